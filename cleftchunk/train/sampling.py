"""Where training crops come from: annotated space, and draws near clefts from the cleft tables
(:mod:`cleftchunk.io.tables`), so that nothing is read that a draw does not need.

- **Annotated space** of a volume (:class:`Space`): the regions given (``--train-roi``, several
  allowed, per volume); else, when its table says some cells are unannotated (Zarr labels another
  tool wrote into a few cubes), the annotated cells; else the whole volume. A crop's offset is
  drawn so that the crop lies in annotated space where it can (an annotated cell, then a position
  in it, until the crop's cells are all annotated); voxels of the source box outside annotated
  space are marked invalid (:class:`AnnotatedCodes`), so an unwritten chunk's fill value is never
  taken as background by the loss.
- **Near clefts** (:class:`CleftIndex`): by ``voxel``, a cleft voxel uniformly over all cleft
  voxels of all volumes — a cell ∝ its count in the table, then the voxel in that cell (one cell
  read); by ``cleft``, a cell uniformly over the cells holding clefts, then one of the clefts in it
  (its connected pieces in that cell) uniformly, then a voxel of that cleft. Drawn by voxel, one
  large face-on cleft (48 % of the cleft voxels of seed 3's demo training sample) centres about
  half the crops; drawn by cleft, 15 %, from the same tables and the same one-cell read. Drawing
  uniformly over clefts did not make the demo's models better (demo-experiments.md, L rows).
- **Known empty**: a uniform candidate whose source box covers only cells the table counts 0
  clefts in cannot pass the rejection test, so its labels are not read unless its keep coin says
  keep; the random stream is the same as when they are read.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.labels import INVALID_BIT
from cleftchunk.io.tables import CleftTable

#: Draws of an annotated cell before a crop partly outside annotated space is accepted.
CELL_DRAWS = 100
#: How a near-cleft draw weighs the clefts (:class:`CleftIndex`).
NEAR_CLEFT_DRAWS = ("voxel", "cleft")
#: Cells whose clefts (voxel numbers by piece) a ``cleft`` draw keeps: 8 bytes a cleft voxel each.
PIECE_CACHE_CELLS = 256


def parse_train_rois(values: Sequence[str] | str | None, shapes: Sequence[Sequence[int]]) -> list[list[Roi] | None]:
    """``--train-roi`` values, ``[N=]z0:z1,y0:y1,x0:x1`` (N: the volume's position in -dn, from
    0; without it, volume 0), to regions per volume (None: no region given for that volume)."""
    if isinstance(values, str):
        values = [values]
    out: list[list[Roi] | None] = [None] * len(shapes)
    for text in values or ():
        head, sep, box = str(text).rpartition("=")
        try:
            index = int(head) if sep else 0
        except ValueError:
            raise CleftchunkError(f"--train-roi {text!r}: the volume before '=' must be its position in -dn (0, 1, ...)") from None
        if not 0 <= index < len(shapes):
            raise CleftchunkError(f"--train-roi {text!r} names volume {index}, but there are {len(shapes)} training volumes (0 to {len(shapes) - 1})")
        shape = shapes[index]
        parts = box.split(",")
        bounds = []
        for part, size in zip(parts, shape):
            lo, colon, hi = part.partition(":")
            try:
                bounds.append((int(lo) if lo else 0, int(hi) if hi else int(size)))
            except ValueError:
                bounds = []
                break
            if not colon:
                bounds = []
                break
        if len(parts) != 3 or len(bounds) != 3:
            raise CleftchunkError(f"--train-roi {text!r} must be [N=]z0:z1,y0:y1,x0:x1 in voxels, e.g. 0=0:64,0:512,0:512")
        roi = Roi.from_bounds([b for b, _ in bounds], [e for _, e in bounds]).intersect(Roi.from_shape(shape))
        if roi.empty:
            raise CleftchunkError(f"--train-roi {text!r} lies outside volume {index} ({','.join(map(str, shape))}): give a region inside it")
        out[index] = (out[index] or []) + [roi]
    return out


class Space:
    """The annotated space of one volume and how crop offsets are drawn in it."""

    def __init__(self, shape: Sequence[int], ranges: Sequence[tuple[int, int]], crop: Sequence[int],
                 regions: Sequence[Roi] | None = None, table: CleftTable | None = None, name: str = ""):
        self.shape, self.ranges, self.crop = tuple(shape), tuple(ranges), tuple(crop)
        self.regions = list(regions) if regions else None
        self.table = table if table is not None and not table.everywhere else None
        if self.regions:
            self.mode = "regions"
            self.region_ranges = [self._fit(r) for r in self.regions]
            sizes = np.array([np.prod([hi - lo + 1 for lo, hi in rr]) for rr in self.region_ranges], np.float64)
            self.region_p = sizes / sizes.sum()
            self.weight = float(sum(r.size for r in self.regions))
        elif self.table is not None:
            self.mode = "cells"
            self.cells = np.flatnonzero(self.table.counts >= 0)
            if self.cells.size == 0:
                raise CleftchunkError(
                    f"the labels of {name or 'a training volume'} hold no annotated chunk (none is stored): "
                    "write the annotations, or give --train-roi regions"
                )
            self.weight = float(self.cells.size * np.prod(self.table.cell))
        else:
            self.mode = "whole"
            self.weight = float(np.prod([hi - lo + 1 for lo, hi in self.ranges]))

    def _fit(self, region: Roi) -> tuple[tuple[int, int], ...]:
        """Offsets of crops inside ``region`` (and the valid offsets); a region smaller than the
        crop along an axis gets the crop centred on it."""
        out = []
        for b, e, c, (lo, hi) in zip(region.begin, region.end, self.crop, self.ranges):
            first, last = max(b, lo), min(e - c, hi)
            if first > last:
                first = last = int(min(max(b + (e - b - c) // 2, lo), hi))
            out.append((int(first), int(last)))
        return tuple(out)

    def draw(self, rng: np.random.Generator) -> tuple[int, ...]:
        if self.mode == "whole":
            return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in self.ranges)
        if self.mode == "regions":
            ranges = self.region_ranges[int(rng.choice(len(self.region_ranges), p=self.region_p))]
            return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ranges)
        table, offset = self.table, ()
        for _ in range(CELL_DRAWS):
            number = int(self.cells[int(rng.integers(self.cells.size))])
            cell = table.grid.chunk_roi(tuple(int(i) for i in np.unravel_index(number, table.counts.shape)))
            centre = [int(rng.integers(b, e)) for b, e in zip(cell.begin, cell.end)]
            offset = tuple(int(min(max(c - s // 2, lo), hi)) for c, s, (lo, hi) in zip(centre, self.crop, self.ranges))
            if (table.counts[table.cell_box(Roi(offset, self.crop))] >= 0).all():
                break
        return offset

    def settle(self, voxel: Sequence[int], offset: Sequence[int]) -> tuple[int, ...]:
        """``offset`` (a crop around ``voxel``) moved, axis by axis, as little as keeps the crop in
        the annotated space around ``voxel`` where that space is long enough (near-cleft draws)."""
        if self.mode == "whole":
            return tuple(offset)
        if self.mode == "regions":
            for region, ranges in zip(self.regions, self.region_ranges):
                if region.contains(Roi(voxel, (1, 1, 1))):
                    return tuple(int(min(max(o, lo), hi)) for o, (lo, hi) in zip(offset, ranges))
            return tuple(offset)
        table = self.table
        cell = [int(v) // c for v, c in zip(voxel, table.cell)]
        out = []
        for axis, (o, size, (lo, hi)) in enumerate(zip(offset, self.crop, self.ranges)):
            line = [slice(i, i + 1) for i in cell]
            line[axis] = slice(None)
            annotated = (table.counts[tuple(line)].reshape(-1) >= 0)
            first = last = cell[axis]
            while first > 0 and annotated[first - 1]:
                first -= 1
            while last + 1 < annotated.size and annotated[last + 1]:
                last += 1
            begin, end = first * table.cell[axis], min((last + 1) * table.cell[axis], table.shape[axis])
            if end - begin >= size:
                o = min(max(o, begin), end - size)
            out.append(int(min(max(o, lo), hi)))
        return tuple(out)

    def inside(self, roi: Roi) -> np.ndarray | None:
        """Voxels of ``roi`` in annotated space, or None when all are."""
        if self.mode == "cells":
            return self.table.annotated_mask(roi)
        if self.mode == "whole" or any(r.contains(roi) for r in self.regions):
            return None
        mask = np.zeros(roi.shape, bool)
        for region in self.regions:
            part = region.intersect(roi)
            if not part.empty:
                mask[part.relative_to(roi).to_slices()] = True
        return mask


class AnnotatedCodes:
    """Label codes read through ``codes``, invalid (excluded from the loss) outside annotated space."""

    def __init__(self, codes: Any, space: Space):
        self.codes, self.space = codes, space
        self.shape = tuple(int(s) for s in codes.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        data = np.asarray(self.codes[key])
        inside = self.space.inside(Roi.from_bounds([k.start for k in key], [k.stop for k in key]))
        if inside is not None:
            data = np.where(inside, data, np.uint8(INVALID_BIT)).astype(np.uint8)
        return data


class CleftIndex:
    """Cleft voxels per cell of each volume, from the tables. A ``voxel`` draw picks a cleft voxel
    uniformly over all volumes (a cell ∝ its count, then the voxel within the re-read, usually
    cached, cell); a ``cleft`` draw picks a cell uniformly among those with clefts, then a cleft
    piece in it (26-connected) uniformly, then a voxel of that piece."""

    def __init__(self, tables: Sequence[CleftTable], by: str = "voxel"):
        self.tables = list(tables)
        self.by = by  # one of NEAR_CLEFT_DRAWS, checked by RejectionConfig
        volume_of, chunk_of, counts = [], [], []
        for i, table in enumerate(self.tables):
            flat = table.counts.reshape(-1)
            numbers = np.flatnonzero(flat > 0)
            volume_of.append(np.full(numbers.size, i, np.int64))
            chunk_of.append(numbers.astype(np.int64))
            counts.append(flat[numbers])
        empty = [np.zeros(0, np.int64)]
        self.volume_of = np.concatenate(volume_of + empty)
        self.chunk_of = np.concatenate(chunk_of + empty)
        self.cumulative = np.cumsum(np.concatenate(counts + empty))
        self.total = int(self.cumulative[-1]) if self.cumulative.size else 0
        self._pieces: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def draw(self, rng: np.random.Generator, codes: Sequence[Any]) -> tuple[int, tuple[int, int, int]]:
        """(volume, voxel) of a cleft voxel, drawn as :attr:`by` says."""
        if self.by == "cleft":
            volume, number, roi = self._cell(int(rng.integers(self.chunk_of.size)))
            voxels, starts = self._cell_pieces(volume, number, codes[volume], roi)
            piece = int(rng.integers(starts.size - 1))
            flat = int(voxels[starts[piece] + rng.integers(starts[piece + 1] - starts[piece])])
        else:
            k = int(rng.integers(self.total))
            entry = int(np.searchsorted(self.cumulative, k, side="right"))
            within = k - (int(self.cumulative[entry - 1]) if entry else 0)
            volume, number, roi = self._cell(entry)
            flat = int(np.flatnonzero(np.asarray(codes[volume][roi.to_slices()]) & 1)[within])
        local = np.unravel_index(flat, roi.shape)
        return volume, tuple(int(o + v) for o, v in zip(roi.offset, local))  # type: ignore[return-value]

    def _cell(self, entry: int) -> tuple[int, int, Roi]:
        """(volume, cell number, cell box) of an entry of the index."""
        volume, number = int(self.volume_of[entry]), int(self.chunk_of[entry])
        table = self.tables[volume]
        return volume, number, table.grid.chunk_roi(tuple(int(i) for i in np.unravel_index(number, table.counts.shape)))

    def _cell_pieces(self, volume: int, number: int, codes: Any, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
        """The cell's cleft voxels (flat, grouped by 26-connected piece) and each piece's start."""
        key = (volume, number)
        if key in self._pieces:
            self._pieces.move_to_end(key)
            return self._pieces[key]
        pieces, n = ndimage.label(np.asarray(codes[roi.to_slices()]) & 1, structure=np.ones((3, 3, 3), bool))
        flat = pieces.reshape(-1)
        voxels = np.flatnonzero(flat)
        order = np.argsort(flat[voxels], kind="stable")
        voxels = voxels[order]
        starts = np.searchsorted(flat[voxels], np.arange(1, n + 2))
        self._pieces[key] = entry = (voxels, starts)
        if len(self._pieces) > PIECE_CACHE_CELLS:
            self._pieces.popitem(last=False)
        return entry


def known_empty(table: CleftTable | None, box: Roi) -> bool:
    """Whether the table shows no cleft in ``box`` (every cell it overlaps counted, and 0)."""
    if table is None:
        return False
    cells = table.counts[table.cell_box(box.intersect(Roi.from_shape(table.shape)))]
    return bool(cells.size) and bool((cells <= 0).all())  # unannotated cells (-1) are masked, so hold none
