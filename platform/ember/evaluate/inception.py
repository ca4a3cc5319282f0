"""Inception-v3 pool features for real FID (`ember eval --inception-weights FILE`).

The network is FID's reference: TensorFlow's 2015-12-05 Inception graph as pytorch-fid and torch-fidelity
port it to torch. torchvision's Inception-v3 layout with the graph's own pooling (average pools that leave
padding out of the count; a max pool in the last block), a 1008-way head, and TensorFlow 1.x bilinear
resizing to 299x299 of uint8 pixels. Written by hand because the libraries that hold it (torch-fidelity,
pytorch-fid) depend on torchvision, whose wheel pins its own torch build: installing them next to ember's
torch replaces it (on CPU machines with a multi-GB CUDA build). Module names follow those ports, so their
weight files (`weights-inception-2015-12-05-6726825d.pth`, `pt_inception-2015-12-05-6726825d.pth`) load
unchanged. Nothing is downloaded: the user points at a local file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import UserError

SIDE = 299
FEATURES = 2048  # the pool3 features FID is computed on
CHUNK = 50  # images per forward: bounded activation memory (~0.3 GB at the widest layer)


class Conv(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU: the ports' BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def average_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b-5d, 35x35
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            chain(x, self.branch5x5_1, self.branch5x5_2),
            chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(average_pool(x)),
        ], 1)


class BlockB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):  # Mixed_6b-6e, 17x17, factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, column = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **column)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **column)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **column)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5),
            self.branch_pool(average_pool(x)),
        ], 1)


class BlockD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            chain(x, self.branch3x3_1, self.branch3x3_2),
            chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool, as in FID's graph), 8x8
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        narrow = self.branch3x3_1(x)
        wide = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else average_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(narrow), self.branch3x3_2b(narrow),
            self.branch3x3dbl_3a(wide), self.branch3x3dbl_3b(wide),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """images in [-1, 1], [N, 1 or 3, H, W] -> pool3 features [N, 2048] (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, 1008)  # the graph's logits; loaded with the weights, unused for FID

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = self.fc.weight.device  # a GPU when there is one: ~0.2 s per image on 2 CPU cores
        return torch.cat([self._pool3(part.to(device)).cpu() for part in images.split(CHUNK)]).double()

    def _pool3(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255)  # the uint8 pixels a PNG of it holds
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        x = (resize_like_tensorflow1(pixels, SIDE) - 128) / 128
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def resize_like_tensorflow1(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's resize_bilinear (align_corners=False) computes it: output pixel i
    samples input position i * in/out, without the half-pixel offset of torch's F.interpolate."""
    for dim in (3, 2):  # width, then height, in float32 as TensorFlow does (bit-exact on CPU)
        size = x.shape[dim]
        position = torch.arange(side, dtype=torch.float32, device=x.device) * torch.tensor(size / side)
        low = position.long()
        high = (low + 1).clamp(max=size - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = side
        frac = (position - low.float()).view(shape)
        before = x.index_select(dim, low)
        x = before + (x.index_select(dim, high) - before) * frac
    return x


def load_inception(path: Path, device: str | None = None) -> FIDInception:
    """The network with the weights of a local file, or a UserError naming the file and what to do."""
    path = Path(path)
    hint = ("point --inception-weights at FID's Inception weights (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    if not path.is_file():
        raise UserError(f"--inception-weights {path}: no such file; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip or torch format errors all mean the same thing here
        raise UserError(f"--inception-weights {path}: not a torch weights file ({err}); {hint}") from err
    if not isinstance(state, dict):
        raise UserError(f"--inception-weights {path}: holds a {type(state).__name__}, not a state dict; {hint}")
    model = FIDInception()
    own = model.state_dict()
    expected, found = set(own), set(state)
    missing = sorted(expected - found)
    unexpected = sorted(name for name in found - expected if not name.startswith("AuxLogits."))  # torchvision's
    if missing or unexpected:
        raise UserError(
            f"--inception-weights {path}: not Inception-v3 FID weights (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); {hint}"
        )
    for name, tensor in own.items():  # e.g. torchvision's ImageNet weights: a 1000-way head
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"--inception-weights {path}: {name} has shape {list(state[name].shape)}, FID's network has "
                f"{list(tensor.shape)} (ImageNet Inception weights are not FID's); {hint}"
            )
    model.load_state_dict({name: state[name] for name in expected})
    return model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
