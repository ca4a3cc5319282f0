"""Hugging Face interop: ember's GPT as the transformers class with the same function, both ways.

    dense   rmsnorm + rope + swiglu                    -> LlamaForCausalLM
            layernorm + learned positions + gelu + bias -> GPT2LMHeadModel
    MoE     routed SwiGLU experts, softmax top-k        -> MixtralForCausalLM (every block MoE, weights renormalised)
            + gated shared experts                      -> Qwen2MoeForCausalLM (every n-th block MoE)

Weights are written under the names the Hub's checkpoints use (and transformers 4 and 5, vLLM and SGLang read):
Mixtral's experts as `block_sparse_moe.experts.E.w1/w2/w3`, Qwen2-MoE's as `mlp.experts.E.gate_proj/...`.
Each transformers tensor is one slice of one ember tensor (`Piece`): export reads the slice, import writes it,
so the two directions cannot disagree. The numerics match because ember's blocks were built to the same
definitions: RoPE over split halves (rotate_half), RMSNorm in fp32, SwiGLU as silu(gate) * up, Mixtral's
softmax -> top-k -> renormalise routing, Qwen2-MoE's sigmoid-gated shared expert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ember.errors import UserError

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
Index = tuple[Any, ...]


@dataclass(frozen=True)
class Piece:
    """transformers tensor `hf` = ember tensor `ember`[index], transposed when `transpose`."""

    hf: str
    ember: str
    index: Index = ()
    transpose: bool = False

    def read(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        tensor = state[self.ember][self.index]
        return (tensor.t() if self.transpose else tensor).contiguous()

    def write(self, state: dict[str, torch.Tensor], tensor: torch.Tensor) -> None:
        target = state[self.ember][self.index]
        source = tensor.t() if self.transpose else tensor
        if target.shape != source.shape:
            raise UserError(f"{self.hf}: shape {tuple(tensor.shape)} does not fit ember's {self.ember}{self.index}")
        target.copy_(source)


# ---- which class, and why not -------------------------------------------------------------------------------


def twin_class(model) -> str:
    """The transformers architecture with the same function as this model section, or a UserError naming the
    option that has no counterpart."""
    if getattr(model, "family", "gpt") != "gpt":
        raise UserError(f"model.family: {model.family} has no transformers causal-LM twin (only gpt exports)")
    if model.moe is None:
        if model.norm == "layernorm" and model.position == "learned" and model.mlp == "gelu" and model.bias:
            if model.kv_heads != model.n_heads:
                raise UserError(f"model.n_kv_heads: {model.n_kv_heads} has no counterpart in GPT2LMHeadModel "
                                "(multi-head attention only); leave it unset")
            return "GPT2LMHeadModel"
        llama = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu"}
        _require(model, llama, "LlamaForCausalLM (or GPT2LMHeadModel: layernorm, learned, gelu, bias: true)")
        return "LlamaForCausalLM"
    _require(model, {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "bias": False}, "a transformers MoE")
    moe = model.moe
    routing = {"impl": "ember", "scoring": "softmax", "balance": "aux_loss", "routing": "token_choice",
               "residual": False, "experts_per_layer": None}
    _require(moe, routing, "MixtralForCausalLM or Qwen2MoeForCausalLM", "model.moe")
    if moe.shared_experts:
        _require(moe, {"shared_expert_gate": True}, "Qwen2MoeForCausalLM (its shared expert is gated)", "model.moe")
        return "Qwen2MoeForCausalLM"
    _require(moe, {"every_n_layers": 1}, "MixtralForCausalLM (every block MoE; Qwen2-MoE needs shared_experts)",
             "model.moe")
    if not moe.normalises_topk:
        raise UserError("model.moe.norm_topk_prob: MixtralForCausalLM renormalises the top-k weights; set it true")
    return "MixtralForCausalLM"


def _require(section, wanted: dict[str, Any], target: str, where: str = "model") -> None:
    for field, value in wanted.items():
        if getattr(section, field) != value:
            shown = json.dumps(value)
            raise UserError(
                f"{where}.{field}: {json.dumps(getattr(section, field))} has no counterpart in {target}; "
                f"it needs {field}: {shown}"
            )


# ---- config.json ----------------------------------------------------------------------------------------------


def twin_config(model) -> dict[str, Any]:
    """config.json of the twin class (what transformers' own save_pretrained would write for these shapes)."""
    name = twin_class(model)
    if name == "GPT2LMHeadModel":
        return {
            "architectures": [name], "model_type": "gpt2", "vocab_size": model.vocab_size, "n_embd": model.d_model,
            "n_layer": model.n_layers, "n_head": model.n_heads, "n_inner": model.ffn_width,
            "n_positions": model.seq_len, "layer_norm_epsilon": model.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": model.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "dtype": "float32",
        }
    config = {
        "architectures": [name], "vocab_size": model.vocab_size, "hidden_size": model.d_model,
        "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads, "head_dim": model.d_model // model.n_heads,
        "intermediate_size": model.ffn_width, "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm_eps, "hidden_act": "silu", "tie_word_embeddings": model.tie_embeddings,
        "rope_theta": model.rope_theta,  # transformers 4; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "attention_dropout": 0.0, "dtype": "float32",
    }
    if name == "LlamaForCausalLM":
        return config | {"model_type": "llama", "attention_bias": model.bias, "mlp_bias": model.bias}
    moe = model.moe
    routed = {"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_weight}
    if name == "MixtralForCausalLM":
        return config | routed | {"model_type": "mixtral", "num_local_experts": moe.num_experts, "sliding_window": None}
    return config | routed | {
        "model_type": "qwen2_moe", "num_experts": moe.num_experts, "moe_intermediate_size": model.ffn_width,
        "shared_expert_intermediate_size": moe.shared_experts * model.ffn_width, "norm_topk_prob": moe.normalises_topk,
        "decoder_sparse_step": moe.every_n_layers, "mlp_only_layers": [], "qkv_bias": False,
        "use_sliding_window": False,
    }


# ---- names ----------------------------------------------------------------------------------------------------


def twin_pieces(model) -> list[Piece]:
    """Every transformers tensor of the twin, as a slice of an ember tensor."""
    name = twin_class(model)
    if name == "GPT2LMHeadModel":
        return _gpt2_pieces(model)
    pieces = [Piece("model.embed_tokens.weight", "tok_emb.weight"), Piece("model.norm.weight", "ln_f.weight")]
    if not model.tie_embeddings:
        pieces.append(Piece("lm_head.weight", "head.weight"))
    for block in range(model.n_layers):
        hf, ours = f"model.layers.{block}.", f"blocks.{block}."
        pieces += [Piece(hf + "input_layernorm.weight", ours + "ln1.weight"),
                   Piece(hf + "post_attention_layernorm.weight", ours + "ln2.weight")]
        pieces += _attention_pieces(model, hf + "self_attn.", ours + "attn.")
        if block not in model.moe_layers:
            pieces += _swiglu_pieces(hf + "mlp.", ours + "ffn.", model.bias)
        elif name == "MixtralForCausalLM":
            pieces += _expert_pieces(model, hf + "block_sparse_moe.", ours + "ffn.moe.", ("w1", "w3", "w2"))
        else:
            pieces += _expert_pieces(model, hf + "mlp.", ours + "ffn.moe.", ("gate_proj", "up_proj", "down_proj"))
            pieces += _swiglu_pieces(hf + "mlp.shared_expert.", ours + "ffn.moe.shared.", False)
            pieces.append(Piece(hf + "mlp.shared_expert_gate.weight", ours + "ffn.moe.shared_gate.weight"))
    return pieces


def _attention_pieces(model, hf: str, ours: str) -> list[Piece]:
    """ember's qkv rows: queries (d_model), then keys and values (kv_heads x head_dim each)."""
    width, kv_width = model.d_model, model.kv_heads * (model.d_model // model.n_heads)
    kinds = ("weight", "bias") if model.bias else ("weight",)
    pieces, start = [], 0
    for projection, rows in (("q_proj", width), ("k_proj", kv_width), ("v_proj", kv_width)):
        span = slice(start, start + rows)
        pieces += [Piece(f"{hf}{projection}.{kind}", f"{ours}qkv.{kind}", (span,)) for kind in kinds]
        start += rows
    return pieces + [Piece(f"{hf}o_proj.{kind}", f"{ours}proj.{kind}") for kind in kinds]


def _swiglu_pieces(hf: str, ours: str, bias: bool) -> list[Piece]:
    kinds = ("weight", "bias") if bias else ("weight",)
    pairs = (("gate_proj", "gate"), ("up_proj", "fc"), ("down_proj", "proj"))
    return [Piece(f"{hf}{theirs}.{kind}", f"{ours}{mine}.{kind}") for theirs, mine in pairs for kind in kinds]


def _expert_pieces(model, hf: str, ours: str, names: tuple[str, str, str]) -> list[Piece]:
    """Router and experts: ember's w_in [E, d, 2 d_ff] holds gate then up columns, w_out [E, d_ff, d]."""
    gate, up, down = names
    width, all_rows = model.ffn_width, slice(None)
    pieces = [Piece(hf + "gate.weight", ours + "router.gate.weight")]
    for e in range(model.moe.num_experts):
        pieces += [
            Piece(f"{hf}experts.{e}.{gate}.weight", ours + "experts.w_in", (e, all_rows, slice(0, width)), True),
            Piece(f"{hf}experts.{e}.{up}.weight", ours + "experts.w_in", (e, all_rows, slice(width, 2 * width)), True),
            Piece(f"{hf}experts.{e}.{down}.weight", ours + "experts.w_out", (e,), True),
        ]
    return pieces


def _gpt2_pieces(model) -> list[Piece]:
    """GPT-2's Conv1D layers store weights as [in, out]: ember's Linear weights transposed."""
    pieces = [Piece("transformer.wte.weight", "tok_emb.weight"), Piece("transformer.wpe.weight", "pos_emb.weight"),
              Piece("transformer.ln_f.weight", "ln_f.weight"), Piece("transformer.ln_f.bias", "ln_f.bias")]
    if not model.tie_embeddings:
        pieces.append(Piece("lm_head.weight", "head.weight"))
    layers = (("ln_1", "ln1", False), ("attn.c_attn", "attn.qkv", True), ("attn.c_proj", "attn.proj", True),
              ("ln_2", "ln2", False), ("mlp.c_fc", "ffn.fc", True), ("mlp.c_proj", "ffn.proj", True))
    for block in range(model.n_layers):
        for theirs, mine, conv in layers:
            hf, ours = f"transformer.h.{block}.{theirs}.", f"blocks.{block}.{mine}."
            pieces += [Piece(hf + "weight", ours + "weight", (), conv), Piece(hf + "bias", ours + "bias")]
    return pieces


def _check_coverage(pieces: list[Piece], module: nn.Module) -> None:
    """Every trained ember tensor reaches the twin (a bug, not a user error, if one does not)."""
    covered = {piece.ember for piece in pieces} | {"head.weight"}  # the tied head is the embedding
    left = [name for name, _ in module.named_parameters(remove_duplicate=False)
            if name not in covered and ".router.noise." not in name]  # noise only acts in training
    if left:
        raise RuntimeError(f"no transformers name for ember's {left[:5]}")


# ---- export and import ----------------------------------------------------------------------------------------


def export_model(module: nn.Module, model, out: Path, tokenizer: Path | str | None = None) -> str:
    """Write `out`/config.json, model.safetensors (+ tokenizer files: `tokenizer` is a tokenizer.json path,
    or its text); returns the architecture written."""
    config, pieces = twin_config(model), twin_pieces(model)
    _check_coverage(pieces, module)
    state = {name: tensor.detach().float() for name, tensor in module.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file({piece.hf: piece.read(state) for piece in pieces}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, model.seq_len)
    return config["architectures"][0]


def write_tokenizer_files(tokenizer: Path | str, out: Path, seq_len: int) -> None:
    """tokenizer.json as trained, and the tokenizer_config.json that lets AutoTokenizer load it."""
    text = tokenizer if isinstance(tokenizer, str) else Path(tokenizer).read_text()
    (out / TOKENIZER).write_text(text)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len, "clean_up_tokenization_spaces": False
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_into(module: nn.Module, model, folder: Path) -> None:
    """model.init_from: check the folder's config against the spec, then copy its weights into `module` (under
    expert parallelism only the experts this rank's module holds)."""
    folder = Path(folder)
    check_config(model, read_config(folder), folder)
    weights = read_weights(folder)
    state = module.state_dict()
    for global_piece in twin_pieces(model):
        piece = _on_this_rank(global_piece, module)
        if piece is None:
            continue
        if piece.hf not in weights:
            if piece.hf == "lm_head.weight" and "model.embed_tokens.weight" in weights:
                continue
            raise UserError(f"model.init_from: {folder} holds no {piece.hf} (a {twin_class(model)} needs it)")
        tensor = weights[piece.hf]
        if piece.hf == "transformer.wpe.weight":
            tensor = tensor[: model.seq_len]  # a longer context than this run's: its first seq_len positions
        with torch.no_grad():
            piece.write(state, tensor.float())


def check_init_from(model) -> None:
    """model.init_from's config against the spec, before any worker starts (exit 2 naming the mismatch)."""
    if getattr(model, "init_from", None):
        folder = Path(model.init_from)
        check_config(model, read_config(folder), folder)


def _on_this_rank(piece: Piece, module: nn.Module) -> Piece | None:
    """An expert piece with its local expert index, or None when another EP rank holds that expert."""
    if not piece.ember.endswith(("experts.w_in", "experts.w_out")):
        return piece
    ffn = module.get_submodule(piece.ember.split(".moe.")[0])
    local = piece.index[0] - ffn.placement.first_expert
    return replace(piece, index=(local, *piece.index[1:])) if 0 <= local < ffn.placement.num_local else None


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"model.init_from: {folder} has no {CONFIG}; point it at a Hugging Face model folder")
    return json.loads(path.read_text())


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"model.init_from: {folder} has no *.safetensors weights (save with safe_serialization)")
    weights = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            weights.update({name: handle.get_tensor(name) for name in handle.keys()})
    return weights


# The config keys that decide the function, and the spec field each comes from (for the error message).
CHECKED = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "n_embd": "d_model", "num_hidden_layers": "n_layers",
    "n_layer": "n_layers", "num_attention_heads": "n_heads", "n_head": "n_heads", "num_key_value_heads": "n_kv_heads",
    "head_dim": "d_model / n_heads", "intermediate_size": "d_ff", "n_inner": "d_ff", "rms_norm_eps": "norm_eps",
    "layer_norm_epsilon": "norm_eps", "hidden_act": "mlp", "activation_function": "mlp",
    "tie_word_embeddings": "tie_embeddings", "attention_bias": "bias", "mlp_bias": "bias", "qkv_bias": "bias",
    "rope_theta": "rope_theta", "num_local_experts": "moe.num_experts", "num_experts": "moe.num_experts",
    "num_experts_per_tok": "moe.top_k", "moe_intermediate_size": "d_ff",
    "shared_expert_intermediate_size": "moe.shared_experts x d_ff", "norm_topk_prob": "moe.norm_topk_prob",
    "decoder_sparse_step": "moe.every_n_layers", "mlp_only_layers": "moe.every_n_layers",
}


def check_config(model, theirs: dict[str, Any], folder: Path) -> None:
    ours = twin_config(model)
    if theirs.get("architectures", [None])[0] != ours["architectures"][0]:
        raise UserError(
            f"model.init_from: {folder} is a {theirs.get('architectures')}; this model section is a "
            f"{ours['architectures'][0]} (the norm, position, mlp, bias and moe fields pick the class)"
        )
    theirs = dict(theirs)
    if isinstance(theirs.get("rope_parameters"), dict):
        theirs["rope_theta"] = theirs["rope_parameters"].get("rope_theta", theirs.get("rope_theta"))
    theirs.setdefault("head_dim", None)
    if theirs["head_dim"] is None and "hidden_size" in theirs:
        theirs["head_dim"] = theirs["hidden_size"] // theirs["num_attention_heads"]
    if theirs.get("n_inner") is None and "n_embd" in theirs:
        theirs["n_inner"] = 4 * theirs["n_embd"]
    for key, field in CHECKED.items():
        if key in ours and key in theirs and theirs[key] != ours[key] and not _close(theirs[key], ours[key]):
            raise UserError(
                f"model.init_from: {folder}/{CONFIG} has {key}={json.dumps(theirs[key])}, the spec gives "
                f"{json.dumps(ours[key])} (model.{field}); make them equal"
            )
    if "n_positions" in theirs and theirs["n_positions"] < model.seq_len:
        raise UserError(f"model.seq_len: {model.seq_len} exceeds {folder}'s n_positions={theirs['n_positions']}")


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, float | int) and isinstance(b, float | int) and abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1)
