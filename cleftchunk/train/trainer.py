"""The trainer of one process: model, optimizer, schedule and EMA, one step, and checkpoint
save/restore (resuming gives bitwise the weights of an uninterrupted run on the CPU)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cleftchunk.errors import CleftchunkError
from cleftchunk.model import (
    build_model,
    on_device,
    set_output_prior,
    save_checkpoint,
)
from cleftchunk.train.config import TrainConfig
from cleftchunk.train.distributed import Dist
from cleftchunk.train.loss import training_loss
from cleftchunk.train.optim import EMA, PlateauWindow, make_optimizer, make_scheduler
from cleftchunk.train.outputs import rng_state, set_rng_state


# -- the trainer -----------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What hooks see after each iteration."""

    iteration: int
    loss: float
    config: TrainConfig
    trainer: "Trainer"
    writer: Any = None
    metrics: dict = field(default_factory=dict)


Hook = Callable[[TrainState], None]


class Trainer:
    """Model, optimizer, schedule and EMA of one process, with checkpoint save/restore."""

    def __init__(self, config: TrainConfig, dist: Dist):
        self.config = config
        self.dist = dist
        torch.manual_seed(config.seed)
        arch = config.arch_dict
        net = on_device(build_model(arch["name"], filters=arch["filters"], in_channels=1, out_channels=1), dist.device)
        if config.output_prior is not None:
            set_output_prior(net, config.output_prior)  # a resumed run's checkpoint replaces it
        if dist.active and dist.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        self.net = net
        self.model: nn.Module = net
        if dist.active:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.optimizer = make_optimizer(self.model.parameters(), config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.window = PlateauWindow()
        self.ema = EMA(net, config.ema) if config.ema else None
        self.iteration = 0
        self.amp = dist.device.type == "cuda" and config.bf16

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        """One optimisation step; returns (mean loss over processes, logits of this process)."""
        device = self.dist.device
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        self.model.train()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(image)
        loss = training_loss(logits, label, mask, self.config.dice, self.config.max_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value, gradients = self.look(loss)
        if not math.isfinite(value):
            raise NonFiniteLoss(value)
        if not math.isfinite(gradients):  # a finite loss can still give NaN gradients (a NaN it masked away)
            raise NonFiniteGradient(value)
        self.optimizer.step()
        if self.config.lr_schedule == "plateau":
            self.window.add(self.scheduler, value)
        else:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.net)
        self.iteration += 1
        return value, logits.detach()

    def look(self, loss: torch.Tensor) -> tuple[float, float]:
        """The mean loss over processes and the sum of this step's gradient norms, read from the
        device together: one wait for the device per step, not one per figure, and before the
        optimizer applies a NaN gradient to the weights."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros((), device=loss.device)
        value, gradients = torch.stack([self.dist.mean(loss.detach()).float(), norms.float()]).tolist()
        return value, gradients

    def inference_state(self) -> dict:
        """The weights prediction should use: the EMA when there is one."""
        return self.ema.state_dict() if self.ema is not None else self.net.state_dict()

    @contextlib.contextmanager
    def inference_net(self):
        """The bare network in eval mode, holding the inference weights for the duration."""
        saved = None
        if self.ema is not None:
            saved = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            self.net.load_state_dict(self.ema.state_dict())
        self.net.eval()
        try:
            yield self.net
        finally:
            if saved is not None:
                self.net.load_state_dict(saved)
            self.net.train()

    def save(self, path: Path) -> Path:
        extra = {
            "rng": rng_state(),
            "sampler": {"next_batch": self.iteration, "seed": self.config.seed},
            "trainer": {"plateau_window": list(self.window.losses), "ema_updates": self.ema.updates if self.ema else 0},
        }
        if self.ema is not None:
            extra["model_raw"] = self.net.state_dict()
        inference = _StateOnly(self.inference_state())
        return save_checkpoint(
            path, inference, self.config.arch_dict, self.config.input_size, self.iteration,
            self.optimizer, self.scheduler, self.config.to_dict(), extra,
        )

    def restore(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt.get("model_raw") or ckpt["model"])
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt.get("trainer") or {}
        self.window = PlateauWindow(state.get("plateau_window", []))
        if self.ema is not None:
            self.ema = EMA(self.net, self.config.ema, state.get("ema_updates", 0))
            self.ema.state = {k: v.to(self.dist.device).clone() for k, v in ckpt["model"].items()}
        self.iteration = int(ckpt["iteration"])
        set_rng_state(ckpt.get("rng"))


class _StateOnly(nn.Module):
    """Adapter so that save_checkpoint stores a given state dict as the model's weights."""

    def __init__(self, state: dict):
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        return self._state


class TrainingInterrupted(CleftchunkError):
    """Ctrl-C during training: said on one line with how to continue (exit status 130)."""

    exit_code = 130


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(f"loss {value}")
        self.value = value


class NonFiniteGradient(Exception):
    """A finite loss whose gradients hold NaN or inf; the weights were not changed."""
