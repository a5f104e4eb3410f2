"""OME-Zarr (NGFF 0.5) metadata: multiscales, voxel size and offset, compressors.

Kept apart from storage (:mod:`.volumes`), as funlib.persistence keeps its metadata: the frame of a
volume can be read from, and written as, several conventions (OME ``multiscales``, ``resolution``
/ ``offset`` attributes of HDF5 and Zarr, N5's ``pixelResolution``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.stores import zarr_store

AXES = ("z", "y", "x")


def multiscale_level0(group: Any) -> str | None:
    attrs = dict(group.attrs)
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if ms:
        return ms[0]["datasets"][0]["path"]
    return None


def read_frame(volume: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Voxel size and offset (nm) from whatever metadata convention the source uses."""
    attrs = dict(volume.array.attrs)
    vs = attrs.get("voxel_size") or attrs.get("resolution")
    off = attrs.get("offset")
    if vs is None and "pixelResolution" in attrs:  # N5 / BigDataViewer: x, y, z order
        pr = attrs["pixelResolution"]
        vs = list(reversed(pr["dimensions"] if isinstance(pr, dict) else pr))
    if vs is None and volume.is_zarr:
        vs, off = _ome_frame(volume, off)
    if vs is not None and np.ndim(vs) == 0:  # some tools store a single isotropic number
        vs = [vs] * volume.ndim
    vs = tuple(float(v) for v in vs) if vs is not None else None
    off = tuple(float(v) for v in off) if off is not None else None
    return vs, off


def _ome_frame(volume: Any, off: Any) -> tuple[Any, Any]:
    import zarr

    if not volume.inner:
        return None, off
    parent_path, _, name = (volume.inner or "").rpartition("/")
    parent = zarr_group(volume.container, parent_path)
    if parent is None:  # an array at the root of its store: no multiscales can describe it
        return None, off
    attrs = dict(parent.attrs)
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if not ms:
        return None, off
    try:
        for ds in ms[0]["datasets"]:
            if ds["path"] == name:
                scale = translation = None
                for t in ds.get("coordinateTransformations", []):
                    if t["type"] == "scale":
                        scale = t["scale"]
                    elif t["type"] == "translation":
                        translation = t["translation"]
                return scale, (off if off is not None else translation)
    except (KeyError, IndexError, TypeError) as e:  # a multiscales entry without the fields NGFF requires
        raise CleftchunkError(
            f"{volume.container}/{parent_path}: malformed OME multiscales metadata ({type(e).__name__}: {e}), so the voxel size "
            "is unknown: repair the metadata (or re-convert the image)"
        ) from e
    return None, off


def zarr_group(location: Any, path: str = "") -> Any | None:
    """The Zarr group at ``path`` of ``location``; None where there is none (nothing, or an array).

    Metadata that is there but does not parse is an error naming the node, never "no group": a
    damaged ``zarr.json`` must not make a voxel size silently unknown.
    """
    import zarr
    from zarr.errors import ContainsArrayError

    try:
        return zarr.open_group(zarr_store(location, "r"), mode="r", path=path)
    except (FileNotFoundError, ContainsArrayError):  # zarr's GroupNotFoundError is a FileNotFoundError
        return None
    except ValueError as e:  # JSON that does not parse, metadata zarr refuses
        where = f"{location}/{path}" if path else str(location)
        raise CleftchunkError(f"{where}: unreadable Zarr metadata ({type(e).__name__}: {e}): the store is damaged, repair or re-create it") from e


def compressor_codecs(name: str | None) -> list:
    """Zarr v3 codecs for a compressor name: zstd (Blosc-zstd, default), lz4, gzip, none."""
    import zarr.codecs as zc

    name = (name or "zstd").lower()
    if name in ("zstd", "blosc-zstd", "blosc"):
        return [zc.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]
    if name in ("lz4", "blosc-lz4"):
        return [zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    if name in ("gzip", "zlib"):
        return [zc.GzipCodec(level=5)]
    if name in ("none", "raw"):
        return []
    raise CleftchunkError(f"unknown compressor {name!r}: use zstd, lz4, gzip or none")


def ome_multiscales(
    name: str,
    voxel_size: Sequence[float],
    offset_nm: Sequence[float],
    levels: Sequence[tuple[str, Sequence[float]]] | None = None,
    centered: bool = True,
) -> dict:
    """OME-Zarr 0.5 ``ome`` attribute for an image whose levels are given as (path, factor).

    ``centered``: levels are means over ``factor`` voxels (first voxel centred half a patch
    later); False for strided levels, whose first voxel is the finer level's first voxel.
    """
    levels = levels or [("s0", (1, 1, 1))]
    datasets = []
    for path, factor in levels:
        scale = [float(v) * float(f) for v, f in zip(voxel_size, factor)]
        # A level downsampled by f (mean over f voxels) has its first voxel centred (f-1)/2 voxels later.
        shift = 0.5 if centered else 0.0
        translation = [float(o) + (float(f) - 1) * float(v) * shift for o, v, f in zip(offset_nm, voxel_size, factor)]
        datasets.append(
            {
                "path": path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in AXES],
                "datasets": datasets,
            }
        ],
    }


