"""Model sections of the image families: `diffusion` (DDPM/DDIM over a U-Net or DiT) and `gan` (a generator
and a discriminator, each with its own optimizer and engine). Both keep an EMA copy of the trained weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ember.spec.base import Section
from ember.spec.engine import EngineSpec
from ember.spec.moe import MoEBlocks, MoESpec
from ember.spec.optim import OptimSpec


class EMASpec(Section):
    decay: float = Field(0.999, ge=0, lt=1, description="EMA decay per optimizer step; 0 disables the EMA copy.")
    start_step: int = Field(0, ge=0, description="Before this step the EMA copy just follows the weights.")


class ImageShape(Section):
    image_size: Literal[8, 16, 32] = Field(8, description="Side of the square images, in pixels.")
    channels: int = Field(1, ge=1, le=4, description="Image channels (1 for grey digits).")
    num_classes: int = Field(10, ge=0, description="Classes for conditioning; 0 trains an unconditional model.")


class DiffusionSpec(MoEBlocks, ImageShape):
    family: Literal["diffusion"] = Field(description="Model family: a denoising diffusion model.")
    backbone: Literal["unet", "dit"] = Field("unet", description="Noise predictor: a small U-Net or a DiT.")
    width: int = Field(64, ge=8, description="U-Net base channels, or the DiT's hidden width.")
    channel_mults: list[int] = Field([1, 2], min_length=1, description="U-Net: channels per level, x width.")
    blocks_per_level: int = Field(2, ge=1, description="U-Net: residual blocks per level.")
    depth: int = Field(4, ge=1, description="DiT: transformer blocks.")
    heads: int = Field(4, ge=1, description="DiT: attention heads; must divide width.")
    patch_size: int = Field(2, ge=1, description="DiT: patch side in pixels; must divide image_size.")
    timesteps: int = Field(1000, ge=2, description="Diffusion steps T of the forward (noising) process.")
    schedule: Literal["linear", "cosine"] = Field("cosine", description="Noise schedule (DDPM linear, or cosine).")
    prediction: Literal["eps", "v"] = Field("eps", description="What the network predicts: the noise or v.")
    label_dropout: float = Field(
        0.15, ge=0, lt=1, description="Share of training labels replaced by 'no class' (needed for CFG)."
    )
    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="Sampler for grids and `ember eval`.")
    sample_steps: int = Field(50, ge=1, description="DDIM steps (DDPM always walks all timesteps).")
    guidance: float = Field(1.0, ge=0, description="Classifier-free guidance scale; 1 is the plain conditional.")
    ema: EMASpec = Field(default_factory=EMASpec, description="Exponential moving average of the weights.")
    moe: MoESpec | None = Field(
        None,
        description="DiT only: Mixture-of-Experts FFNs in every n-th block (ember's MoE layer); ep_size > 1 splits "
        "each MoE block's experts over that many ranks (the EMA copy's experts too).",
    )

    @model_validator(mode="after")
    def _check(self) -> DiffusionSpec:
        if self.backbone == "dit":
            if self.width % self.heads:
                raise ValueError(f"heads={self.heads} must divide width={self.width}")
            if self.image_size % self.patch_size:
                raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.moe is not None:
            if self.backbone != "dit":
                raise ValueError("moe: MoE FFNs need backbone: dit (the U-Net has no transformer FFNs)")
            if self.moe.ep_size > 1 and self.moe.impl != "ember":
                # The EMA copy's experts are all-gathered whole for its checkpoint file (objectives/base.py),
                # which needs ember's stacked expert tensors.
                raise ValueError(f"moe.ep_size={self.moe.ep_size} in a DiT needs moe.impl: ember")
            if not self.moe_layers:
                raise ValueError(f"moe.every_n_layers={self.moe.every_n_layers} > depth={self.depth}: no MoE block")
            if self.moe.experts_per_layer and len(self.moe.experts_per_layer) != len(self.moe_layers):
                raise ValueError(
                    f"moe.experts_per_layer has {len(self.moe.experts_per_layer)} entries; the DiT has "
                    f"{len(self.moe_layers)} MoE blocks ({self.moe_layers} of depth={self.depth})"
                )
        if self.backbone == "unet" and self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"{len(self.channel_mults)} U-Net levels halve image_size={self.image_size} too often")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps={self.sample_steps} exceeds timesteps={self.timesteps}")
        return self

    @property
    def block_count(self) -> int:
        return self.depth


class NetworkSpec(Section):
    width: int = Field(64, ge=4, description="Base channels of the network.")
    optim: OptimSpec | None = Field(None, description="This network's optimizer; default: the job's `optim`.")
    engine: EngineSpec | None = Field(None, description="This network's engine; default: the job's `engine`.")


class GeneratorSpec(NetworkSpec):
    kind: Literal["dcgan", "stylegan2"] = Field(
        "dcgan",
        description="dcgan: upsampling convs from a projected latent; stylegan2: a mapping network to a style w "
        "and weight-modulated, demodulated convs from a learned 4x4 constant (Karras et al. 2020), small.",
    )
    z_dim: int = Field(64, ge=1, description="Latent size.")
    mapping_layers: int = Field(4, ge=1, description="stylegan2: layers of the mapping MLP z (+ class) -> w.")
    w_dim: int | None = Field(None, ge=1, description="stylegan2: size of the style w; default z_dim.")
    mapping_lr_mul: float = Field(
        0.01, gt=0, le=1, description="stylegan2: the mapping network learns this many times as fast (StyleGAN2: 0.01)."
    )


class DiscriminatorSpec(NetworkSpec):
    kind: Literal["dcgan"] = Field("dcgan", description="Strided convs, LeakyReLU, projection conditioning.")


class GANSpec(ImageShape):
    family: Literal["gan"] = Field(description="Model family: a generator and a discriminator.")
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec, description="The generator G.")
    discriminator: DiscriminatorSpec = Field(default_factory=DiscriminatorSpec, description="The discriminator D.")
    loss: Literal["non_saturating"] = Field("non_saturating", description="GAN loss (softplus form).")
    r1_gamma: float = Field(0.1, ge=0, description="R1 penalty weight on D's gradient at real images; 0 disables.")
    r1_interval: int = Field(4, ge=1, description="Lazy regularisation: apply R1 every N steps, scaled by N.")
    ema: EMASpec = Field(default_factory=EMASpec, description="Exponential moving average of G.")

    @property
    def moe(self) -> None:
        return None
