"""Next-token prediction for the GPT family."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.models.gpt import ModelOutput


def split_batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows of seq_len + 1 tokens -> (inputs, next-token targets)."""
    return rows[:, :-1], rows[:, 1:]


def lm_loss(
    output: ModelOutput, targets: torch.Tensor, aux_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy in nats/token plus the weighted MoE load-balancing loss; parts are detached tensors
    (no host sync per micro-batch)."""
    ce = F.cross_entropy(output.logits.float().flatten(0, 1), targets.flatten())
    loss = ce + aux_weight * output.aux_loss
    return loss, {"ce": ce.detach(), "aux_loss": output.aux_loss.detach().float()}
