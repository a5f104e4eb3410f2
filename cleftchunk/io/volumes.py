"""Chunked volumes that know where they are: shape, dtype, chunks, voxel size and offset (nm).

A *volume spec* is a string naming one 3-D dataset:

- ``out.zarr`` (the root is the image) or ``container.zarr/raw`` (a named image inside a container) —
  a Zarr v3 (or v2) array, or an OME-Zarr multiscale group (level 0 is used); either behind
  ``s3://``, ``gs://`` or ``https://`` too (:mod:`.specs` parses specs, :mod:`.stores` opens URLs);
- ``file.h5:volumes/raw`` (also ``.hdf``, ``.hdf5``) — an HDF5 dataset;
- ``file.h5`` with ``dataset=`` given separately;
- read-only sources (see :mod:`cleftchunk.io.sources`): ``stack.tif`` (multi-page TIFF), a folder of
  per-section ``.tif``/``.png`` images, ``volume.npy``, and N5 datasets ``data.n5/raw``;
- ``precomputed://gs://bucket/path#mip=1&roi=...`` — a neuroglancer precomputed volume (one scale,
  optionally a box of it), read and written through tensorstore (:mod:`.precomputed`).

Volumes are 3-D (z, y, x). A 4-D source is read one channel at a time: ``channel=K`` (the CLI's
``--channel K``) selects channel K along the channel axis, which is the *last* axis when it has at
most 4 entries and the first does not (RGB(A) images: z, y, x, c), else the *first* axis (c, z, y, x,
the convention of gunpowder and PyTorch Connectomics).

Zarr output written here is an OME-Zarr (NGFF 0.5) image: a group whose ``ome.multiscales``
attribute gives the scale (voxel size) and translation (offset) in nm, with the full-resolution
array at ``s0`` and optional downsampled levels ``s1, s2, ...``. The ``s0`` array also carries
``voxel_size`` and ``offset`` attributes so that it is self-describing when opened alone.

All positions are (z, y, x). ``Volume.roi`` is in *world voxels*: offset_nm / voxel_size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi, check_voxel_size, voxels_from_nm
from cleftchunk.io import precomputed, stores
from cleftchunk.io.specs import (  # noqa: F401  (re-exported: the spec rules are part of this API)
    HDF5_SUFFIXES,
    ZARR_SUFFIXES,
    check_output_spec,
    image_name,
    is_hdf5,
    source_kind,
    split_spec,
)
from cleftchunk.io.stores import Location
from cleftchunk.io.ome import AXES, compressor_codecs, multiscale_level0, ome_multiscales, read_frame, zarr_group
from cleftchunk.io.formats import (  # noqa: F401  (re-exported: callers import them from here)
    SUPPORTED_DTYPE_KINDS,
    ChannelView,
    channel_axis,
    check_3d,
    check_dtype,
    list_hdf5_datasets,
    open_array,
)

#: Default chunk shape of written volumes: 1 MiB for uint8, thin in z to follow EM anisotropy
#: (40 nm sections vs 4 nm pixels), and a divisor of the default prediction block so that blocks
#: stay aligned to chunks. 256 px in-plane matches the model window.
DEFAULT_CHUNKS = (16, 256, 256)
DEFAULT_VOXEL_SIZE = (40.0, 4.0, 4.0)


def chunk_shape(chunks: Sequence[int] | None, shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The chunk-shape rule of every written volume: three positive whole extents Z,Y,X
    (:data:`DEFAULT_CHUNKS` when none are given), no larger than the volume's ``shape`` when given."""
    given = DEFAULT_CHUNKS if chunks is None or len(chunks) == 0 else chunks
    try:
        values = tuple(int(c) for c in given)
    except (TypeError, ValueError):
        raise CleftchunkError(f"chunks {given!r} must be 3 integers Z,Y,X, e.g. 16,256,256") from None
    if len(values) != 3 or min(values) <= 0:
        raise CleftchunkError(f"chunks={','.join(map(str, values))} must be 3 positive extents Z,Y,X, e.g. 16,256,256")
    return values if shape is None else tuple(min(c, int(s)) for c, s in zip(values, shape))  # type: ignore[return-value]


