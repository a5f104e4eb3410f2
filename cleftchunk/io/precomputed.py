"""Neuroglancer precomputed volumes, read and written through tensorstore's ``neuroglancer_precomputed`` driver.

A spec is ``precomputed://`` followed by where the volume's ``info`` file lies — ``gs://bucket/path``,
``s3://bucket/path``, ``https://host/path`` (read only), ``file:///abs/path`` or a plain local path —
and, after ``#``, which part of it to read: ``mip=N`` (the N-th scale of ``info``) or
``mip=Z,Y,X`` (the scale with that voxel size in nm), and ``roi=z0:z1,y0:y1,x0:x1`` (a box in voxels
of that scale, in the volume's own coordinates as neuroglancer shows them, ``voxel_offset``
included), e.g. ``precomputed://gs://bucket/em#mip=1&roi=0:64,2048:4096,2048:4096``. The
commands' ``--mip`` / ``--roi`` options write that suffix (cli/options.py).

The volume is read lazily: a read touches only the chunks it overlaps. Voxel size and offset (nm)
come from the scale's ``resolution`` and ``voxel_offset`` (+ the ROI's start); axes are turned
from precomputed's x, y, z, channel to cleftchunk's z, y, x.

Why tensorstore rather than CloudVolume: one wheel (CloudVolume added 37 packages to this environment), one library
that also writes precomputed (compressed_segmentation included) and N5 and takes an S3 endpoint,
and reads that already beat the OME-Zarr path on the same data (benchmarks/storage.py). CloudVolume
read a whole local raw region faster still (docs/storage.md has the numbers); reads are not
predict's bottleneck, so that did not decide it. The same driver writes outputs: uint8 as ``raw``,
uint32/uint64 as ``compressed_segmentation``, unsharded so that each chunk is one object and
blocks made of whole chunks (run/options.block_shape_for) never share one. What cleftchunk records
about an output (its operation state) lies in ``cleftchunk.json`` beside ``info``, which
neuroglancer ignores.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qsl

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi, drop_axes, normalize_key

PREFIX = "precomputed://"
#: The sidecar of an output: cleftchunk's attributes (operation state, kinds), never read by neuroglancer.
SIDECAR = "cleftchunk.json"
#: Attribute names that describe the frame: computed from ``info``, never stored in the sidecar.
FRAME_KEYS = ("voxel_size", "offset")
SEGMENTATION_DTYPES = ("uint32", "uint64")
WRITABLE_DTYPES = ("uint8", "uint16", "uint32", "uint64", "float32")
_BOX = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def is_precomputed(spec: Any) -> bool:
    return str(spec).lower().startswith(PREFIX)


def with_selection(spec: str, mip: str | None = None, roi: str | None = None) -> str:
    """``spec`` with ``mip`` / ``roi`` added to its selection (the ``--mip`` / ``--roi`` options)."""
    if mip is None and roi is None:
        return spec
    if not is_precomputed(spec):
        raise CleftchunkError(f"--mip and --roi choose a scale and a box of a precomputed volume; {spec} is not one (precomputed://...)")
    base, selection = split_selection(spec)
    selection.update({k: v for k, v in (("mip", mip), ("roi", roi)) if v is not None})
    return base + "#" + "&".join(f"{k}={v}" for k, v in selection.items())


def split_selection(spec: str) -> tuple[str, dict]:
    """``precomputed://URL#mip=..&roi=..`` -> (``precomputed://URL``, {"mip": .., "roi": ..})."""
    base, _, fragment = str(spec).partition("#")
    selection = dict(parse_qsl(fragment, keep_blank_values=True)) if fragment else {}
    unknown = sorted(set(selection) - {"mip", "roi"})
    if unknown:
        raise CleftchunkError(f"{spec}: unknown selection {', '.join(unknown)}; after # give mip=N (or mip=Z,Y,X nm) and roi=z0:z1,y0:y1,x0:x1")
    return base.rstrip("/"), selection


def parse_box(text: str, option: str = "--roi") -> Roi:
    """``z0:z1,y0:y1,x0:x1`` (voxels) -> Roi; every bound given, each end above its begin."""
    parts = str(text).split(",")
    matches = [_BOX.match(p) for p in parts]
    if len(parts) != 3 or not all(matches):
        raise CleftchunkError(f"{option} {text!r} is not Z0:Z1,Y0:Y1,X0:X1 (voxels): e.g. {option} 0:64,1024:2048,1024:2048")
    begin = [int(m.group(1)) for m in matches]
    end = [int(m.group(2)) for m in matches]
    if any(e <= b for b, e in zip(begin, end)):
        raise CleftchunkError(f"{option} {text!r}: each end must be above its begin")
    return Roi.from_bounds(begin, end)


