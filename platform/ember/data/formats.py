"""What a sample's bytes become (decode) and how decoded samples become rows and batches (data.decode).

- `text`: a document's bytes as tokens 0..255 plus a 0 separator, packed back to back into rows of
  `seq_len + 1` tokens; a batch is a `torch.long` tensor [B, seq_len + 1].
- `image`: one PNG (+ optional `cls`) per row; a batch is an `ImageBatch`: float images [B, C, H, W] in
  [-1, 1], long labels [B] (-1 for a sample without a class) and the samples' ids.
- `image_tokens`: DALL-E's idea at toy scale: a grey image quantised to `levels` grey levels is a sequence
  of pixel tokens after one class token, so a GPT learns p(pixels | class); a batch is a `torch.long` tensor
  [B, 1 + H * W]. Tokens 0..levels-1 are grey levels, levels + c is class c, levels + num_classes "no class".
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ember.errors import UserError

SEPARATOR = 0
NO_LABEL = -1


class UndecodableSample(ValueError):
    """A decoder cannot turn this sample into a row (missing member, broken PNG, bad label)."""


class SampleId(NamedTuple):
    """Which sample a row came from: the slot's epoch when it was read, and its WebDataset key."""

    epoch: int
    key: str


class RowFormat(Protocol):
    """How one decode turns samples into rows and rows into a batch, in two steps: `stack` (numpy only, what
    a DataLoader worker sends: arrays pickle far faster than tensors cross processes) and `to_batch`.
    `packs`: rows are fixed-length token runs that cross sample boundaries (text); otherwise each row is
    exactly one sample, handed over as (SampleId, decoded)."""

    packs: ClassVar[bool]

    def decode(self, sample: dict[str, bytes]) -> Any: ...

    def stack(self, rows: list[Any]) -> Any: ...

    def to_batch(self, stacked: Any) -> Any: ...


def collate(rows_format: RowFormat, rows: list[Any]) -> Any:
    return rows_format.to_batch(rows_format.stack(rows))


def decode_text(sample: dict[str, bytes]) -> np.ndarray:
    """A text sample's bytes as tokens 0..255, ended by the document separator."""
    data = sample.get("txt")
    if data is None:
        raise UndecodableSample(f"no .txt member (has {sorted(sample)})")
    tokens = np.empty(len(data) + 1, dtype=np.uint8)
    tokens[:-1] = np.frombuffer(data, dtype=np.uint8)
    tokens[-1] = SEPARATOR
    return tokens


@dataclass(frozen=True)
class TokenizedText:
    """decode for data.tokenizer: a tokenizer file: the document's text tokenized, then the separator (picklable:
    DataLoader workers load the tokenizer from its path)."""

    tokenizer: Any  # ember.data.tokenizer.TextTokenizer

    def __call__(self, sample: dict[str, bytes]) -> np.ndarray:
        data = sample.get("txt")
        if data is None:
            raise UndecodableSample(f"no .txt member (has {sorted(sample)})")
        return self.tokenizer.document(data)


@dataclass(frozen=True)
class TextRows:
    """Packed byte tokens; `decode` is swappable so tests can count decoding work."""

    seq_len: int
    decode_sample: Any = decode_text
    packs: ClassVar[bool] = True

    @property
    def row_length(self) -> int:
        return self.seq_len + 1

    def decode(self, sample: dict[str, bytes]) -> np.ndarray:
        return self.decode_sample(sample)

    def stack(self, rows: list[np.ndarray]) -> np.ndarray:
        return np.stack(rows)

    def to_batch(self, stacked: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stacked).long()


def decode_png(sample: dict[str, bytes]) -> np.ndarray:
    """The sample's PNG as uint8 [C, H, W]: 1 channel for grey images, 3 for anything else."""
    data = sample.get("png")
    if data is None:
        raise UndecodableSample(f"no .png member (has {sorted(sample)})")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            pixels = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UndecodableSample(f"not a readable PNG ({exc})") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()


