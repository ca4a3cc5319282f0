"""Data section: where the WebDataset shards are, how to build them if missing, and the stream's seed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ember.spec.base import Section


class ShardSet(Section):
    urls: str | list[str] = Field(
        description="Shard URLs: paths (relative to the spec file), brace patterns, file://, http(s)://, s3://, gs://."
    )


class TextBuildSpec(Section):
    kind: Literal["text"] = Field("text", description="Build byte-level text shards.")
    source: Literal["stdlib"] = Field("stdlib", description="Corpus: the Python standard library's own source.")
    out: str = Field(description="Folder to write the shards into (relative to the spec file).")
    train_shards: int = Field(8, ge=1, description="Number of training shards to write.")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Fraction of files held out for validation.")


class DataSpec(Section):
    train: ShardSet = Field(description="Training shards.")
    val: ShardSet | None = Field(None, description="Held-out shards for evaluation.")
    build: TextBuildSpec | None = Field(None, description="How `ember run` builds the shards when they are missing.")
    seed: int = Field(0, description="Seed of the shard order (per epoch).")
    num_slots: int = Field(
        8, ge=1, description="Canonical stream slots; the order of samples depends on these, not on the world size."
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A corrupt shard or sample: stop, or count and skip."
    )
