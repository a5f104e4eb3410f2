"""``cleftchunk demo``: the whole pipeline on synthetic data, with a visual report."""

from __future__ import annotations

import click

from cleftchunk_cli.options import count


@click.command("demo")
@click.argument("folder", default="demo-output", type=click.Path(file_okay=False))
@click.option(
    "--size",
    type=click.Choice(["auto", "quick", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="quick: a one-minute check; cpu: < 15 min on 2 cores; gpu: default unetv0, longer training. auto: gpu if CUDA is available, else cpu.",
)
@click.option("--iterations", type=count(1), help="Training iterations (overrides the size's).")
@click.option("--seed", type=count(0), help="Seed of the run: training, test and validation samples are synthesized from 3·seed, 3·seed + 1 and 3·seed + 2.")
@click.option("--overwrite", is_flag=True, help="Start again in a folder that holds an earlier demo.")
def command(folder: str, size: str, iterations: int | None, seed: int | None, overwrite: bool) -> None:
    """Synthesize, convert, train, predict, segment, evaluate and report in FOLDER.

    Re-running the same command after an interruption continues from the first unfinished stage.
    """
    from cleftchunk.demo import run_demo

    from cleftchunk.urls import local_file

    local_file(folder, "demo folder")  # the demo writes a local folder: a URL is refused as given
    page = run_demo(folder, size=size, overwrite=overwrite, iterations=iterations, seed=seed, log=click.echo)
    click.echo(f"report: {page}")
