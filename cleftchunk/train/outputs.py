"""A run's output folder: checkpoints it may hold, the guard against mixing runs, the stored
config, and the RNG state saved with each checkpoint (plain types, so ``weights_only`` loads it)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from cleftchunk.errors import CleftchunkError
from cleftchunk.model import (
    checkpoint_input_size,
)
from cleftchunk.train.config import TrainConfig


CHECKPOINT_GLOB = ("volume_*.pth", "last.pth")


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
    from cleftchunk.io.guard import refuse_overlap
    from cleftchunk.train.data import under_root

    sources = [under_root(s, config.root) for s in [*config.images, *config.labels] if s]
    refuse_overlap(folder, sources, what="output folder")  # checkpoints written into a volume would corrupt it
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
