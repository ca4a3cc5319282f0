"""Generation pieces without Ray: the KV-cached ragged forward against the plain forward, and seeded sampling."""

from __future__ import annotations

import torch

from ember.generation.decode import Admit, DecodeRunner, StepPlan, finish_reason
from ember.generation.sampling import SamplingParams, nucleus
from ember.models import build_model
from ember.models.layers.attention import RaggedKV
from ember.spec.model import GPTSpec, MoESpec


def tiny_moe_gpt(seed: int = 1):
    spec = GPTSpec(d_model=32, n_layers=2, n_heads=2, seq_len=32, moe=MoESpec(num_experts=4, drop_tokens=False))
    return build_model(spec, seed=seed).eval()


@torch.no_grad()
def test_cached_ragged_decode_equals_the_full_forward() -> None:
    model = tiny_moe_gpt()
    idx = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    full = model(idx).logits
    caches, prompts = [model.new_cache() for _ in range(3)], [5, 8, 3]  # prompts of different lengths, one batch
    flat = torch.cat([idx[i, :n] for i, n in enumerate(prompts)]).view(1, -1)
    prefill = model(flat, RaggedKV(caches, prompts)).logits[0]
    torch.testing.assert_close(prefill, torch.cat([full[i, :n] for i, n in enumerate(prompts)]), rtol=0, atol=1e-6)
    positions = list(prompts)
    while max(positions) < 20:  # one token per sequence per step; finished ones leave the batch
        active = [i for i in range(3) if positions[i] < 20]
        step = torch.tensor([idx[i, positions[i]] for i in active]).view(1, -1)
        logits = model(step, RaggedKV([caches[i] for i in active], [1] * len(active))).logits[0]
        torch.testing.assert_close(logits, torch.stack([full[i, positions[i]] for i in active]), rtol=0, atol=1e-6)
        positions = [p + 1 if i in active else p for i, p in enumerate(positions)]


def test_a_step_with_no_sequences_still_runs_the_model() -> None:
    """An expert-parallel rank with nothing to decode must still take part in every layer's all-to-all."""
    model = tiny_moe_gpt()
    moe_layers = [module for module in model.modules() if type(module).__name__ == "EmberMoE"]
    token_counts: list[int] = []
    for layer in moe_layers:
        layer.register_forward_hook(lambda _layer, inputs, _out: token_counts.append(inputs[0].numel()))
    assert DecodeRunner(model).step(StepPlan()) == {}
    assert moe_layers
    assert token_counts == [0] * len(moe_layers)  # each MoE layer ran once, on no tokens


def test_runner_greedy_tokens_equal_argmax_of_the_full_forward() -> None:
    model = tiny_moe_gpt()
    runner, prompt, tokens = DecodeRunner(model), [10, 20, 30], []
    plan = StepPlan(admit=[Admit(7, prompt, SamplingParams(temperature=0))])
    for _ in range(6):
        tokens.append(runner.step(plan)[7].token)
        plan = StepPlan(decode=[7])
    expected = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
    assert tokens == expected[3:]


def test_top_k_top_p_sampling_is_seeded_and_deterministic() -> None:
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.8, seed=5)

    def draw(p: SamplingParams) -> list[int]:
        generator = p.generator()
        return [p.pick(logits, generator) for _ in range(50)]

    assert draw(params) == draw(params)
    assert draw(params) != draw(SamplingParams(0.9, 40, 0.8, seed=6))
    allowed = set(torch.nonzero(nucleus(torch.softmax(logits / 0.9, -1), 0.8)).flatten().tolist())
    allowed &= set(torch.topk(logits, 40).indices.tolist())
    assert set(draw(params)) <= allowed


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert nucleus(probs, 0.7).nonzero().flatten().tolist() == [1, 2]
    assert nucleus(probs, 0.05).nonzero().flatten().tolist() == [1]  # never empty
    assert nucleus(probs, 1.0).nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_finish_reasons() -> None:
    assert finish_reason([104, 105], 3, 10, 32, stop=["hi"]) == "stop"
    assert finish_reason([1, 2], 3, 2, 32, stop=[]) == "length"
    assert finish_reason([1, 2], 31, 10, 32, stop=[]) == "length"  # no position left for the next token
    assert finish_reason([1], 31, 10, 32, stop=[]) is None


def test_step_loop_batches_admits_and_retires_with_the_reference_answers() -> None:
    """The continuous-batching loop on two in-process runners (no Ray): more requests than batch slots,
    different lengths; every answer equals the sequence decoded alone, and the batch never exceeds its cap."""
    import asyncio

    from ember.serve.batching import StepLoop

    model = tiny_moe_gpt()
    runners = [DecodeRunner(model), DecodeRunner(model)]  # two "ranks" (no experts split: no collectives)
    widest = []

    async def step(plans: list[StepPlan]) -> dict:
        widest.append(sum(len(p.admit) + len(p.decode) for p in plans))
        return {k: v for runner, plan in zip(runners, plans, strict=True) for k, v in runner.step(plan).items()}

    def alone(prompt: list[int], length: int, params: SamplingParams) -> list[int]:
        runner, plan, out = DecodeRunner(model), StepPlan(admit=[Admit(0, prompt, params)]), []
        for _ in range(length):
            out.append(runner.step(plan)[0].token)
            plan = StepPlan(decode=[0])
        return out

    jobs = [([5 + i, 9], 3 + i, SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i)) for i in range(5)]

    async def main() -> list[list[int]]:
        loop = StepLoop(step, ranks=2, seq_len=32, max_batch=2)
        loop.start()

        async def one(prompt, length, params) -> list[int]:
            return [picked.token async for picked, _ in loop.generate(prompt, length, params, stop=[])]

        return await asyncio.gather(*(one(*job) for job in jobs))

    assert asyncio.run(main()) == [alone(*job) for job in jobs]
    assert max(widest) == 2  # five requests, two slots: admitted as others retired
