"""MoE layer throughput, forward + backward, side by side: a dense FFN of the same active FLOPs (d_ff * k),
DeepSpeed's MoE (capacity factor 1.0, and dropless), fairscale's MOELayer (top-2 only: it has no top-1 gate),
and ember's layer (capacity factor 1.0, and dropless), at several expert counts and k in {1, 2}.

    python bench/moe_layer.py [--tokens 4096] [--experts 4 16 64] [--repeats 3] [--threads 2] [--backends]
                              [--device cuda --dtype bf16]

Within one (E, k) group the variants run interleaved, repeat after repeat, and each keeps its fastest time:
on a shared machine that compares them under the same load. E=64 vs E=4 is compared through each group's
dense time for the same reason. --backends times ember's expert backends (segments, grouped_mm, padded) instead.
On a GPU (`--device cuda --dtype bf16`, what bench/gpu_check.sh runs) ember's layer uses its default backend there,
torch's grouped GEMM; every step ends with a device synchronize so the times are the kernels'.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ember.engines.expert_groups import attach_expert_groups
from ember.models.layers.mlp import MLP
from ember.models.layers.moe import EmberMoE
from ember.models.layers.moe.deepspeed_layer import build_deepspeed_moe
from ember.models.layers.moe.experts import RUNNERS
from ember.spec.model import MoESpec
from ember.world import local_world

D_MODEL, D_FF = 256, 1024
Step = Callable[[], None]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moe_spec(experts: int, k: int, drop_tokens: bool, impl: str) -> MoESpec:
    return MoESpec(num_experts=experts, top_k=k, capacity_factor=1.0, eval_capacity_factor=1.0,
                   drop_tokens=drop_tokens, impl=impl)


def fairscale_moe(experts: int) -> nn.Module:
    from fairscale.nn.moe import MOELayer, Top2Gate

    return MOELayer(Top2Gate(D_MODEL, experts), nn.ModuleList(MLP(D_MODEL, D_FF) for _ in range(experts)))


def build_layers(experts: int, k: int) -> dict[str, nn.Module]:
    layers = {"dense": MLP(D_MODEL, D_FF * k)}
    for drop, mode in ((True, "capacity"), (False, "dropless")):
        deepspeed = build_deepspeed_moe(D_MODEL, D_FF, moe_spec(experts, k, drop, "deepspeed"), 0.0)
        attach_expert_groups(deepspeed, local_world())
        layers[f"deepspeed-{mode}"] = deepspeed
        layers[f"ember-{mode}"] = EmberMoE(D_MODEL, D_FF, moe_spec(experts, k, drop, "ember"))
    if k == 2:
        layers["fairscale"] = fairscale_moe(experts)
    return layers


def training_step(layer: nn.Module, tokens: int, device: torch.device, dtype: torch.dtype) -> Step:
    layer.to(device, dtype)
    x = torch.randn(64, tokens // 64, D_MODEL, device=device, dtype=dtype, requires_grad=True)  # fairscale: 3-D
    grad = torch.randn_like(x)

    def step() -> None:
        out = layer(x)
        if isinstance(out, tuple):
            outputs, grads = [out[0], out[1]], [grad, torch.ones_like(out[1])]
        elif hasattr(layer, "l_aux"):  # fairscale keeps its aux loss on the module
            outputs, grads = [out, layer.l_aux], [grad, torch.ones_like(layer.l_aux)]
        else:
            outputs, grads = [out], [grad]
        torch.autograd.backward(outputs, grads)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def fastest(steps: dict[str, Step], repeats: int) -> dict[str, float]:
    """Seconds per step: one warm-up each, then `repeats` interleaved rounds, fastest kept."""
    best = {}
    for name, step in steps.items():
        step()
        best[name] = float("inf")
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def bench_layers(args) -> dict[str, dict[str, float]]:
    """(E, k) -> variant -> tokens/s."""
    results = {}
    for k in (1, 2):
        for experts in args.experts:
            layers = build_layers(experts, k)
            steps = {name: training_step(layer, args.tokens, args.device, args.dtype) for name, layer in layers.items()}
            seconds = fastest(steps, args.repeats)
            results[f"E{experts}-k{k}"] = {name: args.tokens / s for name, s in seconds.items()}
            print_row(f"E{experts}-k{k}", results[f"E{experts}-k{k}"])
    return results


def bench_backends(args) -> dict[str, dict[str, float]]:
    results = {}
    for k in (1, 2):
        for experts in args.experts:
            layers = {"dense": MLP(D_MODEL, D_FF * k)}
            for backend in RUNNERS:
                layers[backend] = EmberMoE(D_MODEL, D_FF, moe_spec(experts, k, False, "ember"))
                layers[backend].experts.backend = backend
            steps = {name: training_step(layer, args.tokens, args.device, args.dtype) for name, layer in layers.items()}
            seconds = fastest(steps, args.repeats)
            results[f"E{experts}-k{k}"] = {name: args.tokens / s for name, s in seconds.items()}
            print_row(f"E{experts}-k{k}", results[f"E{experts}-k{k}"])
    return results


def print_row(group: str, tokens_per_s: dict[str, float]) -> None:
    dense = tokens_per_s["dense"]
    cells = "  ".join(f"{name} {rate / 1e3:7.1f}k ({rate / dense:4.2f}x)" for name, rate in tokens_per_s.items())
    print(f"{group:8s} {cells}", flush=True)


def summary(results: dict[str, dict[str, float]], experts: list[int]) -> dict[str, float]:
    """Ratios of tokens/s; `_vs_dense` against the dense FFN of the same active FLOPs in the same group."""
    ratios: dict[str, float] = {}
    for group, rates in results.items():
        for name, rate in rates.items():
            if name != "dense":
                ratios[f"{group}/{name}_vs_dense"] = rate / rates["dense"]
        for mode in ("capacity", "dropless"):
            ratios[f"{group}/ember_vs_deepspeed_{mode}"] = rates[f"ember-{mode}"] / rates[f"deepspeed-{mode}"]
    low, high = min(experts), max(experts)
    ember = [f"ember-{mode}" for mode in ("capacity", "dropless")]
    ratios.update({
        f"ember_dropless_vs_deepspeed_dropless_E{high}_min_k": min(
            ratios[f"E{high}-k{k}/ember_vs_deepspeed_dropless"] for k in (1, 2)),
        "ember_vs_dense_min": min(ratios[f"{g}/{n}_vs_dense"] for g in results for n in ember),
        f"ember_E{high}_vs_E{low}_min": min(
            ratios[f"E{high}-k{k}/{n}_vs_dense"] / ratios[f"E{low}-k{k}/{n}_vs_dense"] for k in (1, 2) for n in ember),
    })
    return {key: round(value, 3) for key, value in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", action="store_true", help="time ember's expert backends instead")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    dtype_name, args.dtype = args.dtype, DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    local_world()
    where = f"{args.threads} threads" if args.device.type == "cpu" else torch.cuda.get_device_name(args.device)
    print(f"tokens/s, forward + backward: {args.tokens} tokens, d={D_MODEL}, d_ff={D_FF}, {dtype_name}, {where}; "
          "(x) = vs the dense FFN of the same active FLOPs")
    if args.backends:
        results = bench_backends(args)
        print(json.dumps({f"{g}/{n}_vs_dense": round(r / rates["dense"], 3)
                          for g, rates in results.items() for n, r in rates.items() if n != "dense"}))
        return
    print(json.dumps(summary(bench_layers(args), args.experts)))


if __name__ == "__main__":
    main()
