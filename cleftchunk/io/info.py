"""What a volume (or every volume of a container) is: the facts ``cleftchunk info`` prints.

For each volume: kind of storage, shape, dtype, chunks, voxel size, offset, compression ratio
(stored bytes / raw bytes, so 0.25 means 4× smaller) and a value range sampled from at most
:data:`SAMPLE_CHUNKS` chunks spread over the volume (never the whole volume).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cleftchunk.io import sources, stores
from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.io.ome import zarr_group
from cleftchunk.io.volumes import Volume, list_hdf5_datasets, open_volume, source_kind, split_spec

SAMPLE_CHUNKS = 8
#: Largest box read per sampled chunk: contiguous HDF5 datasets have one chunk, the whole volume.
SAMPLE_BOX = (16, 256, 256)


@dataclass
class VolumeInfo:
    spec: str
    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    chunks: tuple[int, ...] | None = None
    voxel_size: tuple[float, ...] | None = None
    voxel_size_known: bool = True
    offset_nm: tuple[float, ...] | None = None
    stored_bytes: int | None = None
    raw_bytes: int | None = None
    value_min: Any = None
    value_max: Any = None
    sampled_chunks: int = 0
    total_chunks: int = 0
    levels: list[str] = field(default_factory=list)
    note: str | None = None  # why this is listed but not a usable volume

    @property
    def ratio(self) -> float | None:
        if self.stored_bytes is None or not self.raw_bytes:
            return None
        return self.stored_bytes / self.raw_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["compression_ratio"] = self.ratio
        known = self.voxel_size_known and None not in (self.voxel_size, self.offset_nm, self.shape)
        out["frame_end_nm"] = [o + s * v for o, s, v in zip(self.offset_nm, self.shape, self.voxel_size)] if known else None
        for key in ("value_min", "value_max"):
            if isinstance(out[key], np.generic):
                out[key] = out[key].item()
        return out


def describe(spec: str | os.PathLike, dataset: str | None = None) -> list[VolumeInfo]:
    """Info for the volume ``spec`` names, or for each volume inside the container it names."""
    container, inner = split_spec(spec, dataset)
    if source_kind(container) == "precomputed":  # one volume; its scales are listed as its levels
        return [volume_info(open_volume(spec))]
    stores.check_reachable(container)
    if not stores.exists(container):
        raise CleftchunkError(f"{container} does not exist: check the path")
    members = container_members(container, inner)
    if members is None:
        return [volume_info(open_volume(spec, dataset=dataset))]
    return [member_info(container, m) for m in members]


def container_members(container: Path, inner: str | None) -> list[str] | None:
    """Dataset paths to list when ``container/inner`` is a container or group, else None."""
    kind = source_kind(container)
    if kind == "hdf5" and inner is None:
        import h5py

        try:
            with h5py.File(container, "r") as f:
                names = list_hdf5_datasets(f)
        except OSError as e:
            raise CleftchunkError(f"{container} is not a readable HDF5 file ({e}): check that it is complete") from e
        return names if len(names) != 1 else None
    if kind == "n5":
        base = container / inner if inner else container
        if not base.is_dir() or "dimensions" in sources.n5_attributes(base):  # nothing there: open_volume says so
            return None
        return [f"{inner}/{d}" if inner else d for d in sources.n5_datasets(base)]
    if kind == "zarr":
        return zarr_members(container, inner)
    return None


def zarr_members(container: Path, inner: str | None) -> list[str] | None:
    node = zarr_group(container, inner or "")
    if node is None or _is_image(node):  # nothing there, or an array: open_volume says which
        return None
    found: list[str] = []
    _walk_images(node, inner or "", found)
    return found


def _is_image(group: Any) -> bool:
    attrs = dict(group.attrs)
    return bool((attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales"))


def _walk_images(group: Any, prefix: str, found: list[str]) -> None:
    import zarr

    for name, member in sorted(group.members(), key=lambda m: m[0]):
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(member, zarr.Array) or _is_image(member):
            found.append(path)
        else:
            _walk_images(member, path, found)


def member_info(container: Path, inner: str) -> VolumeInfo:
    spec = f"{container}:{inner}" if source_kind(container) == "hdf5" else f"{container}/{inner}"
    try:
        return volume_info(open_volume(spec))
    except CleftchunkError as e:  # e.g. CREMI annotation tables: list them, say why they are no volume
        shape, dtype = _raw_shape(container, inner)
        return VolumeInfo(spec, source_kind(container), shape=shape, dtype=dtype, note=str(e))


def _raw_shape(container: Path, inner: str) -> tuple[tuple[int, ...] | None, str | None]:
    """Shape and dtype of an HDF5 dataset that is no volume (a table, say); (None, None) otherwise."""
    if source_kind(container) != "hdf5":
        return None, None
    import h5py

    with h5py.File(container, "r") as f:
        node = f[inner]
        if not isinstance(node, h5py.Dataset):  # a group: it has no shape of its own
            return None, None
        return tuple(node.shape), str(node.dtype)


def volume_info(volume: Volume) -> VolumeInfo:
    info = VolumeInfo(
        spec=str(volume),
        kind=volume.kind,
        shape=volume.shape,
        dtype=str(volume.dtype),
        chunks=volume.chunks,
        voxel_size=volume.voxel_size,
        voxel_size_known=volume.voxel_size_known,
        offset_nm=volume.offset_nm,
        raw_bytes=volume.nbytes,
        stored_bytes=stored_bytes(volume),
        levels=_levels(volume),
    )
    info.value_min, info.value_max, info.sampled_chunks, info.total_chunks = sample_range(volume)
    return info


def stored_bytes(volume: Volume) -> int | None:
    """Bytes the volume's data occupies on disk (chunks only, metadata excluded)."""
    kind = volume.kind
    if kind == "hdf5":
        return int(volume.array.id.get_storage_size())
    if kind in ("tiff", "npy"):
        return volume.container.stat().st_size
    if kind == "folder":
        return sum(p.stat().st_size for p in volume.array.files)
    if kind == "n5":
        return _tree_size(volume.array.path, skip="attributes.json")
    if kind == "precomputed":
        return volume.array.stored_bytes()
    if stores.is_url(volume.container):
        return _object_size(volume)
    return _tree_size(volume.container / (volume.inner or ""), skip="zarr.json", also_skip=(".zarray", ".zattrs"))


