"""``cleftchunk evaluate PRED GT``: CREMI cleft metrics, block-wise and exact."""

from __future__ import annotations

import os

import click

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import refuse_overlap
from cleftchunk.urls import local_file
from cleftchunk.post.metrics import THETA_NM, evaluate, format_table, to_json
from cleftchunk.post.segment import DEFAULT_THRESHOLD

from cleftchunk_cli.options import KIND_CHOICE, THRESHOLD, amount, ignore_frame_option, parse_zyx, positive_zyx, run_options


@click.command("evaluate")
@click.argument("pred")
@click.argument("gt")
@click.option("--theta", type=amount(0, message="θ = {number} nm must be a finite distance >= 0 (CREMI uses 200): fix --theta"), default=THETA_NM, show_default=True, help="Distance threshold θ (nm) for FP/FN (strict >).")
@click.option("--threshold", type=THRESHOLD, default=DEFAULT_THRESHOLD, show_default=True,
              help="Probability volumes: cleft voxels are >= this (of 255).")
@click.option("--voxel-size", help="Z,Y,X in nm, overriding the metadata of both volumes.")
@click.option("--pred-kind", type=KIND_CHOICE, default="auto", show_default=True, help="What PRED holds.")
@click.option("--gt-kind", type=KIND_CHOICE, default="auto", show_default=True, help="What GT holds.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics to this JSON file.")
@click.option("--halo", help="Context around each block, Z,Y,X voxels (default θ); speed only, never the result.")
@ignore_frame_option
@run_options()
def command(pred, gt, theta, threshold, voxel_size, pred_kind, gt_kind, json_path, halo, ignore_frame, run):
    """CREMI synaptic-cleft metrics of PRED against the ground truth GT.

    \b
    What a volume holds (its kind) is decided, unless --pred-kind/--gt-kind say it, by:
      1. a `cleft_kind` attribute (written by `cleftchunk segment`); outputs of
         `cleftchunk predict` are prob;
      2. bool -> mask; unsigned ints in a dataset named `main` (PyTorch Connectomics) -> main;
      3. uint64 -> ids (CREMI: 0xFF..FF background, 0xFF..FE invalid in GT, 0 is a cleft);
      4. uint8 -> mask if the values are 0/1, else prob (cleft = value >= --threshold);
      5. other unsigned ints -> main (0 background); floats in [0, 1] -> prob (>= threshold/255);
      anything else (signed ints, floats outside [0, 1]) is an error.
    Values are looked at in up to 64 chunks spread over the volume (every chunk of a
    smaller one), never the whole of a large volume, and not at all with --dry-run;
    sampled uint8 chunks holding only 0 are an error that asks for --pred-kind/--gt-kind.
    Volumes of one frame (voxel size, offset, shape) are compared voxel for voxel. A ground
    truth smaller than the prediction (e.g. the labelled region of a padded CREMI sample) is
    placed by the offsets of both; the prediction must cover it. Different voxel sizes are
    refused; --ignore-frame compares the volumes voxel for voxel whatever their metadata say.
    Empty prediction or ground truth: undefined averages are n/a (null in JSON), distances to an
    empty set are infinite ("inf" in JSON); see the cleftchunk.post.metrics documentation.
    """
    # checked first, so that a run is not wasted on a file it may not write (a dry run too)
    if json_path:
        local_file(json_path, "--json file")
    refuse_overlap(json_path, [pred, gt], what="--json file")
    if json_path and os.path.exists(json_path) and not run.overwrite:
        raise CleftchunkError(f"{json_path} exists: pass --overwrite to replace it (or choose another --json file)")
    result = evaluate(
        pred,
        gt,
        theta=theta,
        threshold=threshold,
        voxel_size=positive_zyx(voxel_size, "--voxel-size", float),
        pred_kind=pred_kind,
        gt_kind=gt_kind,
        halo=parse_zyx(halo, "--halo", minimum=0),
        run=run,
        log=click.echo,
        ignore_frame=ignore_frame,
    )
    if result is None:  # a dry run: the plan was printed, nothing is written
        return
    if json_path:  # first: the file is whole even when the reader of the table stops early (`| head -1`)
        write_json(json_path, to_json(result) + "\n")
    click.echo(format_table(result))
    if json_path:
        click.echo(f"metrics written to {json_path}")


def write_json(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a failure leaves any earlier file as it was."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
