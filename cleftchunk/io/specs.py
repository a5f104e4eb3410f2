"""Volume specs: how a string names a dataset, and which outputs cleftchunk can write.

- ``file.h5:volumes/raw`` — an HDF5 dataset (local only);
- ``out.zarr`` — a Zarr image whose root is the image (OME-Zarr multiscales at the root, levels
  ``s0, s1, ...``), as napari-ome-zarr and ome-zarr-py name it;
- ``container.zarr/name`` — a named image (or array) inside a container, as funlib/daisy name it;
- either Zarr form behind ``s3://``, ``gs://`` or ``https://`` (see :mod:`.stores`);
- read-only local sources: ``stack.tif``, a folder of images, ``volume.npy``, ``data.n5/raw``;
- ``precomputed://gs://bucket/path`` (and ``s3://``, ``https://``, ``file://``, a local path), with
  an optional ``#mip=..&roi=..`` selection (see :mod:`.precomputed`): one volume, no datasets inside.
"""

from __future__ import annotations

import os
from pathlib import Path

from cleftchunk.errors import CleftchunkError
from cleftchunk.io import precomputed, sources, stores
from cleftchunk.io.stores import Location

HDF5_SUFFIXES = (".h5", ".hdf", ".hdf5")
ZARR_SUFFIXES = (".zarr", ".zarr2", ".zarr3")


def split_spec(spec: str | os.PathLike, dataset: str | None = None) -> tuple[Location, str | None]:
    """Split ``file.h5:volumes/raw`` / ``out.zarr/raw`` / ``s3://b/out.zarr/raw`` into (container, path inside).

    The container is a :class:`Path`, or for a URL the URL string (see :mod:`.stores`).
    """
    text = str(spec)
    if precomputed.is_precomputed(text):  # the whole spec (its #selection too) names one volume
        if dataset is not None:
            raise CleftchunkError(f"{text} is a precomputed volume, with no datasets inside: drop --dataset {dataset}")
        return text, None
    if isinstance(stores.parse_location(spec), str):  # a URL; malformed ones are refused here
        return _split_url(text, dataset)
    if ":" in text and not text.startswith("file:"):
        head, _, tail = text.rpartition(":")
        if head.lower().endswith(HDF5_SUFFIXES) or head.lower().endswith(ZARR_SUFFIXES + (".n5",)):
            if dataset is not None and dataset != tail:
                raise CleftchunkError(f"{text!r} names dataset {tail!r} but --dataset says {dataset!r}: give one of them")
            return Path(head), tail.strip("/") or None
    path = Path(text)
    parts = path.parts
    for i, part in enumerate(parts):
        if part.lower().endswith(ZARR_SUFFIXES + (".n5",)):
            container = Path(*parts[: i + 1])
            return container, _with_dataset("/".join(parts[i + 1 :]) or None, dataset)
    return path, (dataset.strip("/") if dataset else None)


def _split_url(url: str, dataset: str | None) -> tuple[str, str | None]:
    stores.known_scheme(url)
    scheme, _, rest = url.partition("://")
    parts = [p for p in rest.split("/") if p]
    for i, part in enumerate(parts):
        low = part.lower()
        if low.split(":", 1)[0].endswith(HDF5_SUFFIXES + sources.TIFF_SUFFIXES + (".npy", ".n5")):
            raise stores.local_only(url, "HDF5, TIFF, N5 and .npy")
        if low.endswith(ZARR_SUFFIXES):
            container = f"{scheme}://{'/'.join(parts[: i + 1])}"
            return container, _with_dataset("/".join(parts[i + 1 :]) or None, dataset)
    return f"{scheme}://{'/'.join(parts)}", (dataset.strip("/") if dataset else None)


def _with_dataset(inner: str | None, dataset: str | None) -> str | None:
    if dataset is None:
        return inner
    return "/".join(p for p in (inner, dataset.strip("/")) if p)


def is_hdf5(path: Location) -> bool:
    return str(path).lower().endswith(HDF5_SUFFIXES)


def source_kind(container: Location) -> str:
    """What kind of storage ``container`` is: hdf5, zarr, n5, tiff, npy, folder or precomputed (URLs: zarr)."""
    if precomputed.is_precomputed(container):
        return "precomputed"
    if stores.is_url(container):
        return "zarr"
    suffix = container.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix in sources.TIFF_SUFFIXES:
        return "tiff"
    if suffix == ".npy":
        return "npy"
    if sources.is_n5(container):
        return "n5"
    if suffix in ZARR_SUFFIXES or not container.is_dir() or not sources.is_image_folder(container):
        return "zarr"
    return "folder"


def check_output_spec(spec: str | os.PathLike) -> None:
    """Refuse an output cleftchunk cannot write: not Zarr, or a read-only URL scheme."""
    container, _ = split_spec(spec)
    if precomputed.is_precomputed(container):  # (the dtype is checked when it is created)
        precomputed.check_output(str(container), "uint8")
        return
    if is_hdf5(container):
        raise CleftchunkError(f"{spec}: cleftchunk writes Zarr; give an output path ending in .zarr (out.zarr or out.zarr/name)")
    if stores.is_url(container):
        stores.check_url(str(container), write=True)
    if not str(container).lower().endswith(ZARR_SUFFIXES):
        raise CleftchunkError(
            f"{spec}: the output must be a Zarr image, out.zarr, or an image inside a container, out.zarr/name"
        )


def image_name(container: Location, inner: str | None) -> str:
    """The multiscales ``name`` of an image: its last path part, or the container's stem for a root image."""
    if inner:
        return inner.rpartition("/")[2]
    return str(container).rstrip("/").rpartition("/")[2].rsplit(".", 1)[0]
