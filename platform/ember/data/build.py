"""Corpus -> WebDataset shards (the shared shard-set writer), URL expansion, and the check that a job's shards
exist before it starts. Image shards: build_images.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webdataset import TarWriter

from ember.data.tokenizer import TOKENIZER_FILE, train_byte_level_bpe
from ember.errors import InternalError, UserError
from ember.spec.data import DataSpec, ImageBuildSpec, TextBuildSpec
from ember.spec.paths import expand_urls, local_path  # noqa: F401 (re-exported: the readers use them)
from ember.spec.paths import missing_local_shards as missing_shard_fields

log = logging.getLogger(__name__)

SKIPPED_FOLDERS = frozenset({"site-packages", "test", "tests", "idlelib"})
MANIFEST_NAME = "shards.json"
VAL_PIECE_BYTES = 4096  # held-out files are cut into pieces of at most this: any prefix of the val shard samples many
VAL_PIECES_PER_FILE = 8  # and no file gives more than 32 KB of them


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    path: Path
    size: int


def build_text_shards(
    out: Path,
    source: str = "stdlib",
    train_shards: int = 8,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    tokenizer: str = "bytes",
    vocab_size: int = 4096,
) -> dict[str, Any]:
    """Write `train_shards` train tars, `val-000000.tar` and `shards.json` into `out`; return the manifest.
    tokenizer "bpe": also a byte-level BPE of `vocab_size` tokens trained on the train split alone,
    as `out`/tokenizer.json (the shards keep the text; the stream tokenizes it)."""
    files = collect_source_files(source, max_bytes)
    train, val = split_train_val(files, val_fraction)
    groups = deal_by_bytes(spread_order(train), train_shards)
    shards = [(f"train-{i:06d}.tar", (text_sample(f) for f in group)) for i, group in enumerate(groups)]
    shards.append(("val-000000.tar", val_pieces(val)))
    facts = {"kind": "text", "source": source, "val_piece_bytes": VAL_PIECE_BYTES,
             "val_pieces_per_file": VAL_PIECES_PER_FILE}
    extra: dict[str, bytes] = {}
    if tokenizer == "bpe":
        trained = train_byte_level_bpe((f.path.read_bytes().decode("utf-8", "replace") for f in train), vocab_size)
        extra[TOKENIZER_FILE] = trained.to_str().encode()
        facts |= {"tokenizer": TOKENIZER_FILE, "vocab_size": trained.get_vocab_size()}
    elif tokenizer != "bytes":
        raise UserError(f"--tokenizer {tokenizer}: choose bytes or bpe")
    manifest = write_shard_set(Path(out), shards, facts, extra)
    log.info("wrote %d train + 1 val shards (%d files) to %s", train_shards, len(files), out)
    return manifest


def write_shard_set(
    out: Path,
    shards: list[tuple[str, Iterable[dict[str, Any]]]],
    facts: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Write each (name, samples) as a tar plus `shards.json` (facts + per-shard entries) into a staging
    folder beside `out`, then publish it: readers never see a half-written shard set. `extra_files` (a
    tokenizer) are published with it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private, and it becomes `out` itself
    try:
        entries = [write_shard(staging / name, samples) for name, samples in shards]
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        manifest = {**facts, "shards": entries, "created_by": "ember"}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def collect_source_files(source: str, max_bytes: int | None = None) -> list[SourceFile]:
    """The corpus files in sorted path order; with `max_bytes`, the longest prefix that fits in it."""
    if source != "stdlib":
        raise UserError(f"unknown text source {source!r}; the only one is 'stdlib'")
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for relpath in sorted(stdlib_sources(root)):
        path = root / relpath
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            break
        files.append(SourceFile(relpath, path, size))
        total += size
    return files


def stdlib_sources(root: Path) -> list[str]:
    """Relative posix paths of the `.py` files under root, pruning skipped folders (site-packages is huge)."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_FOLDERS]
        relative = Path(folder).relative_to(root)
        found += [(relative / name).as_posix() for name in names if name.endswith(".py")]
    return [relpath for relpath in found if (root / relpath).is_file()]


