"""Training: loss, optimizers, the loop, checkpoints, logging, validation, and several GPUs.

``train(config) -> Path`` runs a whole training and returns ``<output>/last.pth``. The defaults are
the original pipeline's (see shared/reference/pipeline-facts.md): class-rebalanced BCE, Adam with
amsgrad and reduce-on-plateau, checkpoints ``volume_<iteration>.pth`` every ``iteration_save``
iterations and at the end. Options: a Dice term, AdamW + cosine decay, an EMA of the weights.

With an EMA (``ema`` = its decay, e.g. 0.999), the checkpoint's ``model`` entry holds the EMA
weights — the ones prediction loads — and ``model_raw`` the weights being trained (for resuming).

Determinism: the model is initialised from ``seed``; batch ``b`` is a pure function of (seed, b)
(see :mod:`cleftchunk.data`), so ``--resume`` from ``last.pth`` continues exactly: on the CPU with
the same settings, a resumed run ends with bitwise the same weights as an uninterrupted one.

Logging: TensorBoard event files under ``log_dir`` (default ``runs/<output folder name>``, so that
``tensorboard --logdir runs`` run where training was started shows it): loss, learning rate,
samples/s, image panels (input | label | prediction) of three sections, validation metrics; a tqdm
progress bar with iteration, loss, samples/s and ETA.

Several processes: DistributedDataParallel with synchronized batch norm on GPUs (``gpus`` = N:
the command spawns N processes; under ``torchrun`` the environment's ranks are used). ``batch_size``
is the global batch (the tutorial's ``-b 8 -g 4`` = 2 crops per GPU). ``cpu_processes`` = N runs
the same code path on the CPU with the gloo backend (plain per-process batch norm, which
SyncBatchNorm does not support on the CPU); it exists to test the multi-process path, not for speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .augment import AugmentConfig
from .data import CropSampler, CropStream, RejectionConfig, label_codes, make_loader, open_training_volumes, split_list
from .errors import CleftchunkError
from .geometry import Roi
from .model import (
    build_model,
    check_input_shape,
    checkpoint_input_size,
    load_checkpoint,
    resolve_filters,
    save_checkpoint,
    unwrap,
)

CHECKPOINT_GLOB = ("volume_*.pth", "last.pth")


# -- configuration ----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a training run needs; YAML files and command-line flags use these names."""

    images: list[str] = field(default_factory=list)  # -dn, relative to root
    labels: list[str] = field(default_factory=list)  # -ln
    root: str | None = None  # -t
    output: str = "outputs/unetv0"  # -o
    lr: float = 1e-3
    iteration_total: int = 100_000
    iteration_save: int = 10_000
    input_size: list[int] = field(default_factory=lambda: [8, 256, 256])  # -mi
    gpus: int | None = None  # -g; None: 1 if CUDA is available, else the CPU
    workers: int = 1  # -c
    cache_mb: float = 512  # decoded-chunk cache of each loader process (0: none)
    batch_size: int = 8  # -b, global over all processes
    arch: str = "unetv0"  # -ac
    preset: str | None = None
    filters: list[int] | None = None
    seed: int = 0
    label_mode: str = "auto"
    augment: dict = field(default_factory=dict)  # AugmentConfig fields
    rejection: dict = field(default_factory=dict)  # RejectionConfig fields
    optimizer: str = "adam"  # adam (amsgrad, the original) | adamw
    weight_decay: float | None = None  # None: 1e-6 for adam, 1e-2 for adamw
    scheduler: str = "plateau"  # plateau (the original) | cosine | constant
    warmup: int = 0  # linear warm-up iterations (cosine)
    min_lr: float = 1e-7
    plateau_patience: int = 1000  # scheduler steps of 10 iterations each
    ema: float = 0.0  # EMA decay of the weights; 0: off
    dice: float = 0.0  # weight of the Dice term added to the BCE
    bf16: bool = True  # autocast on GPUs
    log_dir: str | None = None  # default runs/<output folder name>
    log_every: int = 10
    image_every: int = 500
    validate_image: str | None = None
    validate_labels: str | None = None
    validate_roi: str | None = None  # "z0:z1,y0:y1,x0:x1" voxels of the validation volume
    validate_every: int = 0
    progress: bool = True
    threads: int | None = None  # torch threads on the CPU; None: cores left over by the loader workers
    cpu_processes: int = 0  # DDP on the CPU (gloo) to exercise the multi-process path

    #: Keys that control one invocation and are not stored with the run.
    RUN_ONLY = ("resume", "overwrite")

    @classmethod
    def from_dict(cls, values: dict | None) -> "TrainConfig":
        values = {k.replace("-", "_"): v for k, v in dict(values or {}).items() if k not in cls.RUN_ONLY}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CleftchunkError(f"unknown training setting(s) {', '.join(unknown)}: valid ones are {', '.join(sorted(known))}")
        config = cls(**values)
        config.normalize()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def normalize(self) -> None:
        self.images = split_list(self.images)
        self.labels = split_list(self.labels)
        self.input_size = parse_shape(self.input_size, "model input -mi")
        check_input_shape(self.input_size)
        if self.filters is not None:
            self.filters = parse_ints(self.filters, "--filters")
        self.augment = AugmentConfig.from_dict(self.augment).to_dict()
        self.rejection = RejectionConfig.from_dict(self.rejection).to_dict()
        for name in ("iteration_total", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise CleftchunkError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if int(self.iteration_save) < 0 or int(self.workers) < 0:
            raise CleftchunkError("iteration-save and the number of workers -c must not be negative")
        if not float(self.lr) > 0:
            raise CleftchunkError(f"learning rate -lr {self.lr} must be positive")
        if self.optimizer not in ("adam", "adamw"):
            raise CleftchunkError(f"unknown optimizer {self.optimizer!r}: use adam or adamw")
        if self.scheduler not in ("plateau", "cosine", "constant"):
            raise CleftchunkError(f"unknown scheduler {self.scheduler!r}: use plateau, cosine or constant")
        if not 0 <= float(self.ema) < 1:
            raise CleftchunkError(f"ema decay {self.ema} must lie in [0, 1) (0 switches it off; 0.999 is typical)")
        if bool(self.validate_image) != bool(self.validate_labels):
            raise CleftchunkError("validation needs both --validate-image and --validate-labels")
        resolve_filters(self.arch, self.preset, self.filters)  # unknown presets fail now, not later

    @property
    def arch_dict(self) -> dict:
        return {
            "name": self.arch,
            "filters": list(resolve_filters(self.arch, self.preset, self.filters)),
            "in_channels": 1,
            "out_channels": 1,
        }

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path("runs") / (self.output_dir.resolve().name or "train")


def parse_ints(value: Any, what: str) -> list[int]:
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise CleftchunkError(f"{what} {value!r} must be integers separated by commas, e.g. 8,256,256") from None


def parse_shape(value: Any, what: str) -> list[int]:
    shape = parse_ints(value, what)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise CleftchunkError(f"{what} {value!r} must be three positive sizes z,y,x, e.g. 8,256,256")
    return shape


def load_yaml_config(path: str | os.PathLike) -> dict:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CleftchunkError(f"cannot read the config file {path} ({e.strerror}): check the path") from e
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CleftchunkError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from e
    if not isinstance(values, dict):
        raise CleftchunkError(f"{path} must hold a mapping of settings (key: value), not a {type(values).__name__}")
    return values


# -- loss ------------------------------------------------------------------------------------------
def weighted_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The original class-rebalanced BCE, on logits, averaged over valid voxels.

    Per sample: wf = clamp(mean(y), min=0.01), weight = y·(1 − wf)/wf + (1 − y).
    """
    logits, target = logits.float(), target.float()
    mask = torch.ones_like(target) if mask is None else mask.float()
    dims = tuple(range(1, target.ndim))
    valid = mask.sum(dims, keepdim=True).clamp(min=1)
    wf = ((target * mask).sum(dims, keepdim=True) / valid).clamp(min=0.01)
    weight = (target * (1 - wf) / wf + (1 - target)) * mask
    total = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return total / mask.sum().clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice over valid voxels, averaged over samples."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    mask = torch.ones_like(target) if mask is None else mask.float()
    dims = tuple(range(1, target.ndim))
    inter = (prob * target * mask).sum(dims)
    total = (prob * mask).sum(dims) + (target * mask).sum(dims)
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def training_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, dice: float = 0.0) -> torch.Tensor:
    loss = weighted_bce(logits, target, mask)
    if dice:
        loss = loss + dice * dice_loss(logits, target, mask)
    return loss


# -- optimizer, schedule, EMA ----------------------------------------------------------------------
def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        wd = 1e-6 if config.weight_decay is None else config.weight_decay
        return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, amsgrad=True)
    wd = 1e-2 if config.weight_decay is None else config.weight_decay
    return torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=config.plateau_patience, threshold=1e-4, min_lr=config.min_lr
        )
    if config.scheduler == "cosine":
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


# -- RNG state (plain types, so that weights_only loading accepts it) ------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# -- output folder ---------------------------------------------------------------------------------
def existing_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for pattern in CHECKPOINT_GLOB for p in folder.glob(pattern))


def check_output(config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: existing checkpoints need --resume (continue) or --overwrite (replace)."""
    if resume and overwrite:
        raise CleftchunkError("--resume and --overwrite contradict each other: give one of them")
    folder = config.output_dir
    if folder.exists() and not folder.is_dir():
        raise CleftchunkError(f"output {folder} is a file, not a folder: choose another -o")
    found = existing_checkpoints(folder) if folder.is_dir() else []
    if resume and not (folder / "last.pth").is_file():
        raise CleftchunkError(f"nothing to resume: {folder / 'last.pth'} does not exist; drop --resume to start a new run")
    if found and not resume and not overwrite:
        raise CleftchunkError(
            f"{folder} already holds checkpoints ({found[0].name}...): pass --resume to continue that run or --overwrite to start over"
        )


def clear_output(config: TrainConfig) -> None:
    """For --overwrite: remove the checkpoints (only ours) of the previous run."""
    for path in existing_checkpoints(config.output_dir):
        path.unlink()


def write_config(config: TrainConfig) -> Path:
    import yaml

    config.output_dir.mkdir(parents=True, exist_ok=True)
    path = config.output_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path


def check_resumable(ckpt: dict, config: TrainConfig, path: Path) -> None:
    have_arch, want_arch = dict(ckpt["arch"]), config.arch_dict
    have_arch["filters"] = [int(f) for f in have_arch.get("filters", [])]
    if have_arch != want_arch:
        raise CleftchunkError(
            f"{path} holds architecture {describe_arch(have_arch)} but this run asks for {describe_arch(want_arch)}: "
            "use the same -ac/--preset/--filters or train into a new -o folder"
        )
    have_size, want_size = list(checkpoint_input_size(ckpt)), list(config.input_size)
    if have_size != want_size:
        raise CleftchunkError(
            f"{path} was trained with input size {','.join(map(str, have_size))} but this run asks for "
            f"{','.join(map(str, want_size))}: use -mi {','.join(map(str, have_size))} or train into a new -o folder"
        )


def describe_arch(arch: dict) -> str:
    return f"{arch.get('name')}({','.join(str(f) for f in arch.get('filters', []))})"


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / self.world_size


def requested_processes(config: TrainConfig) -> tuple[int, bool]:
    """(number of processes, on GPUs?) from -g / cpu_processes and what torch sees."""
    if config.cpu_processes:
        return int(config.cpu_processes), False
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config.gpus is None:
        return 1, available > 0
    if config.gpus == 0:
        return 1, False
    if config.gpus > available:
        raise CleftchunkError(
            f"-g {config.gpus} asks for {config.gpus} GPU(s) but torch sees {available}: use -g {available} "
            f"({'0 trains on the CPU' if not available else 'or fewer'})"
        )
    return int(config.gpus), True


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(rank: int, world_size: int, local_rank: int, on_gpu: bool) -> Dist:
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo", rank=rank, world_size=world_size, init_method="env://"
        )
    return Dist(rank, world_size, local_rank, device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        net = build_model(arch["name"], filters=arch["filters"], in_channels=1, out_channels=1).to(dist.device)
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
        loss = training_loss(logits, label, mask, self.config.dice)
        value = float(self.dist.mean(loss.detach()).item())
        if not math.isfinite(value):
            raise NonFiniteLoss(value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.config.scheduler == "plateau":
            self.window.add(self.scheduler, value)
        else:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.net)
        self.iteration += 1
        return value, logits.detach()

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


# -- logging ---------------------------------------------------------------------------------------
def section_panels(image: torch.Tensor, label: torch.Tensor, logits: torch.Tensor, sections: int = 3) -> torch.Tensor:
    """(1, n·H, 3·W) grey panels: input | label | prediction for ``sections`` z-sections of sample 0."""
    img, lab = image[0, 0].float().cpu(), label[0, 0].float().cpu()
    prob = torch.sigmoid(logits[0, 0].float()).cpu()
    z = img.shape[0]
    picks = sorted({0, z // 2, z - 1})[:sections]
    rows = [torch.cat([img[k], lab[k], prob[k]], dim=1) for k in picks]
    return torch.cat(rows, dim=0).clamp(0, 1)[None]


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
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{self.rate():.2f}", refresh=False)
        if it % self.config.log_every == 0 or it == self.config.iteration_total:
            self.writer.add_scalar("loss/train", float(np.mean(self.losses)), it)
            self.writer.add_scalar("lr", trainer.lr, it)
            self.writer.add_scalar("samples_per_s", self.rate(), it)
            self.writer.add_scalar("loader/mean_tries", float(batch["tries"].float().mean()), it)
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


# -- validation ------------------------------------------------------------------------------------
def same_dataset(a: Any, b: Any) -> bool:
    """Whether two opened volumes are the same stored dataset."""
    try:
        return Path(a.container).resolve() == Path(b.container).resolve() and (a.inner or "") == (b.inner or "")
    except AttributeError:
        return a is b


def parse_roi(text: str | None, shape: Sequence[int]) -> tuple[slice, ...]:
    """``z0:z1,y0:y1,x0:x1`` (empty bounds allowed) to slices; None = the whole volume."""
    if not text:
        return tuple(slice(0, s) for s in shape)
    parts = text.split(",")
    if len(parts) != 3:
        raise CleftchunkError(f"--validate-roi {text!r} must be z0:z1,y0:y1,x0:x1")
    out = []
    for part, size in zip(parts, shape):
        lo, _, hi = part.partition(":")
        try:
            s = slice(int(lo) if lo else 0, int(hi) if hi else size)
        except ValueError:
            raise CleftchunkError(f"--validate-roi {text!r} must hold integers, e.g. 0:16,0:512,0:512") from None
        out.append(s)
    return tuple(out)


def predict_in_memory(net: nn.Module, image: np.ndarray, window: Sequence[int], device: torch.device) -> np.ndarray:
    """Probabilities over a small in-memory region: 50 %-overlap tiles, mean blending, reflect padding."""
    from .geometry import tile_starts

    pad = [(max(0, (w - s + 1) // 2), max(0, w - s - (w - s + 1) // 2)) for s, w in zip(image.shape, window)]
    padded = np.pad(image, pad, mode="reflect") if any(a or b for a, b in pad) else image
    total = np.zeros(padded.shape, np.float32)
    weight = np.zeros(padded.shape, np.float32)
    starts = [tile_starts(s, w, max(w // 2, 1)) for s, w in zip(padded.shape, window)]
    with torch.no_grad():
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    sl = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
                    tile = torch.from_numpy(np.ascontiguousarray(padded[sl]))[None, None].to(device)
                    total[sl] += torch.sigmoid(net(tile)).float()[0, 0].cpu().numpy()
                    weight[sl] += 1
    prob = total / weight
    return prob[tuple(slice(a, a + s) for (a, _), s in zip(pad, image.shape))]


class Validator:
    """A hook: every ``every`` iterations, predict the held-out region and report loss + CREMI metrics.

    CREMI metrics come from :mod:`cleftchunk.metrics` when it is installed; otherwise only the loss.
    Results go to TensorBoard (``val/*``) and ``<output>/validation.jsonl``.
    """

    def __init__(self, config: TrainConfig):
        from .data import under_root, image_scale, resolve_label_mode
        from .volumes import open_volume

        image = open_volume(under_root(config.validate_image, config.root))
        labels = open_volume(under_root(config.validate_labels, config.root))
        if image.shape != labels.shape:
            raise CleftchunkError(f"validation image {image} {image.shape} and labels {labels} {labels.shape} differ in shape")
        roi = parse_roi(config.validate_roi, image.shape)
        self.volume = image
        self.whole_volume = not config.validate_roi
        self.roi = Roi.from_bounds([s.start for s in roi], [s.stop for s in roi])
        self.every = int(config.validate_every)
        self.window = list(config.input_size)
        self.image = image[roi].astype(np.float32) * np.float32(image_scale(image.dtype))
        codes = label_codes(labels[roi], resolve_label_mode(config.label_mode, labels))
        self.label = (codes & 1).astype(bool)
        self.invalid = (codes & 2).astype(bool)
        self.voxel_size = image.voxel_size
        self.path = config.output_dir / "validation.jsonl"

    def holdout_for(self, volumes: Sequence[Any]) -> list[Roi | None]:
        """The validation region, for each training volume that is the validation volume."""
        out: list[Roi | None] = []
        for v in volumes:
            same = same_dataset(v.image, self.volume)
            if same and self.whole_volume:
                raise CleftchunkError(
                    f"--validate-image {self.volume} is also a training volume: hold out a region of it with --validate-roi"
                )
            out.append(self.roi if same else None)
        return out

    def __call__(self, state: TrainState) -> None:
        if not self.every or state.iteration % self.every and state.iteration != state.config.iteration_total:
            return
        result = self.evaluate(state.trainer)
        result["iteration"] = state.iteration
        state.metrics.update(result)
        if state.writer is not None:
            for key, value in result.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    state.writer.add_scalar(f"val/{key}", value, state.iteration)
            with self.path.open("a") as f:
                f.write(json.dumps(result) + "\n")

    def evaluate(self, trainer: Trainer) -> dict:
        with trainer.inference_net() as net:
            prob = predict_in_memory(net, self.image, self.window, trainer.dist.device)
        valid = ~self.invalid
        loss = float(weighted_bce(torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))[None, None],
                                  torch.from_numpy(self.label.astype(np.float32))[None, None],
                                  torch.from_numpy(valid.astype(np.float32))[None, None]))
        result: dict[str, Any] = {"loss": loss}
        try:
            from .metrics import cremi_metrics_reference
        except ImportError:  # evaluation not installed: loss only
            return result
        pred_mask = np.round(prob * 255) >= 128  # the uint8 prediction binarized as the original does
        metrics = cremi_metrics_reference(pred_mask, self.label, self.voxel_size, invalid_mask=self.invalid)
        for key in ("f1", "precision", "recall", "cremi_score", "adgt", "adf", "fp", "fn"):
            value = metrics.get(key)
            result[key] = float(value) if value is not None else None
        return result


# -- the run ---------------------------------------------------------------------------------------
def as_config(config: dict | TrainConfig) -> TrainConfig:
    if isinstance(config, TrainConfig):
        config.normalize()
        return config
    return TrainConfig.from_dict(config)


def train(config: dict | TrainConfig, resume: bool = False, overwrite: bool = False, hooks: Sequence[Hook] = ()) -> Path:
    """Train as configured; returns the path of the last checkpoint (``<output>/last.pth``)."""
    config = as_config(config)
    processes, on_gpu = requested_processes(config)
    if under_torchrun():
        processes = int(os.environ["WORLD_SIZE"])
    if config.batch_size % processes:
        raise CleftchunkError(f"batch size -b {config.batch_size} must be a multiple of the {processes} processes (one share each)")
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        return run_process(config, init_distributed(rank, world, local, on_gpu), resume, overwrite, hooks)
    if processes > 1:
        return spawn_processes(config, processes, on_gpu, resume, overwrite)
    return run_process(config, init_distributed(0, 1, 0, on_gpu), resume, overwrite, hooks)


def spawn_processes(config: TrainConfig, processes: int, on_gpu: bool, resume: bool, overwrite: bool) -> Path:
    """``-g N``: N processes on this machine, one per GPU (hooks cannot cross processes)."""
    import torch.multiprocessing as mp

    check_output(config, resume, overwrite)  # fail here, in one process, rather than N times
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        mp.spawn(_spawned, args=(processes, on_gpu, config.to_dict(), resume, overwrite), nprocs=processes, join=True)
    except mp.ProcessRaisedException as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        user = [line for line in lines if "CleftchunkError:" in line]
        if user:
            raise CleftchunkError(user[-1].split("CleftchunkError:", 1)[1].strip()) from None
        raise RuntimeError(f"a training process failed: {lines[-1] if lines else e}") from None
    return config.output_dir / "last.pth"


def _spawned(rank: int, world: int, on_gpu: bool, config: dict, resume: bool, overwrite: bool) -> None:
    run_process(TrainConfig.from_dict(config), init_distributed(rank, world, rank, on_gpu), resume, overwrite, ())


def run_process(config: TrainConfig, dist: Dist, resume: bool, overwrite: bool, hooks: Sequence[Hook]) -> Path:
    try:
        return _run(config, dist, resume, overwrite, hooks)
    finally:
        if dist.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(config: TrainConfig, dist: Dist, resume: bool, overwrite: bool, hooks: Sequence[Hook]) -> Path:
    check_output(config, resume, overwrite)
    last = config.output_dir / "last.pth"
    ckpt = load_checkpoint(last) if resume else None
    if ckpt is not None:
        check_resumable(ckpt, config, last)
    volumes = open_training_volumes(config.images, config.labels, config.root, config.label_mode)
    validator = Validator(config) if config.validate_image and config.validate_every else None
    sampler = CropSampler(
        volumes, config.input_size, AugmentConfig.from_dict(config.augment), RejectionConfig.from_dict(config.rejection),
        cache_mb=config.cache_mb, holdout=validator.holdout_for(volumes) if validator else None,
    )
    hooks = list(hooks) + ([validator] if validator else [])
    dist.barrier()  # every process has checked before the main one changes anything
    if dist.main:
        if overwrite:
            clear_output(config)
        write_config(config)
    dist.barrier()

    trainer = Trainer(config, dist)
    if ckpt is not None:
        trainer.restore(ckpt)
    if trainer.iteration >= config.iteration_total:
        return last
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    per_process = config.batch_size // dist.world_size
    stream = CropStream(sampler, per_process, config.seed, start=trainer.iteration, rank=dist.rank, world_size=dist.world_size)
    logger = Logger(config, dist, trainer.iteration)
    batches = iter(make_loader(stream, config.workers))
    threads = torch.get_num_threads()
    if dist.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config, dist.world_size))
    try:
        while trainer.iteration < config.iteration_total:
            batch = next(batches)
            try:
                loss, logits = trainer.step(batch)
            except NonFiniteLoss as e:
                raise CleftchunkError(non_finite_message(e.value, trainer.iteration + 1, last)) from None
            logger.iteration(trainer, loss, batch, logits)
            if dist.main and should_save(trainer.iteration, config):
                save_both(trainer, config)
            state = TrainState(trainer.iteration, loss, config, trainer, logger.writer)
            for hook in hooks:
                hook(state)
            if state.metrics and dist.main:
                logger.message(format_metrics(state.iteration, state.metrics))
    except KeyboardInterrupt:
        raise TrainingInterrupted(interrupted_message(trainer.iteration, last)) from None
    finally:
        del batches  # stops the loader's worker processes
        logger.close()
        torch.set_num_threads(threads)
    dist.barrier()
    return last


def cpu_threads(config: TrainConfig, processes: int = 1) -> int:
    """Threads for CPU training: oversubscribing cores (loader workers + torch threads) makes
    torch's parallel kernels spin-wait and slows a step by several times."""
    if config.threads:
        return int(config.threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes - config.workers)


def should_save(iteration: int, config: TrainConfig) -> bool:
    return iteration == config.iteration_total or (config.iteration_save and iteration % config.iteration_save == 0)


def save_both(trainer: Trainer, config: TrainConfig) -> Path:
    """``volume_<iteration>.pth`` (the original's name) and ``last.pth``, both written atomically."""
    named = trainer.save(config.output_dir / f"volume_{trainer.iteration}.pth")
    tmp = config.output_dir / ".last.pth.copy.tmp"
    shutil.copyfile(named, tmp)
    os.replace(tmp, config.output_dir / "last.pth")
    return named


def non_finite_message(value: float, iteration: int, last: Path) -> str:
    if last.is_file():
        kept = f"the last good checkpoint is {last} (iteration {load_checkpoint(last)['iteration']})"
    else:
        kept = "no checkpoint was written yet"
    return (
        f"the loss became {value} at iteration {iteration}, so training stopped; {kept}; "
        "lower the learning rate (-lr) and --resume, or check the input data"
    )


def interrupted_message(iteration: int, last: Path) -> str:
    if last.is_file():
        saved = load_checkpoint(last)["iteration"]
        return f"interrupted at iteration {iteration}; {last} holds iteration {saved}: add --resume to the same command to continue from there"
    return f"interrupted at iteration {iteration} before the first checkpoint: run the command again to start over"


def format_metrics(iteration: int, metrics: dict) -> str:
    parts = [f"{k} {v:.4g}" for k, v in metrics.items() if k != "iteration" and isinstance(v, (int, float))]
    return f"validation @ {iteration}: " + ", ".join(parts)
