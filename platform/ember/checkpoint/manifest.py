"""manifest.json: the commit record of a checkpoint (every file with size and sha256, plus run facts)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (the directory entry makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """fsync every file in `folder`, then write the manifest describing them (written last, fsynced)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": FORMAT_VERSION, "created": time.time(), **facts, "files": files}
    target = folder / MANIFEST
    target.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync_path(target)
    for sub in {p.parent for p in folder.rglob("*")} | {folder}:
        fsync_path(sub)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify_manifest(folder: Path, checksums: bool = True) -> list[str]:
    """Problems found in a committed checkpoint; an empty list means it verifies."""
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder / MANIFEST}: missing or unreadable"]
    problems = []
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path}: size {path.stat().st_size} != {expected['size']}")
        elif checksums and file_sha256(path) != expected["sha256"]:
            problems.append(f"{path}: checksum mismatch")
    return problems