def _object_size(volume: Volume) -> int | None:
    """Bytes under the array's prefix in an object store; None where the store cannot list (HTTP)."""
    if stores.url_scheme(volume.container) in ("http", "https"):
        return None
    fs, path = stores.filesystem(str(stores.join(volume.container, volume.inner)))
    sizes = fs.find(path, detail=True)
    return sum(int(i.get("size") or 0) for k, i in sizes.items() if k.rpartition("/")[2] not in ("zarr.json", ".zarray", ".zattrs"))


def _tree_size(root: Path, skip: str, also_skip: tuple[str, ...] = ()) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name != skip and name not in also_skip:
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def _levels(volume: Volume) -> list[str]:
    if volume.kind == "precomputed":
        from cleftchunk.io.precomputed import describe as precomputed_scales

        return precomputed_scales(str(volume.container))
    if not volume.is_zarr or not volume.inner:
        return []
    group = zarr_group(volume.container, volume.inner.rpartition("/")[0])
    if group is None:  # the array is the root of its store: no levels beside it
        return []
    attrs = dict(group.attrs)
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales") or []
    return [d["path"] for d in ms[0]["datasets"]] if ms else []


def sample_range(volume: Volume, n: int = SAMPLE_CHUNKS) -> tuple[Any, Any, int, int]:
    """(min, max, chunks sampled, chunks in total) over up to ``n`` chunks spread evenly."""
    if 0 in volume.shape:  # an empty dataset: no values, no chunks
        return None, None, 0, 0
    grid = ChunkGrid(Roi.from_shape(volume.shape), volume.chunks)
    indices = list(grid.indices())
    count = min(n, len(indices))
    picks = sorted({indices[round(i * (len(indices) - 1) / max(count - 1, 1))] for i in range(count)})
    lo = hi = None
    for index in picks:
        roi = grid.chunk_roi(index)
        box = Roi(roi.offset, tuple(min(s, b) for s, b in zip(roi.shape, SAMPLE_BOX)))
        data = volume[box.to_slices()]
        if data.size == 0:
            continue
        lo = data.min() if lo is None else min(lo, data.min())
        hi = data.max() if hi is None else max(hi, data.max())
    return lo, hi, len(picks), len(indices)


def format_info(info: VolumeInfo) -> str:
    if info.note:
        shape = f" {info.shape} {info.dtype}" if info.shape else ""
        return f"{info.spec}{shape}: not a volume ({info.note})"
    scales = info.kind == "precomputed"
    levels = f", OME-Zarr levels {' '.join(info.levels)}" if len(info.levels) > 1 and not scales else ""
    vs = f"{_nums(info.voxel_size)} nm" if info.voxel_size_known else "unknown (pass --voxel-size when converting)"
    ratio = f"{_size(info.stored_bytes)} of {_size(info.raw_bytes)} raw (ratio {info.ratio:.3g})" if info.ratio is not None else "n/a"
    if info.stored_bytes == 0:
        ratio += ": no chunk stored, all voxels are the fill value"
    rows = [
        ("shape", f"{info.shape} (z, y, x)"),
        ("dtype", info.dtype),
        ("chunks", str(info.chunks)),
        ("voxel size", vs),
        ("offset", f"{_nums(info.offset_nm)} nm"),
        ("frame", _frame(info)),
        ("stored", ratio),
        ("values", f"{_value(info.value_min)} .. {_value(info.value_max)} (sampled {info.sampled_chunks} of {info.total_chunks} chunks)"),
    ]
    rows += [("scales" if i == 0 else "", line) for i, line in enumerate(info.levels if scales else [])]
    return "\n".join([f"{info.spec} [{info.kind}{levels}]"] + [f"  {k:<11} {v}" for k, v in rows])


def _frame(info: VolumeInfo) -> str:
    """Where the volume lies (cleftchunk.frames): what two volumes used together must share."""
    from cleftchunk.frames import Frame

    if info.voxel_size is None or info.offset_nm is None or info.shape is None or len(info.shape) != len(info.voxel_size):
        return "unknown"
    return Frame(info.voxel_size, info.offset_nm, info.shape, known=info.voxel_size_known).extent()


def _nums(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _value(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, (np.integer, int)) and int(v) >= 0xFFFFFFFFFFFFFF00:
        return hex(int(v))
    return f"{v}"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
