"""A bounded cache of decoded chunks for training's readers: crops overlap, so a loader worker
decodes each chunk once while it is hot, within a byte budget (its hit rate is logged)."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np

from cleftchunk.geometry import ChunkGrid, Roi


# -- a bounded cache of decoded chunks ----------------------------------------------------------------
#: Chunk shape used for caching sources stored without (or with very large) chunks.
CACHE_CHUNKS = (16, 256, 256)
MAX_CACHE_CHUNK_BYTES = 64 * 2**20


class ChunkCache:
    """Decoded chunks of several arrays, least recently used first out, within ``budget`` bytes.

    Random crops overlap the same chunks again and again (and rejection sampling reads several
    candidates per kept crop); keeping decoded chunks saves the decompression. Memory is bounded
    by the budget, not by the volumes. Pickling (a new worker process) yields an empty cache.
    """

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._chunks: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:
        return {"budget": self.budget}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["budget"])

    def get(self, key: Any, load: Any) -> np.ndarray:
        data = self._chunks.get(key)
        if data is not None:
            self._chunks.move_to_end(key)
            self.hits += 1
            return data
        self.misses += 1
        data = load()
        if data.nbytes <= self.budget:
            self._chunks[key] = data
            self.bytes += data.nbytes
            while self.bytes > self.budget:
                _, old = self._chunks.popitem(last=False)
                self.bytes -= old.nbytes
        return data


class ChunkedView:
    """Array-like ``source`` (optionally converted, e.g. ids → label codes) read chunk by chunk via a cache."""

    def __init__(self, source: Any, cache: ChunkCache, name: str, convert: Any = None):
        self.source = source
        self.cache = cache
        self.name = name
        self.convert = convert
        self.shape = tuple(int(s) for s in source.shape)
        self.grid = ChunkGrid(Roi.from_shape(self.shape), cache_chunk_shape(source))

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        """The box ``key`` (explicit bounds inside the volume), newly allocated."""
        begin, end = [int(k.start) for k in key], [int(k.stop) for k in key]
        out = None
        for dst, data, src in self._pieces(begin, end):
            if out is None:  # the dtype is the converted chunks'
                out = np.empty([e - b for b, e in zip(begin, end)], data.dtype)
            out[dst] = data[src]
        return out

    def read_into(self, begin: Sequence[int], end: Sequence[int], out: np.ndarray) -> np.ndarray:
        """The box [begin, end) (inside the volume) into ``out`` (a batch's buffer)."""
        for dst, data, src in self._pieces(begin, end):
            out[dst] = data[src]
        return out

    def _pieces(self, begin: Sequence[int], end: Sequence[int]) -> Iterator[tuple[tuple, np.ndarray, tuple]]:
        """(where in the box, cached chunk, where in the chunk) for every chunk the box overlaps.

        Plain integer arithmetic rather than Roi objects: a batch reads a few hundred chunk pieces,
        and the objects' checks were most of a loader worker's time. The grid starts at 0: the view
        covers its whole source."""
        size = self.grid.chunk_shape
        ranges = [range(b // c, (e - 1) // c + 1) for b, e, c in zip(begin, end, size)]
        for index in itertools.product(*ranges):
            data = self.cache.get((self.name, index), lambda i=index: self._load(self.grid.chunk_roi(i)))
            low = [i * c for i, c in zip(index, size)]
            dst = tuple(slice(max(b, lo) - b, min(e, lo + c) - b) for b, e, lo, c in zip(begin, end, low, size))
            src = tuple(slice(max(b, lo) - lo, min(e, lo + c) - lo) for b, e, lo, c in zip(begin, end, low, size))
            yield dst, data, src

    def _load(self, roi: Roi) -> np.ndarray:
        data = np.asarray(self.source[roi.to_slices()])
        return self.convert(data) if self.convert is not None else data


def cache_chunk_shape(source: Any) -> tuple[int, ...]:
    """The source's storage chunks when they are a sensible cache unit, else CACHE_CHUNKS."""
    shape = tuple(int(s) for s in source.shape)
    chunks = getattr(source, "chunks", None)
    itemsize = np.dtype(source.dtype).itemsize
    if not chunks or math.prod(chunks) * itemsize > MAX_CACHE_CHUNK_BYTES:
        chunks = CACHE_CHUNKS  # unchunked (e.g. contiguous HDF5, numpy) or huge chunks
    return tuple(min(c, s) for c, s in zip(chunks, shape))


class Converted:
    """``source`` read through ``convert`` (no cache)."""

    def __init__(self, source: Any, convert: Any):
        self.source = source
        self.convert = convert
        self.shape = tuple(int(s) for s in source.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return self.convert(np.asarray(self.source[key]))
