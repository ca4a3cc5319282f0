"""The experts of one MoE layer as stacked weights, computed on rows already grouped by expert.

    w_in [E_local, d, d_ff], b_in [E_local * d_ff], w_out [E_local, d_ff, d], b_out [E_local * d]
    expert e: y = gelu_tanh(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]   (ember's MLP, per expert)

SwiGLU experts (gated) keep the same four names with w_in twice as wide, gate columns first:
    h = x @ w_in[e] + b_in[e];  y = (silu(h[:, :d_ff]) * h[:, d_ff:]) @ w_out[e] + b_out[e]
Without biases (bias: false), b_in and b_out stay as zero buffers: every checkpoint, reshard and serving
path keeps the one stacked layout.

Biases are stored flat so the optimizer's "decay matrices only" rule treats them as the vectors they are.
Three ways to run the grouped GEMMs (`backend`; by default `choose_backend` picks one per call):
  segments    one GEMM per expert segment into preallocated buffers, forward and backward in one autograd
              Function (no per-expert autograd nodes, no padding); the CPU default, measured fastest there
              by bench/moe_layer.py --backends. SwiGLU experts run segment by segment under autograd.
  grouped_mm  torch's grouped GEMM over the segments' end offsets (one CUTLASS kernel per matrix on CUDA
              SM >= 80, a loop inside torch on CPU); the CUDA default in bf16, GELU and SwiGLU experts.
  padded      batched GEMM over groups padded to the largest one (GELU experts only)
Every backend computes the same function; tests hold them equal (CPU runs each one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GROUPED_MM_MIN_CAPABILITY = (8, 0)  # torch's grouped GEMM kernels: Ampere and later
GROUPED_MM_ALIGN_BYTES = 16  # each row of every operand starts 16-byte aligned (a whole expert's rows too)


def choose_backend(device_type: str, dtype: torch.dtype, widths: tuple[int, int],
                   capability: tuple[int, int] | None = None) -> str:
    """The default backend: torch's grouped GEMM on a CUDA GPU that has it (`capability`: the GPU's compute
    capability), in bf16, with rows it can align; the segment loop everywhere else (CPU: measured fastest
    there; fp32/fp16 GPU runs: the grouped kernels take bf16).

    Rows of a [R, d] operand start at multiples of d elements, so every expert's first row is 16-byte aligned
    for any group sizes once d_model and d_ff (`widths`) are multiples of 8 in bf16: no padding of groups.
    """
    if device_type != "cuda" or dtype != torch.bfloat16 or not hasattr(F, "grouped_mm"):  # torch >= 2.9
        return "segments"
    if capability is None or capability < GROUPED_MM_MIN_CAPABILITY:
        return "segments"
    aligned = all(width * dtype.itemsize % GROUPED_MM_ALIGN_BYTES == 0 for width in widths)
    return "grouped_mm" if aligned else "segments"


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_local: int,
        d_model: int,
        d_ff: int,
        group_name: str,
        backend: str | None = None,
        gated: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_local, self.d_model, self.d_ff, self.gated = num_local, d_model, d_ff, gated
        width_in = 2 * d_ff if gated else d_ff
        self.w_in = nn.Parameter(torch.empty(num_local, d_model, width_in))
        self.w_out = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        for name, size in (("b_in", num_local * width_in), ("b_out", num_local * d_model)):
            if bias:
                self.register_parameter(name, nn.Parameter(torch.zeros(size)))
            else:
                self.register_buffer(name, torch.zeros(size))
        self.backend = backend
        self.grad_memory = (GradientMemory(), GradientMemory())  # for w_in and w_out
        for param in self.parameters():
            param.allreduce = False  # DeepSpeed's expert marker: reduced over the expert-data-parallel group
            param.group_name = group_name
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.d_model)  # nn.Linear's default; the GPT re-initialises every expert by id
        nn.init.uniform_(self.w_in, -bound, bound)
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x: [R, d] rows grouped by local expert, counts[e] rows each -> [R, d]."""
        weights = self.w_in, self.b_in.view(self.num_local, -1), self.w_out, self.b_out.view(self.num_local, -1)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
        backend = self.backend or choose_backend(x.device.type, dtype, (self.d_model, self.d_ff), capability)
        memory = self.grad_memory if x.device.type == "cpu" else None
        with torch.autocast(x.device.type, enabled=False):
            if self.gated:
                return GATED_RUNNERS.get(backend, run_gated)(x, counts, *weights)
            return RUNNERS[backend](x, counts, *weights, memory=memory)

    @torch.no_grad()
    def load_expert(self, local: int, fc: nn.Linear, proj: nn.Linear, gate: nn.Linear | None = None) -> None:
        """Copy one dense expert (an MLP's fc, proj and, for SwiGLU, gate Linear layers) into slot `local`."""
        w_in = fc.weight.t() if gate is None else torch.cat([gate.weight.t(), fc.weight.t()], dim=1)
        self.w_in[local].copy_(w_in)
        self.w_out[local].copy_(proj.weight.t())
        if isinstance(self.b_in, nn.Parameter):
            b_in = fc.bias if gate is None else torch.cat([gate.bias, fc.bias])
            self.b_in.view(self.num_local, -1)[local].copy_(b_in)
            self.b_out.view(self.num_local, -1)[local].copy_(proj.bias)