# -- the Volume type ----------------------------------------------------------------------
@dataclass
class Volume:
    """A 3-D dataset plus its physical frame. Picklable: reopens lazily in each process."""

    container: Location
    inner: str | None
    voxel_size: tuple[float, ...]
    offset_nm: tuple[float, ...]
    mode: str = "r"
    voxel_size_known: bool = True
    channel: int | None = None
    _array: Any = field(default=None, repr=False, compare=False)
    _h5file: Any = field(default=None, repr=False, compare=False)
    _kind: str | None = field(default=None, repr=False, compare=False)

    # -- storage access --------------------------------------------------------------
    @property
    def array(self) -> Any:
        """The underlying array (zarr.Array, h5py.Dataset or a source), opened on first use."""
        if self._array is None:
            array = open_array(self)
            self._array = array if self.channel is None else ChannelView(array, self.channel, str(self))
        return self._array

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None
        state["_h5file"] = None
        return state

    def close(self) -> None:
        if self._h5file is not None:
            self._h5file.close()
        self._h5file = None
        self._array = None

    @property
    def spec(self) -> str:
        if self.inner is None:
            return str(self.container)
        sep = ":" if is_hdf5(self.container) else "/"
        return f"{self.container}{sep}{self.inner}"

    @property
    def kind(self) -> str:
        """hdf5, zarr, n5, tiff, npy or folder (see :func:`source_kind`); looked up once."""
        if self._kind is None:
            self._kind = source_kind(self.container)
        return self._kind

    @property
    def is_zarr(self) -> bool:
        return self.kind == "zarr"

    # -- metadata --------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        chunks = getattr(self.array, "chunks", None)
        return tuple(int(c) for c in chunks) if chunks else self.shape

    @property
    def attrs(self) -> dict:
        """The stored array's attributes (a copy; empty for formats without any)."""
        return dict(getattr(self.array, "attrs", None) or {})

    @property
    def offset(self) -> tuple[int, ...]:
        """Offset in world voxels."""
        return voxels_from_nm(self.offset_nm, self.voxel_size)

    @property
    def roi(self) -> Roi:
        return Roi(self.offset, self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    # -- data ------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> np.ndarray:
        """Array-local indexing (0 is the first stored voxel)."""
        return np.asarray(self.array[key])

    def read(self, roi: Roi) -> np.ndarray:
        """Read a ROI given in world voxels; it must lie inside the volume."""
        self._check_inside(roi)
        return np.asarray(self.array[roi.to_slices(self.offset)])

    def write(self, roi: Roi, data: np.ndarray) -> None:
        self._check_inside(roi)
        if tuple(data.shape) != roi.shape:
            raise ValueError(f"data of shape {data.shape} does not fit {roi}")
        self.array[roi.to_slices(self.offset)] = data

    def read_nm(self, offset_nm: Sequence[float], shape_nm: Sequence[float]) -> np.ndarray:
        return self.read(Roi.from_nm(offset_nm, shape_nm, self.voxel_size))

    def write_nm(self, offset_nm: Sequence[float], data: np.ndarray) -> None:
        offset = voxels_from_nm(offset_nm, self.voxel_size)
        self.write(Roi(offset, data.shape), data)

    def _check_inside(self, roi: Roi) -> None:
        if not self.roi.contains(roi):
            raise ValueError(f"{roi} is not inside {self.spec} ({self.roi})")

    def to_dask(self, chunks: Sequence[int] | None = None):
        """A dask array over the stored data (lazy; each task reopens the store)."""
        import dask.array as da

        if self.is_zarr and self.channel is None:
            arr = da.from_zarr(self.array)
            return arr if chunks is None else arr.rechunk(tuple(chunks))
        return da.from_array(_LazyReader(self), chunks=tuple(chunks or self.chunks), asarray=True, lock=False)

    def __str__(self) -> str:
        return self.spec if self.channel is None else f"{self.spec} (channel {self.channel})"

    def __repr__(self) -> str:
        return (
            f"Volume({self.spec}, shape={self.shape}, dtype={self.dtype}, chunks={self.chunks}, "
            f"voxel_size={self.voxel_size}, offset_nm={self.offset_nm})"
        )


class _LazyReader:
    """Array-like for dask over an HDF5 dataset: opens the file in each worker process."""

    def __init__(self, volume: Volume):
        self.volume = volume
        self.shape = volume.shape
        self.dtype = volume.dtype
        self.ndim = volume.ndim

    def __getitem__(self, key):
        return self.volume[key]


# -- opening ------------------------------------------------------------------------------
def open_volume(
    spec: str | os.PathLike,
    dataset: str | None = None,
    mode: str = "r",
    voxel_size: Sequence[float] | None = None,
    offset_nm: Sequence[float] | None = None,
    channel: int | None = None,
) -> Volume:
    """Open a 3-D dataset as a :class:`Volume`.

    ``voxel_size`` / ``offset_nm`` override what the metadata says; with neither, an unknown
    voxel size is (1, 1, 1) with ``voxel_size_known`` False. ``channel`` picks one channel of
    4-D data. Data that is not 3-D, or whose dtype is not bool, integer or float, is refused
    with a :class:`CleftchunkError`.
    """
    container, inner = split_spec(spec, dataset)
    if not precomputed.is_precomputed(container):  # (a precomputed reader says what is missing or unreachable)
        stores.check_reachable(container)
        if not stores.exists(container):
            raise CleftchunkError(f"{container} does not exist: check the path")
    volume = Volume(container, inner, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), mode=mode, channel=channel)
    if mode != "r" and volume.kind not in ("zarr", "hdf5", "precomputed"):
        raise CleftchunkError(f"{volume.spec} is a read-only {volume.kind} source: convert it to Zarr first (cleftchunk convert)")
    array = volume.array  # opens, resolving multiscale groups to level 0
    check_3d(array, volume)
    check_dtype(np.dtype(array.dtype), volume)
    meta_vs, meta_off = read_frame(volume)
    ndim = len(array.shape)
    volume.voxel_size_known = voxel_size is not None or meta_vs is not None
    volume.voxel_size = tuple(float(v) for v in (voxel_size or meta_vs or (1.0,) * ndim))
    volume.offset_nm = tuple(float(v) for v in (offset_nm or meta_off or (0.0,) * ndim))
    if len(volume.voxel_size) != ndim or len(volume.offset_nm) != ndim:
        raise CleftchunkError(
            f"{volume.spec}: voxel size {volume.voxel_size} / offset {volume.offset_nm} do not match its {ndim} axes"
        )
    return volume


