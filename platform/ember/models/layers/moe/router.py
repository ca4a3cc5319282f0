"""Top-k softmax router: which experts each token goes to, with what weight, and the routing losses.

Semantics. In capacity mode they are those of DeepSpeed 0.19.8's TopKGate with use_rts=False and
top2_2nd_expert_sampling=False, reproduced call for call where rounding or tie-breaking depends on it:

- logits = x.float() @ W_g^T, in fp32; p = softmax(logits). Noisy gating (Shazeer et al. 2017), in training
  only: logits += N(0, 1) * softplus(x @ W_noise^T), and p is the softmax of the noisy logits.
- top-1: expert = argmax p; weight = p[expert], not renormalised. Capacity C = max(ceil(S / E * cf), min_capacity)
  for S tokens, cf = capacity_factor in training and eval_capacity_factor in eval. An expert chosen by more
  than C tokens keeps the C tokens `torch.topk(one_hot(expert), C, dim=0)` returns: DeepSpeed's rule without
  random token selection. Which of the equal mask values topk returns is torch's choice, deterministic for a
  given device but NOT first-come (on CPU it favours later tokens); ember makes the same call to match it.
- top-2: first = argmax p, second = argmax of the logits with the first masked out. C = max(ceil(S / E * 2cf),
  min_capacity). An expert's slots fill with first choices in token order, then second choices in token
  order; routes past C drop. weight_i = p_i / max(p_1 + p_2, eps) over the routes kept, so a token whose
  second route dropped gets weight 1 on its first.
- dropless (drop_tokens=False): no route drops; weights as above.
- balance loss (Switch Transformer): E * sum_e mean_s(p_e) * (fraction of tokens whose FIRST choice is e),
  counted before drops, on top-2 too (DeepSpeed's definition).
- z-loss (ST-MoE): mean_s logsumexp(logits)^2, on the noise-free logits.

- expert choice (Zhou et al. 2022), instead of the above: every expert takes the C = ceil(S / E * k * cf)
  tokens with the highest p for it, weighted by that p; a token may reach 0 to E experts. Balanced by
  construction (no balance loss), but a token's experts depend on the other tokens of the batch, so it
  is not causal: for LM training only where that is acceptable.

- top_k > 2, sigmoid scoring or bias balancing: experts = topk(scores (+ score_bias), k); weights are the
  scores (never the bias) of the chosen experts, renormalised to sum 1 when `normalise`; sigmoid scores
  (DeepSeek-V3) are normalised over experts for the balance loss and the statistics.
- bias balancing (DeepSeek-V3, auxiliary-loss-free): no balance loss; training forwards count each expert's
  routes, and `update_balance_biases` moves the bias by rate * sign(mean load - load) after each step.
Routing is deterministic: nothing is sampled except the noise of noisy gating.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    experts: torch.Tensor  # [S, k] global expert id of each route; a dropped route holds num_experts
    weights: torch.Tensor  # [S, k] fp32 combine weight; 0 for a dropped route
    counts: torch.Tensor  # [E] routes each expert receives after drops
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


class TopKRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float,
        eval_capacity_factor: float,
        min_capacity: int,
        drop_tokens: bool,
        noisy: bool = False,
        expert_choice: bool = False,
        scoring: str = "softmax",
        normalise: bool | None = None,
        balance: str = "aux_loss",
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k}: the router needs 1 <= top_k <= num_experts={num_experts}")
        self.num_experts, self.top_k, self.scoring = num_experts, top_k, scoring
        self.normalise = normalise if normalise is not None else (top_k > 1 or scoring == "sigmoid")
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.drop_tokens, self.expert_choice = min_capacity, drop_tokens, expert_choice
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy else None
        self.bias_update_rate = bias_update_rate
        # Registered only for bias balancing: other routers' state dicts (and old checkpoints) stay as they were.
        self.register_buffer("score_bias", torch.zeros(num_experts) if balance == "bias" else None)
        self.register_buffer("pending_load", torch.zeros(num_experts) if balance == "bias" else None, persistent=False)
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [S, d] tokens."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32, whatever the precision
            logits = F.linear(x.float(), self.gate.weight.float())
            noisy = self._add_noise(x, logits)
        scores = F.softmax(noisy, dim=1) if self.scoring == "softmax" else torch.sigmoid(noisy)
        probs = scores if self.scoring == "softmax" else scores / scores.sum(dim=1, keepdim=True)
        if self.expert_choice:
            return self._experts_choose(probs, logits)
        experts = self._choose(scores, noisy)
        kept = self._keep(experts) if self.drop_tokens else torch.ones_like(experts, dtype=torch.bool)
        weights = self._weights(scores, experts, kept)
        routed = torch.where(kept, experts, self.num_experts)
        counts = torch.bincount(routed.flatten(), minlength=self.num_experts + 1)[: self.num_experts]
        balance = balance_loss(probs, experts[:, 0], self.top_k)
        z_loss = torch.logsumexp(logits, dim=1).square().mean()
        self.last_stats = routing_stats(probs, experts, kept, balance, z_loss)
        if self.score_bias is not None:
            self.last_stats["score_bias"] = self.score_bias.detach().float().clone()
            if self.training and torch.is_grad_enabled():  # a training forward (not eval, not generation)
                self._record_load(experts)
            balance = balance.new_zeros(())  # balanced by the bias, not by a loss
        return Routing(routed, weights, counts, balance, z_loss)

    @torch.no_grad()
    def _record_load(self, experts: torch.Tensor) -> None:
        # Activation checkpointing recomputes every block once more with the same bias: each load doubles,
        # and sign(mean - load) does not change.
        self.pending_load += torch.bincount(experts.flatten(), minlength=self.num_experts).float()

    @torch.no_grad()
    def apply_load(self, load: torch.Tensor) -> None:
        """DeepSeek-V3's update: raise the bias of experts below the mean load, lower it above; forget the load."""
        self.score_bias += self.bias_update_rate * torch.sign(load.mean() - load).to(self.score_bias.dtype)
        self.pending_load.zero_()

    def _experts_choose(self, probs: torch.Tensor, logits: torch.Tensor) -> Routing:
        """Expert choice: routes as [S, E], column e holding e where expert e took the token."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        tokens = probs.shape[0]
        capacity = min(deepspeed_capacity(tokens, self.num_experts, factor * self.top_k, self.min_capacity), tokens)
        chosen = torch.topk(probs, capacity, dim=0).indices  # [C, E]: each expert's tokens
        taken = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, chosen, True)
        experts = torch.arange(self.num_experts, device=probs.device).expand_as(probs)
        z_loss = torch.logsumexp(logits, dim=1).square().mean()
        balance = probs.new_zeros(())  # balanced by construction
        self.last_stats = expert_choice_stats(probs, taken, z_loss)
        return Routing(torch.where(taken, experts, self.num_experts), probs * taken, taken.sum(0), balance, z_loss)

    def _add_noise(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.noise is None or not self.training:
            return logits
        scale = F.softplus(F.linear(x.float(), self.noise.weight.float()))
        return logits + torch.randn_like(logits) * scale

    def _choose(self, scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.scoring != "softmax" or self.score_bias is not None or self.top_k > 2:
            selection = scores if self.score_bias is None else scores + self.score_bias.float()
            return torch.topk(selection, self.top_k, dim=1).indices
        first = torch.argmax(scores, dim=1)
        if self.top_k == 1:
            return first.unsqueeze(1)
        second = torch.argmax(logits.masked_fill(F.one_hot(first, self.num_experts).bool(), float("-inf")), dim=1)
        return torch.stack([first, second], dim=1)

    def _keep(self, experts: torch.Tensor) -> torch.Tensor:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = deepspeed_capacity(experts.shape[0], self.num_experts, factor * self.top_k, self.min_capacity)
        if self.top_k == 1:
            return keep_like_deepspeed_top1(experts[:, 0], self.num_experts, capacity).unsqueeze(1)
        return keep_first_come(experts, self.num_experts, capacity)

    def _weights(self, scores: torch.Tensor, experts: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        chosen = scores.gather(1, experts) * kept  # the bias chose the experts; it never weighs them
        if not self.normalise:
            return chosen
        return chosen / torch.clamp(chosen.sum(dim=1, keepdim=True), min=torch.finfo(chosen.dtype).eps)


@torch.no_grad()
def update_balance_biases(model: nn.Module) -> None:
    """After an optimizer step: move every bias-balanced router's expert bias by the load it saw, summed over
    all ranks first (one all-reduce), so every replica of a router keeps the same bias."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.score_bias is not None]
    if not routers:
        return
    loads = torch.cat([router.pending_load for router in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)
    for router, load in zip(routers, loads.split([r.num_experts for r in routers]), strict=True):
        router.apply_load(load)


def deepspeed_capacity(tokens: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """ceil(tokens / experts * factor) with the factor as a float32 tensor, as DeepSpeed rounds it."""
    capacity = torch.ceil((tokens / num_experts) * torch.tensor(factor)).to(torch.int64)
    return max(int(capacity), min_capacity)


def keep_like_deepspeed_top1(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[S] bool: the tokens DeepSpeed's top-1 gate keeps (same topk call, so the same choice among ties)."""
    mask = F.one_hot(experts, num_experts)
    chosen = torch.topk(mask, k=min(capacity, mask.shape[0]), dim=0)[1]
    selected = torch.zeros_like(mask).scatter_(0, chosen, 1)
    return selected.gather(1, experts.unsqueeze(1)).squeeze(1).bool()


def keep_first_come(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[S, k] bool: routes within capacity when slots fill choice by choice, each in token order."""
    by_choice = experts.t().reshape(-1)
    order = torch.argsort(by_choice, stable=True)
    counts = torch.bincount(by_choice, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device) - starts[by_choice[order]]
    return (position < capacity).view(experts.shape[1], experts.shape[0]).t()


def balance_loss(probs: torch.Tensor, first: torch.Tensor, top_k: int) -> torch.Tensor:
    num_experts = probs.shape[1]
    mean_prob = torch.mean(probs, dim=0)
    first_fraction = torch.bincount(first, minlength=num_experts).float() / first.numel()
    if top_k == 1:
        return torch.sum(mean_prob * first_fraction) * num_experts
    return torch.mean(mean_prob * first_fraction) * num_experts * num_experts  # DeepSpeed's top-2 rounding


@torch.no_grad()
def routing_stats(
    probs: torch.Tensor, experts: torch.Tensor, kept: torch.Tensor, balance: torch.Tensor, z_loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Detached tensors (no host sync) for logging: load per expert, drops, entropy, losses."""
    routes = experts.numel()
    return {
        "expert_fraction": torch.bincount(experts.flatten(), minlength=probs.shape[1]).float() / routes,
        "dropped_fraction": (~kept).sum().float() / routes,
        "router_entropy": -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1).mean(),
        "balance_loss": balance.detach(),
        "z_loss": z_loss.detach(),
    }


@torch.no_grad()
def expert_choice_stats(probs: torch.Tensor, taken: torch.Tensor, z_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """routing_stats for expert choice: `dropped_fraction` is the share of tokens no expert took."""
    counts = taken.sum(0).float()
    return {
        "expert_fraction": counts / counts.sum(),
        "dropped_fraction": (~taken.any(dim=1)).float().mean(),
        "router_entropy": -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1).mean(),
        "balance_loss": probs.new_zeros(()),
        "z_loss": z_loss.detach(),
    }
