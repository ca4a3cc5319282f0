"""Input paths in a spec are relative to the spec file's folder; outputs are relative to where you run."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")


def resolve_path(value: str, base: Path) -> str:
    if _URL.match(value) or Path(value).is_absolute():
        return value
    return str(base / value)


def resolve_input_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    model = result.get("model")
    if isinstance(model, dict) and isinstance(model.get("init_from"), str):
        model["init_from"] = resolve_path(model["init_from"], base)
    data = result.get("data")
    if not isinstance(data, dict):
        return result
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    for shard_set in [data.get("train"), data.get("val"), *sources]:
        if isinstance(shard_set, dict):
            urls = shard_set.get("urls")
            if isinstance(urls, str):
                shard_set["urls"] = resolve_path(urls, base)
            elif isinstance(urls, list):
                shard_set["urls"] = [resolve_path(u, base) if isinstance(u, str) else u for u in urls]
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, str) and tokenizer != "bytes":
        data["tokenizer"] = resolve_path(tokenizer, base)
    build = data.get("build")
    if isinstance(build, dict) and isinstance(build.get("out"), str):
        build["out"] = resolve_path(build["out"], base)
    return result
