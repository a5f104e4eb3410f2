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
from typing import Sequence


from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi


# -- indexing helpers ---------------------------------------------------------------------
def roi_of(slices: Sequence[slice]) -> Roi:
    return Roi.from_bounds([s.start for s in slices], [s.stop for s in slices])


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