# -- where: the kvstore ------------------------------------------------------------------------
def kvstore(spec: str) -> dict:
    """tensorstore's kvstore spec for the folder of ``info`` that ``spec`` names."""
    base, _ = split_selection(spec)
    url = base[len(PREFIX):]
    scheme, sep, rest = url.partition("://")
    if not sep:  # a plain local path
        scheme, rest = "file", str(Path(url).resolve())
    scheme = scheme.lower()
    if scheme == "file":
        return {"driver": "file", "path": str(Path(rest).resolve()) + "/"}
    if scheme in ("gs", "gcs", "s3"):
        bucket, _, path = rest.partition("/")
        if not bucket:
            raise CleftchunkError(f"{spec}: no bucket: write precomputed://{scheme}://BUCKET/PATH")
        store = {"driver": "gcs" if scheme != "s3" else "s3", "bucket": bucket, "path": path.strip("/") + "/" if path.strip("/") else ""}
        if scheme == "s3":
            store.update(_s3_options())
        return store
    if scheme in ("http", "https"):
        return {"driver": "http", "base_url": url.rstrip("/") + "/"}
    raise CleftchunkError(f"{spec}: unknown storage scheme {scheme}://; use precomputed://gs://, s3://, https://, file:// or a local path")


def place(spec: str) -> str:
    """Where the volume's files lie, one spelling per place (for comparing outputs with inputs):
    an absolute local path, ``s3://bucket/path``, ``gs://bucket/path`` or the base URL."""
    store = kvstore(spec)
    if store["driver"] == "file":
        return store["path"].rstrip("/")
    if store["driver"] == "http":
        return store["base_url"].rstrip("/")
    scheme = "s3" if store["driver"] == "s3" else "gs"
    return f"{scheme}://{store['bucket']}/{store['path']}".rstrip("/")


def _s3_options() -> dict:
    """The endpoint and region the AWS variables name (MinIO, Ceph, the tests' server); credentials
    are read by tensorstore itself from the same variables, profile and files as the AWS tools."""
    out = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["aws_region"] = region
    return out


def _ts():
    try:
        import tensorstore
    except ImportError as e:
        raise CleftchunkError("precomputed volumes need the tensorstore package: pip install tensorstore (or cleftchunk[precomputed])") from e
    return tensorstore


def _result(future: Any, spec: str, doing: str, wait: bool = False) -> Any:
    """A tensorstore future's value; its errors (missing, denied, unreachable) as one line.

    Metadata (open, info, sidecar) fails after the connect timeout × attempts of :mod:`.stores`
    rather than hang on a dead endpoint; data reads and writes (``wait``) take what they take."""
    from cleftchunk.io import stores

    limit = None if wait else float(os.environ.get("CLEFTCHUNK_CONNECT_TIMEOUT", stores.CONNECT_TIMEOUT)) * stores.ATTEMPTS
    try:
        return future.result(timeout=limit)
    except TimeoutError:
        future.cancel()
        raise CleftchunkError(f"{spec}: cannot {doing}: no answer in {limit:g} s: check the address, AWS_ENDPOINT_URL and the network") from None
    except (ValueError, OSError) as e:  # tensorstore raises ValueError for NOT_FOUND, PERMISSION_DENIED, ...
        text = str(e).splitlines()[0]
        fix = "check the path, the bucket and the credentials (AWS_* or GOOGLE_APPLICATION_CREDENTIALS)"
        if "NOT_FOUND" in text or "not found" in text.lower():
            fix = "check the path: it must be the folder holding the volume's info file"
        raise CleftchunkError(f"{spec}: cannot {doing} ({text}): {fix}") from None


def read_info(spec: str) -> dict | None:
    """The volume's ``info`` (None when there is none)."""
    ts = _ts()
    store = _result(ts.KvStore.open(kvstore(spec)), spec, "open its storage")
    found = _result(store.read("info"), spec, "read its info file")
    if found.state != "value":
        return None
    try:
        return json.loads(bytes(found.value))
    except ValueError as e:
        raise CleftchunkError(f"{spec}: its info file is not JSON ({e}): repair or re-create it") from None


