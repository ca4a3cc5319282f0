"""Plain torch.nn models; no distributed code inside a model."""

from __future__ import annotations

from torch import nn

from ember.models.gpt import GPT, ModelOutput, build_model
from ember.world import ExpertPlacement


def build_denoiser(spec, placement: ExpertPlacement | None = None, seed: int = 0) -> nn.Module:
    """The diffusion family's noise predictor (a DiffusionSpec picks the backbone); a DiT with MoE blocks
    holds the experts `placement` gives this rank (None: EP rank 0's), initialised from `seed` and their
    global ids."""
    from ember.models.dit import DiT
    from ember.models.unet import UNet

    return DiT(spec, placement, seed) if spec.backbone == "dit" else UNet(spec)


def build_gan(spec) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of a GANSpec, built in that order (so one seed fixes both)."""
    from ember.models.gan import Discriminator, Generator, StyleGenerator

    generator = StyleGenerator(spec) if spec.generator.kind == "stylegan2" else Generator(spec)
    return generator, Discriminator(spec)


__all__ = ["GPT", "ModelOutput", "build_denoiser", "build_gan", "build_model"]
