"""``cleftchunk info PATH``: shape, dtype, chunks, frame, compression and values of volumes."""

from __future__ import annotations

import json

import click

from cleftchunk_cli.options import source_selection

from cleftchunk.io import info as volume_info


@click.command("info")
@click.argument("path")
@click.option("--dataset", help="Dataset inside PATH (HDF5/Zarr/N5); without it a container lists all its volumes.")
@source_selection("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def command(path, dataset, as_json):
    """Describe PATH: a Zarr/OME-Zarr, HDF5 (CREMI), N5, TIFF, image folder or .npy volume or container."""
    infos = volume_info.describe(path, dataset)
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2, default=str))
        return
    click.echo("\n".join(volume_info.format_info(i) for i in infos))
