"""Real FID's feature network (`ember eval --inception-weights`): TensorFlow 1.x resizing computed exactly,
the weights file of FID's ports loads and mistakes in it name the file, and the Frechet distance in its
features puts held-out digits near real ones and noise far away.

No real Inception weights exist offline: the tests write a file from a randomly initialised network with the
ports' key layout (the same network and file format; checked bit-exact against torch-fidelity's extractor
with shared weights when this was written)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.errors import UserError
from ember.evaluate.classifier import digit_split
from ember.evaluate.frechet import frechet_distance
from ember.evaluate.inception import FIDInception, load_inception, resize_like_tensorflow1

COUNT = 10  # images per set: ~0.2 s each through a 299x299 Inception on 2 cores


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    network = FIDInception()
    for module in network.modules():  # He init keeps the signal's scale through the 94 convolutions (torch's
        if isinstance(module, torch.nn.Conv2d):  # default shrinks it until every image has the same features)
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path


def test_resize_samples_like_tensorflow_1_without_half_pixel_centres() -> None:
    x = torch.tensor([[[[0.0, 8.0], [16.0, 24.0]]]])
    # TF1 align_corners=False: output i reads input position i * 2/4 = 0, 0.5, 1, 1.5 (clamped to the edge).
    expected_row = torch.tensor([0.0, 4.0, 8.0, 8.0])
    resized = resize_like_tensorflow1(x, 4)[0, 0]
    assert torch.equal(resized[0], expected_row)
    assert torch.equal(resized[1], expected_row + 8)
    assert torch.equal(resized[2], expected_row + 16)
    assert torch.equal(resized[3], expected_row + 16)


def test_weights_load_and_fid_separates_digits_from_noise(weights: Path) -> None:
    network = load_inception(weights, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(),
                                                 torch.load(weights).values(), strict=True))
    (train, _), (held_out, _) = digit_split(8)
    generator = torch.Generator().manual_seed(0)
    real = train[torch.randperm(len(train), generator=generator)[:COUNT]]
    noise = torch.rand(COUNT, 1, 8, 8, generator=generator) * 2 - 1
    features = [network(images).numpy() for images in (held_out[:COUNT], real, noise)]
    assert features[0].shape == (COUNT, 2048)
    real_fid, noise_fid = frechet_distance(features[1], features[0]), frechet_distance(features[2], features[0])
    assert real_fid > 0.1, (real_fid, noise_fid)  # measured: 1.8 and 70
    assert noise_fid > 10 * real_fid, (real_fid, noise_fid)


def test_wrong_files_name_the_file_and_what_to_do(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no such file; point --inception-weights at FID's Inception weights"):
        load_inception(tmp_path / "absent.pth")
    other = tmp_path / "classifier.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(UserError, match=r"classifier\.pt: not Inception-v3 FID weights \(missing \['Conv2d"):
        load_inception(other)
    imagenet_head = {**torch.load(weights), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    torch.save(imagenet_head, tmp_path / "imagenet.pth")
    shapes = r"imagenet\.pth: fc\.weight has shape \[1000, 2048\], FID's network has \[1008, 2048\]"
    with pytest.raises(UserError, match=shapes):
        load_inception(tmp_path / "imagenet.pth")


def test_cli_exits_2_naming_a_missing_weights_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "ember.cli", "eval", str(run), "--inception-weights",
                             str(tmp_path / "nope.pth")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nope.pth" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
