"""The CREMI file layout: which datasets a CREMI HDF5 file holds, and its annotations."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import list_hdf5_datasets
from cleftchunk.labels import CREMI_CLEFTS, CREMI_NEURONS, CREMI_RAW

#: Output image name of each CREMI dataset.
CREMI_NAMES = {CREMI_RAW: "raw", CREMI_CLEFTS: "clefts", CREMI_NEURONS: "neuron_ids"}


def cremi_volumes(path: str | os.PathLike) -> dict[str, str] | None:
    """Output name → HDF5 dataset for the 3-D volumes of a CREMI file; None if it is not one."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "volumes" not in f or not isinstance(f["volumes"], h5py.Group):
                return None
            names = {}
            for ds in list_hdf5_datasets(f["volumes"]):
                full = f"volumes/{ds}"
                if f[full].ndim == 3:
                    names[CREMI_NAMES.get(full, ds.rpartition("/")[2])] = full
            return names or None
    except OSError as e:
        raise CleftchunkError(f"{path} is not a readable HDF5 file ({e}): check that it is complete") from e


def read_cremi_annotations(path: str | os.PathLike) -> dict | None:
    """The synaptic partner annotations of a CREMI file as JSON-able lists (locations in nm, z, y, x)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "annotations" not in f:
            return None
        group = f["annotations"]
        out: dict[str, Any] = {}
        for name in list_hdf5_datasets(group):
            data = group[name][()]
            if data.dtype.kind in "SO":
                data = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(data)])
            out[name] = data.tolist()
        if "offset" in group.attrs:
            out["offset"] = [float(v) for v in group.attrs["offset"]]
        return out




def hdf5_state(path: str | os.PathLike, attribute: str) -> dict | None:
    """The JSON state a block-wise operation keeps in an HDF5 file's root ``attribute``, or None
    when the file is not HDF5 or holds no such state. Errors of the system (permissions, a
    vanished disk: an ``errno``) are raised as they are."""
    import json

    import h5py

    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(attribute)
    except OSError as e:
        if e.errno is not None:
            raise
        return None  # h5py: "file signature not found", a truncated file
    try:
        state = json.loads(text) if isinstance(text, (str, bytes)) else None
    except ValueError:
        return None
    return state if isinstance(state, dict) and "identity_hash" in state else None
