"""Scratch space of a prediction: partial sums and done markers, each appearing by an atomic rename."""

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



# -- scratch space: partial sums and done markers -----------------------------------------
@dataclass(frozen=True)
class Scratch:
    """Partials (``partials/<block>.npy``, or ``.zero`` when all its tiles were empty) and done
    markers (``done/<block>``). Each file appears by an atomic rename, complete or not at all."""

    root: str

    def _path(self, *parts: str) -> Path:
        return Path(self.root, *parts)

    def ensure(self) -> None:
        for sub in ("partials", "done", "tmp"):
            self._path(sub).mkdir(parents=True, exist_ok=True)

    def done(self) -> set[str]:
        d = self._path("done")
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def mark_done(self, index: Coord) -> None:
        self._atomic_write(self._path("done", _name(index)), b"")

    def partials(self) -> set[str]:
        d = self._path("partials")
        return {p.name.rsplit(".", 1)[0] for p in d.iterdir() if p.suffix in (".npy", ".zero")} if d.is_dir() else set()

    def has_partial(self, index: Coord) -> dict | None:
        """The stats saved with a block's partial, or None when it has none yet."""
        meta = self._path("partials", _name(index) + ".json")
        if self._path("partials", _name(index) + ".npy").exists() or self._path("partials", _name(index) + ".zero").exists():
            try:
                return json.loads(meta.read_text())
            except (OSError, ValueError):
                return {}
        return None

    def save_partial(self, index: Coord, partial: np.ndarray | None, stats: dict) -> None:
        # Stats first: the partial's appearance is what marks the block's tiles as done.
        self._atomic_write(self._path("partials", _name(index) + ".json"), json.dumps(stats).encode())
        if partial is None:
            self._atomic_write(self._path("partials", _name(index) + ".zero"), b"")
            return
        tmp = self._path("tmp", f"{_name(index)}-{uuid.uuid4().hex}.npy")
        with open(tmp, "wb") as f:
            np.save(f, partial)
        os.replace(tmp, self._path("partials", _name(index) + ".npy"))

    def load_partial(self, index: Coord) -> np.ndarray | None:
        """The partial as a read-only memory map (so only the slices used are read), None if zero."""
        path = self._path("partials", _name(index) + ".npy")
        if path.exists():
            return np.load(path, mmap_mode="r")
        if self._path("partials", _name(index) + ".zero").exists():
            return None
        raise FileNotFoundError(f"partial of block {index} is missing from {self.root}")

    def drop_partial(self, name: str) -> None:
        for suffix in (".npy", ".zero", ".json"):
            self._path("partials", name + suffix).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self._path("tmp", f"{path.name}-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
