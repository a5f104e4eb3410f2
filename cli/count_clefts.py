"""``cleftchunk count-clefts LABELS``: the cleft table training reads, counted ahead of training."""

import click

from cleftchunk.errors import CleftchunkError
from cleftchunk_cli.options import KIND_CHOICE, run_options


@click.command("count-clefts")
@click.argument("labels")
@click.option("--kind", type=KIND_CHOICE, default="auto", show_default=True,
              help="What LABELS hold (auto: their metadata, name and a few sampled boxes).")
@click.option("--annotated", type=click.Choice(["auto", "stored", "whole"]), default="auto", show_default=True,
              help="Annotated space: stored = the chunks the store holds (labels another tool wrote into a few cubes); "
                   "whole = every chunk; auto = whole for cleftchunk's own outputs, else stored.")
@run_options()
def command(labels, kind, annotated, run):
    """Count the cleft voxels of each chunk of the Zarr labels LABELS into their table (stored
    beside them as <array>_cleft_counts). convert and segment write it with the labels, and
    training builds it when it finds none; this command does it ahead, on a cluster if asked."""
    from cleftchunk.io.tables import load_table, write_cleft_table

    op = write_cleft_table(labels, kind, annotated, run, log=click.echo)
    if op is None and not run.dry_run:
        raise CleftchunkError(f"{labels} is not a Zarr array: training counts the clefts of such labels in memory, no table is stored")
    if op is not None:
        table = load_table(op.output, op.labels.shape)
        annotated_cells = int((table.counts >= 0).sum())
        click.echo(f"{op.output}: {table.clefts} cleft voxels in {annotated_cells} annotated chunks of {table.counts.size} ({op.annotated})")
