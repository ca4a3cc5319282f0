"""Data section: where the WebDataset shards are (one list, or weighted sources), how to build them if missing,
how samples are decoded, and the stream's seed, slots and DataLoader workers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ember.spec.base import Section, tagged_union


class ShardSet(Section):
    urls: str | list[str] = Field(
        description="Shard URLs: paths (relative to the spec file), brace patterns, file://, http(s)://, s3://, gs://."
    )

    @field_validator("urls")
    @classmethod
    def _some_shards(cls, urls: str | list[str]) -> str | list[str]:
        patterns = [urls] if isinstance(urls, str) else urls
        if not patterns or not all(pattern.strip() for pattern in patterns):
            raise ValueError("give at least one shard path or pattern, e.g. shards/train-{000000..000007}.tar")
        return urls


class SourceSpec(ShardSet):
    weight: float = Field(1.0, gt=0, description="Share of the training rows drawn from this source.")


class TextBuildSpec(Section):
    kind: Literal["text"] = Field("text", description="Build byte-level text shards.")
    source: Literal["stdlib"] = Field("stdlib", description="Corpus: the Python standard library's own source.")
    out: str = Field(description="Folder to write the shards into (relative to the spec file).")
    train_shards: int = Field(8, ge=1, description="Number of training shards to write.")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Fraction of files held out for validation.")
    tokenizer: Literal["bytes", "bpe"] = Field(
        "bytes", description="bpe: also train a byte-level BPE on the train split, written as out/tokenizer.json."
    )
    vocab_size: int = Field(4096, ge=257, description="tokenizer: bpe: tokens in the vocabulary (>= 257).")


class ImageBuildSpec(Section):
    kind: Literal["images"] = Field(description="Build PNG image shards.")
    source: Literal["digits", "sample-images"] = Field(
        description="digits: scikit-learn's 8x8 digits with labels; sample-images: patches of its two photos."
    )
    out: str = Field(description="Folder to write the shards into (relative to the spec file).")
    shard_size: int = Field(256, ge=1, description="Samples per training shard.")
    image_size: Literal[8, 16, 32] = Field(8, description="Side of the square images, in pixels.")
    val_fraction: float = Field(
        0.165, gt=0, lt=1, description="Fraction held out for validation (0.165: 297 of the 1797 digits)."
    )


# A build section without `kind` builds text, as before images existed.
BuildSpec = tagged_union("kind", "text", TextBuildSpec, ImageBuildSpec)


class ImageTokensSpec(Section):
    levels: int = Field(17, ge=2, le=256, description="Grey levels an image is quantised to (digits have 17).")
    num_classes: int = Field(10, ge=1, description="Class tokens after the grey levels; one more means 'no class'.")

    @property
    def vocab_size(self) -> int:
        return self.levels + self.num_classes + 1


class DataSpec(Section):
    train: ShardSet | None = Field(None, description="Training shards (or give `sources` instead).")
    sources: list[SourceSpec] | None = Field(
        None, min_length=1, description="Training shards mixed from several sources by weight (instead of `train`)."
    )
    val: ShardSet | None = Field(None, description="Held-out shards for evaluation.")
    build: BuildSpec | None = Field(None, description="How `ember run` builds the shards when they are missing.")
    decode: Literal["text", "image", "image_tokens"] = Field(
        "text",
        description="text: packed byte tokens; image: float images in [-1, 1] and labels; "
        "image_tokens: a class token then one token per grey level (a GPT over images).",
    )
    tokenizer: str = Field(
        "bytes",
        description="decode: text: `bytes` (tokens 0..255), or a Hugging Face tokenizer.json (e.g. the BPE that "
        "`ember data build text --tokenizer bpe` writes beside the shards); relative to the spec file.",
    )
    image_tokens: ImageTokensSpec = Field(
        default_factory=ImageTokensSpec, description="Palette and classes of the image_tokens decode."
    )
    seed: int = Field(0, description="Seed of the shard order (per epoch) and of the mixing of sources.")
    num_slots: int = Field(
        8, ge=1, description="Canonical stream slots; the order of samples depends on these, not on the world size."
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes per rank; each reads a fixed part of the rank's slots."
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A corrupt shard or sample: stop, or count and skip."
    )
    shuffle_buffer: int = Field(
        0, ge=0, description="Rows each slot reads ahead and yields in a seeded random order (0: tar order). "
        "A resume re-reads at most this many rows per slot, and lands on exactly the same row.",
    )

    @model_validator(mode="after")
    def _one_training_set(self) -> DataSpec:
        if (self.train is None) == (self.sources is None):
            raise ValueError("give exactly one of data.train (one shard list) and data.sources (weighted lists)")
        return self

    def train_sets(self) -> list[SourceSpec]:
        """The training shard lists with their weights (one of weight 1 for `train`)."""
        return self.sources if self.sources is not None else [SourceSpec(urls=self.train.urls)]
