"""The digits classifier whose penultimate layer is the feature space of `ember eval`.

Trained by ember on the digits train split (the samples `ember data build images --source digits` does not
hold out), on one thread with a fixed seed and a fixed number of epochs, so every machine builds the same
network; it is cached on first use under the cache folder, keyed by image size and recipe version.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ember.data.build_images import VAL_FRACTION, digit_samples, held_out_keys

RECIPE = "v1"  # bump when the architecture or training recipe changes: the cache key changes with it
EPOCHS, BATCH, LR, SEED = 30, 64, 2e-3, 0


class DigitsClassifier(nn.Module):
    def __init__(self, image_size: int, features: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def digit_split(image_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (held-out images, labels)), images in [-1, 1] as [N, 1, H, W]; the same split
    as the digit shards (a sample's side depends only on its key)."""
    samples = list(digit_samples(image_size))
    held_out = held_out_keys(samples, VAL_FRACTION)

    def stack(chosen: list) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.stack([s.pixels for s in chosen]).astype(np.float32)
        return torch.from_numpy(pixels / 127.5 - 1.0)[:, None], torch.tensor([s.label for s in chosen])

    return stack([s for s in samples if s.key not in held_out]), stack([s for s in samples if s.key in held_out])


@contextmanager
def one_thread() -> Iterator[None]:
    """CPU kernels give the same bits only with the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(image_size: int) -> DigitsClassifier:
    (images, labels), _ = digit_split(image_size)
    generator = torch.Generator().manual_seed(SEED)
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = DigitsClassifier(image_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        for _ in range(EPOCHS):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(order), BATCH):
                batch = order[start : start + BATCH]
                shifted = random_shift(images[batch], generator)
                loss = F.cross_entropy(model(shifted), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (padding with background): features that tolerate small shifts."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    size = images.shape[-1]
    return padded[:, :, dy : dy + size, dx : dx + size]


def load_classifier(cache_dir: Path, image_size: int) -> DigitsClassifier:
    """The cached classifier, trained (and cached atomically) on first use."""
    path = Path(cache_dir) / f"digits-classifier-{image_size}px-{RECIPE}.pt"
    model = DigitsClassifier(image_size)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train_classifier(image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model