def exists(spec: str) -> bool:
    return read_info(spec) is not None


def scale_lines(info: dict) -> list[str]:
    """One line per scale: index, voxel size z,y,x nm, shape z,y,x, offset z,y,x (voxels), chunks, encoding."""
    lines = []
    for i, scale in enumerate(info.get("scales", [])):
        chunks = scale.get("chunk_sizes", [[0, 0, 0]])[0]
        lines.append(f"mip {i}: {_zyx(scale['resolution'])} nm, shape {_zyx(scale['size'])}, offset {_zyx(scale.get('voxel_offset', [0, 0, 0]))}, "
                     f"chunks {_zyx(chunks)}, {scale.get('encoding', 'raw')}{', sharded' if scale.get('sharding') else ''}")
    return lines


def _zyx(values: Sequence[float]) -> str:
    """precomputed's x, y, z as cleftchunk's Z,Y,X text."""
    return ",".join(f"{v:g}" for v in reversed(values))


def choose_scale(spec: str, info: dict, mip: str | None) -> int:
    """The scale index ``mip`` names: an index, or a voxel size Z,Y,X in nm."""
    scales = info.get("scales") or []
    if not scales:
        raise CleftchunkError(f"{spec}: its info lists no scales: it is not a precomputed volume")
    if mip is None or mip == "":
        return 0
    available = "; ".join(scale_lines(info))
    if "," not in mip and "x" not in mip:
        try:
            index = int(mip)
        except ValueError:
            raise CleftchunkError(f"{spec}: mip {mip!r} is neither a scale index nor a voxel size Z,Y,X") from None
        if not 0 <= index < len(scales):
            raise CleftchunkError(f"{spec} has {len(scales)} scales, no mip {index}: {available}")
        return index
    try:
        want = [float(v) for v in mip.replace("x", ",").split(",")]
    except ValueError:
        raise CleftchunkError(f"{spec}: mip {mip!r} must be a scale index or a voxel size Z,Y,X in nm, e.g. 40,8,8") from None
    for i, scale in enumerate(scales):
        if len(want) == 3 and np.allclose(list(reversed(scale["resolution"])), want):
            return i
    raise CleftchunkError(f"{spec} has no scale of voxel size {mip} nm: choose one of {available}")


