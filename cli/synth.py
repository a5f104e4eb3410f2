"""``cleftchunk synth``: write a synthetic CREMI-like sample (raw, clefts, neuron ids)."""

from __future__ import annotations

import click

from cleftchunk.errors import CleftchunkError
from cleftchunk.synth.generate import DEFAULT_SHAPE
from cleftchunk_cli.options import SHARE, count, positive_zyx, run_options


@click.command("synth")
@click.argument("dst", type=click.Path())
@click.option("--shape", default=",".join(map(str, DEFAULT_SHAPE)), show_default=True,
              help="Volume extent Z,Y,X in voxels (40x4x4 nm).")
@click.option("--seed", default=0, show_default=True, type=count(0), help="Random seed: same seed, same volume.")
@click.option("--difficulty", default=0.5, show_default=True, type=SHARE,
              help="0..1: noise, blur, section changes, distractors, missing/misaligned sections.")
@click.option("--format", "fmt", default=None,
              help="zarr: DST.zarr/{raw,clefts,neuron_ids}; cremi: one CREMI-layout HDF5 file DST.hdf "
                   "[default: cremi for .hdf/.h5/.hdf5 names, else zarr].")
@click.option("--chunks", default=None, help="Chunk shape Z,Y,X [default: 16,256,256]; the work block is --block-shape (default: one chunk).")
@click.option("--missing-rate", default=None, type=SHARE, help="Share of missing sections [default: 0.02*difficulty].")
@click.option("--misalign-rate", default=None, type=SHARE, help="Share of shifted sections [default: 0.02*difficulty].")
@click.option("--preview", default=None, type=click.Path(), help="Also write a PNG of a few sections with clefts overlaid.")
@run_options()
def command(dst, shape, seed, difficulty, fmt, chunks, missing_rate, misalign_rate, preview, run):
    """Write a synthetic CREMI-like EM sample with synaptic clefts to DST.

    Every voxel is a function of the seed and its coordinate, so the result is the same for any
    chunking or number of workers, and an interrupted run resumes when re-run.
    """
    from cleftchunk.synth.generate import generate_region, make_params
    from cleftchunk.synth.preview import preview_region, save_preview
    from cleftchunk.synth.write import check_shape, synthesize

    fmt = fmt.lower() if fmt else None
    shape = check_shape(positive_zyx(shape, "--shape"))
    overrides = {k: v for k, v in (("missing_rate", missing_rate), ("misalign_rate", misalign_rate)) if v is not None}
    make_params(difficulty, **overrides)  # fail on bad values before touching the destination
    if preview is not None and not str(preview).lower().endswith(".png"):
        raise CleftchunkError(f"--preview {preview} must name a .png file")
    from cleftchunk.io.guard import refuse_overlap

    refuse_overlap(preview, [dst], what="--preview file")
    summary = synthesize(dst, shape, seed=seed, difficulty=difficulty, chunks=positive_zyx(chunks, "--chunks"), format=fmt,
                         run=run, log=click.echo, **overrides)
    if summary is None:  # a dry run
        return
    resumed = f", {summary['skipped']} already written" if summary["skipped"] else ""
    click.echo(
        f"wrote {summary['path']} ({summary['format']}, shape {','.join(map(str, shape))}, {summary['blocks']} blocks{resumed}) "
        f"in {summary['seconds']:.1f} s"
    )
    if preview is not None:
        data = generate_region(preview_region(shape), seed, difficulty, **overrides)
        save_preview(preview, data["raw"], data["clefts"])
        click.echo(f"preview: {preview}")
