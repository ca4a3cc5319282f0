"""`ember eval RUN_DIR`: sample from a run's newest checkpoint and score the samples against held-out digits.

Scores, per model variant (EMA or raw weights) and guidance scale, over several sampling seeds:
- Frechet distance between the samples and the 297 held-out digits in the digits classifier's feature space;
- class accuracy: how often the classifier names the class a sample was conditioned on (labels cycle 0..9);
- with `inception_weights`, real FID as well: the same distance in Inception-v3's pool3 features.
A reference row scores real training digits the same way: the floor a perfect model would reach.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.checkpoint.export import build_single_process_model
from ember.checkpoint.manager import find_checkpoint
from ember.checkpoint.manifest import read_manifest
from ember.checkpoint.readers import load_ema
from ember.engines.weights import full_state_dict
from ember.errors import UserError
from ember.evaluate.classifier import DigitsClassifier, digit_split, load_classifier
from ember.evaluate.frechet import frechet_distance
from ember.evaluate.inception import load_inception
from ember.spec import JobSpec
from ember.spec.moe import single_process

Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (labels, seed) -> images in [-1, 1]
CHUNK = 250  # images per sampling batch: bounded memory at any --n


@dataclass(frozen=True)
class Variant:
    name: str  # "ema" | "raw"
    guidance: float | None
    generate: Generate


class Scorer:
    """Features and predictions of the cached classifier (and Inception's features when given); the held-out
    digits' features computed once."""

    def __init__(self, classifier: DigitsClassifier, image_size: int, inception: torch.nn.Module | None = None) -> None:
        self.classifier, self.inception = classifier, inception
        (self.train_images, _), (held_out, _) = digit_split(image_size)
        self.reference = self.features(held_out)[0]
        self.inception_reference = inception(held_out).numpy() if inception is not None else None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        images = images.float().cpu()
        features = torch.cat([self.classifier.features(part) for part in images.split(CHUNK)])
        return features.double().numpy(), self.classifier.head(features).argmax(1).numpy()

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        features, predicted = self.features(images)
        result = {"fd": frechet_distance(features, self.reference)}
        if self.inception is not None:
            result["fid"] = frechet_distance(self.inception(images).numpy(), self.inception_reference)
        if labels is not None:
            result["accuracy"] = float((predicted == labels.numpy()).mean())
        return result


def evaluate_run(
    run_dir: Path, cache_dir: Path, n: int = 1000, seeds: list[int] | None = None,
    guidance: list[float] | None = None, out: Path | None = None, inception_weights: Path | None = None,
) -> dict[str, Any]:
    inception = load_inception(inception_weights) if inception_weights is not None else None
    checkpoint = find_checkpoint(Path(run_dir))
    manifest = read_manifest(checkpoint)
    spec = JobSpec.model_validate(manifest["spec"])
    image_size, num_classes = image_shape(spec)
    scorer = Scorer(load_classifier(cache_dir, image_size), image_size, inception)
    seeds = seeds or [0, 1, 2]
    labels = torch.arange(n) % num_classes if num_classes else None
    rows = [score_variant(variant, scorer, labels, seeds) for variant in variants(spec, checkpoint, guidance)]
    generator = torch.Generator().manual_seed(0)
    real = [scorer.score(scorer.train_images[torch.randperm(len(scorer.train_images), generator=generator)[:n]],
                         None) for _ in seeds]
    report = {
        "run": str(Path(run_dir).absolute()), "checkpoint": checkpoint.name, "step": manifest["step"],
        "family": spec.model.family, "n": n, "seeds": seeds, "held_out": len(scorer.reference),
        "feature_space": "penultimate layer (128) of ember's digits classifier", "results": rows,
        "reference": {"name": "real train digits", **spreads(real, ["fd", "fid"])},
        "inception_weights": str(Path(inception_weights).absolute()) if inception_weights is not None else None,
    }
    path = out or Path(run_dir) / "eval.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def image_shape(spec: JobSpec) -> tuple[int, int]:
    model = spec.model
    if model.family == "gpt":
        if spec.data.decode != "image_tokens":
            raise UserError("ember eval scores image models; this run is a text GPT (data.decode is not image_tokens)")
        return int(round(model.seq_len**0.5)), spec.data.image_tokens.num_classes
    if model.channels != 1:
        raise UserError(f"ember eval scores grey digits; model.channels={model.channels}")
    return model.image_size, model.num_classes


def score_variant(variant: Variant, scorer: Scorer, labels: torch.Tensor | None, seeds: list[int]) -> dict:
    started = time.perf_counter()
    runs = [scorer.score(generate_all(variant.generate, labels, seed), labels) for seed in seeds]
    row = {"model": variant.name, "guidance": variant.guidance, **spreads(runs, ["fd", "fid", "accuracy"])}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def generate_all(generate: Generate, labels: torch.Tensor | None, seed: int, n: int | None = None) -> torch.Tensor:
    count = len(labels) if labels is not None else n
    parts = []
    for index, start in enumerate(range(0, count, CHUNK)):
        chunk = labels[start : start + CHUNK] if labels is not None else torch.zeros(min(CHUNK, count - start))
        parts.append(generate(chunk, seed * 100_003 + index).float().cpu())
    return torch.cat(parts)


def spread(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": [float(v) for v in values]}


def spreads(runs: list[dict[str, float]], names: list[str]) -> dict[str, dict[str, Any]]:
    """spread() of each score the runs have, by name."""
    return {name: spread([run[name] for run in runs]) for name in names if name in runs[0]}


def variants(spec: JobSpec, checkpoint: Path, guidance: list[float] | None) -> list[Variant]:
    family = spec.model.family
    if family == "diffusion":
        return diffusion_variants(spec, checkpoint, guidance)
    if guidance:
        raise UserError(f"--guidance applies to diffusion runs; this run is {family}")
    return gan_variants(spec, checkpoint) if family == "gan" else [image_gpt_variant(spec, checkpoint)]


def diffusion_variants(spec: JobSpec, checkpoint: Path, guidance: list[float] | None) -> list[Variant]:
    from ember.generation.diffusion import build_schedule, sample_images
    from ember.models import build_denoiser

    model = build_denoiser(single_process(spec.model))
    model.load_state_dict(load_ema(checkpoint, "model"))
    model.eval()
    schedule, shape = build_schedule(spec.model), (spec.model.channels, spec.model.image_size, spec.model.image_size)

    def generate_with(scale: float) -> Generate:
        def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
            conditional = labels.long() if spec.model.num_classes else None
            return sample_images(model, schedule, (len(labels), *shape), conditional,
                                 null_label=spec.model.num_classes, guidance=scale, sampler=spec.model.sampler,
                                 steps=spec.model.sample_steps, seed=seed)
        return generate

    return [Variant("ema", scale, generate_with(scale)) for scale in guidance or [spec.model.guidance]]


def gan_variants(spec: JobSpec, checkpoint: Path) -> list[Variant]:
    from ember.engines import network_spec
    from ember.generation.gan import sample_gan
    from ember.models import build_gan

    ema, raw = build_gan(spec.model)[0], build_gan(spec.model)[0]
    ema.load_state_dict(load_ema(checkpoint, "generator"))
    raw.load_state_dict(full_state_dict(checkpoint / "engine" / "generator", network_spec(spec, "generator")))

    def generate_with(generator: torch.nn.Module) -> Generate:
        def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
            conditional = labels.long() if spec.model.num_classes else None
            return sample_gan(generator, conditional, len(labels), spec.model.generator.z_dim, seed)
        return generate

    return [Variant("ema", None, generate_with(ema)), Variant("raw", None, generate_with(raw))]


def image_gpt_variant(spec: JobSpec, checkpoint: Path) -> Variant:
    from ember.generation.sampling import sample_image_tokens

    model = build_single_process_model(spec)
    model.load_state_dict(full_state_dict(checkpoint / "engine", spec))
    model.eval()
    tokens = spec.data.image_tokens

    def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return sample_image_tokens(lambda ids: model(ids).logits, labels.long(), spec.model.seq_len, tokens.levels,
                                   temperature=1.0, seed=seed)

    return Variant("raw", None, generate)


def summary(report: dict[str, Any]) -> list[str]:
    """One line per scored variant, for the console."""
    lines = [f"{report['run']} ({report['family']}, {report['checkpoint']}): {report['n']} samples x "
             f"{len(report['seeds'])} seeds vs {report['held_out']} held-out digits"]
    for row in report["results"]:
        guidance = f" guidance {row['guidance']:g}" if row["guidance"] is not None else ""
        accuracy = ""
        if "accuracy" in row:
            accuracy = f"  accuracy {row['accuracy']['mean']:.1%} +- {row['accuracy']['std']:.1%}"
        lines.append(f"  {row['model']}{guidance}: {distances(row)}{accuracy}")
    lines.append(f"  real train digits (floor): {distances(report['reference'])}")
    return lines


def distances(row: dict[str, Any]) -> str:
    text = f"FD {row['fd']['mean']:.2f} +- {row['fd']['std']:.2f}"
    if "fid" in row:
        text += f"  FID {row['fid']['mean']:.2f} +- {row['fid']['std']:.2f}"
    return text
