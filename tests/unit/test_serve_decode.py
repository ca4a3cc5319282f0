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

    from ember.serve.batching import DriverLoop, LocalDriver, Scheduler, StepLoop

    model = tiny_moe_gpt()
    runners = [DecodeRunner(model), DecodeRunner(model)]  # two "ranks" (no experts split: no collectives)
    widest = []

    def step(plans: list[StepPlan]) -> dict:  # on the driver's thread, as in rank 0
        widest.append(sum(len(p.admit) + len(p.decode) for p in plans))
        return {k: v for runner, plan in zip(runners, plans, strict=True) for k, v in runner.step(plan).items()}

    def alone(prompt: list[int], length: int, params: SamplingParams) -> list[int]:
        runner, plan, out = DecodeRunner(model), StepPlan(admit=[Admit(0, prompt, params)]), []
        for _ in range(length):
            out.append(runner.step(plan)[0].token)
            plan = StepPlan(decode=[0])
        return out

    jobs = [([5 + i, 9], 3 + i, SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i)) for i in range(5)]

    driver = LocalDriver(DriverLoop(step, Scheduler(ranks=2, seq_len=32, max_batch=2)))

    async def main() -> list[list[int]]:
        loop = StepLoop(driver)
        loop.start()

        async def one(prompt, length, params) -> list[int]:
            return [picked.token async for picked, _ in loop.generate(prompt, length, params, stop=[])]

        return await asyncio.gather(*(one(*job) for job in jobs))

    try:
        assert asyncio.run(main()) == [alone(*job) for job in jobs]
    finally:
        driver.stop()
    assert max(widest) == 2  # five requests, two slots: admitted as others retired


def test_a_client_that_goes_away_is_retired_and_the_others_decode_on() -> None:
    """A request whose client stops reading (its generator closed after one token) is retired by the step
    after the cancel reaches the driver, not decoded to its 20 tokens; the request after it still gets its
    reference answer. The second step is held (a threading.Event) until the client has gone, so which step
    sees the cancel is fixed, not raced."""
    import asyncio
    import threading

    from ember.serve.batching import DriverLoop, LocalDriver, Scheduler, StepLoop

    model = tiny_moe_gpt()
    runner, plans, gone = DecodeRunner(model), [], threading.Event()

    def step(ranks: list[StepPlan]) -> dict:
        plans.append(ranks[0])
        if len(plans) == 2:
            assert gone.wait(60)
        return runner.step(ranks[0])

    driver = LocalDriver(DriverLoop(step, Scheduler(ranks=1, seq_len=32)))
    greedy = SamplingParams(temperature=0.0)

    async def main() -> tuple[list[int], list[int]]:
        loop = StepLoop(driver)
        loop.start()
        leaving = loop.generate([7, 8], 20, greedy, stop=[])
        first = [(await leaving.__anext__())[0].token]
        await leaving.aclose()  # the client went away after one token
        gone.set()
        staying = [picked.token async for picked, _ in loop.generate([5, 9], 6, greedy, stop=[])]
        return first, staying

    try:
        first, staying = asyncio.run(main())
    finally:
        driver.stop()
    reference = DecodeRunner(model)
    plan, expected = StepPlan(admit=[Admit(0, [5, 9], greedy)]), []
    for _ in range(6):
        expected.append(reference.step(plan)[0].token)
        plan = StepPlan(decode=[0])
    assert staying == expected
    assert len(first) == 1
    assert [plan.decode for plan in plans[:2]] == [[], [0]]  # admitted, then decoded once while it left
    assert plans[2].retire == [0] and all(0 not in plan.decode for plan in plans[2:])
    assert 0 not in runner.live
