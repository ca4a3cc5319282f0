"""A byte-level GPT checkpoint's loss over a whole val shard, to check what a run's evaluation reports.

    python bench/held_out.py RUN_DIR/checkpoints/step_000300 data/stdlib-text/val-000000.tar

A run evaluates the first `schedule.eval_batches x micro_batch` rows of its val shard (every rank the same
rows). This scores every row instead: the shard's documents end to end, cut into windows of seq_len + 1
bytes, each predicting its last seq_len bytes (no document separators, so the figure is the text's own).
Used for bench/RESULTS.md's "Data order and the held-out set". The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from ember.serve.weights import load_rank_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("val", type=Path, help="a text val shard (byte-level)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    model, _ = load_rank_model(args.checkpoint)
    length = model.spec.seq_len
    with tarfile.open(args.val) as tar:
        data = b"".join(tar.extractfile(member).read() for member in tar.getmembers() if member.isfile())
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    windows = (len(tokens) - 1) // length
    inputs = tokens[: windows * length].view(windows, length)
    targets = tokens[1 : windows * length + 1].view(windows, length)
    total = 0.0
    with torch.no_grad():
        for start in range(0, windows, args.batch):
            logits = model(inputs[start : start + args.batch]).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), targets[start : start + args.batch].flatten(),
                                     reduction="sum").item()
    loss = total / (windows * length)
    print(f"{args.checkpoint}: {windows} windows of {length} bytes ({len(data)} bytes): {loss:.4f} nats/byte")
    print(json.dumps({"bench": "held_out", "checkpoint": str(args.checkpoint), "windows": windows,
                      "bytes": len(data), "nats_per_byte": round(loss, 4)}))


if __name__ == "__main__":
    main()
