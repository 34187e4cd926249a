"""The optimiser and learning-rate schedule every LLM-training stage of the toy shares (stages 0c and 1, and
the symbolic benchmark that mirrors them), so that a stage differs from another only in what it trains on."""

from __future__ import annotations

import math

import torch


def toy_adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norms and biases: none), betas (0.9, 0.98)."""
    params = list(params)
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98))


def lr_at(step: int, schedule) -> float:
    """Linear warm-up over ``schedule.warmup`` steps, then cosine decay to 5% of ``schedule.lr`` at ``schedule.steps``."""
    if step < schedule.warmup:
        return schedule.lr * (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return schedule.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


__all__ = ["lr_at", "toy_adamw"]
