"""Image shards from scikit-learn's bundled data: the 8x8 digits with their labels, or patches of its two
sample photos. Samples are PNG (+ `cls` for digits), written with webdataset's TarWriter into train shards of
`shard_size` samples and one val shard, byte for byte reproducible, with a shards.json index."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ember.data.build import write_shard_set
from ember.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("digits", "sample-images")
IMAGE_SIZES = (8, 16, 32)
# A photo patch covers this many pixels of the photo before it is resized to the image size.
PATCH_SPAN, PATCH_STRIDE = 64, 16
VAL_FRACTION = 0.165  # 297 of the 1797 digits: the held-out set `ember eval` compares samples with


@dataclass(frozen=True)
class ImageSample:
    key: str
    pixels: np.ndarray  # uint8 [H, W] (grey) or [H, W, 3]
    label: int | None  # None: the sample has no class

    def to_webdataset(self) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": self.key, "png": encode_png(self.pixels)}
        if self.label is not None:
            sample["cls"] = str(self.label).encode()
        return sample


def build_image_shards(
    out: Path,
    source: str = "digits",
    shard_size: int = 256,
    image_size: int = 8,
    val_fraction: float = VAL_FRACTION,
) -> dict[str, Any]:
    """Write train shards of `shard_size` samples, `val-000000.tar` and `shards.json`; return the manifest."""
    check_image_options(source, shard_size, image_size)
    samples = list(image_samples(source, image_size))
    val_keys = held_out_keys(samples, val_fraction)
    train = sorted((s for s in samples if s.key not in val_keys), key=lambda s: key_hash(s.key))
    val = sorted((s for s in samples if s.key in val_keys), key=lambda s: key_hash(s.key))
    groups = [train[start : start + shard_size] for start in range(0, len(train), shard_size)]
    named = [(f"train-{i:06d}.tar", group) for i, group in enumerate(groups)] + [("val-000000.tar", val)]
    shards = [(name, (sample.to_webdataset() for sample in group)) for name, group in named]
    channels = 1 if samples[0].pixels.ndim == 2 else 3
    facts = {"kind": "images", "source": source, "image_size": image_size, "channels": channels}
    manifest = write_shard_set(Path(out), shards, facts)
    log.info("wrote %d train + 1 val image shards (%d samples) to %s", len(groups), len(samples), out)
    return manifest


def check_image_options(source: str, shard_size: int, image_size: int) -> None:
    if source not in IMAGE_SOURCES:
        raise UserError(f"--source {source}: unknown image source; use one of {', '.join(IMAGE_SOURCES)}")
    if image_size not in IMAGE_SIZES:
        raise UserError(f"--image-size {image_size}: use one of {', '.join(map(str, IMAGE_SIZES))}")
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: a shard holds at least one sample")


def image_samples(source: str, image_size: int) -> Iterator[ImageSample]:
    return digit_samples(image_size) if source == "digits" else photo_patches(image_size)


def digit_samples(image_size: int) -> Iterator[ImageSample]:
    """scikit-learn's 1797 digits: grey levels 0..16 stored as round(v * 255 / 16), so 17 levels come back
    exactly; upscaled when image_size > 8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = np.rint(image * 255.0 / 16.0).astype(np.uint8)
        yield ImageSample(f"digit-{index:04d}", resize(grey, image_size), int(label))


def photo_patches(image_size: int) -> Iterator[ImageSample]:
    """Overlapping PATCH_SPAN-pixel squares of scikit-learn's two sample photos, resized; no class."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    for filename, photo in zip(photos.filenames, photos.images, strict=True):
        name = Path(filename).stem
        height, width = photo.shape[:2]
        for top in range(0, height - PATCH_SPAN + 1, PATCH_STRIDE):
            for left in range(0, width - PATCH_SPAN + 1, PATCH_STRIDE):
                patch = photo[top : top + PATCH_SPAN, left : left + PATCH_SPAN]
                yield ImageSample(f"{name}-{top:03d}-{left:03d}", resize(patch, image_size), None)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS))


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def key_hash(key: str) -> int:
    """Stable across processes and Python versions (hash() is salted)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)


def held_out_keys(samples: list[ImageSample], val_fraction: float) -> set[str]:
    """Per class, the round(n * val_fraction) samples with the smallest key hash: stratified, and stable
    (a sample's side depends on its key and its class's size only). Unlabelled samples form one class."""
    by_class: dict[int | None, list[str]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample.key)
    held_out: set[str] = set()
    for keys in by_class.values():
        held_out.update(sorted(keys, key=key_hash)[: round(len(keys) * val_fraction)])
    if not held_out or len(held_out) == len(samples):
        raise UserError(f"val_fraction={val_fraction} leaves no train or no val samples")
    return held_out
