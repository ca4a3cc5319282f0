"""What keeps one request from breaking a replica, without Ray: a bad sequence fails alone, sampling stays
finite at any temperature, penalties match vLLM's formulas, streamed text equals the collected text."""

from __future__ import annotations

import pytest
import torch

from ember.errors import UserError
from ember.generation.decode import Admit, DecodeRunner, StepPlan
from ember.generation.sampling import SamplingParams, decode_bytes
from ember.models import build_model
from ember.serve.app import refuse_expert_choice
from ember.serve.completions import ChoiceText
from ember.spec.model import GPTSpec, MoESpec


def tiny_gpt(**moe):
    spec = GPTSpec(d_model=32, n_layers=2, n_heads=2, seq_len=32, moe=MoESpec(num_experts=4, drop_tokens=False, **moe))
    return build_model(spec, seed=1).eval()


def test_a_sequence_the_model_cannot_take_fails_alone_and_the_others_decode_on() -> None:
    runner, greedy = DecodeRunner(tiny_gpt()), SamplingParams(temperature=0)
    alone = DecodeRunner(tiny_gpt()).step(StepPlan(admit=[Admit(0, [10, 20], greedy)]))[0].token
    bad = [Admit(1, [10, 300], greedy), Admit(2, [1] * 33, greedy), Admit(3, [5], SamplingParams(seed=2**64))]
    picked = runner.step(StepPlan(admit=[Admit(0, [10, 20], greedy), *bad]))
    assert "vocabulary" in picked[1].error
    assert "context" in picked[2].error
    assert "sampling" in picked[3].error
    assert picked[0].token == alone
    assert set(runner.live) == {0}


@pytest.mark.parametrize("temperature", [1e-300, 1e-6, 1e-3, 10.0])
def test_any_allowed_temperature_picks_a_token_of_the_vocabulary(temperature: float) -> None:
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 30
    params = SamplingParams(temperature=temperature, seed=3)
    token = params.pick(logits, params.generator())
    assert 0 <= token < 256
    assert (temperature > 1e-5 or token == int(logits.argmax()))


def test_penalties_and_logit_bias_follow_vllms_formulas() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    prompt, generated = [0, 1], [3, 3, 4]
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias=((2, 1.5),)
    )
    expected = [2.0 / 2, -1.0 * 2, 0.5 + 1.5, 3.0 / 2 - 0.5 - 0.25 * 2, -2.0 * 2 - 0.5 - 0.25]
    assert params.adjust(logits, prompt, generated).tolist() == pytest.approx(expected)


def test_streamed_text_holds_back_what_a_stop_string_may_need_and_equals_the_collected_text() -> None:
    tokens, stop = list("héllo wörld, bye".encode()), ["ld,", "zz"]
    whole = decode_bytes(tokens)
    stream, pieces = ChoiceText(stop), []
    for i, token in enumerate(tokens):
        ends = "ld," in decode_bytes(tokens[: i + 1])
        pieces.append(stream.add(token, "stop" if ends else None))
        if ends:
            break
    assert "".join(pieces) == whole[: whole.index("ld,")]
    assert all("l" not in piece or "ld," not in piece for piece in pieces)


def test_expert_choice_checkpoints_are_refused_with_the_field_named() -> None:
    refuse_expert_choice(tiny_gpt().spec)  # token choice serves
    with pytest.raises(UserError, match="expert_choice"):
        refuse_expert_choice(tiny_gpt(routing="expert_choice", impl="ember").spec)


