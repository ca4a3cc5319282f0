"""`--set a.b=value` overrides applied to the raw spec mapping before validation."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from ember.errors import UserError


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"--set {text!r}: expected dotted.path=value, e.g. --set engine.zero_stage=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value  # not YAML: keep the literal string
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"--set {text!r}: {where} is a value, not a section; set {where}=... instead")
            node = child
        node[parts[-1]] = value
    return result