# -- the array --------------------------------------------------------------------------------
class PrecomputedArray:
    """One scale (and box) of a precomputed volume as a (z, y, x) array; reopened after pickling."""

    def __init__(self, spec: str, writable: bool = False):
        self.spec = str(spec)
        self.writable = writable
        info = read_info(self.spec)
        if info is None:
            raise CleftchunkError(f"{self.spec}: no precomputed volume there (no info file): check the path")
        try:
            self._describe(info)
        except (KeyError, TypeError, IndexError, ValueError) as e:  # an info file missing what a volume needs
            raise CleftchunkError(f"{self.spec}: its info file is not a precomputed volume's ({type(e).__name__}: {e}): repair or re-create it") from None
        self._view = None

    def _describe(self, info: dict) -> None:
        if int(info.get("num_channels", 1)) != 1:
            raise CleftchunkError(f"{self.spec} has {info['num_channels']} channels: cleftchunk reads single-channel volumes")
        _, selection = split_selection(self.spec)
        self.scale_index = choose_scale(self.spec, info, selection.get("mip"))
        scale = info["scales"][self.scale_index]
        self.encoding = scale.get("encoding", "raw")
        full = Roi(tuple(reversed(scale.get("voxel_offset", [0, 0, 0]))), tuple(reversed(scale["size"])))
        box = full if selection.get("roi") in (None, "") else parse_box(selection["roi"], "roi")
        if not full.contains(box):
            raise CleftchunkError(f"{self.spec}: roi {_bounds(box)} is not inside mip {self.scale_index}'s bounds {_bounds(full)} (voxels z,y,x)")
        self.box, self.whole = box, box == full
        self.shape = box.shape
        self.dtype = np.dtype(info["data_type"])
        self.chunks = tuple(int(c) for c in reversed(scale["chunk_sizes"][0]))
        resolution = tuple(float(r) for r in reversed(scale["resolution"]))
        self.frame = {"voxel_size": list(resolution), "offset": [b * r for b, r in zip(box.offset, resolution)]}

    @property
    def attrs(self) -> "SidecarAttrs":
        return SidecarAttrs(self.spec, self.frame)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_view": None}

    def view(self) -> Any:
        """The tensorstore view: channel 0, axes z, y, x, the box's first voxel at 0."""
        if self._view is None:
            ts = _ts()
            spec = {"driver": "neuroglancer_precomputed", "kvstore": kvstore(self.spec), "scale_index": self.scale_index,
                    "recheck_cached_data": False}
            mode = {"read": True, "write": True} if self.writable else {"read": True}
            store = _result(ts.open(spec, **mode), self.spec, "open the volume")
            view = store[ts.d["channel"][0]][ts.d["z", "y", "x"].transpose[:]]
            box = self.box
            # the box in the volume's own coordinates (voxel_offset included), then moved to 0
            view = view[box.offset[0]:box.end[0], box.offset[1]:box.end[1], box.offset[2]:box.end[2]]
            self._view = view.translate_to[0, 0, 0]
        return self._view

    def __getitem__(self, key: Any) -> np.ndarray:
        slices, dropped = normalize_key(key, self.shape)
        data = _result(self.view()[slices].read(order="C"), self.spec, "read it", wait=True)
        return drop_axes(np.asarray(data), dropped)

    def __setitem__(self, key: Any, data: np.ndarray) -> None:
        slices, _ = normalize_key(key, self.shape)
        _result(self.view()[slices].write(np.ascontiguousarray(data, dtype=self.dtype)), self.spec, "write it", wait=True)

    def stored_bytes(self) -> int | None:
        """Bytes of this scale's chunks (None for a box of it, or where the store cannot list, as over HTTP)."""
        store = kvstore(self.spec)
        if store["driver"] == "http" or not self.whole:  # (a box's share of the chunks is not known)
            return None
        info = read_info(self.spec) or {}
        key = info["scales"][self.scale_index]["key"].strip("/") + "/"
        if store["driver"] == "file":
            root = Path(store["path"]) / key
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        ts = _ts()
        kv = _result(ts.KvStore.open(store), self.spec, "open its storage")
        names = _result(kv.list(ts.KvStore.KeyRange(key, key[:-1] + "0")), self.spec, "list its chunks")
        return sum(len(bytes(_result(kv.read(n), self.spec, "read a chunk").value)) for n in names)


class SidecarAttrs(dict):
    """An output's attributes: the frame (from ``info``) plus ``cleftchunk.json``; setting one
    rewrites the sidecar (one object, written whole)."""

    def __init__(self, spec: str, frame: dict):
        stored = _read_sidecar(spec)
        super().__init__({**stored, **frame})
        self._spec = spec

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        _write_sidecar(self._spec, {k: v for k, v in self.items() if k not in FRAME_KEYS})

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _read_sidecar(spec: str) -> dict:
    ts = _ts()
    store = _result(ts.KvStore.open(kvstore(spec)), spec, "open its storage")
    found = _result(store.read(SIDECAR), spec, f"read {SIDECAR}")
    if found.state != "value":
        return {}
    try:
        return json.loads(bytes(found.value))
    except ValueError:
        return {}  # a damaged sidecar: the output is not recognised as cleftchunk's, so it is refused, not resumed


def _write_sidecar(spec: str, attrs: dict) -> None:
    ts = _ts()
    store = _result(ts.KvStore.open(kvstore(spec)), spec, "open its storage")
    _result(store.write(SIDECAR, json.dumps(attrs, default=_plain).encode()), spec, f"write {SIDECAR}")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def _bounds(roi: Roi) -> str:
    return ",".join(f"{b}:{e}" for b, e in zip(roi.offset, roi.end))


# -- writing ----------------------------------------------------------------------------------
def check_output(spec: str, dtype: Any) -> str:
    """The spec of a volume cleftchunk can write (no selection, a writable place, a dtype
    precomputed holds), before anything is read or created."""
    base, selection = split_selection(spec)
    if selection:
        raise CleftchunkError(f"{spec}: an output is written whole; drop the #{'&'.join(selection)} selection")
    if np.dtype(dtype).name not in WRITABLE_DTYPES:
        raise CleftchunkError(f"{spec}: precomputed outputs hold {', '.join(WRITABLE_DTYPES)}, not {np.dtype(dtype)}: write a Zarr output instead")
    if kvstore(spec)["driver"] == "http":
        raise CleftchunkError(f"{spec}: https:// is read-only; write to precomputed://gs://, s3://, file:// or a local path")
    return base


