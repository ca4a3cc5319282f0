"""`ember eval`'s metric on real data: the digits classifier is accurate on held-out digits, and the Frechet
distance in its feature space puts real digits near the held-out set and noise far away (a test that fails if
the feature space cannot tell digits from noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.evaluate.classifier import load_classifier
from ember.evaluate.frechet import frechet_distance
from ember.evaluate.report import Scorer


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    return Scorer(load_classifier(tmp_path_factory.mktemp("cache"), 8), 8)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(200_000, 2))
    b = rng.normal(1.0, 2.0, size=(200_000, 2))
    # ||mu_a - mu_b||^2 + sum (s_a - s_b)^2 for diagonal covariances = 2 * 1 + 2 * (1 - 2)^2 = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.02)


def test_classifier_is_accurate_on_held_out_digits(scorer: Scorer) -> None:
    from ember.evaluate.classifier import digit_split

    _, (images, labels) = digit_split(8)
    assert scorer.score(images, labels)["accuracy"] > 0.95


def test_held_out_digits_and_noise_are_separated_by_a_wide_margin(scorer: Scorer) -> None:
    generator = torch.Generator().manual_seed(0)
    real = scorer.train_images[torch.randperm(len(scorer.train_images), generator=generator)[:300]]
    noise = torch.rand(300, 1, 8, 8, generator=generator) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1)  # digit-like, but degraded
    real_fd, noise_fd, blurred_fd = (scorer.score(x, None)["fd"] for x in (real, noise, blurred))
    assert noise_fd > 20 * real_fd, (real_fd, noise_fd)
    assert real_fd < blurred_fd < noise_fd, (real_fd, blurred_fd, noise_fd)


def test_classifier_is_cached_and_loads_identically(scorer: Scorer, tmp_path: Path) -> None:
    first = load_classifier(tmp_path, 8)
    again = load_classifier(tmp_path, 8)  # from the cache file
    assert len(list(tmp_path.glob("digits-classifier-8px-*.pt"))) == 1
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])
    for name, tensor in scorer.classifier.state_dict().items():  # trained twice, deterministically: same bits
        assert torch.equal(tensor, first.state_dict()[name]), name
