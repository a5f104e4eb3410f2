"""``cleftchunk convert SRC DST``: any supported volume to chunked OME-Zarr, resumable."""

from __future__ import annotations

import click

from cleftchunk.io import convert as conv
from cleftchunk.run.chunks import DEFAULT_TASK_BYTES
from cleftchunk.errors import CleftchunkError
from cleftchunk_cli.options import count, parse_zyx, positive_zyx, run_options, source_selection


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--dataset", help="Dataset inside SRC (HDF5/Zarr/N5), e.g. volumes/raw; or write SRC as FILE:DATASET.")
@click.option("--channel", type=count(0), help="For 4-D data: the channel K to convert (channel axis first, or last if it has ≤ 4 entries).")
@click.option("--chunks", help="Output chunk shape Z,Y,X (default 16,256,256).")
@click.option("--compressor", default="zstd", show_default=True, help="zstd (Blosc-zstd), lz4, gzip or none.")
@click.option("--shards", help="Zarr v3 shard shape Z,Y,X, a multiple of --chunks (for volumes with millions of chunks).")
@click.option("--voxel-size", help="Voxel size Z,Y,X in nm; required when SRC's metadata has none (e.g. 40,4,4).")
@click.option("--offset", help="Offset Z,Y,X in nm (default: from SRC's metadata, else 0).")
@click.option("--mask", is_flag=True, help="Write a uint8 0/1 cleft mask instead of the label values.")
@click.option("--background", help="With --mask: the not-cleft value (an integer, or 'cremi' for 0xFF..FF/0xFF..FE). "
              "Default: SRC's 'background' attribute, else 'cremi' for uint64 clefts (volumes/... or *clefts*), else 0.")
@click.option("--levels", type=count(1, example="4"), default=1, show_default=True, help="OME-Zarr pyramid levels, each (1,2,2) smaller.")
@click.option("--downsample", type=click.Choice(["auto", "mean", "stride", "mode"]), default="auto", show_default=True,
              help="How levels are made: mean for images, stride for labels and masks (auto); mode for labels.")
@click.option("--task-mb", type=count(0, example="256"), default=DEFAULT_TASK_BYTES // 2**20, show_default=True,
              help="Source MiB per task when --block-shape is not given (memory ≈ task threads × 3 × this; 0: one storage unit per task).")
@click.option("--verify", "do_verify", is_flag=True, help="Afterwards compare every chunk with SRC and report mismatches.")
@source_selection("src")
@run_options()
def command(src, dst, dataset, channel, chunks, compressor, shards, voxel_size, offset, mask, background, levels,
            downsample, task_mb, do_verify, run):
    """Convert SRC (HDF5, CREMI file, TIFF stack, image folder, Zarr, N5, .npy) to OME-Zarr DST.

    DST is a volume like out.zarr/raw; for a whole CREMI file (SRC.hdf with volumes/raw, ... and
    no dataset named) it is a container like out.zarr, which receives raw, clefts and neuron_ids.
    Re-running the same command after an interruption resumes it.
    """
    plan_options = dict(
        channel=channel,
        chunks=positive_zyx(chunks, "--chunks"),
        compressor=compressor,
        shards=positive_zyx(shards, "--shards"),
        voxel_size=positive_zyx(voxel_size, "--voxel-size", float),
        offset_nm=parse_zyx(offset, "--offset", float),
        background=background,
        levels=levels,
        level_method=None if downsample == "auto" else downsample,
    )
    results = conv.convert_path(src, dst, dataset=dataset, mask=mask, run=run, task_bytes=task_mb * 2**20, log=click.echo,
                                **plan_options)
    for result in results:
        click.echo(_summary(result))
    if do_verify:
        for result in results:
            _verify(result.plan, run)


def _summary(result: conv.ConversionResult) -> str:
    plan = result.plan
    if result.status == "complete":
        return f"{plan.dst}: already complete, nothing to do ({plan.describe()})"
    resumed = f" ({result.units - result.written} were already stored)" if result.status == "resumed" else ""
    return f"{result.status} {plan.describe()}: filled {result.written} of {result.units} storage units{resumed}"


def _verify(plan: conv.ConversionPlan, run) -> None:
    from cleftchunk.io.verify import verify

    mismatches = verify(plan, run)
    if mismatches:
        for m in mismatches[:20]:
            click.echo(f"mismatch: {plan.dst} {m}", err=True)
        more = " (first 20 listed)" if len(mismatches) > 20 else ""
        raise CleftchunkError(
            f"{plan.dst}: {len(mismatches)} chunks differ from {plan.source}{more}: re-run with --overwrite to rewrite it"
        )
    click.echo(f"verified {plan.dst}: every chunk equals {plan.source}")
