"""``cleftchunk train``: the seed tutorial's training options, a YAML config, resume and overwrite."""

from __future__ import annotations

import click

from cleftchunk.errors import CleftchunkError
from cleftchunk_cli.options import BATCH_SYSTEMS, IGNORE_FRAME_HELP, amount, count

EPILOG = """\b
Example (the seed tutorial's command):
  cleftchunk train -t /path/to/cremi/ -dn images/im_A.h5@images/im_B.h5 \\
      -ln gt-syn/syn_A.h5@gt-syn/syn_B.h5 -o outputs/unetv0 -lr 1e-03 \\
      --iteration-total 100000 --iteration-save 10000 -mi 8,256,256 -g 4 -c 4 -b 8 -ac unetv0
  tensorboard --logdir runs

Precedence: flags > --config YAML > (with --resume) the run's stored config > defaults.
The resolved config is written to OUTPUT/config.yaml; checkpoints are OUTPUT/volume_<N>.pth
and OUTPUT/last.pth. TensorBoard logs go to --log-dir (default runs/<output folder name>).
"""


def _kv_pairs(values: tuple[str, ...], what: str) -> dict:
    import yaml

    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CleftchunkError(f"{what} {item!r} must look like NAME=VALUE, e.g. rotation_p=0.5")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _renamed(old: str, new: str, what: str, elsewhere: str):
    """A click callback for a retired spelling of train: a one-line error naming the new one (the
    old one means something else on the block-wise commands: ``elsewhere``)."""

    def refuse(ctx: click.Context, param: click.Parameter, value: object) -> None:
        if value is not None:
            raise CleftchunkError(f"train {old} is now {new}, {what}: on the block-wise commands {old} is {elsewhere}")

    return refuse


def _not_built(ctx: click.Context, param: click.Parameter, value: object) -> None:
    """--cluster / --nodes on train: refused, saying how to train in a batch job today."""
    if value is not None:
        raise CleftchunkError(
            f"train {max(param.opts, key=len)} is not built yet (no DDP across nodes): train on one node inside a batch job, "
            "e.g. sbatch --gres=gpu:4 --wrap 'cleftchunk train -g 4 ...'"
        )


