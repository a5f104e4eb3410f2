"""``cleftchunk export CLEFTS OUT.hdf``: a CREMI-layout HDF5 file."""

from __future__ import annotations

import click

from cleftchunk.post.export import export_cremi, parse_crop

from cleftchunk_cli.options import KIND_CHOICE, ignore_frame_option, parse_zyx, run_options


@click.command("export")
@click.argument("clefts")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--raw", help="Also write this volume as volumes/raw (the same frame: voxel size, offset and shape).")
@click.option("--crop", help="Export only Z0:Z1,Y0:Y1,X0:X1 (voxels of CLEFTS), e.g. 37:162,911:2161,911:2161.")
@click.option("--offset", help="Voxel offset Z,Y,X of the exported region in the sample's frame "
              "(default: CLEFTS' own offset plus the crop's begin), written in nm as `offset`.")
@click.option("--kind", type=KIND_CHOICE, default="auto", show_default=True,
              help="What CLEFTS holds: ids (CREMI) or main (0 = background, converted).")
@ignore_frame_option
@run_options()
def command(clefts, out, raw, crop, offset, kind, ignore_frame, run):
    """Write cleft ids as volumes/labels/clefts of a CREMI HDF5 file (file_format 0.2).

    \b
    Padded CREMI samples (200x3072x3072) hold the labelled region at voxel offset 37,911,911:
      prediction of the whole padded sample, cut to the labelled region:
        cleftchunk export out.zarr/clefts A.hdf --crop 37:162,911:2161,911:2161
      prediction of the labelled region alone, placed in the padded frame:
        cleftchunk export out.zarr/clefts A.hdf --offset 37,911,911
    """
    from cleftchunk.urls import local_file

    info = export_cremi(
        clefts,
        local_file(out, "output"),  # CREMI files are written locally: a URL is refused as given
        raw=raw,
        offset=parse_zyx(offset, "--offset", minimum=0),
        crop=parse_crop(crop) if crop else None,
        kind=kind,
        run=run,
        log=click.echo,
        ignore_frame=ignore_frame,
    )
    if run.dry_run:
        return
    click.echo(f"{info['path']}: clefts {tuple(info['shape'])} at voxel offset {tuple(info['offset_voxels'])}")
