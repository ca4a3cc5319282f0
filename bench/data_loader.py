"""ShardStream throughput against a raw read of the same tars, and the time from resume to the first batch.

    python bench/data_loader.py [--seconds 2] [--rounds 3]

Image shards: scikit-learn digits at 16x16 (15 train shards of 100); text: the stdlib shards (8 train
shards; data/stdlib-text, built if missing). The raw read is the stdlib's tarfile walking the same shards
in one process and reading every member's bytes: the floor any tar loader pays. ShardStream decodes too
(PNG -> float tensors, bytes -> packed token rows) and runs with 0 and 2 DataLoader workers. Resume: a
fresh stream loads the cursor saved at 1%, 50% and 99% of an epoch and hands out its first batch.
Rounds alternate the three readers so that drift on a shared machine hits all of them; figures are
medians over rounds (ratios: medians of the per-round ratios). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from ember.data.build import build_text_shards
from ember.data.build_images import build_image_shards
from ember.data.loader import build_stream
from ember.spec.data import DataSpec
from ember.spec.model import GPTSpec

REPO = Path(__file__).resolve().parents[1]
TEXT_MODEL = GPTSpec(seq_len=256)
MICRO_BATCH = 64
FRACTIONS = [0.01, 0.5, 0.99]


def raw_tar_read(urls: list[str]) -> tuple[int, int]:
    """(samples, bytes) of one sequential pass over the tars, reading every member."""
    keys, size = set(), 0
    for url in urls:
        with tarfile.open(url, mode="r|") as tar:
            for member in tar:
                size += len(tar.extractfile(member).read())
                keys.add(member.name.split(".", 1)[0])
    return len(keys), size


def rate(work: Callable[[], int], seconds: float) -> float:
    """Units of work per second, repeating `work` (which returns its units) for about `seconds`."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += work()
    return done / (time.perf_counter() - start)


def stream_rate(data: DataSpec, model: Any, unit: Callable[[Any], int], seconds: float) -> float:
    stream = build_stream(data, model, MICRO_BATCH, rank=0, world_size=1)
    next(stream)  # worker start-up is not throughput
    result = rate(lambda: unit(next(stream)), seconds)
    stream.close()
    return result


def resume_times(data: DataSpec, model: Any, epoch_batches: int, fractions: list[float]) -> dict[float, float]:
    """Seconds from a fresh stream + load_state to its first batch, at each fraction of an epoch."""
    stream = build_stream(data.model_copy(update={"num_workers": 0}), model, MICRO_BATCH, rank=0, world_size=1)
    states, taken = {}, 0
    for fraction in fractions:
        while taken < int(fraction * epoch_batches):
            next(stream)
            taken += 1
        states[fraction] = json.loads(json.dumps(stream.state()))
    times = {}
    for fraction, state in states.items():
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            resumed = build_stream(data, model, MICRO_BATCH, rank=0, world_size=1)
            resumed.load_state(state)
            next(resumed)
            samples.append(time.perf_counter() - start)
            resumed.close()
        times[fraction] = statistics.median(samples)
    return times


def text_shards() -> Path:
    folder = REPO / "data" / "stdlib-text"
    if not (folder / "shards.json").is_file():
        build_text_shards(folder, train_shards=8)
    return folder


def measure_round(data: DataSpec, model: Any, unit: Callable[[Any], int], per_pass: int, seconds: float) -> tuple:
    """(raw, 0 workers, 2 workers) rates, one after the other."""
    urls = list(braceexpand(data.train.urls))
    raw = rate(lambda: raw_tar_read(urls) and per_pass, seconds)
    streamed = [stream_rate(data.model_copy(update={"num_workers": w}), model, unit, seconds) for w in (0, 2)]
    return raw, *streamed


def bench_case(name: str, data: DataSpec, model: Any, unit: Callable[[Any], int], args: Any) -> tuple[tuple, dict]:
    samples, size = raw_tar_read(list(braceexpand(data.train.urls)))
    per_pass = samples if name == "images" else size  # images: samples; text: bytes (= tokens)
    rounds = [measure_round(data, model, unit, per_pass, args.seconds) for _ in range(args.rounds)]
    raw, zero, two = (statistics.median(r[i] for r in rounds) for i in range(3))
    epoch_batches = samples // MICRO_BATCH if name == "images" else size // (MICRO_BATCH * 257)
    resume = resume_times(data, model, epoch_batches, FRACTIONS)
    summary = {
        f"{name}_vs_raw_0_workers": round(statistics.median(r[1] / r[0] for r in rounds), 3),
        f"{name}_vs_raw_2_workers": round(statistics.median(r[2] / r[0] for r in rounds), 3),
        **{f"{name}_resume_s_at_{int(f * 100)}pct": round(resume[f], 4) for f in FRACTIONS},
        f"{name}_resume_99_vs_1": round(resume[0.99] / resume[0.01], 2),
    }
    what = "samples/s" if name == "images" else "tokens/s"
    return (name, what, raw, {0: zero, 2: two}, resume), summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="Measuring time per figure and round.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of raw / 0 workers / 2 workers.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        digits = Path(scratch) / "digits"
        build_image_shards(digits, "digits", shard_size=100, image_size=16)
        cases = {
            "images": (DataSpec(train={"urls": f"{digits}/train-{{000000..000014}}.tar"}, decode="image"), None, len),
            "text": (
                DataSpec(train={"urls": f"{text_shards()}/train-{{000000..000007}}.tar"}),
                TEXT_MODEL,
                lambda batch: batch.numel(),
            ),
        }
        rows, summary = [], {"bench": "data_loader", "cpus": _cpus()}
        for name, (data, model, unit) in cases.items():
            row, figures = bench_case(name, data, model, unit, args)
            rows.append(row)
            summary.update(figures)
    print_table(rows)
    print(json.dumps(summary))


def print_table(rows: list[tuple[str, str, float, dict[int, float], dict[float, float]]]) -> None:
    print(f"{'data':7s} {'unit':10s} {'raw tar':>12s} {'0 workers':>12s} {'2 workers':>12s}   resume 1% / 50% / 99%")
    for name, what, raw, measured, resume in rows:
        times = " / ".join(f"{resume[f] * 1000:.0f} ms" for f in sorted(resume))
        print(f"{name:7s} {what:10s} {raw:12,.0f} {measured[0]:12,.0f} {measured[2]:12,.0f}   {times}")
    sys.stdout.flush()


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
