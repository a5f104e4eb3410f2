"""The one completion record of every block-wise stage: one byte per block in a small Zarr array.

- Byte i is 1 when block i (raster order) is done: its data was written by a task that returned.
  Only the client writes the record, after the task that wrote the block's data has finished,
  so the record never says "done" for data that is not written; a kill loses at most the marks
  not flushed yet, and those blocks are simply redone (same bytes: every stage is deterministic).
- The record is one 1-D array in chunks of ``CHUNK`` blocks: resuming a million-block job reads
  one megabyte in one object, not a million files. Each chunk is written whole by the store's
  atomic rename, so a killed flush leaves the previous chunk.
- Its ``identity`` attribute is a hash of the block layout and of every parameter that can change
  a byte of the output; a record with another identity is not trusted (:meth:`open` starts a
  fresh one and says so), so a resume with another block shape cannot skip the wrong blocks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Blocks per record chunk: 1 MiB of record per million blocks, read in one piece.
CHUNK = 2**20
#: Seconds between flushes of finished marks (a kill loses at most this much finished work).
FLUSH_SECONDS = 0.5


def identity_hash(*parts: Any) -> str:
    """A stable hash of JSON-able parts (layout, parameters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class BlockRecord:
    """Done marks of ``n_blocks`` blocks stored at ``path`` (a Zarr array), cached per chunk."""

    path: str
    n_blocks: int
    identity: str
    array: Any = field(repr=False, default=None)
    _chunks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _dirty: set[int] = field(default_factory=set, repr=False)
    _flushed: float = field(default_factory=time.monotonic, repr=False)

    @classmethod
    def open(cls, path: str | Path, n_blocks: int, identity: str, fresh: bool = False) -> tuple["BlockRecord", bool]:
        """The record at ``path`` if it has this identity (→ (record, True)), else (or with
        ``fresh``) a new one (→ (record, False): nothing of an earlier run may be trusted)."""
        import zarr

        path = str(path)
        try:
            array = None if fresh else zarr.open_array(path, mode="r+")
            if array is not None and array.attrs.get("identity") == identity and array.shape == (n_blocks,):
                return cls(path, n_blocks, identity, array), True
        except (FileNotFoundError, ValueError, KeyError, TypeError) + _zarr_missing():
            pass
        chunk = max(1, min(CHUNK, n_blocks))
        array = zarr.create_array(path, shape=(n_blocks,), chunks=(chunk,), dtype="uint8", fill_value=0, overwrite=True)
        array.attrs["identity"] = identity
        return cls(path, n_blocks, identity, array), False

    def _chunk(self, c: int) -> np.ndarray:
        if c not in self._chunks:
            if len(self._chunks) > 8:  # keep the front only
                for old in [k for k in self._chunks if k not in self._dirty][:4]:
                    del self._chunks[old]
            lo = c * CHUNK
            self._chunks[c] = np.asarray(self.array[lo : min(lo + CHUNK, self.n_blocks)])
        return self._chunks[c]

    def is_done(self, i: int) -> bool:
        return bool(self._chunk(i // CHUNK)[i % CHUNK])

    def count_done(self) -> int:
        return sum(int(np.count_nonzero(self._chunk(c))) for c in range(-(-self.n_blocks // CHUNK)))

    def mark_done(self, i: int) -> None:
        """Call only after block i's data is written (its task has returned)."""
        c = i // CHUNK
        self._chunk(c)[i % CHUNK] = 1
        self._dirty.add(c)
        if time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        for c in sorted(self._dirty):
            lo = c * CHUNK
            self.array[lo : lo + len(self._chunks[c])] = self._chunks[c]
        self._dirty.clear()
        self._flushed = time.monotonic()


def _zarr_missing() -> tuple[type, ...]:
    from zarr.errors import ArrayNotFoundError, ContainsGroupError, NodeTypeValidationError

    return (ArrayNotFoundError, ContainsGroupError, NodeTypeValidationError)


def record_path_beside(container: str, inner: str | None, stage: str) -> Path:
    """Where a stage keeps the record of an output: beside its container (never inside it, so
    readers of the container do not see it), named after the container, the array and the stage."""
    text = str(container)
    if "://" in text:  # an object store: the client's current directory (the client writes the record)
        parent, name = Path.cwd(), text.rstrip("/").rsplit("/", 1)[-1]
    else:
        path = Path(container).resolve()
        parent, name = path.parent, path.name
    return parent / f".{name}.{(inner or '').replace('/', '_')}.{stage}-done.zarr"


def remove_record(path: str | Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
