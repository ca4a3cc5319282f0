"""Export a checkpoint's full model weights (ZeRO shards and expert files gathered) to safetensors.

The file loads into the plain single-process model (`load_exported`), whatever engine and EP size
trained it: experts are stored under their global ids, so the model is rebuilt with ep_size=1.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from ember.checkpoint.io import load_file
from ember.checkpoint.manager import find_checkpoint
from ember.checkpoint.manifest import read_manifest
from ember.checkpoint.reshard import EXPERT_WEIGHTS_GLOB, MODEL_STATES
from ember.errors import UserError
from ember.models import GPT, build_model
from ember.spec import JobSpec
from ember.spec.moe import single_process

SPEC_KEY = "ember_spec"


def export_safetensors(path: Path, out: Path) -> Path:
    checkpoint = find_checkpoint(Path(path))
    manifest = read_manifest(checkpoint)
    spec = JobSpec.model_validate(manifest["spec"])
    model = build_single_process_model(spec)
    model.load_state_dict(full_state_dict(checkpoint / "engine", spec), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(
        model, str(out), metadata={SPEC_KEY: json.dumps(spec.model_dump(mode="json")), "step": str(manifest["step"])}
    )
    return checkpoint


def export_huggingface(path: Path, out: Path) -> tuple[Path, str]:
    """The checkpoint as the transformers class with the same function (ember.interop.huggingface): returns the
    checkpoint read and the architecture written. A model with no such class is refused, naming the option."""
    from ember.interop.huggingface import export_model, twin_class

    checkpoint = find_checkpoint(Path(path))
    spec = JobSpec.model_validate(read_manifest(checkpoint)["spec"])
    twin_class(spec.model)  # refuse before gathering any weights
    model = build_single_process_model(spec)
    model.load_state_dict(full_state_dict(checkpoint / "engine", spec), strict=True)
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
    return build_model(single_process(spec.model), ep_rank=0, seed=spec.schedule.seed)


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


def full_state_dict(engine_dir: Path, spec: JobSpec) -> dict[str, torch.Tensor]:
    kind = spec.engine.kind
    if kind == "deepspeed":
        return _deepspeed_state_dict(engine_dir, spec)
    if kind == "fsdp":
        return _dcp_state_dict(engine_dir)
    return _torch_load(engine_dir / "model.pt")  # ddp and fairscale write the full module on rank 0


def _deepspeed_state_dict(engine_dir: Path, spec: JobSpec) -> dict[str, torch.Tensor]:
    if spec.engine.zero_stage == 3 or (spec.engine.precision != "fp32" and spec.model.moe is None):
        # Partitioned (ZeRO-3) or low-precision module weights: rebuild the fp32 masters from the shards.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(engine_dir.parent), tag=engine_dir.name)
    state = _torch_load(engine_dir / MODEL_STATES)["module"]
    for expert_file in sorted(engine_dir.glob(EXPERT_WEIGHTS_GLOB)):
        state.update(_torch_load(expert_file))  # keys already carry global expert ids
    return {name: tensor.float() for name, tensor in state.items()}


def _dcp_state_dict(engine_dir: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "full.pt"
        dcp_to_torch_save(str(engine_dir), str(target))
        return _torch_load(target)["model"]


def _torch_load(path: Path):
    return load_file(path, "the checkpoint; it cannot be exported")
