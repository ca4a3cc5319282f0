"""`POST /v1/images` for the image families: class-conditional samples from a diffusion or GAN checkpoint's
EMA weights (what `ember eval` scores), as PNG bytes. One process: these models need no expert parallelism."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.checkpoint.readers import load_ema
from ember.errors import UserError
from ember.observe.images import to_picture, to_pixels
from ember.spec import JobSpec
from ember.spec.moe import single_process


@dataclass(frozen=True)
class ImageQuery:
    n: int
    class_label: int | None
    guidance_scale: float | None  # diffusion only; None: the spec's
    steps: int | None  # diffusion DDIM steps; None: the spec's
    seed: int


class ImageSampler:
    def __init__(self, checkpoint: Path, spec: JobSpec) -> None:
        self.spec = spec.model
        if self.spec.family == "diffusion":
            from ember.generation.diffusion import build_schedule
            from ember.models import build_denoiser

            self.model = build_denoiser(single_process(self.spec))
            self.model.load_state_dict(load_ema(checkpoint, "model"))
            self.schedule = build_schedule(self.spec)
        elif self.spec.family == "gan":
            from ember.models import build_gan

            self.model = build_gan(self.spec)[0]
            self.model.load_state_dict(load_ema(checkpoint, "generator"))
        else:
            raise UserError(f"{checkpoint}: a {self.spec.family} checkpoint has no image sampler")
        self.model.eval()

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def sample(self, query: ImageQuery) -> list[bytes]:
        labels = torch.full((query.n,), query.class_label or 0, dtype=torch.long) if self.num_classes else None
        images = self._diffusion(query, labels) if self.spec.family == "diffusion" else self._gan(query, labels)
        return [png_bytes(image) for image in images]

    def _diffusion(self, query: ImageQuery, labels: torch.Tensor | None) -> torch.Tensor:
        from ember.generation.diffusion import sample_images

        shape = (query.n, self.spec.channels, self.spec.image_size, self.spec.image_size)
        guidance = self.spec.guidance if query.guidance_scale is None else query.guidance_scale
        steps = self.spec.sample_steps if query.steps is None else min(query.steps, self.spec.timesteps)
        return sample_images(self.model, self.schedule, shape, labels, null_label=self.spec.num_classes,
                             guidance=guidance, sampler=self.spec.sampler, steps=steps, seed=query.seed)  # fmt: skip

    def _gan(self, query: ImageQuery, labels: torch.Tensor | None) -> torch.Tensor:
        from ember.generation.gan import sample_gan

        return sample_gan(self.model, labels, query.n, self.spec.generator.z_dim, query.seed)


def png_bytes(image: torch.Tensor) -> bytes:
    """[C, H, W] in [-1, 1] -> a PNG (grey or RGB)."""
    buffer = io.BytesIO()
    to_picture(to_pixels(image).permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
