"""What a data cursor pins of its shards, so that a resume on other data is refused instead of read silently.

A shard is pinned by its URL and size, and by the best fingerprint at hand:
- the sha256 that `shards.json` beside it records (ember's builders write one) - for a local file only when its
  size matches and it is not newer than the manifest (written last), as a manifest left beside edited or
  replaced files would vouch for old bytes;
- else what the store reports to change with the content: a local file's mtime, an HTTP ETag or Last-Modified,
  an object store's ETag or modification time.
A shard pinned by sha256 must have the same size and sha256 now (the content is the identity: a shard set
moved to another folder or server still resumes); otherwise every field pinned on both sides must match.
Copies must keep their mtimes (`cp -a`, `rsync -t`): a shard newer than its shards.json, or without one, is
pinned by its mtime (`touch shards.json` after copying vouches for the copies again). Reading every shard
to hash it would cost an epoch's I/O; the builders hash once, as they write.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import fsspec

from ember.data.build import MANIFEST_NAME, local_path
from ember.data.remote import TRANSIENT_ERRORS, http_head, open_remote
from ember.errors import UserError

log = logging.getLogger(__name__)

ShardIdentity = dict[str, Any]
# Header or info fields that change with an object's content, by store: HTTP, S3, GCS, fsspec's local/memory.
CHANGE_MARKERS = ("ETag", "Last-Modified", "LastModified", "etag", "md5Hash", "generation", "mtime", "created")


@dataclass(frozen=True)
class Manifest:
    """A folder's shards.json: its entries by shard name, and when it was written (local folders only)."""

    entries: dict[str, dict[str, Any]]
    written_ns: int | None = None

    def vouches_for(self, name: str, stat: os.stat_result | None) -> dict[str, Any] | None:
        """The entry of a shard it describes; for a local file, only if its size matches and it was not written
        after the manifest (ember writes the manifest last): an edited or replaced file is not vouched for."""
        entry = self.entries.get(name)
        if not entry or not entry.get("sha256"):
            return None
        if stat is None:
            return entry
        if entry.get("bytes") != stat.st_size or self.written_ns is None or stat.st_mtime_ns > self.written_ns:
            return None
        return entry


def shard_identities(urls: tuple[str, ...]) -> list[ShardIdentity]:
    """The identity of each shard of one list, reading each folder's shards.json once."""
    manifests: dict[str, Manifest] = {}
    return [shard_identity(url, manifests) for url in urls]


def shard_identity(url: str, manifests: dict[str, Manifest]) -> ShardIdentity:
    if url.startswith("pipe:"):
        return {"url": url}  # a command's output has no identity to check
    folder, _, name = url.rpartition("/")
    if folder not in manifests:
        manifests[folder] = read_manifest(folder)
    try:
        return identity_from(url, name, manifests[folder])
    except (*TRANSIENT_ERRORS, ValueError) as exc:  # a missing shard: the read reports it, with on_error
        log.debug("no identity for %s: %s", url, exc)
        return {"url": url}


def identity_from(url: str, name: str, manifest: Manifest) -> ShardIdentity:
    path = local_path(url)
    if path is not None:
        stat = path.stat()
        entry = manifest.vouches_for(name, stat)
        if entry is not None:
            return {"url": url, "size": stat.st_size, "sha256": entry["sha256"]}
        return {"url": url, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    entry = manifest.vouches_for(name, None)
    if entry is not None:
        return {"url": url, "size": entry.get("bytes"), "sha256": entry["sha256"]}
    info = http_head(url) if url.startswith(("http://", "https://")) else fsspec_info(url)
    size = info.get("Content-Length", info.get("size"))
    markers = {key: str(info[key]) for key in CHANGE_MARKERS if info.get(key) is not None}
    return {"url": url, "size": None if size is None else int(size), **markers}


def fsspec_info(url: str) -> dict[str, Any]:
    filesystem, path = fsspec.core.url_to_fs(url)
    return filesystem.info(path)


def read_manifest(folder: str) -> Manifest:
    """A folder's shards.json; empty when it has none (or it cannot be read)."""
    url = f"{folder}/{MANIFEST_NAME}" if folder else MANIFEST_NAME
    try:
        path = local_path(url)
        if path is not None:
            if not path.is_file():
                return Manifest({})
            written_ns, text = path.stat().st_mtime_ns, path.read_text()
        else:
            with open_remote(url) as stream:
                written_ns, text = None, stream.read().decode()
        shards = json.loads(text).get("shards", [])
        entries = {entry["name"]: entry for entry in shards if isinstance(entry, dict) and "name" in entry}
        return Manifest(entries, written_ns)
    except (*TRANSIENT_ERRORS, ValueError, AttributeError, UnicodeDecodeError):
        return Manifest({})


def differences(saved: ShardIdentity, current: ShardIdentity) -> list[str]:
    """How a shard differs from the one a cursor pinned; empty when it is the same shard. A shard that cannot
    be looked up now is left to the read, which reports it (or skips it under on_error=skip)."""
    if len(current) == 1 or len(saved) == 1:  # the URL alone: nothing was known on one side
        return []
    if saved.get("sha256"):  # its content was pinned: only the same content will do
        keys = ["size", "sha256"]
    else:
        keys = [key for key in saved if key in current]
    return [
        f"{key} {saved.get(key, 'unknown')} then, {current.get(key, 'unknown')} now"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def check_shard_identities(
    saved: list[list[ShardIdentity]] | None, current: list[list[ShardIdentity]], labels: list[str]
) -> None:
    """Refuse to resume on shards other than the ones the cursor was saved on, naming the first that changed."""
    if saved is None:
        log.warning(
            "the saved data cursor does not pin its shards (it predates shard identities); resuming without "
            "checking that the shards are the ones it was saved on"
        )
        return
    for label, saved_list, current_list in zip(labels, saved, current, strict=True):
        for index, (then, now) in enumerate(zip(saved_list, current_list, strict=True)):
            changed = differences(then, now)
            if changed:
                raise UserError(
                    f"{now['url']} (shard {index} of {label}) is not the shard the data cursor was saved on: "
                    f"{'; '.join(changed)}. Restore the shards the run started with, or start a new run "
                    "(checkpoint.resume: never); resuming would read other data than the cursor names. (Unchanged "
                    "copies that lost their mtimes: `touch shards.json` beside them.)"
                )

