"""Next-token prediction for the GPT family."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ember.data.tokenizer import TextTokenizer, bits_per_byte
from ember.engines import build_engine
from ember.generation.sampling import sample_image_tokens, sample_tokens
from ember.models.gpt import ModelOutput, build_model
from ember.models.layers.moe.router import update_balance_biases
from ember.observe.images import image_grid
from ember.train.objectives.base import ModelParts, NextBatch, Sample
from ember.world import ExpertPlacement, World


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


class LanguageModelObjective:
    """A GPT over bytes (text) or image tokens (a class token, then one token per pixel: DALL-E's idea)."""

    throughput_name = "tokens_per_s"
    loss_unit = "nats/token"

    def __init__(self, spec, world: World, placement: ExpertPlacement | None = None) -> None:
        self.spec, self.world = spec, world
        placement = placement or world.expert_placement(spec.model)
        self.model = build_model(spec.model, placement, spec.schedule.seed)
        if spec.model.init_from:  # fine-tuning a Hugging Face checkpoint (a resume then loads over it)
            from ember.interop.huggingface import load_into

            load_into(self.model, spec.model, Path(spec.model.init_from))
        self.model = self.model.to(world.device)
        self.engine = build_engine(spec, self.model, world)
        self.engines = {"model": self.engine}
        self.parts = ModelParts(self.engines, {}, world)
        self.items_per_step = spec.global_batch * spec.model.seq_len
        self.aux_weight = spec.model.moe.aux_loss_weight if spec.model.moe else 0.0
        text = spec.data.decode == "text"  # held-out loss also in bits per byte: comparable across tokenizers
        self.tokenizer = TextTokenizer.from_spec(spec.data.tokenizer)
        self.byte_lengths = self.tokenizer.byte_lengths() if text else None
        self.eval_extras: dict[str, float] = {}

    def train_step(self, next_batch: NextBatch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        totals = torch.zeros(2, dtype=torch.float64, device=self.world.device)
        for _ in range(self.spec.grad_accumulation):
            inputs, targets = split_batch(next_batch().to(self.world.device, non_blocking=True))
            loss, parts = lm_loss(self.engine.forward(inputs), targets, self.aux_weight)
            self.engine.backward(loss)
            totals += torch.stack([parts["ce"], parts["aux_loss"]]).double()
        grad_norm = self.engine.step()
        update_balance_biases(self.model)  # balance: bias (DeepSeek-V3): after the step, from its load
        totals /= self.spec.grad_accumulation
        means = {"loss": totals[0]} | ({"aux_loss": totals[1]} if self.spec.model.moe else {})
        return means, {"grad_norm": float(grad_norm), "lr": self.engine.lr()}

    @torch.no_grad()
    def eval_loss(self, next_batch: NextBatch, batches: int) -> torch.Tensor:
        self.engine.module.eval()
        total = torch.zeros(1, dtype=torch.float64, device=self.world.device)
        nats, text_bytes, tokens = 0.0, 0, 0
        for _ in range(batches):
            inputs, targets = split_batch(next_batch().to(self.world.device))
            ce = lm_loss(self.engine.forward(inputs), targets, 0.0)[1]["ce"].double()
            total += ce
            if self.byte_lengths is not None:  # every rank reads the same held-out rows: no reduction needed
                nats += float(ce) * targets.numel()
                tokens += targets.numel()
                text_bytes += int(self.byte_lengths[targets.cpu().numpy()].sum())
        self.engine.module.train()
        self.eval_extras = {"bits_per_byte": bits_per_byte(nats / max(tokens, 1), tokens, text_bytes)} if tokens else {}
        return total / batches

    def sample(self, seed: int) -> Sample | None:
        """Every rank generates (MoE layers exchange tokens); the caller reports rank 0's."""
        if self.spec.data.decode == "image_tokens":
            return self.sample_digits(seed)
        log = self.spec.logging
        if log.sample_tokens == 0:
            return None
        self.engine.module.eval()
        tokens = sample_tokens(
            lambda ids: self.engine.forward(ids).logits, self.tokenizer.encode(log.sample_prompt), log.sample_tokens,
            self.spec.model.seq_len, log.sample_temperature, top_k=None, seed=seed, device=self.world.device,
        )
        self.engine.module.train()
        return Sample(text=log.sample_prompt + self.tokenizer.decode(tokens))

    def sample_digits(self, seed: int) -> Sample | None:
        """A grid of image-token samples: one column per class."""
        if self.spec.logging.sample_rows == 0:
            return None
        tokens = self.spec.data.image_tokens
        classes = torch.arange(tokens.num_classes).repeat(self.spec.logging.sample_rows)
        self.engine.module.eval()
        images = sample_image_tokens(
            lambda ids: self.engine.forward(ids).logits, classes, self.spec.model.seq_len, tokens.levels,
            temperature=self.spec.logging.sample_temperature, seed=seed, device=self.world.device,
        )
        self.engine.module.train()
        return Sample(grid=image_grid(images, columns=tokens.num_classes))
