"""Reading boxes of file-backed sources: the indexing every source accepts, and one-line errors
for files that cannot be read (shared by :mod:`.sources` and :mod:`.n5`)."""

from __future__ import annotations

import contextlib
import lzma
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi


# -- indexing helpers ---------------------------------------------------------------------
def normalize_key(key: Any, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Expand ``key`` to one step-1 slice per axis; also return the axes indexed by an int.

    Sources read boxes, so this accepts what the volume layer and dask pass: slices with
    step 1, ints and Ellipsis.
    """
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape):
        raise IndexError(f"too many indices for an array of shape {tuple(shape)}")
    slices, dropped = [], []
    for axis, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, (int, np.integer)):
            k = int(k) + (n if k < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
            slices.append(slice(k, k + 1))
            dropped.append(axis)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                raise IndexError("sources only support contiguous slices (step 1)")
            slices.append(slice(start, max(start, stop)))
        else:
            raise IndexError(f"unsupported index {k!r}: use slices or ints")
    return tuple(slices), tuple(dropped)


def roi_of(slices: Sequence[slice]) -> Roi:
    return Roi.from_bounds([s.start for s in slices], [s.stop for s in slices])


def drop_axes(data: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    return data.squeeze(axis=tuple(axes)) if axes else data


def natural_key(name: str) -> list:
    """Sort key under which ``s2.png`` comes before ``s10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def damaged_file_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What the decoders (tifffile, Pillow, numpy, zlib/bz2/lzma, struct) raise for bytes that are not
    what the format promises: a damaged or truncated file. ``more``: a caller's decoder's own kinds.

    Not among them: MemoryError, and the OSErrors that are about the file rather than its bytes
    (:func:`reading` reports permissions and vanished files as such; Pillow's "truncated" and
    "cannot identify" are plain OSErrors, so other OSErrors count as damage).
    """
    return (ValueError, TypeError, IndexError, KeyError, EOFError, struct.error, zlib.error, lzma.LZMAError, OSError) + more


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn a failed read of ``path`` into a one-line error that says why: permission, a file
    gone since it was listed, or damage. A CleftchunkError (already one line) passes through."""
    try:
        yield
    except CleftchunkError:
        raise
    except PermissionError as e:
        raise CleftchunkError(f"cannot read {path}: permission denied: give this user read access to it") from e
    except FileNotFoundError as e:
        raise CleftchunkError(f"cannot read {path}: it disappeared after it was listed: check what else writes there") from e
    except damaged_file_errors() as e:
        raise CleftchunkError(f"cannot read {what} {path} ({type(e).__name__}: {e}): the file is corrupt or truncated") from e
