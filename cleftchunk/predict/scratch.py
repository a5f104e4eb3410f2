"""Scratch space of a prediction: the *spill* of each block — the parts of its tile sums that fall
in other blocks' write regions — one compressed piece per user block, each file appearing by an
atomic rename. The part inside a block's own write region never goes to scratch: it is handed to
the same block's blend task in memory.

Layout: ``spill/<block>/<user>.blosc`` (int64, Blosc-zstd with byte shuffle: tile sums are well
below 2^63, so their high bytes compress away), then ``spill/<block>.json`` (the tile counts),
written last: a spill is complete exactly when its ``.json`` exists. An absent piece of a
complete spill is zero (all its tiles were empty, or the sum there is 0).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cleftchunk.geometry import Coord
from cleftchunk.predict.plan import _name


def _codec():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)


@dataclass(frozen=True)
class Scratch:
    root: str

    def _path(self, *parts: str) -> Path:
        return Path(self.root, *parts)

    def ensure(self) -> None:
        for sub in ("spill", "tmp"):
            self._path(sub).mkdir(parents=True, exist_ok=True)

    def spill_stats(self, index: Coord) -> dict | None:
        """The counts saved with a block's complete spill, or None when it has none yet."""
        try:
            return json.loads(self._path("spill", _name(index) + ".json").read_text())
        except FileNotFoundError:
            return None

    def save_spill(self, index: Coord, pieces: dict[Coord, np.ndarray], stats: dict) -> int:
        """Save the pieces (user block → int64 array), then the counts; returns bytes written."""
        folder = self._path("spill", _name(index))
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        codec = _codec()
        for user, piece in pieces.items():
            if not piece.any():
                continue
            data = codec.encode(np.ascontiguousarray(piece, dtype=np.int64))
            self._atomic_write(folder / (_name(user) + ".blosc"), bytes(data))
            written += len(data)
        self._atomic_write(self._path("spill", _name(index) + ".json"), json.dumps(stats).encode())
        return written

    def load_piece(self, index: Coord, user: Coord, shape: Coord) -> np.ndarray | None:
        """Block ``index``'s spill into ``user``'s write region (None: zero)."""
        if self.spill_stats(index) is None:
            raise FileNotFoundError(f"spill of block {index} is missing from {self.root}")
        path = self._path("spill", _name(index), _name(user) + ".blosc")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return np.frombuffer(_codec().decode(data), dtype=np.int64).reshape(shape)

    def drop_spill(self, index: Coord) -> None:
        self._path("spill", _name(index) + ".json").unlink(missing_ok=True)
        shutil.rmtree(self._path("spill", _name(index)), ignore_errors=True)

    def clear(self) -> None:
        """Forget every spill (an earlier run with another block layout)."""
        shutil.rmtree(self._path("spill"), ignore_errors=True)
        self.ensure()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self._path("tmp", f"{path.name}-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
