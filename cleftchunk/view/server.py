"""The neuroglancer viewer of :mod:`cleftchunk.view`: layers, the local server and screenshots."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.frames import Frame, align
from cleftchunk.io.volumes import Volume, open_volume

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
INSTALL_CHROMIUM = "apt-get install -y chromium"
SCREENSHOT_TIMEOUT = 120.0
#: Probabilities (uint8) shown as a green overlay whose opacity follows the value.
PREDICTION_SHADER = """
void main() {
  float p = toNormalized(getDataValue());
  emitRGBA(vec4(0.0, 1.0, 0.2, p * 0.8));
}
"""


@dataclass(frozen=True)
class ViewLayers:
    """What to show: the EM image, and optionally a prediction and cleft instances (specs or Volumes)."""

    image: Any
    prediction: Any = None
    clefts: Any = None
    ignore_frame: bool = False  # show every layer in the image's frame, voxel for voxel

    def volumes(self) -> dict[str, Volume]:
        named = {"image": self.image, "prediction": self.prediction, "clefts": self.clefts}
        return {name: _volume(v) for name, v in named.items() if v is not None}


def _neuroglancer() -> Any:
    try:
        import neuroglancer
    except ImportError:
        raise CleftchunkError("cleftchunk view needs neuroglancer: pip install neuroglancer (or cleftchunk[view])") from None
    return neuroglancer


def _volume(spec: Any) -> Volume:
    return spec if isinstance(spec, Volume) else open_volume(spec)


def build_viewer(layers: ViewLayers, port: int = 0) -> Any:
    """A neuroglancer Viewer serving ``layers`` on 127.0.0.1:``port`` (0: any free port)."""
    volumes = layers.volumes()
    image = volumes["image"]
    offsets = {}
    for name, volume in volumes.items():
        # neuroglancer places each layer by its offset: one resolution, and an overlap with the image
        align(Frame.of(image, f"image {image.spec}"), Frame.of(volume, f"{name} {volume.spec}"), layers.ignore_frame, "overlap",
              fix="give volumes at one resolution")
        framed = not layers.ignore_frame and image.voxel_size_known and volume.voxel_size_known
        offsets[name] = list(volume.offset if framed else image.offset)
    ng = _neuroglancer()
    ng.set_server_bind_address("127.0.0.1", bind_port=int(port))
    viewer = ng.Viewer()
    space = ng.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=list(image.voxel_size))
    with viewer.txn() as state:
        state.dimensions = space
        for name, volume in volumes.items():
            state.layers[name] = _layer(ng, name, volume, space, offsets[name])
        centre = [o + s / 2 for o, s in zip(image.offset, image.shape)]
        state.position = centre
        state.display_dimensions = ["x", "y", "z"]  # sections (z) across the screen's depth, as EM is viewed
        state.layout = "xy"
        state.cross_section_scale = max(image.shape[1:]) / 256  # the whole section in view, with a margin
    return viewer


def _layer(ng: Any, name: str, volume: Volume, space: Any, offset: list[int]) -> Any:
    kind = "segmentation" if name == "clefts" else "image"
    source = ng.LocalVolume(data=volume, dimensions=space, voxel_offset=offset, volume_type=kind)
    if kind == "segmentation":
        return ng.SegmentationLayer(source=source)
    if name == "prediction":
        return ng.ImageLayer(source=source, shader=PREDICTION_SHADER)
    return ng.ImageLayer(source=source)


def serve(layers: ViewLayers, port: int = 0, log: Callable[[str], None] = print) -> None:
    """Serve until interrupted (Ctrl-C), after printing the viewer's URL."""
    import signal

    viewer = build_viewer(layers, port)
    # Ctrl-C must stop it even when started with SIGINT ignored (inherited from a parent process)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log(f"neuroglancer viewer (Ctrl-C to stop): {viewer.get_viewer_url()}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopped")
    finally:
        import neuroglancer

        neuroglancer.stop()  # end its server thread, which could otherwise keep the process alive


def find_chromium() -> str:
    """The Chromium executable (``CHROMIUM`` overrides), else an error saying how to install it."""
    override = os.environ.get("CHROMIUM")
    for name in ((override,) if override else CHROMIUM_NAMES):
        found = shutil.which(name)
        if found:
            return found
    raise CleftchunkError(f"screenshots need a headless Chromium, and none was found: {INSTALL_CHROMIUM} (Debian), or set CHROMIUM=/path/to/chrome")


def screenshot(viewer: Any, path: str | os.PathLike, size: tuple[int, int] = (800, 600), timeout: float = SCREENSHOT_TIMEOUT) -> Path:
    """Write a PNG of the viewer's current view, rendered by headless Chromium; returns its path."""
    browser = find_chromium()
    with tempfile.TemporaryDirectory(prefix="cleftchunk-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [browser, *_chromium_flags(profile, size), viewer.get_viewer_url()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: the renderer and GPU processes end with it
        )
        try:
            reply = _wait_for_screenshot(viewer, size, timeout, proc)
        finally:
            _end_browser(proc)
    out = Path(path)
    out.write_bytes(reply.screenshot.image)
    return out


def _end_browser(proc: subprocess.Popen) -> None:
    """Stop the browser we started and every process it started (its process group), then reap it."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _chromium_flags(profile: str, size: tuple[int, int]) -> list[str]:
    return [
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--use-angle=swiftshader",  # software WebGL: no GPU or display needed
        "--enable-unsafe-swiftshader",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
    ]


def _wait_for_screenshot(viewer: Any, size: tuple[int, int], timeout: float, proc: subprocess.Popen) -> Any:
    """neuroglancer's screenshot, which answers once every visible chunk is loaded; bounded in time."""
    with viewer.config_state.txn() as s:
        s.show_ui_controls = False
        s.show_panel_borders = False
        s.viewer_size = list(size)
    done = threading.Event()
    reply: list[Any] = [None]

    def handler(result: Any) -> None:
        reply[0] = result
        done.set()

    viewer.async_screenshot(handler)
    deadline = time.monotonic() + timeout
    while not done.wait(0.5):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:] if proc.stderr else []
            raise CleftchunkError(f"headless Chromium exited ({proc.returncode}) before the screenshot: {' '.join(err) or 'no message'}")
        if time.monotonic() > deadline:
            raise CleftchunkError(f"no screenshot after {timeout:.0f} s: the browser did not render the view (is WebGL available?)")
    return reply[0]


def image_statistics(png: bytes) -> dict:
    """Distinct colours and the share of non-black pixels of a PNG (for checks of a screenshot)."""
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    flat = pixels.reshape(-1, 3)
    return {"colours": len(np.unique(flat, axis=0)), "lit": float((flat.max(axis=1) > 16).mean()), "shape": pixels.shape}