def is_validation(relpath: str, val_fraction: float) -> bool:
    """A stable split: it depends on the path alone, not on which other files exist."""
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


def split_train_val(files: list[SourceFile], val_fraction: float) -> tuple[list[SourceFile], list[SourceFile]]:
    val = [f for f in files if is_validation(f.relpath, val_fraction)]
    train = [f for f in files if not is_validation(f.relpath, val_fraction)]
    return train, val


def spread_order(files: list[SourceFile]) -> list[SourceFile]:
    """The files ordered by a hash of their path, so that every stretch of a shard, its start included, holds
    modules from the whole corpus. In path order a run shorter than an epoch trained on the alphabetically
    first packages alone (300 quickstart steps read ~10 % of each shard), and an evaluation, which reads the
    val shard's first rows, scored the alphabetically first held-out files alone. Stable: a file's place
    depends on its path alone."""
    return sorted(files, key=lambda f: hash_order(f.relpath))


def hash_order(key: str) -> bytes:
    """A sort key that scatters names evenly and never changes."""
    return hashlib.sha256(f"ember-order:{key}".encode()).digest()


def val_pieces(
    files: list[SourceFile], size: int = VAL_PIECE_BYTES, per_file: int = VAL_PIECES_PER_FILE
) -> list[dict[str, Any]]:
    """The held-out files cut at line ends into pieces of at most `size` bytes (a longer line is cut where it
    reaches it), at most `per_file` pieces of each file (those first in hash order), all pieces in the order
    of a hash of their key. An evaluation scores the val shard's first eval_batches x micro_batch rows (64 KB
    in the quickstart). With whole files those rows were one to three modules and their loss was off the
    whole split's by up to 0.17 nats/byte (bench/RESULTS.md); uncapped, one generated file
    (pydoc_data/topics.py, 700 KB of help text) was 59 % of the stdlib's held-out bytes. Each piece is a
    document (it ends with the separator), like a training file."""
    pieces = []
    for file in files:
        data, start, cut = file.path.read_bytes(), 0, []
        while start < len(data):
            end = min(start + size, len(data))
            if end < len(data):
                end = data.rfind(b"\n", start, end) + 1 or end
            cut.append({"__key__": f"{sample_key(file.relpath)}-p{len(cut):05d}", "txt": data[start:end]})
            start = end
        pieces += sorted(cut, key=lambda piece: hash_order(piece["__key__"]))[:per_file]
    return sorted(pieces, key=lambda piece: hash_order(piece["__key__"]))


def deal_by_bytes(files: list[SourceFile], shards: int) -> list[list[SourceFile]]:
    """Give each file, in the order given, to the shard holding the fewest bytes so far (lowest index on ties)."""
    if len(files) < shards:
        raise UserError(f"only {len(files)} training files for {shards} shards; lower train_shards or max_bytes")
    groups: list[list[SourceFile]] = [[] for _ in range(shards)]
    sizes = [0] * shards
    for file in files:
        target = min(range(shards), key=lambda i: (sizes[i], i))
        groups[target].append(file)
        sizes[target] += file.size
    return groups


def sample_key(relpath: str) -> str:
    """A WebDataset key: no dots (the key ends at the first one) and no slashes."""
    return relpath.replace(".", "_").replace("/", "--")


def text_sample(file: SourceFile) -> dict[str, Any]:
    return {"__key__": sample_key(file.relpath), "txt": file.path.read_bytes()}


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write one tar of WebDataset samples; fixed owner and mtime so equal inputs give equal bytes."""
    keys: set[str] = set()
    with (
        open(path, "wb") as stream,
        TarWriter(stream, user="ember", group="ember", mtime=0, encoder=False) as tar,
    ):
        for sample in samples:
            if sample["__key__"] in keys:
                raise InternalError(f"sample key {sample['__key__']!r} occurs twice in {path.name}")
            keys.add(sample["__key__"])
            tar.write(sample)
    data = path.read_bytes()
    return {
        "name": path.name,
        "samples": len(keys),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def publish(staging: Path, out: Path) -> None:
    """Move a finished shard set into place: one folder rename when possible, else file by file with the
    manifest last, so `shards.json` only ever describes complete shards."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.replace(staging, out)
        return
    except OSError:
        out.mkdir(parents=True, exist_ok=True)
    for item in sorted(staging.iterdir(), key=lambda p: (p.name == MANIFEST_NAME, p.name)):
        os.replace(item, out / item.name)


