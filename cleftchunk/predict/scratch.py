"""Scratch space of a prediction: the *spill* of each block — the parts of its tile sums that fall
in other blocks' write regions — one compressed piece per user block, each file appearing by an
atomic rename. The part inside a block's own write region never goes to scratch: it is handed to
the same block's blend task in memory.

Layout: ``spill/<block>/<user>.blosc`` (the sums' integer type — int32 up to overlap 0.75, see
:func:`cleftchunk.predict.tiling.sums_dtype` — Blosc-zstd with byte shuffle: their high bytes
compress away), then ``spill/<block>.json`` (the tile counts and that type), written last: a
spill is complete exactly when its ``.json`` exists. An absent piece of a
complete spill is zero (all its tiles were empty, or the sum there is 0).

Within :meth:`Scratch.in_memory` (runs whose tasks are all threads of one process: predict's
default on a CPU-only machine), spills are kept in that process's memory instead, as the very
arrays the tiles task summed (no conversion, no compression, no file), up to a byte budget; a
spill that does not fit goes to disk as above. They are forgotten when the run ends: a resumed
run reruns the tiles of a done block whose spill it needs (the same integers, see
:mod:`cleftchunk.predict`). Other processes never see them, so only in-process runs may use this.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cleftchunk.geometry import Coord
from cleftchunk.predict.plan import _name


def _codec():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)


@dataclass
class _MemorySpills:
    """The spills one in-process run keeps in memory: block → (counts, {user: array})."""

    budget: int
    held: int = 0
    spills: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keep(self, index: Coord, pieces: dict[Coord, np.ndarray], stats: dict) -> int | None:
        """Keep copies of the non-zero pieces if they fit in the budget: their bytes, or None."""
        kept = {user: np.array(piece, copy=True) for user, piece in pieces.items() if piece.any()}
        size = sum(piece.nbytes for piece in kept.values())
        with self.lock:
            if self.held + size > self.budget:
                return None
            self.held += size
            self.spills[index] = (stats, kept)
        return size

    def drop(self, index: Coord) -> None:
        with self.lock:
            _, kept = self.spills.pop(index, (None, {}))
            self.held -= sum(piece.nbytes for piece in kept.values())


class Scratch:
    """The scratch folder ``root`` of one prediction, and (within :meth:`in_memory`) the spills
    this process keeps in memory instead. A copy sent to another process carries the folder only."""

    def __init__(self, root: str):
        self.root = str(root)
        self._spills: _MemorySpills | None = None

    def __getstate__(self) -> dict:
        return {"root": self.root}  # spills in memory never leave their process

    def __setstate__(self, state: dict) -> None:
        self.root, self._spills = state["root"], None

    def __repr__(self) -> str:
        return f"Scratch({self.root!r})"

    @contextlib.contextmanager
    def in_memory(self, budget: int):
        """Keep this process's spills in memory, up to ``budget`` bytes, until the block ends
        (see the module docstring: for runs whose tasks are all threads of this process)."""
        self._spills = _MemorySpills(budget)
        try:
            yield self
        finally:
            self._spills = None

    def _memory(self) -> _MemorySpills | None:
        return self._spills

    def _path(self, *parts: str) -> Path:
        return Path(self.root, *parts)

    def ensure(self) -> None:
        for sub in ("spill", "tmp"):
            self._path(sub).mkdir(parents=True, exist_ok=True)

    def spill_stats(self, index: Coord) -> dict | None:
        """The counts saved with a block's complete spill, or None when it has none yet."""
        memory = self._memory()
        if memory is not None and index in memory.spills:
            return memory.spills[index][0]
        try:
            return json.loads(self._path("spill", _name(index) + ".json").read_text())
        except FileNotFoundError:
            return None

    def save_spill(self, index: Coord, pieces: dict[Coord, np.ndarray], stats: dict) -> dict:
        """Save the pieces (user block → array of integers), then the counts; returns the bytes
        written to disk and kept in memory (``spill_bytes``, ``spill_memory_bytes``)."""
        memory = self._memory()
        kept = None if memory is None else memory.keep(index, pieces, stats)
        if kept is not None:
            return {"spill_bytes": 0, "spill_memory_bytes": kept}
        return {"spill_bytes": self._write_spill(index, pieces, stats), "spill_memory_bytes": 0}

    def _write_spill(self, index: Coord, pieces: dict[Coord, np.ndarray], stats: dict) -> int:
        """The pieces in their integer type, Blosc-compressed, one file each, then the counts and
        that type; bytes written."""
        folder = self._path("spill", _name(index))
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        codec = _codec()
        dtypes = {np.dtype(piece.dtype).str for piece in pieces.values()}
        if len(dtypes) > 1 or not dtypes <= {"<i4", "<i8"}:
            raise ValueError(f"spill pieces must share one integer type (int32 or int64), not {sorted(dtypes)}")
        for user, piece in pieces.items():
            if not piece.any():
                continue
            data = codec.encode(np.ascontiguousarray(piece))
            self._atomic_write(folder / (_name(user) + ".blosc"), bytes(data))
            written += len(data)
        record = {**stats, "dtype": dtypes.pop() if dtypes else "<i8"}
        self._atomic_write(self._path("spill", _name(index) + ".json"), json.dumps(record).encode())
        return written

    def load_piece(self, index: Coord, user: Coord, shape: Coord) -> np.ndarray | None:
        """Block ``index``'s spill into ``user``'s write region (None: zero)."""
        memory = self._memory()
        if memory is not None and index in memory.spills:
            return memory.spills[index][1].get(user)
        stats = self.spill_stats(index)
        if stats is None:
            raise FileNotFoundError(f"spill of block {index} is missing from {self.root}")
        path = self._path("spill", _name(index), _name(user) + ".blosc")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return np.frombuffer(_codec().decode(data), dtype=np.dtype(stats.get("dtype", "<i8"))).reshape(shape)

    def drop_spill(self, index: Coord) -> None:
        memory = self._memory()
        if memory is not None:
            memory.drop(index)
        self._path("spill", _name(index) + ".json").unlink(missing_ok=True)
        shutil.rmtree(self._path("spill", _name(index)), ignore_errors=True)

    def clear(self) -> None:
        """Forget every spill (an earlier run with another block layout)."""
        memory = self._memory()
        if memory is not None:
            with memory.lock:
                memory.spills.clear()
                memory.held = 0
        shutil.rmtree(self._path("spill"), ignore_errors=True)
        self.ensure()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self._path("tmp", f"{path.name}-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