def test_the_kv_budget_counts_what_a_sequence_allocates_and_admission_keeps_to_it() -> None:
    import asyncio

    from ember.serve.batching import DriverLoop, LocalDriver, Scheduler, StepLoop
    from ember.serve.memory import MIB, kv_bytes_per_sequence, sequences_per_rank

    model = tiny_gpt()
    runner = DecodeRunner(model)
    runner.step(StepPlan(admit=[Admit(0, [1, 2, 3], SamplingParams(temperature=0))]))
    cache = runner.live[0].cache
    allocated = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert kv_bytes_per_sequence(model.spec) == allocated
    assert sequences_per_rank(model.spec, 2.5 * allocated / MIB, max_batch=64) == 2
    with pytest.raises(UserError, match="--kv-cache-mb"):
        sequences_per_rank(model.spec, 0.5 * allocated / MIB, max_batch=64)
    half = DecodeRunner(tiny_gpt().to(torch.bfloat16))  # `--dtype bf16`: the cache is kept in the weights' dtype
    half.step(StepPlan(admit=[Admit(0, [1, 2, 3], SamplingParams(temperature=0))]))
    halved = sum(t.numel() * t.element_size() for t in [*half.live[0].cache.keys, *half.live[0].cache.values])
    assert kv_bytes_per_sequence(model.spec, element_size=2) == halved == allocated // 2
    assert sequences_per_rank(model.spec, 2.5 * allocated / MIB, max_batch=64, element_size=2) == 5

    held = []

    def step(plans: list[StepPlan]) -> dict:
        picked = runner.step(plans[0])
        held.append(len(runner.live))
        return picked

    runner = DecodeRunner(model)
    driver = LocalDriver(DriverLoop(step, Scheduler(ranks=1, seq_len=32, max_batch=64, max_per_rank=2)))

    async def main() -> list[list[int]]:
        loop = StepLoop(driver)
        loop.start()

        async def one(prompt: list[int]) -> list[int]:
            return [p.token async for p, _ in loop.generate(prompt, 4, SamplingParams(temperature=0), stop=[])]

        return await asyncio.gather(*(one([5 + i]) for i in range(5)))

    try:
        assert len(asyncio.run(main())) == 5  # five requests, a budget of two caches
    finally:
        driver.stop()
    assert max(held) == 2


def test_a_full_waiting_line_refuses_new_sequences_instead_of_queueing_them() -> None:
    import asyncio
    import threading

    from ember.serve.batching import DriverLoop, LocalDriver, Overloaded, Scheduler, StepLoop
    from ember.serve.completions import failure

    runner, release = DecodeRunner(tiny_gpt()), threading.Event()

    def step(plans: list[StepPlan]) -> dict:  # the first sequence's first step holds until the end
        assert release.wait(60)
        return runner.step(plans[0])

    driver = LocalDriver(DriverLoop(step, Scheduler(ranks=1, seq_len=32)))

    async def main() -> None:
        loop = StepLoop(driver, max_waiting=1)
        loop.start()
        first = loop.generate([1], 2, SamplingParams(), stop=[])
        waiting = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0)
        assert not loop.room(1)
        with pytest.raises(Overloaded) as raised:
            await loop.generate([2], 2, SamplingParams(), stop=[]).__anext__()
        refusal = failure(raised.value)
        assert (refusal.status, refusal.headers) == (503, {"Retry-After": "1"})
        release.set()
        assert (await waiting)[0].token >= 0  # the one admitted still completes
        await first.aclose()

    try:
        asyncio.run(main())
    finally:
        release.set()
        driver.stop()


def test_without_a_budget_ranks_sharing_a_host_split_half_its_free_memory_and_the_smallest_share_wins() -> None:
    from ember.serve.memory import DEFAULT_KV_FRACTION, MIB, default_kv_cache_mb, free_memory_bytes

    free = free_memory_bytes(torch.device("cpu"))
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < free <= total
    ranks = [{"memory_pool": "node-a/cpu", "free_memory_bytes": 8 * MIB},
             {"memory_pool": "node-a/cpu", "free_memory_bytes": 8 * MIB},
             {"memory_pool": "node-b/cpu", "free_memory_bytes": 12 * MIB}]  # fmt: skip
    assert default_kv_cache_mb(ranks) == DEFAULT_KV_FRACTION * 8 / 2  # node a's two ranks share its 8 MiB
    assert default_kv_cache_mb(ranks[2:]) == DEFAULT_KV_FRACTION * 12


def test_auto_precision_is_fp32_on_cpu_and_16_bit_on_a_gpu() -> None:
    from ember.generation.precision import generation_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device name only: nothing runs on it
    assert generation_dtype("auto", cpu, trained="bf16") == torch.float32
    assert generation_dtype("auto", gpu, trained="fp32") == torch.bfloat16
    assert generation_dtype("auto", gpu, trained="fp16") == torch.float16  # the checkpoint's own 16 bits
    assert generation_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="--dtype fp8"):
        generation_dtype("fp8", cpu)


def test_bf16_generation_stays_close_to_fp32() -> None:
    """The same checkpoint in bf16 (weights and KV cache) scores the next token like fp32 does."""
    model = tiny_gpt()
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        exact = model(tokens).logits.log_softmax(-1)
        half = model.to(torch.bfloat16)(tokens).logits.float().log_softmax(-1)
    assert (half - exact).abs().max() < 0.1
