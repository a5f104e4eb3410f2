"""How a :class:`~cleftchunk.io.volumes.Volume` finds its array in each storage format (Zarr and
OME-Zarr groups, HDF5, precomputed, and the read-only sources), and what is refused: data that is not 3-D
(or 4-D with a channel picked), and data types no stage handles."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io import precomputed, sources, stores
from cleftchunk.io.ome import multiscale_level0

# ``Volume`` in annotations is cleftchunk.io.volumes.Volume, not imported: volumes imports this module.
#: dtype kinds every stage can handle: bool, signed/unsigned integers, floats.
SUPPORTED_DTYPE_KINDS = "biuf"


def channel_axis(shape: Sequence[int]) -> int:
    """The channel axis of a 4-D shape: last if it is small (RGB-like) and the first is not, else first."""
    return 3 if shape[3] <= 4 and shape[0] > 4 else 0


def check_3d(array: Any, volume: Volume) -> None:
    shape = tuple(int(s) for s in array.shape)
    if len(shape) == 3:
        return
    if len(shape) == 4:
        axis = channel_axis(shape)
        raise CleftchunkError(
            f"{volume} is 4-D {shape}; a volume is 3-D (z, y, x): pick one of its {shape[axis]} channels "
            f"(axis {axis}) with --channel K"
        )
    if len(shape) < 3:
        raise CleftchunkError(
            f"{volume} is {len(shape)}-D {shape}; a volume is 3-D (z, y, x): give a stack of sections "
            "(multi-page TIFF, a folder of images, or a 3-D dataset)"
        )
    raise CleftchunkError(f"{volume} is {len(shape)}-D {shape}; only 3-D data, or 4-D with --channel K, can be read: extract a 3-D volume first")


def check_dtype(dtype: np.dtype, volume: Volume) -> None:
    if dtype.kind not in SUPPORTED_DTYPE_KINDS or dtype.fields is not None:
        raise CleftchunkError(
            f"{volume} has data type {dtype}, which cleftchunk does not handle: store it as an integer or float type"
        )


def open_array(volume: Volume) -> Any:
    """The array (or array-like source) ``volume`` names; a multiscale group resolves to level 0."""
    kind = volume.kind
    if kind == "hdf5":
        return _open_hdf5(volume)
    if kind == "zarr":
        return _open_zarr(volume)
    if kind == "n5":
        return sources.N5Array(volume.container, volume.inner)
    if kind == "precomputed":
        return precomputed.PrecomputedArray(str(volume.container), writable=volume.mode != "r")
    if volume.inner:
        raise CleftchunkError(f"{volume.container} is a {kind} file with no datasets inside; drop {volume.inner!r} from the path")
    if kind == "tiff":
        return sources.TiffStack(volume.container)
    if kind == "npy":
        return sources.NpyArray(volume.container)
    return sources.ImageFolder(volume.container)


def _open_hdf5(volume: Volume) -> Any:
    import h5py

    try:
        f = h5py.File(volume.container, "r" if volume.mode == "r" else "a")
    except OSError as e:
        raise CleftchunkError(f"{volume.container} is not a readable HDF5 file ({e}): check that it is complete") from e
    volume._h5file = f
    datasets = list_hdf5_datasets(f)
    inner = volume.inner
    if inner is None:
        if len(datasets) == 1:
            inner = volume.inner = datasets[0]
        elif not datasets:
            raise CleftchunkError(f"{volume.container} holds no datasets")
        else:
            raise CleftchunkError(
                f"{volume.container} holds several datasets ({', '.join(datasets)}): pick one with --dataset or FILE:DATASET"
            )
    if inner not in f or not isinstance(f[inner], h5py.Dataset):
        raise CleftchunkError(
            f"{volume.container} has no dataset {inner!r}; it has: {', '.join(datasets) or 'none'}"
        )
    return f[inner]


def list_hdf5_datasets(f: Any) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _open_zarr(volume: Volume) -> Any:
    import zarr

    mode = "r" if volume.mode == "r" else "r+"
    try:
        node = zarr.open(stores.zarr_store(volume.container, mode), mode=mode, path=volume.inner or "")
    except CleftchunkError:
        raise
    except KeyError as e:
        metadata = stores.join(volume.container, f"{volume.inner}/zarr.json" if volume.inner else "zarr.json")
        if stores.exists(metadata):  # there is a node, its metadata lacks a key: damaged, not absent
            raise CleftchunkError(f"{metadata} is damaged (no {e}): repair or re-create its metadata") from e
        raise CleftchunkError(
            f"{volume.spec}: no Zarr array or group there, so neither an image (out.zarr, multiscales at its root) "
            f"nor a container of images (out.zarr/name); check the path ({type(e).__name__})"
        ) from e
    except FileNotFoundError as e:
        raise CleftchunkError(
            f"{volume.spec}: no Zarr array or group there, so neither an image (out.zarr, multiscales at its root) "
            f"nor a container of images (out.zarr/name); check the path ({type(e).__name__})"
        ) from e
    except stores.storage_errors() as e:
        if not stores.is_url(volume.container):
            raise  # a local OSError (permissions, a full disk) speaks for itself
        raise stores.explain(e, volume.spec) from e
    except ValueError as e:  # zarr's metadata errors (and JSON that does not parse) are ValueErrors
        raise CleftchunkError(f"{volume.spec} is not a readable Zarr node ({type(e).__name__}: {e}): repair or re-create its metadata") from e
    if isinstance(node, zarr.Group):
        level0 = multiscale_level0(node)
        if level0 is None:
            arrays = sorted(k for k, _ in node.arrays())
            groups = sorted(k for k, _ in node.groups())
            raise CleftchunkError(
                f"{volume.spec} is a container of images, not an image (no multiscales at its root): "
                f"name one inside it, e.g. {volume.spec}/{(arrays + groups + ['raw'])[0]} "
                f"(it holds: {', '.join(arrays + groups) or 'nothing'})"
            )
        volume.inner = "/".join(p for p in (volume.inner, level0) if p)
        node = node[level0]
    return node


class ChannelView:
    """One channel of a 4-D array, as a 3-D array (see the module docstring for the axis rule)."""

    def __init__(self, array: Any, channel: int, name: str):
        shape = tuple(int(s) for s in array.shape)
        if len(shape) != 4:
            raise CleftchunkError(f"{name} has {len(shape)} axes {shape}; --channel only applies to 4-D data: drop it")
        self.axis = channel_axis(shape)
        if not 0 <= channel < shape[self.axis]:
            raise CleftchunkError(f"{name} has {shape[self.axis]} channels (axis {self.axis} of {shape}): pass --channel 0..{shape[self.axis] - 1}")
        self.base = array
        self.index = channel
        self.shape = shape[: self.axis] + shape[self.axis + 1 :]
        self.dtype = np.dtype(array.dtype)
        chunks = getattr(array, "chunks", None) or shape
        self.chunks = tuple(int(c) for i, c in enumerate(chunks) if i != self.axis)
        self.attrs = getattr(array, "attrs", {})

    def __getitem__(self, key: Any) -> np.ndarray:
        slices, dropped = sources.normalize_key(key, self.shape)
        full = list(slices)
        full.insert(self.axis, self.index)
        data = np.asarray(self.base[tuple(full)])
        return data.squeeze(axis=dropped) if dropped else data
