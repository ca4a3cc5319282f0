"""pydantic's validation errors in the user's words: the full dotted field as written in the YAML, the allowed
values of a choice, and the nearest known field for a misspelt key."""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from ember.spec.base import UNKNOWN_TAG, tag_of


def format_validation_error(err: ValidationError, root: type[BaseModel], source: str) -> str:
    count = err.error_count()
    lines = [f"{source}: invalid job spec ({count} problem{'s' * (count > 1)}):"]
    for item in err.errors():
        field, message = describe_error(item, root)
        lines.append(f"  {field}: {message}" if field else f"  {message}")
    return "\n".join(lines)


def describe_error(item: dict[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    """(dotted field, message) of one pydantic error."""
    loc = tuple(item["loc"])
    if item["type"] == "extra_forbidden":
        where, sections = walk(loc[:-1], root)
        key = str(loc[-1])
        known = sorted({name for section in sections for name in section.model_fields})
        return join(where, key), "unknown field" + did_you_mean(key, known) + " (`ember schema` lists every field)"
    where, _ = walk(loc, root)
    if item["type"] == UNKNOWN_TAG:
        tag, _, choices = item["msg"].partition(": ")
        allowed = choices.split(", ")
        value = item["input"].get(tag) if isinstance(item["input"], dict) else item["input"]
        message = f"{value!r} is not one of: {', '.join(allowed)}"
        return join(where, tag), message + (did_you_mean(value, allowed) if isinstance(value, str) else "")
    if item["type"] == "missing":
        return where, "required field is missing"
    return where, item["msg"].removeprefix("Value error, ")


def walk(loc: tuple, root: type[BaseModel]) -> tuple[str, list[type[BaseModel]]]:
    """The dotted field a pydantic location names, without the union tags pydantic inserts
    (engine.deepspeed.zero_stage -> engine.zero_stage), and the sections that can sit there."""
    where, sections = "", [root]
    for part in loc:
        if isinstance(part, int):
            where = join(where, str(part))  # a list item: data.sources.0.weight
            continue
        owners = [section for section in sections if part in section.model_fields]
        tagged = [section for section in sections if part in (tag_of(section, "kind"), tag_of(section, "family"))]
        if tagged and not owners:
            sections = tagged  # a union's tag, not a field the user writes
            continue
        where = join(where, str(part))
        sections = [inner for section in owners for inner in sections_in(section.model_fields[part].annotation)]
    return where, sections


def sections_in(annotation: Any) -> list[type[BaseModel]]:
    """Every spec section a field can hold, through Optional, unions, lists and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [section for arg in get_args(annotation) for section in sections_in(arg)]


def did_you_mean(word: str, known: list[str]) -> str:
    nearest = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean {nearest[0]}?" if nearest else ""


def join(where: str, part: str) -> str:
    return f"{where}.{part}" if where else part
