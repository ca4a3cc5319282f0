"""Export a checkpoint's full model weights (ZeRO shards and expert files gathered) to safetensors.

The file loads into the plain single-process model (`load_exported`), whatever engine and EP size
trained it: experts are stored under their global ids, so the model is rebuilt with ep_size=1. The engine
that wrote the checkpoint reads its own files (`read_weights`, ember.engines.weights.full_state_dict).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from ember.checkpoint.manager import find_checkpoint
from ember.checkpoint.manifest import read_manifest
from ember.errors import UserError
from ember.models import GPT, build_model
from ember.spec import JobSpec
from ember.spec.moe import single_process

SPEC_KEY = "ember_spec"
ReadWeights = Callable[[Path, JobSpec], dict[str, torch.Tensor]]  # (engine folder, spec) -> full module state


def export_safetensors(path: Path, out: Path, read_weights: ReadWeights) -> Path:
    checkpoint = find_checkpoint(Path(path))
    manifest = read_manifest(checkpoint)
    spec = JobSpec.model_validate(manifest["spec"])
    model = build_single_process_model(spec)
    model.load_state_dict(read_weights(checkpoint / "engine", spec), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(
        model, str(out), metadata={SPEC_KEY: json.dumps(spec.model_dump(mode="json")), "step": str(manifest["step"])}
    )
    return checkpoint


def export_huggingface(path: Path, out: Path, read_weights: ReadWeights) -> tuple[Path, str]:
    """The checkpoint as the transformers class with the same function (ember.interop.huggingface): returns the
    checkpoint read and the architecture written. A model with no such class is refused, naming the option."""
    from ember.interop.huggingface import export_model, twin_class

    checkpoint = find_checkpoint(Path(path))
    spec = JobSpec.model_validate(read_manifest(checkpoint)["spec"])
    twin_class(spec.model)  # refuse before gathering any weights
    model = build_single_process_model(spec)
    model.load_state_dict(read_weights(checkpoint / "engine", spec), strict=True)
    return checkpoint, export_model(model, spec.model, Path(out), _tokenizer_of(checkpoint, spec))


def _tokenizer_of(checkpoint: Path, spec: JobSpec) -> Path | str | None:
    """The checkpoint's tokenizer.json; for a byte-level text model, the bytes tokenizer written as one."""
    from ember.data.tokenizer import TOKENIZER_FILE, bytes_tokenizer_json

    if (checkpoint / TOKENIZER_FILE).is_file():
        return checkpoint / TOKENIZER_FILE
    if spec.data.decode == "text" and spec.data.tokenizer == "bytes":
        return bytes_tokenizer_json()
    return None


def build_single_process_model(spec: JobSpec) -> GPT:
    """The same architecture with every expert local (ep_size=1)."""
    return build_model(single_process(spec.model), seed=spec.schedule.seed)


def load_exported(path: Path) -> tuple[GPT, JobSpec]:
    if not Path(path).is_file():
        raise UserError(f"{path}: no such safetensors file; create it with `ember ckpt export RUN_DIR --out FILE`")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if SPEC_KEY not in metadata:
        raise UserError(f"{path}: not an ember export (no {SPEC_KEY} metadata)")
    spec = JobSpec.model_validate(json.loads(metadata[SPEC_KEY]))
    model = build_single_process_model(spec)
    load_model(model, str(path), strict=True)
    return model, spec
