"""TensorBoard logging and the progress bar of a training run."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from cleftchunk.train.config import TrainConfig
from cleftchunk.train.distributed import Dist
from cleftchunk.train.trainer import Trainer



# -- logging ---------------------------------------------------------------------------------------
def section_panels(image: torch.Tensor, label: torch.Tensor, logits: torch.Tensor, sections: int = 3) -> torch.Tensor:
    """(1, n·H, 3·W) grey panels: input | label | prediction for ``sections`` z-sections of sample 0."""
    img, lab = image[0, 0].float().cpu(), label[0, 0].float().cpu()
    prob = torch.sigmoid(logits[0, 0].float()).cpu()
    z = img.shape[0]
    picks = sorted({0, z // 2, z - 1})[:sections]
    rows = [torch.cat([img[k], lab[k], prob[k]], dim=1) for k in picks]
    return torch.cat(rows, dim=0).clamp(0, 1)[None]


def cache_hit_rate(batch: dict) -> float:
    """Hit rate of the decoded-chunk cache of the loader worker that made ``batch`` (so far)."""
    hits, misses = (int(v) for v in batch["cache"][:2])
    return hits / (hits + misses) if hits + misses else 0.0


class Logger:
    """TensorBoard (main process only) and the progress bar."""

    def __init__(self, config: TrainConfig, dist: Dist, start: int):
        self.config = config
        self.writer = None
        self.bar = None
        self.samples = 0
        self.t0 = time.perf_counter()
        self.losses: list[float] = []
        if not dist.main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(log_dir=str(config.tensorboard_dir), purge_step=start or None)
        self.bar = tqdm(
            total=config.iteration_total, initial=start, desc="train", unit="it", dynamic_ncols=True,
            disable=not config.progress, file=sys.stderr,
        )

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.samples / elapsed if elapsed > 0 else 0.0

    def iteration(self, trainer: Trainer, loss: float, batch: dict, logits: torch.Tensor) -> None:
        self.samples += self.config.batch_size
        self.losses.append(loss)
        if self.writer is None:
            return
        it = trainer.iteration
        self.bar.update(1)
        cache = {"cache_hits": f"{cache_hit_rate(batch):.0%}"} if "cache" in batch else {}
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{self.rate():.2f}", **cache, refresh=False)
        if it % self.config.log_every == 0 or it == self.config.iteration_total:
            self.writer.add_scalar("loss/train", float(np.mean(self.losses)), it)
            self.writer.add_scalar("lr", trainer.lr, it)
            self.writer.add_scalar("samples_per_s", self.rate(), it)
            self.writer.add_scalar("loader/mean_tries", float(batch["tries"].float().mean()), it)
            if "cache" in batch:
                self.writer.add_scalar("loader/cache_hit_rate", cache_hit_rate(batch), it)
            self.losses = []
        if self.config.image_every and (it % self.config.image_every == 0 or it == 1):
            self.writer.add_image("sections/input|label|prediction", section_panels(batch["image"], batch["label"], logits), it)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
