"""``cleftchunk segment PRED -o CLEFTS``: cleft instances by block-wise connected components."""

from __future__ import annotations

import click

from cleftchunk.post.segment import DEFAULT_THRESHOLD, segment
from cleftchunk_cli.options import KIND_CHOICE, THRESHOLD, count, positive_zyx, run_options, source_selection


@click.command("segment")
@click.argument("pred")
@click.option("-o", "--output", required=True, help="Output Zarr image for uint64 cleft ids, e.g. out.zarr/clefts.")
@click.option("--threshold", type=THRESHOLD, default=None,
              help="Cleft voxels are probabilities >= this (of 255; floats in [0, 1] are compared with it / 255). "
              f"Default: the threshold chosen at training that predict recorded in PRED, else {DEFAULT_THRESHOLD}.")
@click.option("--min-size", type=count(0), default=None,
              help="Drop components with fewer voxels than this. Default: the one recorded in PRED, else 0.")
@click.option("--connectivity", type=click.Choice(["6", "26"]), default="26", show_default=True,
              help="Neighbours that connect: 6 (faces) or 26 (faces, edges and corners).")
@click.option("--kind", "pred_kind", type=KIND_CHOICE, default="auto", show_default=True,
              help="What PRED holds (auto: from its dtype, metadata and sampled values; see `cleftchunk evaluate --help`).")
@click.option("--chunks", help="Output chunk shape Z,Y,X (default 16,256,256).")
@source_selection("pred")
@run_options()
def command(pred, output, threshold, min_size, connectivity, pred_kind, chunks, run):
    """Threshold PRED and label its connected components as CREMI cleft ids.

    Ids are 1..K, ordered by each cleft's first voxel in C order, whatever the block shape;
    background is 0xFFFFFFFFFFFFFFFF. Voxel size and offset are those of PRED.
    """
    result = segment(
        pred,
        output,
        threshold=threshold,
        min_size=min_size,
        connectivity=int(connectivity),
        kind=pred_kind,
        chunks=positive_zyx(chunks, "--chunks"),
        run=run,
        log=click.echo,
    )
    if result is None:  # a dry run, or an output already complete (both said so)
        return
    click.echo(
        f"{output}: {result.components} clefts ({result.voxels} voxels), "
        f"{result.removed} smaller than {result.min_size} voxels removed, {result.blocks} blocks"
        + (f" ({result.already_done} written already by an interrupted run, kept)" if result.already_done else "")
    )
