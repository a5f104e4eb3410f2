"""The training configuration: every setting with its default, parsing and checks, and the
precedence of its sources (defaults < the run's stored config < a YAML file < explicit values)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from cleftchunk.train.augment import AugmentConfig
from cleftchunk.train.data import RejectionConfig, split_list
from cleftchunk.errors import CleftchunkError
from cleftchunk.model import (
    check_input_shape,
    resolve_filters,
)


# -- configuration ----------------------------------------------------------------------------------
#: Where crops are augmented: auto (on the model's device when it is a GPU), cpu (loader workers, numpy) or device (torch).
AUGMENT_ON = ("auto", "cpu", "device")


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
    loader_workers: int = 1  # -c, --loader-workers: data loader processes
    cache_mb: float = 512  # decoded-chunk cache of each loader process (0: none)
    batch_size: int = 8  # -b, global over all processes
    arch: str = "unetv0"  # -ac
    preset: str | None = None
    filters: list[int] | None = None
    seed: int = 0
    label_mode: str = "auto"
    ignore_frame: bool = False  # images and labels voxel for voxel, whatever their frames (cleftchunk.frames)
    augment: dict = field(default_factory=dict)  # AugmentConfig fields
    augment_on: str = "auto"  # cpu (loader workers, numpy) | device (the model's, torch) | auto: device on a GPU
    rejection: dict = field(default_factory=dict)  # RejectionConfig fields
    optimizer: str = "adam"  # adam (amsgrad, the original) | adamw
    weight_decay: float | None = None  # None: 1e-6 for adam, 1e-2 for adamw
    lr_schedule: str = "plateau"  # plateau (the original) | cosine | constant
    warmup: int = 0  # linear warm-up iterations (cosine)
    min_lr: float = 1e-7
    plateau_patience: int = 1000  # scheduler steps of 10 iterations each
    ema: float = 0.0  # EMA decay of the weights; 0: off
    dice: float = 0.0  # weight of the Dice term added to the BCE
    output_prior: float | None = None  # initial output probability (None: 0.5, the original's); e.g. 0.01 with a plain BCE
    max_weight: float | None = None  # cap of the BCE's positive-class weight (None: the original's (1 − wf)/wf)
    bf16: bool = True  # autocast on GPUs
    log_dir: str | None = None  # default runs/<output folder name>
    log_every: int = 10
    image_every: int = 500
    validate_image: str | None = None
    validate_labels: str | None = None
    validate_roi: str | None = None  # "z0:z1,y0:y1,x0:x1" voxels of the validation volume
    validate_every: int = 0
    train_roi: list[str] = field(default_factory=list)  # "[N=]z0:z1,y0:y1,x0:x1" regions crops come from (train/sampling.py)
    annotated: str = "auto"  # annotated space of Zarr labels without regions: auto | stored | whole (io/tables.py)
    progress: bool = True
    threads: int | None = None  # torch threads on the CPU; None: cores left over by the loader workers
    cpu_processes: int = 0  # DDP on the CPU (gloo) to exercise the multi-process path

    #: Keys that control one invocation and are not stored with the run.
    RUN_ONLY = ("resume", "overwrite")
    #: Earlier names of settings: the configs stored in older checkpoints (and YAML files written
    #: for them) still load. ``workers`` and ``scheduler`` mean Dask workers and schedulers on the
    #: block-wise commands, so training's own settings were renamed.
    RENAMED = {"workers": "loader_workers", "scheduler": "lr_schedule"}

    @classmethod
    def from_dict(cls, values: dict | None) -> "TrainConfig":
        values = {k.replace("-", "_"): v for k, v in dict(values or {}).items() if k not in cls.RUN_ONLY}
        for old, new in cls.RENAMED.items():
            if old in values:
                values.setdefault(new, values[old])
                del values[old]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CleftchunkError(f"unknown training setting(s) {', '.join(unknown)}: valid ones are {', '.join(sorted(known))}")
        config = cls(**values)
        try:
            config.normalize()
        except (TypeError, ValueError) as e:  # a word where a number belongs (YAML or flags)
            raise CleftchunkError(f"a training setting has a value of the wrong type ({e}): give numbers where numbers are expected") from None
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
        self.rejection = RejectionConfig.from_dict({**RejectionConfig.TRAINING, **dict(self.rejection or {})}).to_dict()
        for name in ("iteration_total", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise CleftchunkError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if int(self.iteration_save) < 0 or int(self.loader_workers) < 0:
            raise CleftchunkError("iteration-save and the loader workers (-c, --loader-workers) must not be negative")
        if not float(self.lr) > 0:
            raise CleftchunkError(f"learning rate -lr {self.lr} must be positive")
        if self.augment_on not in AUGMENT_ON:
            raise CleftchunkError(f"unknown augment-on {self.augment_on!r}: use auto, cpu or device")
        if self.optimizer not in ("adam", "adamw"):
            raise CleftchunkError(f"unknown optimizer {self.optimizer!r}: use adam or adamw")
        if self.lr_schedule not in ("plateau", "cosine", "constant"):
            raise CleftchunkError(f"unknown lr-schedule {self.lr_schedule!r}: use plateau, cosine or constant")
        if not 0 <= float(self.ema) < 1:
            raise CleftchunkError(f"ema decay {self.ema} must lie in [0, 1) (0 switches it off; 0.999 is typical)")
        if self.max_weight is not None and not self.max_weight > 0:
            raise CleftchunkError(f"max-weight {self.max_weight} must be positive (1: plain BCE; 5: the demo's)")
        if self.output_prior is not None and not 0 < self.output_prior < 1:
            raise CleftchunkError(f"output-prior {self.output_prior} must lie strictly between 0 and 1, e.g. 0.01")
        self.train_roi = [self.train_roi] if isinstance(self.train_roi, str) else [str(r) for r in self.train_roi or []]
        if self.annotated not in ("auto", "stored", "whole"):
            raise CleftchunkError(f"annotated={self.annotated!r}: use auto, stored (the label chunks the store holds) or whole")
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


#: Settings that are mappings: each source changes only the keys it names.
MAPPING_SETTINGS = ("augment", "rejection")


def resolve_config(values: dict | None = None, config_file: str | os.PathLike | None = None, resume: bool = False) -> TrainConfig:
    """The configuration of a run, from its sources in order of precedence:
    defaults < (with ``resume``) the config stored in the run's ``last.pth`` < ``config_file`` (YAML)
    < ``values`` (e.g. command-line flags). ``augment`` and ``rejection`` are merged key by key."""
    explicit = {k.replace("-", "_"): v for k, v in dict(values or {}).items()}
    from_file = load_yaml_config(config_file) if config_file else {}
    layers = [from_file, explicit]
    if resume:
        from cleftchunk.model import load_checkpoint

        output = explicit.get("output") or from_file.get("output") or TrainConfig.output
        last = Path(output) / "last.pth"
        if last.is_file():
            layers.insert(0, dict(load_checkpoint(last).get("config") or {}))
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key in MAPPING_SETTINGS and isinstance(value, dict) and isinstance(merged.get(key), dict):
                value = {**merged[key], **value}
            merged[key] = value
    return TrainConfig.from_dict(merged)