def create(spec: str, shape: Sequence[int], dtype: Any, chunks: Sequence[int], voxel_size: Sequence[float],
           offset_nm: Sequence[float], attrs: dict | None = None, overwrite: bool = False) -> PrecomputedArray:
    """A one-scale precomputed volume (``image`` for uint8/uint16/float32, ``segmentation`` with
    ``compressed_segmentation`` for uint32/uint64), in the frame given, holding ``attrs``."""
    base = check_output(spec, dtype)
    dtype = np.dtype(dtype)
    offset = [round(o / v) for o, v in zip(offset_nm, voxel_size)]
    segmentation = dtype.name in SEGMENTATION_DTYPES
    scale = {"size": list(reversed([int(s) for s in shape])), "voxel_offset": list(reversed(offset)),
             "resolution": list(reversed([float(v) for v in voxel_size])), "chunk_size": list(reversed([int(c) for c in chunks])),
             "encoding": "compressed_segmentation" if segmentation else "raw"}
    if segmentation:
        scale["compressed_segmentation_block_size"] = [8, 8, 8]
    ts = _ts()
    if exists(base):
        if overwrite:
            _clear(base)
    else:
        _refuse_foreign_files(base)
    meta = {"type": "segmentation" if segmentation else "image", "data_type": dtype.name, "num_channels": 1}
    open_spec = {"driver": "neuroglancer_precomputed", "kvstore": kvstore(base), "multiscale_metadata": meta, "scale_metadata": scale}
    _result(ts.open(open_spec, create=True, read=True, write=True), spec, "create it")
    array = PrecomputedArray(base, writable=True)
    _write_sidecar(base, {k: v for k, v in (attrs or {}).items() if k not in FRAME_KEYS})
    return array


def create_volume(spec: str, shape: Sequence[int], dtype: Any, chunks: Sequence[int], voxel_size: Sequence[float],
                  offset_nm: Sequence[float] | None, attrs: dict | None, overwrite: bool, exist_ok: bool) -> Any:
    """The array of a new precomputed output (for :func:`cleftchunk.io.volumes.create_volume`),
    or None for an existing one to resume (``exist_ok``; the caller reopens and checks it): no
    compressor, shards or fill value to choose (the encoding follows the dtype, missing chunks
    read 0); refused, resumed or replaced (``overwrite``) as a Zarr one."""
    from cleftchunk.geometry import check_voxel_size, voxels_from_nm

    check_output(spec, dtype)
    shape = tuple(int(s) for s in shape)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks, shape))
    offset_nm = tuple(float(o) for o in (offset_nm or (0.0, 0.0, 0.0)))
    check_voxel_size(voxel_size, offset_nm, spec)
    voxels_from_nm(offset_nm, voxel_size)  # the offset must lie on the voxel grid
    if exists(spec) and not overwrite:
        if not exist_ok:
            raise CleftchunkError(f"{spec} exists: pass --overwrite to replace it (or choose another output)")
        return None
    return create(spec, shape, dtype, chunks, voxel_size, offset_nm, attrs, overwrite)


def _refuse_foreign_files(spec: str) -> None:
    """A local folder holding files but no volume is someone else's: never written into (and so
    never removed by a later --overwrite)."""
    store = kvstore(spec)
    if store["driver"] == "file" and Path(store["path"]).is_dir() and any(Path(store["path"]).iterdir()):
        raise CleftchunkError(f"{spec}: {store['path']} holds files but no precomputed volume: write to a new or empty folder")


def _clear(spec: str) -> None:
    """Remove a volume that is being replaced (--overwrite): its info, sidecar and chunks."""
    ts = _ts()
    store = kvstore(spec)
    if store["driver"] == "file":
        import shutil

        shutil.rmtree(store["path"], ignore_errors=True)
        return
    kv = _result(ts.KvStore.open(store), spec, "open its storage")
    _result(kv.delete_range(ts.KvStore.KeyRange()), spec, "remove the old volume")


def describe(spec: str) -> list[str]:
    """The scales ``cleftchunk info`` lists."""
    info = read_info(spec)
    return scale_lines(info) if info else []
