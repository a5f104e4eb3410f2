"""Optimizers (Adam with amsgrad, as the original; AdamW), learning-rate schedules, and an EMA of the weights."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from cleftchunk.model import (
    unwrap,
)
from cleftchunk.train.config import TrainConfig


# -- optimizer, schedule, EMA ----------------------------------------------------------------------
def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        wd = 1e-6 if config.weight_decay is None else config.weight_decay
        return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, amsgrad=True)
    wd = 1e-2 if config.weight_decay is None else config.weight_decay
    return torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=config.plateau_patience, threshold=1e-4, min_lr=config.min_lr
        )
    if config.lr_schedule == "cosine":
        floor = min(config.min_lr / config.lr, 1.0)
        total, warmup = config.iteration_total, config.warmup

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class PlateauWindow:
    """The original steps reduce-on-plateau every 10 iterations with the mean loss of those 10."""

    EVERY = 10

    def __init__(self, losses: Sequence[float] = ()):
        self.losses = list(losses)

    def add(self, scheduler: Any, loss: float) -> None:
        self.losses.append(float(loss))
        if len(self.losses) == self.EVERY:
            scheduler.step(sum(self.losses) / self.EVERY)
            self.losses = []


class EMA:
    """Exponential moving average of a model's state (parameters and BN statistics).

    The decay ramps up as min(decay, (1 + n)/(10 + n)) so that early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, updates: int = 0):
        self.decay = float(decay)
        self.updates = int(updates)
        self.state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in unwrap(model).state_dict().items():
            shadow = self.state[key]
            if shadow.is_floating_point():
                shadow.mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict:
        return self.state
