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


def describe_file(folder: Path, path: Path) -> tuple[str, dict[str, Any]]:
    """fsync one file and describe it as the manifest does: (name relative to folder, size and sha256)."""
    fsync_path(path)
    return str(path.relative_to(folder)), {"size": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(folder: Path, facts: dict[str, Any], files: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest (last, fsynced) describing `files`; without them, fsync and describe every file
    in `folder` (a checkpoint one process wrote alone)."""
    if files is None:
        described = [describe_file(folder, p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
        files = dict(described)
    manifest = {"format": FORMAT_VERSION, "created": time.time(), **facts, "files": files}
    target = folder / MANIFEST
    target.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync_path(target)
    for sub in {p.parent for p in folder.rglob("*")} | {folder}:
        fsync_path(sub)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest as a dict; None when it is missing, unreadable or not a JSON object."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_manifest(folder: Path, checksums: bool = True) -> list[str]:
    """Problems found in a committed checkpoint; an empty list means it verifies."""
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder / MANIFEST}: missing, unreadable or not a JSON object"]
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{folder / MANIFEST}: lists no files (a manifest is written only after every file)"]
    problems = []
    for name, expected in files.items():
        problem = file_problem(folder / name, expected, checksums)
        if problem:
            problems.append(f"{folder / name}: {problem}")
    return problems


def file_problem(path: Path, expected: Any, checksums: bool) -> str | None:
    if not isinstance(expected, dict) or not {"size", "sha256"} <= expected.keys():
        return "its manifest entry has no size and sha256"
    if not path.is_file():
        return "missing"
    if path.stat().st_size != expected["size"]:
        return f"size {path.stat().st_size} != {expected['size']}"
    if checksums and file_sha256(path) != expected["sha256"]:
        return "checksum mismatch"
    return None
