"""`ember data inspect`: what a shard folder holds (from its shards.json and a look at its first samples), and a
PNG grid of its first images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ember.data.build import MANIFEST_NAME
from ember.data.formats import UndecodableSample, decode_png
from ember.data.reader import SampleCounter, iter_shard_samples, open_url
from ember.errors import UserError

GRID_TILE = 32  # pixels per image in a grid; smaller images are scaled up (nearest) to stay legible


@dataclass(frozen=True)
class FirstSample:
    key: str
    members: dict[str, bytes]


def read_index(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST_NAME}; build shards with `ember data build text|images --out DIR`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); rebuild the shards") from None


def first_samples(folder: Path, index: dict[str, Any], count: int) -> list[FirstSample]:
    """The first `count` samples of the listed shards, in index order."""
    found: list[FirstSample] = []
    for shard in index["shards"]:
        if len(found) >= count or not (Path(folder) / shard["name"]).is_file():
            continue
        with open_url(str(Path(folder) / shard["name"])) as stream:
            samples = iter_shard_samples(stream, SampleCounter(0))
            found += [FirstSample(key, members) for _, key, members, _ in islice(samples, count - len(found))]
    return found


def shard_status(folder: Path, shard: dict[str, Any]) -> str:
    path = Path(folder) / shard["name"]
    if not path.is_file():
        return "MISSING"
    return "ok" if path.stat().st_size == shard["bytes"] else f"SIZE {path.stat().st_size} != {shard['bytes']}"


def describe(folder: Path, keys: int = 5) -> list[str]:
    """Lines for `ember data inspect`: the set, each shard (samples, size, status) and the first keys."""
    index = read_index(folder)
    shards = index["shards"]
    kind = index.get("kind", "text")
    shape = f", {index['image_size']}x{index['image_size']}x{index['channels']}" if kind == "images" else ""
    total = sum(s["samples"] for s in shards)
    lines = [
        f"{folder}: {kind} from {index.get('source', '?')}{shape}; {len(shards)} shards, {total} samples, "
        f"{human_bytes(sum(s['bytes'] for s in shards))}"
    ]
    lines += [
        f"  {s['name']:<18} {s['samples']:>7} samples {human_bytes(s['bytes']):>9}  {shard_status(folder, s)}"
        for s in shards
    ]
    lines.append("first samples:")
    lines += [f"  {sample.key}  {describe_members(sample.members)}" for sample in first_samples(folder, index, keys)]
    return lines


def describe_members(members: dict[str, bytes]) -> str:
    parts = [f"{suffix} {len(data)} B" for suffix, data in sorted(members.items())]
    if "cls" in members:
        parts.append(f"label {members['cls'].decode(errors='replace')}")
    return ", ".join(parts)


def human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def write_grid(folder: Path, out: Path, count: int = 64, columns: int = 8) -> int:
    """Write the first `count` images of the shard set as one PNG grid; return how many it holds."""
    index = read_index(folder)
    if index.get("kind") != "images":
        raise UserError(f"{folder}: holds {index.get('kind', 'text')} shards; --grid needs image shards")
    images = []
    for sample in first_samples(folder, index, count):
        try:
            images.append(decode_png(sample.members))
        except UndecodableSample as exc:
            raise UserError(f"{folder}: sample {sample.key!r}: {exc}") from None
    Image.fromarray(tile(images, columns)).save(out)
    return len(images)


def tile(images: list[np.ndarray], columns: int) -> np.ndarray:
    """uint8 [C, H, W] images -> one [rows*T, cols*T(, 3)] picture, with a 1-pixel gap between tiles."""
    channels, height, width = images[0].shape
    scale = max(1, GRID_TILE // max(height, width))
    rows = -(-len(images) // columns)
    step_y, step_x = height * scale + 1, width * scale + 1
    grid = np.zeros((channels, rows * step_y - 1, min(columns, len(images)) * step_x - 1), dtype=np.uint8)
    for i, image in enumerate(images):
        y, x = (i // columns) * step_y, (i % columns) * step_x
        grid[:, y : y + height * scale, x : x + width * scale] = image.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid[0] if channels == 1 else grid.transpose(1, 2, 0)
