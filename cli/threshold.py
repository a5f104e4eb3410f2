"""``cleftchunk threshold PRED -o MASK``: a 0/1 cleft mask of a probability map."""

import click

from cleftchunk.labels import DEFAULT_THRESHOLD
from cleftchunk.post.threshold import threshold
from cleftchunk_cli.options import THRESHOLD, positive_zyx, run_options


@click.command("threshold")
@click.argument("pred")
@click.option("-o", "--output", required=True, help="Output Zarr image for the uint8 mask, e.g. out.zarr/mask.")
@click.option("--threshold", "level", type=THRESHOLD, default=DEFAULT_THRESHOLD, show_default=True,
              help="Cleft voxels are probabilities >= this (of 255; floats in [0, 1] are compared with it / 255).")
@click.option("--chunks", help="Output chunk shape Z,Y,X (default 16,256,256).")
@run_options()
def command(pred, output, level, chunks, run):
    """Write 1 where PRED's probability reaches --threshold, else 0 (in PRED's frame)."""
    report = threshold(pred, output, level, positive_zyx(chunks, "--chunks"), run=run, log=click.echo)
    if report is not None:
        click.echo(f"{output}: {report.written} blocks written, {report.already_done} kept from an interrupted run")
