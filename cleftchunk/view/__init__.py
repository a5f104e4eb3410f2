"""``cleftchunk view``: an EM image, its prediction and its cleft instances in a local neuroglancer.

The viewer is neuroglancer's Python server (the ``neuroglancer`` package, ``pip install
cleftchunk[view]``) bound to 127.0.0.1: nothing is reachable from another machine. Each layer is a
``LocalVolume`` over a :class:`~cleftchunk.io.volumes.Volume`, so data is read lazily, chunk by
chunk, as the browser asks for it — from a local path or an object store alike — and the three
layers share one coordinate space in nm (z, y, x, voxel size and offset from the metadata), so
they overlay exactly as they do for every other OME-Zarr reader.

Screenshots need a browser connected to the viewer (neuroglancer renders with WebGL in the
page): :func:`screenshot` starts headless Chromium (Debian's ``chromium`` package) on the
viewer's URL, with SwiftShader's software WebGL, and waits for neuroglancer to report that every
visible chunk has loaded.
"""

from cleftchunk.view.server import ViewLayers, build_viewer, find_chromium, screenshot, serve

__all__ = ["ViewLayers", "build_viewer", "find_chromium", "screenshot", "serve"]