def missing_local_shards(data_spec: DataSpec) -> list[str]:
    return [url for _field, url in missing_shard_fields(data_spec)]


def build_from_spec(build: TextBuildSpec | ImageBuildSpec) -> None:
    if isinstance(build, TextBuildSpec):
        build_text_shards(
            Path(build.out), build.source, build.train_shards, build.val_fraction,
            tokenizer=build.tokenizer, vocab_size=build.vocab_size,
        )
        return
    # Imported here: the image builder is written on top of this module's shard-set writer.
    from ember.data.build_images import build_image_shards

    build_image_shards(Path(build.out), build.source, build.shard_size, build.image_size, build.val_fraction)


def ensure_shards(data_spec: DataSpec) -> None:
    """Build missing shards when the spec says how; then raise once, listing every shard still missing."""
    if data_spec.build is not None and missing_local_shards(data_spec):
        fill_missing_shards(data_spec.build)
    if isinstance(data_spec.build, TextBuildSpec):
        warn_if_old_text_layout(Path(data_spec.build.out))
    missing = missing_local_shards(data_spec)
    if missing:
        listing = "\n  ".join(missing)
        raise UserError(
            f"{len(missing)} shard file(s) missing:\n  {listing}\n"
            "Build them with `ember data build text --source stdlib --out DIR` or `ember data build images "
            "--source digits --out DIR` (or add a data.build section so `ember run` builds them), or fix "
            "data.train.urls / data.sources / data.val.urls."
        )


def warn_if_old_text_layout(out: Path) -> None:
    """Text shards from an ember before the hash order and held-out pieces (2026-12-06) are kept (a saved
    data cursor may point into them) but said to be stale: their shards start with the alphabetically first
    modules and an evaluation scores one or two held-out files."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return
    if manifest.get("kind") != "text" or manifest.get("created_by") != "ember" or "val_pieces_per_file" in manifest:
        return
    log.warning("%s was built by an older ember: its shards are in path order and its held-out files whole, so a "
                "short run trains on the alphabetically first modules and evaluates only a few files. Move it away "
                "(and start a new run) to build the current layout.", out)


def fill_missing_shards(build: TextBuildSpec | ImageBuildSpec) -> None:
    """Build an absent shard set; to a set that is partly there, add only the missing shards, and only when a
    fresh build reproduces every shard that is there byte for byte. Otherwise refuse: a data cursor saved on
    those shards points into them, and the corpus can change under the same spec (the stdlib text differs
    between Python versions), so replacing them would resume runs silently on other data."""
    out = Path(build.out)
    present = sorted(out.glob("*.tar")) if out.is_dir() else []
    if not present:
        build_from_spec(build)
        return
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".rebuild", dir=out.parent))
    try:
        fresh = scratch / out.name
        build_from_spec(build.model_copy(update={"out": str(fresh)}))
        changed = [shard.name for shard in present if not same_file(shard, fresh / shard.name)]
        if changed:
            raise UserError(
                f"{out}: shards are missing, and building them again would not reproduce {', '.join(changed)} "
                "byte for byte (the corpus changed - another Python version for stdlib text - or a shard was "
                "edited). ember does not replace shards a saved data cursor may point into: restore the missing "
                f"shards, or move {out} away to build a new set and start a new run."
            )
        for shard in sorted(fresh.glob("*.tar")):
            if not (out / shard.name).exists():
                os.replace(shard, out / shard.name)
        os.replace(fresh / MANIFEST_NAME, out / MANIFEST_NAME)  # last: it describes only shards that are there
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def same_file(path: Path, other: Path) -> bool:
    if not other.is_file() or path.stat().st_size != other.stat().st_size:
        return False
    with open(path, "rb") as first, open(other, "rb") as second:
        return hashlib.file_digest(first, "sha256").digest() == hashlib.file_digest(second, "sha256").digest()