# -- creating -----------------------------------------------------------------------------
def exists(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` holds something. An image group with nothing in it but its own metadata is
    what a run killed between creating the group and its ``s0`` leaves: it does not count, so the
    same command creates the array and goes on instead of asking for --overwrite."""
    container, inner = split_spec(spec)
    if precomputed.is_precomputed(container):
        return precomputed.exists(str(container))
    if inner is None or is_hdf5(container):
        return stores.exists(container)
    place = stores.join(container, inner)
    if not stores.exists(place):
        return False
    return stores.is_url(place) or not _empty_group(Path(place))


def _empty_group(place: Path) -> bool:
    """An image group create_volume began (its OME metadata written) and never gave an array;
    an empty group of another origin (no "ome" attribute) still counts as someone's data."""
    try:
        if not place.is_dir() or [p.name for p in place.iterdir()] != ["zarr.json"]:
            return False
        meta = json.loads((place / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("node_type") == "group" and "ome" in (meta.get("attributes") or {})


def create_volume(
    spec: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
    offset_nm: Sequence[float] | None = None,
    compressor: str | None = "zstd",
    shards: Sequence[int] | None = None,
    fill_value: Any = 0,
    attrs: dict | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
) -> Volume:
    """Create an OME-Zarr image with its data at ``s0``: ``out.zarr`` (the image is the root) or
    ``container.zarr/name`` (one named image of a container); local or an object-store URL.

    An existing volume is an error unless ``overwrite`` (replace it) or ``exist_ok`` (reopen it
    for resuming; then its shape, dtype and chunks must match, or it is an error too).
    """

    container, inner = split_spec(spec)
    check_output_spec(spec)
    if precomputed.is_precomputed(container):
        return _create_precomputed(str(container), shape, dtype, chunks or DEFAULT_CHUNKS, voxel_size, offset_nm, attrs, overwrite, exist_ok)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise CleftchunkError(f"volume shape {shape} must be 3 positive extents (z, y, x)")
    chunks = chunk_shape(chunks, shape)
    offset_nm = tuple(float(o) for o in (offset_nm or (0.0, 0.0, 0.0)))
    check_voxel_size(voxel_size, offset_nm, str(spec))
    voxels_from_nm(offset_nm, voxel_size)  # the offset must lie on the voxel grid
    if shards is not None:
        shards = tuple(int(s) for s in shards)
        if any(s % c for s, c in zip(shards, chunks)):
            raise CleftchunkError(f"shard shape {shards} must be a multiple of the chunk shape {chunks}")

    stores.check_reachable(container)
    if exists(spec):
        if exist_ok and not overwrite:
            volume = open_volume(spec, mode="r+")
            want = (shape, np.dtype(dtype), chunks)
            have = (volume.shape, volume.dtype, volume.chunks)
            if want != have:
                raise CleftchunkError(
                    f"{spec} exists with shape/dtype/chunks {have}, not {want}: pass --overwrite to replace it"
                )
            return volume
        if not overwrite:
            raise CleftchunkError(_exists_message(spec))

    ome = ome_multiscales(image_name(container, inner), voxel_size, offset_nm)
    image = _image_group(container, inner, overwrite, {"ome": ome})
    image.attrs["ome"] = ome  # again: a group that existed already (an image begun and left) gets it too
    array = image.create_array(
        "s0",
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        compressors=compressor_codecs(compressor),
        fill_value=fill_value,
        dimension_names=AXES,
        overwrite=overwrite,
        attributes={
            "voxel_size": [float(v) for v in voxel_size],
            "offset": list(offset_nm),
            **(attrs or {}),
        },
    )
    level0 = f"{inner}/s0" if inner else "s0"
    volume = Volume(container, level0, tuple(float(v) for v in voxel_size), offset_nm, mode="r+")
    volume._array = array
    return volume


def _image_group(container: Location, inner: str | None, overwrite: bool, attributes: dict) -> Any:
    """The image's group, created with its ``attributes`` in one write (a failure between two
    writes would leave a bare group, which is someone's data: resuming would refuse it)."""
    import zarr

    if inner is None:
        return zarr.open_group(stores.zarr_store(container, "w"), mode="w" if overwrite else "a", attributes=attributes)
    root = zarr.open_group(stores.zarr_store(container, "a"), mode="a")
    if multiscale_level0(root) is not None:
        raise CleftchunkError(
            f"{container} is an image itself (multiscales at its root), not a container: "
            f"write {inner!r} to another container, e.g. {str(container).rsplit('.', 1)[0]}-{inner.replace('/', '-')}.zarr"
        )
    if overwrite and inner in root:
        del root[inner]
    return root.require_group(inner) if inner in root else root.create_group(inner, attributes=attributes)


def _exists_message(spec: str | os.PathLike) -> str:
    return container_refusal(spec) or f"{spec} exists: pass --overwrite to replace it (or choose another output)"


def container_refusal(spec: str | os.PathLike) -> str | None:
    """For an output given as ``out.zarr`` that is a container of images: why it is refused and
    what to write instead. None for anything else."""
    container, inner = split_spec(spec)
    if inner is not None or is_hdf5(container) or precomputed.is_precomputed(container):
        return None
    root = zarr_group(container)
    if root is None:
        return None
    members = sorted(k for k, _ in root.members())
    if multiscale_level0(root) is not None or not members:
        return None
    return (
        f"{spec} is a container holding {', '.join(members)}, not an image: name a new image inside it, "
        f"e.g. {spec}/pred, or pass --overwrite to replace the whole container"
    )


def create_like(spec: str | os.PathLike, like: Volume, dtype: Any, chunks: Sequence[int] | None = None, **options: Any) -> Volume:
    """Create a volume in the frame of ``like``: same shape, voxel size and offset (chunks too by default).

    Every derived output (predictions, cleft ids, masks) is created this way, so it overlays its
    input in any viewer; ``options`` are those of :func:`create_volume`.
    """
    return create_volume(
        spec,
        like.shape,
        dtype,
        chunks=like.chunks if chunks is None else chunks,
        voxel_size=like.voxel_size,
        offset_nm=like.offset_nm,
        **options,
    )


def _create_precomputed(spec: str, shape, dtype, chunks, voxel_size, offset_nm, attrs, overwrite: bool, exist_ok: bool) -> Volume:
    """create_volume for a precomputed:// output (cleftchunk.io.precomputed makes the array)."""
    array = precomputed.create_volume(spec, shape, dtype, chunks, voxel_size, offset_nm, attrs, overwrite, exist_ok)
    if array is None:  # resumed: it must be the volume this run would create
        volume = open_volume(spec, mode="r+")
        want = (tuple(int(s) for s in shape), np.dtype(dtype), tuple(min(int(c), int(s)) for c, s in zip(chunks, shape)))
        have = (volume.shape, volume.dtype, volume.chunks)
        if want != have:
            raise CleftchunkError(f"{spec} exists with shape/dtype/chunks {have}, not {want}: pass --overwrite to replace it")
        return volume
    volume = Volume(spec, None, tuple(float(v) for v in voxel_size), tuple(float(o) for o in (offset_nm or (0.0, 0.0, 0.0))), mode="r+")
    volume._array = array
    return volume
