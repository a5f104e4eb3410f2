"""``train(config)``: one process, several spawned ones, or ranks under ``torchrun``; the loop
that steps, logs, saves and calls the hooks; the messages for interruptions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from cleftchunk.backend import usable_cores
from cleftchunk.train.augment import AugmentConfig
from cleftchunk.train.data import CropSampler, CropStream, RejectionConfig, make_loader, open_training_volumes
from cleftchunk.train.device_batches import DevicePrefetcher, SourceSampler, resolve_augment_on
from cleftchunk.backend import configure_torch
from cleftchunk.errors import CleftchunkError
from cleftchunk.model import (
    load_checkpoint,
)
from cleftchunk.train.config import resolve_config, TrainConfig
from cleftchunk.train.sampling import parse_train_rois
from cleftchunk.train.distributed import Dist, free_port, init_distributed, requested_processes, under_torchrun
from cleftchunk.train.logger import Logger
from cleftchunk.train.outputs import check_output, check_resumable, clear_output, write_config
from cleftchunk.train.trainer import Hook, NonFiniteGradient, NonFiniteLoss, TrainState, Trainer, TrainingInterrupted
from cleftchunk.train.validation import Validator


# -- the run ---------------------------------------------------------------------------------------
def train(
    config: dict | TrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    hooks: Sequence[Hook] = (),
    config_file: str | os.PathLike | None = None,
) -> Path:
    """Train as configured; returns the path of the last checkpoint (``<output>/last.pth``).

    ``config``: the settings given explicitly (a dict, or a complete :class:`TrainConfig`), over
    ``config_file`` (YAML) and, with ``resume``, over the run's stored config — the precedence of
    :func:`~cleftchunk.train.config.resolve_config`, the same for this call and the command."""
    config = config if isinstance(config, TrainConfig) else resolve_config(config, config_file, resume)
    config.normalize()
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
    volumes = open_training_volumes(config.images, config.labels, config.root, config.label_mode, config.ignore_frame)
    # A validation region is held out of training even when it is not scored during training
    # (validate_every 0): the demo chooses its operating point there after training.
    validator = Validator(config) if config.validate_image else None
    regions = parse_train_rois(config.train_roi, [v.shape for v in volumes])
    tables = cleft_tables(volumes, config, dist)
    augment_on = resolve_augment_on(config.augment_on, dist.device)
    sampler = (SourceSampler if augment_on == "device" else CropSampler)(
        volumes, config.input_size, AugmentConfig.from_dict(config.augment), RejectionConfig.from_dict(config.rejection),
        cache_mb=config.cache_mb, holdout=validator.holdout_for(volumes) if validator else None, tables=tables, regions=regions,
    )
    hooks = list(hooks) + ([validator] if validator and config.validate_every else [])
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
        configure_torch(cudnn_benchmark=True)
    per_process = config.batch_size // dist.world_size
    stream = CropStream(sampler, per_process, config.seed, start=trainer.iteration, rank=dist.rank, world_size=dist.world_size)
    logger = Logger(config, dist, trainer.iteration)
    batches = iter(make_loader(stream, config.loader_workers))
    if augment_on == "device":
        from cleftchunk.train.augment_torch import TorchAugmenter

        batches = DevicePrefetcher(batches, TorchAugmenter(sampler.augmenter, dist.device))
    if dist.main:
        where = f"on the model's device ({dist.device.type}, torch)" if augment_on == "device" else "in the loader workers (cpu, numpy)"
        logger.message(f"augmentation {where}: --augment-on {config.augment_on}")
    threads = torch.get_num_threads()
    if dist.device.type == "cpu":
        configure_torch(cpu_threads(config, dist.world_size))
    try:
        while trainer.iteration < config.iteration_total:
            batch = next(batches)
            try:
                loss, logits = trainer.step(batch)
            except NonFiniteLoss as e:
                raise CleftchunkError(non_finite_message(f"the loss became {e.value}", trainer.iteration + 1, last, batch, volumes)) from None
            except NonFiniteGradient:
                raise CleftchunkError(non_finite_message("a gradient became NaN or inf", trainer.iteration + 1, last, batch, volumes)) from None
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
        configure_torch(threads)
    dist.barrier()
    return last


def cleft_tables(volumes: Sequence, config: TrainConfig, dist: Dist) -> list:
    """The cleft table of each training volume (io/tables.py): read from beside Zarr labels,
    or built there once (the main process builds, the others wait and read); counted in memory
    for other sources."""
    from cleftchunk.run.options import RunOptions
    from cleftchunk.io.tables import cleft_table
    from cleftchunk.train.data import cache_chunk_shape

    def build() -> list:
        run = RunOptions(progress=config.progress and dist.main)
        return [cleft_table(v.labels, v.label_mode, cache_chunk_shape(v.labels), config.annotated, run) for v in volumes]

    tables = build() if dist.main else None
    dist.barrier()
    return tables if tables is not None else build()


def cpu_threads(config: TrainConfig, processes: int = 1) -> int:
    """Threads for CPU training: oversubscribing cores (loader workers + torch threads) makes
    torch's parallel kernels spin-wait and slows a step by several times."""
    if config.threads:
        return int(config.threads)
    return max(1, usable_cores() // processes - config.loader_workers)


def should_save(iteration: int, config: TrainConfig) -> bool:
    return iteration == config.iteration_total or (config.iteration_save and iteration % config.iteration_save == 0)


def save_both(trainer: Trainer, config: TrainConfig) -> Path:
    """``volume_<iteration>.pth`` (the original's name) and ``last.pth``, both written atomically;
    never weights holding NaN or inf."""
    if not weights_finite(trainer.inference_state()):
        raise CleftchunkError(non_finite_message("the weights became NaN or inf", trainer.iteration, config.output_dir / "last.pth"))
    named = trainer.save(config.output_dir / f"volume_{trainer.iteration}.pth")
    tmp = config.output_dir / ".last.pth.copy.tmp"
    shutil.copyfile(named, tmp)
    os.replace(tmp, config.output_dir / "last.pth")
    return named


def crops(batch: dict, volumes: Sequence, only: Any = None) -> str:
    """Where a batch's crops are from ("VOLUME at voxel Z,Y,X; ..."), or those ``only`` selects."""
    rows = batch.get("where")
    if rows is None:
        return ""
    rows = rows if only is None else rows[only]
    named = list(dict.fromkeys(f"{volumes[int(w[0])].name} at voxel {','.join(str(int(c)) for c in w[1:])}" for w in rows))
    return "; ".join(named[:4]) + ("; ..." if len(named) > 4 else "")


def weights_finite(state: dict) -> bool:
    tensors = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors)).sum()))


def _kept(last: Path) -> str:
    if last.is_file():
        return f"the last good checkpoint is {last} (iteration {load_checkpoint(last)['iteration']})"
    return "no checkpoint was written yet"


def non_finite_message(what: str, iteration: int, last: Path, batch: dict | None = None, volumes: Sequence = ()) -> str:
    """Why training stopped at ``iteration``: the crops of the batch named, those holding NaN or inf
    (a float image without data there) as the cause."""
    image = batch.get("image") if batch else None
    finite = torch.isfinite(image).flatten(1).all(1) if image is not None else None
    if finite is not None and not bool(finite.all()):
        bad = crops(batch, volumes, ~finite)
        return (
            f"{what} at iteration {iteration}, so training stopped: a training crop holds NaN or inf{' (' + bad + ')' if bad else ''}; "
            f"{_kept(last)}; replace the non-finite voxels of the image (e.g. by 0) and train again"
        )
    shown = crops(batch, volumes) if batch else ""
    return (
        f"{what} at iteration {iteration}{' (crops: ' + shown + ')' if shown else ''}, so training stopped; {_kept(last)}; "
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