def unstack_experts(stacked: dict[str, torch.Tensor], num_local: int) -> list[dict[str, torch.Tensor]]:
    """Stacked parameters (w_in, b_in, w_out, b_out) -> per expert, in nn.Linear layout under the MLP's names."""
    b_in, b_out = stacked["b_in"].view(num_local, -1), stacked["b_out"].view(num_local, -1)
    return [
        {"fc.weight": stacked["w_in"][e].t(), "fc.bias": b_in[e],
         "proj.weight": stacked["w_out"][e].t(), "proj.bias": b_out[e]}
        for e in range(num_local)
    ]


def stack_experts(per_expert: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of unstack_experts."""
    return {
        "w_in": torch.stack([e["fc.weight"].t() for e in per_expert]),
        "b_in": torch.cat([e["fc.bias"] for e in per_expert]),
        "w_out": torch.stack([e["proj.weight"].t() for e in per_expert]),
        "b_out": torch.cat([e["proj.bias"] for e in per_expert]),
    }


def split_stacked(kind: str, tensor: torch.Tensor, count: int) -> list[torch.Tensor]:
    """One stacked tensor (kind: w_in, b_in, w_out or b_out) -> its experts' tensors in nn.Linear layout."""
    if kind.startswith("w"):
        return [tensor[e].t().contiguous() for e in range(count)]
    return [piece.clone() for piece in tensor.view(count, -1)]


def join_stacked(kind: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of split_stacked."""
    return torch.stack([piece.t() for piece in pieces]) if kind.startswith("w") else torch.cat(pieces)


def segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty segment."""
    result, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            result.append((expert, start, start + count))
        start += count
    return result


class GradientMemory:
    """Reuses the memory of a large weight gradient across steps, once nothing else holds it.

    On CPU, glibc serves allocations over 32 MB with fresh mmap pages, so a stacked expert gradient
    (E * d * d_ff floats: 64 MB at E=64, d=256, d_ff=1024) costs ~40 ms of page faults per step, more than
    its GEMMs. The memory is handed out again only when the optimizer, engine or user no longer holds the
    previous gradient (zero_grad, or ZeRO moving it into its buckets); otherwise a fresh tensor is made.
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def empty_like(self, weight: torch.Tensor) -> torch.Tensor:
        for buffer in self.buffers:
            if buffer.shape == weight.shape and buffer.dtype == weight.dtype and _only_here(buffer):
                return buffer.view(buffer.shape)  # a new tensor over the same memory
        buffer = torch.empty_like(weight)
        self.buffers = [*self.buffers[-1:], buffer]  # two suffice: the .grad in use and an accumulation one
        return buffer.view(buffer.shape)


def _only_here(buffer: torch.Tensor) -> bool:
    """True when no tensor but `buffer` itself uses its storage (its own reference and the storage handle)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(buffer.untyped_storage()._cdata) <= 2


class SegmentFFN(torch.autograd.Function):
    """Expert FFN segment by segment, forward and backward in one Function: no per-expert autograd nodes,
    no padding; each segment's GEMM -> GELU -> GEMM runs while its hidden rows are still in cache."""

    @staticmethod
    def forward(ctx: Any, x, counts, w_in, b_in, w_out, b_out, memory) -> torch.Tensor:
        spans = segments(counts)
        hidden = x.new_empty((x.shape[0], w_in.shape[2]))
        act, y = torch.empty_like(hidden), torch.empty_like(x)
        for e, lo, hi in spans:
            torch.addmm(b_in[e], x[lo:hi], w_in[e], out=hidden[lo:hi])
            torch.ops.aten.gelu.out(hidden[lo:hi], approximate="tanh", out=act[lo:hi])
            torch.addmm(b_out[e], act[lo:hi], w_out[e], out=y[lo:hi])
        ctx.save_for_backward(x, hidden, act, w_in, w_out)
        ctx.spans, ctx.memory = spans, memory or (None, None)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, hidden, act, w_in, w_out = ctx.saved_tensors
        grad_y, grad_x, grad_hidden = grad_y.contiguous(), torch.empty_like(x), torch.empty_like(hidden)
        (grad_w_in, grad_b_in), (grad_w_out, grad_b_out) = (
            weight_grads(w, memory, ctx.spans) for w, memory in zip((w_in, w_out), ctx.memory, strict=True)
        )
        for e, lo, hi in ctx.spans:
            rows = slice(lo, hi)
            torch.mm(grad_y[rows], w_out[e].t(), out=grad_hidden[rows])  # d act, made d hidden in place below
            torch.mm(act[rows].t(), grad_y[rows], out=grad_w_out[e])
            torch.sum(grad_y[rows], dim=0, out=grad_b_out[e])
            torch.ops.aten.gelu_backward.grad_input(
                grad_hidden[rows], hidden[rows], approximate="tanh", grad_input=grad_hidden[rows]
            )
            torch.mm(grad_hidden[rows], w_in[e].t(), out=grad_x[rows])
            torch.mm(x[rows].t(), grad_hidden[rows], out=grad_w_in[e])
            torch.sum(grad_hidden[rows], dim=0, out=grad_b_in[e])
        return grad_x, None, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None


def weight_grads(weight: torch.Tensor, memory: GradientMemory | None, spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised weight and bias gradient buffers, zero for the experts no segment will write."""
    grad_w = memory.empty_like(weight) if memory is not None else torch.empty_like(weight)
    grad_b = weight.new_zeros((weight.shape[0], weight.shape[2]))
    idle = sorted(set(range(weight.shape[0])) - {e for e, _, _ in spans})
    if idle:
        grad_w[idle] = 0
    return grad_w, grad_b


def run_segments(x, counts, w_in, b_in, w_out, b_out, memory=None) -> torch.Tensor:
    return SegmentFFN.apply(x, counts, w_in, b_in, w_out, b_out, memory)


def run_grouped_mm(x, counts, w_in, b_in, w_out, b_out, memory=None, gated: bool = False) -> torch.Tensor:
    """Both GEMMs of every expert as one grouped GEMM each, over the segments' end offsets.

    `counts` arrive as host integers (the dispatcher's one sync, which the all-to-all's split sizes need
    anyway); they go to the device once, as offsets and as each row's owner for the biases, with the output
    size given so nothing waits on the device."""
    sizes = torch.tensor(counts, dtype=torch.int32).to(x.device, non_blocking=True)
    offsets = sizes.cumsum(0, dtype=torch.int32)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=x.device), sizes, output_size=x.shape[0])
    hidden = F.grouped_mm(x, w_in, offs=offsets) + b_in.index_select(0, owner)
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        act = F.silu(gate) * up
    else:
        act = F.gelu(hidden, approximate="tanh")
    return F.grouped_mm(act, w_out, offs=offsets) + b_out.index_select(0, owner)


def run_grouped_mm_gated(x, counts, w_in, b_in, w_out, b_out) -> torch.Tensor:
    return run_grouped_mm(x, counts, w_in, b_in, w_out, b_out, gated=True)


def run_gated(x, counts, w_in, b_in, w_out, b_out) -> torch.Tensor:
    """SwiGLU experts, one segment at a time under autograd (no hand-written backward: the GELU path's is).

    Every expert runs, an empty one on zero rows, so the output always depends on `x` and on every weight: under
    expert parallelism a rank that received no rows must still run the backward all-to-alls that the other ranks
    run (an output made apart from `x` cut them out of its graph, and the ranks deadlocked), and give its experts
    (zero) gradients like every other rank."""
    outputs, start = [], 0
    for e, count in enumerate(counts):
        gate, up = torch.addmm(b_in[e], x[start:start + count], w_in[e]).chunk(2, dim=-1)
        outputs.append(torch.addmm(b_out[e], F.silu(gate) * up, w_out[e]))
        start += count
    return torch.cat(outputs)


def run_padded(x, counts, w_in, b_in, w_out, b_out, memory=None) -> torch.Tensor:
    width = max(counts, default=0)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=x.device), torch.tensor(counts, device=x.device))
    starts = torch.tensor([0, *counts[:-1]], device=x.device).cumsum(0)
    slot = owner * width + torch.arange(x.shape[0], device=x.device) - starts[owner]
    padded = x.new_zeros((len(counts) * width, x.shape[1])).index_copy(0, slot, x).view(len(counts), width, -1)
    act = F.gelu(torch.baddbmm(b_in.unsqueeze(1), padded, w_in), approximate="tanh")
    out = torch.baddbmm(b_out.unsqueeze(1), act, w_out)
    return out.view(-1, x.shape[1]).index_select(0, slot)


RUNNERS = {"segments": run_segments, "grouped_mm": run_grouped_mm, "padded": run_padded}
GATED_RUNNERS = {"segments": run_gated, "grouped_mm": run_grouped_mm_gated}  # padded: GELU experts only