@click.command("train", epilog=EPILOG, context_settings={"max_content_width": 100})
@click.option("-t", "--root", help="Root folder of the -dn/-ln volumes (the tutorial's -t).")
@click.option("-dn", "--images", help="Image volumes joined by @ (relative to -t): Zarr, HDF5, TIFF, ...")
@click.option("-ln", "--labels", help="Label volumes joined by @, one per image (CREMI uint64 ids or 0/1 masks).")
@click.option("-o", "--output", help="Output folder for checkpoints and config.yaml [outputs/unetv0].")
@click.option("-lr", "--lr", type=amount(0, open_low=True, example="1e-3"), help="Learning rate [1e-3].")
@click.option("--iteration-total", type=count(1), help="Iterations to train in total [100000].")
@click.option("--iteration-save", type=count(1), help="Save a checkpoint every N iterations (and at the end) [10000].")
@click.option("-mi", "--model-input", "input_size", help="Model input size z,y,x: z even, y and x multiples of 32 [8,256,256].")
@click.option("-g", "--gpus", type=count(0), help="GPUs (DistributedDataParallel, one process each); 0 = CPU [1 if CUDA else 0].")
@click.option("--cluster", type=click.Choice(BATCH_SYSTEMS), expose_value=False, callback=_not_built, is_eager=True, help="Not built yet for train (refused, with how to train inside a batch job); the block-wise commands take it.")
@click.option("--nodes", type=click.IntRange(min=1), expose_value=False, callback=_not_built, is_eager=True, help="Not built yet: DDP across nodes (refused).")
@click.option("-c", "--loader-workers", "loader_workers", type=count(0), help="Data loader worker processes [1] (-c as in the tutorial).")
@click.option("--workers", hidden=True, expose_value=False, callback=_renamed("--workers", "--loader-workers (-c)", "the data loader processes", "the number of Dask worker processes"))
@click.option("--cache-mb", type=amount(0), help="Decoded-chunk cache per loader process, MiB (0: none) [512].")
@click.option("--threads", type=count(1), help="Torch threads for CPU training [cores minus loader workers].")
@click.option("-b", "--batch-size", type=count(1), help="Global batch size, split over the GPUs [8].")
@click.option("-ac", "--architecture", "arch", help="Architecture name [unetv0].")
@click.option("--preset", type=click.Choice(["default", "medium", "small"]), help="Filter widths by name [default: 32,...,256].")
@click.option("--filters", help="Explicit filter widths, e.g. 8,12,16,20,24 (overrides --preset).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings (keys as in config.yaml).")
@click.option("--seed", type=count(0), help="Seed of the initialisation and of the crop stream [0].")
@click.option("--label-mode", type=click.Choice(["auto", "cremi", "nonzero", "zero-background"]), help="What the labels hold: cremi (uint64 ids, background 0xFF..FF), nonzero / zero-background (0 = background) [auto: the label rule of every stage, from the metadata, the name and a few sampled boxes].")
@click.option("--ignore-frame", "ignore_frame", is_flag=True, default=None, help=IGNORE_FRAME_HELP)
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), help="adam (amsgrad, original) or adamw [adam].")
@click.option("--lr-schedule", "lr_schedule", type=click.Choice(["plateau", "cosine", "constant"]), help="Learning-rate schedule [plateau].")
@click.option("--scheduler", hidden=True, expose_value=False, callback=_renamed("--scheduler", "--lr-schedule", "the learning-rate schedule", "the address of a Dask scheduler"))
@click.option("--ema", type=amount(0, 1, open_high=True, example="0.999"), help="EMA decay of the weights saved for inference (e.g. 0.999); 0 = off [0].")
@click.option("--dice", type=amount(0), help="Weight of a Dice term added to the weighted BCE [0].")
@click.option("--output-prior", type=amount(0, 1, open_low=True, open_high=True, example="0.01"), help="Initial output probability of a fresh model, e.g. 0.01 with --max-weight 1 [0.5, the original's].")
@click.option("--max-weight", type=amount(0, open_low=True, example="1"), help="Cap of the BCE's positive-class weight; 1 = plain BCE [none: the original's rebalancing].")
@click.option("--augment", "augment", multiple=True, metavar="NAME=VALUE", help="Augmentation setting, repeatable (e.g. rotation_p=0).")
@click.option("--augment-on", "augment_on", type=click.Choice(["auto", "cpu", "device"]), help="Where crops are augmented: cpu (loader workers) or device (the model's, batch-wise with torch, overlapping the step) [auto: device on a GPU].")
@click.option("--no-augment", is_flag=True, default=None, help="Switch every augmentation off.")
@click.option("--reject", "rejection", multiple=True, metavar="NAME=VALUE", help="Rejection sampling: min_voxels=100, keep_p=0.1, near_cleft=0.85 (share of crops centred on a cleft), near_cleft_by=voxel|cleft.")
@click.option("--train-roi", "train_roi", multiple=True, metavar="[N=]Z0:Z1,Y0:Y1,X0:X1", help="Region of volume N (its place in -dn, from 0) crops come from; repeatable [Zarr labels: the chunks their store holds].")
@click.option("--log-dir", help="TensorBoard folder [runs/<output folder name>].")
@click.option("--validate-image", help="Held-out image volume (relative to -t); a training volume too if --validate-roi holds a region out.")
@click.option("--validate-labels", help="Labels of the held-out volume.")
@click.option("--validate-roi", help="Region to validate on, z0:z1,y0:y1,x0:x1 (kept out of training crops) [whole volume].")
@click.option("--validate-every", type=count(0), help="Validate every N iterations [0 = never].")
@click.option("--no-progress", is_flag=True, default=None, help="No progress bar.")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from last.pth (exactly where it stopped).")
@click.option("--overwrite", is_flag=True, help="Replace the checkpoints already in OUTPUT.")
def command(config_file, augment, no_augment, rejection, no_progress, resume, overwrite, **flags) -> None:
    """Train the cleft model on image/label volumes (random augmented crops, read lazily)."""
    from cleftchunk.train import train
    from cleftchunk.train.augment import AugmentConfig

    from cleftchunk.urls import local_file

    for value, what in ((flags.get("output"), "output folder"), (flags.get("root"), "--root folder"), (config_file, "--config file")):
        if value:
            local_file(value, what)  # checked as given: the config's Path would mangle s3:// into s3:/
    values = {k: v for k, v in flags.items() if v is not None and v != ()}
    if no_augment:
        values["augment"] = AugmentConfig.off().to_dict()
    if augment:
        values["augment"] = {**(values.get("augment") or {}), **_kv_pairs(augment, "--augment")}
    if rejection:
        values["rejection"] = {**(values.get("rejection") or {}), **_kv_pairs(rejection, "--reject")}
    if no_progress:
        values["progress"] = False
    last = train(values, resume=resume, overwrite=overwrite, config_file=config_file)
    click.echo(f"checkpoint: {last}")
