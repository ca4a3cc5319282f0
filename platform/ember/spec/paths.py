"""Input paths in a spec are relative to the spec file's folder; outputs are relative to where you run.
Which inputs are local files, and which of those are missing, is decided here too."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from ember.spec.data import DataSpec

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")
# A scheme of two letters or more, so that a Windows drive letter is not mistaken for one.
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")


def is_url(value: str) -> bool:
    """http(s)://, s3://, pipe:... anything but a plain path or file://."""
    return bool(_URL.match(value)) and not value.startswith("file://")


def is_under(path: str, folders: list[str]) -> bool:
    """Whether `path` (a plain path or file:// URL, maybe a brace pattern) lies in one of `folders`."""
    plain = Path(os.path.normpath(path.removeprefix("file://")))
    return any(plain.is_relative_to(os.path.normpath(folder)) for folder in folders)


def resolve_path(value: str, base: Path) -> str:
    if not value.strip() or _URL.match(value) or Path(value).is_absolute():
        return value  # an empty path stays empty, for validation to name it
    return str(base / value)


def resolve_input_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    model = result.get("model")
    if isinstance(model, dict) and isinstance(model.get("init_from"), str):
        model["init_from"] = resolve_path(model["init_from"], base)
    if isinstance(result.get("data"), dict):
        _resolve_data_paths(result["data"], base)
    checkpoint = result.get("checkpoint")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("resume"), str) and "/" in checkpoint["resume"]:
        checkpoint["resume"] = resolve_path(checkpoint["resume"], base)
    return result


def _resolve_data_paths(data: dict[str, Any], base: Path) -> None:
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


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expand each pattern (`train-{000000..000007}.tar`), keeping the given order."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [url for pattern in patterns for url in braceexpand(pattern)]


def local_path(url: str) -> Path | None:
    """The file behind a local path or file:// URL; None for remote URLs (http, s3, pipe:, ...)."""
    match = _SCHEME.match(url)
    if match is None:
        return Path(url)
    if match.group(1).lower() == "file":
        return Path(url[len("file://") :] if url.startswith("file://") else url[len("file:") :])
    return None


def shard_fields(data: DataSpec) -> list[tuple[str, str | list[str]]]:
    """Each shard list with the dotted field that holds it."""
    fields: list[tuple[str, str | list[str]]] = [("data.train.urls", data.train.urls)] if data.train else []
    fields += [(f"data.sources.{i}.urls", source.urls) for i, source in enumerate(data.sources or [])]
    return fields + ([("data.val.urls", data.val.urls)] if data.val else [])


def missing_local_shards(data: DataSpec) -> list[tuple[str, str]]:
    """(field, url) of every local shard file that does not exist; remote URLs are the reader's to check."""
    return [
        (field, url)
        for field, urls in shard_fields(data)
        for url in expand_urls(urls)
        if (path := local_path(url)) is not None and not path.is_file()
    ]
