"""Diffusion and GAN pieces on tiny models, against references: the noise schedules, the eps/v algebra,
classifier-free guidance, seeded samplers, R1, the EMA, sample grids, and the spec's errors for the families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.errors import UserError
from ember.generation.diffusion import build_schedule, guided, sample_images
from ember.models import build_denoiser, build_gan
from ember.observe.images import image_grid
from ember.spec import JobSpec
from ember.spec.generative import DiffusionSpec, GANSpec
from ember.train.ema import EMA
from ember.train.objectives.diffusion import drop_labels
from ember.train.objectives.gan import r1_penalty
from ember.world import ExpertPlacement

REPO = Path(__file__).resolve().parents[2]


def tiny_diffusion(**fields) -> DiffusionSpec:
    base = {"family": "diffusion", "width": 8, "channel_mults": [1, 2], "blocks_per_level": 1, "timesteps": 50,
            "sample_steps": 5}
    return DiffusionSpec(**(base | fields))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_lose_signal_monotonically(kind: str) -> None:
    alpha_bar = build_schedule(tiny_diffusion(schedule=kind, timesteps=1000)).alpha_bar
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert alpha_bar[0] > 0.99
    assert alpha_bar[-1] < 0.01


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_perfect_prediction_recovers_the_clean_image(prediction: str) -> None:
    schedule = build_schedule(tiny_diffusion(prediction=prediction))
    x0, eps = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 5, 10, 20, 40, 49])
    signal, noise = schedule.coefficients(t, x0)
    x_t = signal * x0 + noise * eps
    target = eps if prediction == "eps" else signal * eps - noise * x0
    got_eps, got_x0 = schedule.to_eps_and_x0(target, x_t, t)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_guidance_one_is_the_conditional_model_and_other_scales_extrapolate() -> None:
    def model(x, t, labels):
        return x + labels.view(-1, 1, 1, 1).float()  # "conditional" output grows with the label

    x, t, labels = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([3, 5])
    assert torch.equal(guided(model, labels, 10, 1.0)(x, t), model(x, t, labels))
    uncond, cond = model(x, t, torch.full_like(labels, 10)), model(x, t, labels)
    torch.testing.assert_close(guided(model, labels, 10, 3.0)(x, t), uncond + 3.0 * (cond - uncond))


def test_label_dropout_maps_dropped_and_unlabelled_to_the_null_class() -> None:
    labels = torch.tensor([0, 1, -1, 9] * 250)
    dropped = drop_labels(labels, 10, 0.25, torch.Generator().manual_seed(0))
    assert (dropped[labels == -1] == 10).all()
    kept = labels >= 0
    share = (dropped[kept] == 10).float().mean().item()
    assert 0.2 < share < 0.3
    assert ((dropped == labels) | (dropped == 10)).all()


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_give_seeded_images_of_the_right_shape(backbone: str, sampler: str) -> None:
    spec = tiny_diffusion(backbone=backbone, width=16, heads=2)
    torch.manual_seed(0)
    model = build_denoiser(spec).eval()
    schedule, labels = build_schedule(spec), torch.arange(4)

    def draw(seed: int) -> torch.Tensor:
        return sample_images(model, schedule, (4, 1, 8, 8), labels, null_label=10, guidance=2.0, sampler=sampler,
                             steps=5, seed=seed)

    first, again, other = draw(1), draw(1), draw(2)
    assert first.shape == (4, 1, 8, 8)
    assert first.abs().max() <= 1.0
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("kind", ["dcgan", "stylegan2"])
def test_generators_are_seeded_and_discriminator_scores_one_number_per_image(kind: str) -> None:
    spec = GANSpec(family="gan", generator={"kind": kind, "width": 8, "z_dim": 8}, discriminator={"width": 8})
    torch.manual_seed(0)
    generator, discriminator = build_gan(spec)
    z, labels = torch.randn(5, 8, generator=torch.Generator().manual_seed(3)), torch.arange(5)
    images = generator.eval()(z, labels)
    assert images.shape == (5, 1, 8, 8)
    assert torch.equal(images, generator(z, labels))
    assert discriminator(images, labels).shape == (5,)


def test_modulated_conv_is_a_per_sample_conv_with_styled_demodulated_weights() -> None:
    """The grouped convolution equals, sample by sample, a plain conv2d with weights scaled by that sample's
    style and normalised per output channel; demodulation gives unit-variance outputs for unit inputs."""
    import torch.nn.functional as F

    from ember.models.gan import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 16, 3, w_dim=8)
    torch.nn.init.normal_(conv.affine.weight)
    x, w = torch.randn(4, 64, 16, 16), torch.randn(4, 8)
    out = conv(x, w)
    for i in range(4):
        weight = conv.weight * conv.scale * conv.affine(w[i : i + 1])[0][None, :, None, None]
        weight = weight / weight.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
        torch.testing.assert_close(out[i : i + 1], F.conv2d(x[i : i + 1], weight, conv.bias, padding=1))
    interior = out[:, :, 1:-1, 1:-1]  # away from the zero padding
    assert 0.9 < float(interior.detach().std(dim=(0, 2, 3)).mean()) < 1.1


def test_stylegan2_generator_trains_against_d_with_r1_and_follows_its_class() -> None:
    from ember.train.objectives.gan import discriminator_loss, generator_loss

    spec = GANSpec(family="gan", generator={"kind": "stylegan2", "width": 8, "z_dim": 16, "mapping_layers": 2},
                   discriminator={"width": 8})
    torch.manual_seed(0)
    generator, discriminator = build_gan(spec)
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-3, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.0, 0.99))
    real, labels = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10
    for _ in range(10):
        real.requires_grad_(True)
        real_scores = discriminator(real, labels)
        fakes = generator(torch.randn(16, 16), labels)
        d_loss = discriminator_loss(real_scores, discriminator(fakes.detach(), labels))
        d_loss = d_loss + 0.05 * r1_penalty(real_scores, real)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = generator_loss(discriminator(generator(torch.randn(16, 16), labels), labels))
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        assert torch.isfinite(d_loss)
        assert torch.isfinite(g_loss)
    z = torch.randn(1, 16).expand(2, -1)
    one, other = generator(z, torch.tensor([1, 7]))
    assert not torch.allclose(one, other, atol=1e-3)  # the same latent, two classes: two images


def test_r1_matches_the_gradient_norm_of_a_linear_critic() -> None:
    weights = torch.randn(1, 4, 4)
    real = torch.randn(3, 1, 4, 4, requires_grad=True)
    scores = (real * weights).flatten(1).sum(1)  # d score / d image = weights, for every image
    torch.testing.assert_close(r1_penalty(scores, real), weights.square().sum())


def test_ema_averages_weights_and_buffers_and_restores_from_its_state() -> None:
    model = torch.nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(2.0)
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.full((3,), 2.0))  # 1 -> halfway to 3
    assert torch.equal(ema.module.running_mean, torch.full((3,), 1.0))
    copy = EMA(torch.nn.BatchNorm1d(3), decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert torch.equal(copy.module.weight, ema.module.weight)
    assert copy.updates == 1


def test_sample_grid_lays_images_out_row_major() -> None:
    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 1.0, 1.0)])
    grid = image_grid(images, columns=2, tile=2, gap=1)
    assert grid.shape == (6, 6, 1)
    assert grid[0, 0, 0] == 0
    assert grid[0, 3, 0] == 255
    assert grid[3, 0, 0] == 255
    assert grid[2, 2, 0] == 255


@pytest.mark.parametrize(
    ("job", "override", "field"),
    [
        ("tiny-diffusion", "data.decode=text", "data.decode=image"),
        ("tiny-diffusion", "model.sample_steps=500", "sample_steps"),
        ("tiny-diffusion", "model.prediction=x0", "model.prediction"),
        ("tiny-gan", "model.generator.widht=3", "model.generator.widht"),
        ("tiny-gan", "model.discriminator.engine={kind: deepspeed, zero_stage: 3}", "zero_stage 3"),
        ("tiny-gan", "model.r1_interval=0", "model.r1_interval"),
    ],
)
def test_family_mistakes_are_user_errors_naming_the_field(job: str, override: str, field: str) -> None:
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        JobSpec.load(REPO / "jobs" / "debug" / f"{job}.yaml", [override])


def test_example_jobs_validate_with_their_families() -> None:
    families = {name: JobSpec.load(REPO / "jobs" / f"{name}.yaml").model.family
                for name in ("diffusion-digits", "gan-digits", "image-gpt-digits")}
    assert families == {"diffusion-digits": "diffusion", "gan-digits": "gan", "image-gpt-digits": "gpt"}


def test_dit_with_moe_blocks_trains_and_reports_its_balance_loss() -> None:
    """A DiT whose every 2nd block is ember's MoE layer: the denoising loss falls, the aux loss is the
    router's load-balancing term (about 1 when balanced), and every expert gets gradient."""
    from ember.models.layers.moe import MoEFFN
    from ember.train.objectives.diffusion import diffusion_loss

    moe = {"num_experts": 4, "top_k": 1, "every_n_layers": 2, "drop_tokens": False, "impl": "ember"}
    spec = tiny_diffusion(backbone="dit", width=32, depth=2, heads=4, patch_size=2, moe=moe)
    assert spec.moe_layers == [1]
    torch.manual_seed(0)
    model = build_denoiser(spec)
    assert isinstance(model.blocks[1].mlp, MoEFFN)
    assert not isinstance(model.blocks[0].mlp, MoEFFN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = build_schedule(spec)
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    labels = torch.arange(32) % 10
    losses, trained = [], torch.zeros(4, dtype=torch.bool)
    for step in range(40):
        loss = diffusion_loss(model, schedule, images, labels)
        aux = model.aux_loss
        assert torch.isfinite(aux)  # Switch balance loss: E * sum(f_i * P_i) >= ~1
        assert 0.5 < aux.detach().item() < 4.0
        optimizer.zero_grad()
        (loss + 0.01 * aux).backward()
        if step > 0:  # (adaLN-Zero gates every block's FFN at 0 at first: no expert gradient at step 0)
            moe_layer = model.blocks[1].mlp.moe
            trained |= moe_layer.experts.w_in.grad.flatten(1).abs().sum(1) > 0
            assert moe_layer.router.gate.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert trained.all()  # every expert was routed tokens and learned


def test_dit_ep_ranks_hold_the_experts_of_the_single_process_dit_by_global_id() -> None:
    """With ep_size 2 each rank builds half of every MoE block's experts; the halves, joined, are the
    experts a DiT with ep_size 1 builds from the same seed (what makes its checkpoints EP-size free)."""
    fields = {"backbone": "dit", "width": 32, "depth": 2, "heads": 4, "patch_size": 2}
    whole = build_denoiser(tiny_diffusion(**fields, moe={"num_experts": 4, "impl": "ember"}), seed=7)
    split = tiny_diffusion(**fields, moe={"num_experts": 4, "ep_size": 2, "impl": "ember"})
    halves = [build_denoiser(split, ExpertPlacement(4, 2, rank), seed=7) for rank in (0, 1)]
    for name in ("w_in", "b_in", "w_out", "b_out"):
        parts = [getattr(half.blocks[1].mlp.moe.experts, name) for half in halves]
        assert parts[0].shape[0] * 2 == getattr(whole.blocks[1].mlp.moe.experts, name).shape[0]
        assert torch.equal(torch.cat(parts), getattr(whole.blocks[1].mlp.moe.experts, name)), name
    other_seed = build_denoiser(tiny_diffusion(**fields, moe={"num_experts": 4, "impl": "ember"}), seed=8)
    assert not torch.equal(other_seed.blocks[1].mlp.moe.experts.w_in, whole.blocks[1].mlp.moe.experts.w_in)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"backbone": "unet", "moe": {"num_experts": 4}}, "need backbone: dit"),
        ({"backbone": "dit", "width": 32, "depth": 2, "moe": {"num_experts": 4, "ep_size": 2, "impl": "deepspeed"}},
         "needs moe.impl: ember"),
        ({"backbone": "dit", "width": 32, "depth": 1, "moe": {"num_experts": 4, "every_n_layers": 2}}, "no MoE block"),
    ],
)
def test_dit_moe_mistakes_name_the_field(fields: dict, needle: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        tiny_diffusion(**fields)
