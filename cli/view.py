"""``cleftchunk view IMAGE [--prediction P] [--clefts C]``: a local neuroglancer viewer of the results."""

from __future__ import annotations

import click

from cleftchunk_cli.options import count, ignore_frame_option


@click.command("view")
@click.argument("image")
@click.option("--prediction", "-p", help="Prediction (uint8 probabilities) shown as a green overlay, e.g. out.zarr/pred.")
@click.option("--clefts", "-c", help="Cleft instances (ids from cleftchunk segment) shown as a segmentation layer.")
@click.option("--port", type=count(0, 65535), default=0, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--screenshot", "screenshot_path", type=click.Path(dir_okay=False), help="Write a PNG of the view (needs Chromium) and exit instead of serving.")
@click.option("--size", default="800,600", show_default=True, help="Screenshot width,height in pixels.")
@ignore_frame_option
def command(image, prediction, clefts, port, screenshot_path, size, ignore_frame):
    """Show IMAGE (EM), with its prediction and cleft instances, in neuroglancer on 127.0.0.1.

    Prints the viewer's URL and serves until Ctrl-C. Volumes are read lazily (local paths,
    s3://, gs://, https:// alike); they must share one voxel size, and each is placed by its
    offset (--ignore-frame: all in the image's frame, voxel for voxel).
    """
    from cleftchunk.view import ViewLayers, build_viewer, screenshot, serve

    from cleftchunk.io.guard import refuse_overlap

    refuse_overlap(screenshot_path, [image, prediction, clefts], what="--screenshot file")  # before the viewer starts
    layers = ViewLayers(image, prediction, clefts, ignore_frame)
    if screenshot_path is None:
        serve(layers, port, log=click.echo)
        return
    width, height = _size(size)
    viewer = build_viewer(layers, port)
    click.echo(f"wrote {screenshot(viewer, screenshot_path, (width, height))}")


def _size(text: str) -> tuple[int, int]:
    from cleftchunk.errors import CleftchunkError

    try:
        width, height = (int(v) for v in text.split(","))
    except ValueError:
        raise CleftchunkError(f"--size {text!r}: give WIDTH,HEIGHT in pixels, e.g. 800,600") from None
    if width <= 0 or height <= 0:
        raise CleftchunkError(f"--size {text!r}: give positive WIDTH,HEIGHT")
    return width, height
