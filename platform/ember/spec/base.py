"""Shared base for every spec section: unknown keys are errors, not silently ignored."""

from __future__ import annotations

import functools
import operator
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Tag

UNKNOWN_TAG = "unknown_tag"  # a tagged union's unknown choice; its message is "field: allowed, values"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True)


def tag_of(section: type[BaseModel], field: str) -> str | None:
    """The Literal value a union member's tag field holds (`kind: Literal["ddp"]` -> "ddp")."""
    info = section.model_fields.get(field)
    values = get_args(info.annotation) if info is not None else ()
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


def tagged_union(field: str, default: str, *members: type[Section]) -> Any:
    """A union picked by `field` (`engine.kind`, `model.family`); a section without it is `default`. An unknown
    value is one error naming the field and its allowed values, not pydantic's wording of the picker."""
    tags = [tag_of(member, field) for member in members]

    def pick(raw: Any) -> str | None:
        value = raw.get(field, default) if isinstance(raw, dict) else getattr(raw, field, default)
        return value if value in tags else None

    choices = tuple(Annotated[member, Tag(tag)] for member, tag in zip(members, tags, strict=True))
    return Annotated[
        functools.reduce(operator.or_, choices),
        # The field and its choices ride in the message: a context dict would make the type unhashable.
        Discriminator(pick, custom_error_type=UNKNOWN_TAG, custom_error_message=f"{field}: {', '.join(tags)}"),
    ]