def decode_label(sample: dict[str, bytes]) -> int:
    """The `cls` member as an int; NO_LABEL (-1) when the sample has none."""
    data = sample.get("cls")
    if data is None:
        return NO_LABEL
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise UndecodableSample(f"cls is not an integer: {data[:20]!r}") from exc


@dataclass
class ImageBatch:
    """A batch of the `image` decode. `ids` trace every row back to its sample."""

    images: torch.Tensor  # float32 [B, C, H, W] in [-1, 1]
    labels: torch.Tensor  # int64 [B]; -1 where a sample has no class
    ids: list[SampleId]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.ids,
        )


@dataclass(frozen=True)
class ImageRows:
    """One image per row; pixels stay uint8 until the batch is built (4x less to pass between processes)."""

    packs: ClassVar[bool] = False

    def decode(self, sample: dict[str, bytes]) -> tuple[np.ndarray, int]:
        return decode_png(sample), decode_label(sample)

    def stack(self, rows: list[tuple[SampleId, tuple[np.ndarray, int]]]) -> tuple[np.ndarray, np.ndarray, list]:
        shapes = {pixels.shape for _, (pixels, _) in rows}
        if len(shapes) > 1:
            raise UserError(
                f"images of different shapes {sorted(shapes)} in one batch (samples {[i.key for i, _ in rows]}); "
                "build every shard set of a job with the same --image-size and colour mode"
            )
        pixels = np.stack([p for _, (p, _) in rows])
        labels = np.array([label for _, (_, label) in rows], dtype=np.int64)
        return pixels, labels, [sample_id for sample_id, _ in rows]

    def to_batch(self, stacked: tuple[np.ndarray, np.ndarray, list[SampleId]]) -> ImageBatch:
        pixels, labels, ids = stacked
        return ImageBatch(torch.from_numpy(pixels).float() / 127.5 - 1.0, torch.from_numpy(labels), ids)


@dataclass(frozen=True)
class ImageTokenRows:
    """A grey image as [class token] + H*W pixel tokens; the row is the model's whole context plus one."""

    seq_len: int
    levels: int = 17
    num_classes: int = 10
    packs: ClassVar[bool] = False

    @property
    def vocab_size(self) -> int:
        return self.levels + self.num_classes + 1

    def decode(self, sample: dict[str, bytes]) -> np.ndarray:
        pixels = decode_png(sample)
        label = decode_label(sample)
        if label >= self.num_classes:
            raise UndecodableSample(f"class {label} >= data.image_tokens.num_classes={self.num_classes}")
        grey = pixels[0] if len(pixels) == 1 else np.asarray(Image.fromarray(pixels.transpose(1, 2, 0)).convert("L"))
        if grey.size != self.seq_len:
            raise UserError(
                f"image tokens of {grey.shape[0]}x{grey.shape[1]} images are {grey.size} pixels after a class "
                f"token, so model.seq_len must be {grey.size} (it is {self.seq_len})"
            )
        first = self.levels + (label if label >= 0 else self.num_classes)
        return np.concatenate([[first], quantise(grey.ravel(), self.levels)]).astype(np.int64)

    def stack(self, rows: list[tuple[SampleId, np.ndarray]]) -> np.ndarray:
        return np.stack([tokens for _, tokens in rows])

    def to_batch(self, stacked: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stacked)


def quantise(grey: np.ndarray, levels: int) -> np.ndarray:
    """uint8 grey values -> tokens 0..levels-1; exact for digits (0..16 stored as round(v * 255 / 16))."""
    return np.rint(grey.astype(np.float64) * (levels - 1) / 255.0).astype(np.int64)


def dequantise(tokens: np.ndarray, levels: int) -> np.ndarray:
    """Pixel tokens back to uint8 grey values (for sample grids of a trained image-token GPT)."""
    return np.rint(np.clip(tokens, 0, levels - 1) * 255.0 / (levels - 1)).astype(np.uint8)
