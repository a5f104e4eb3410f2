"""Operations whose output is a volume: where the operation base (run/operation.py) keeps its
lifecycle state, record and lock for an output at a spec.

:class:`VolumeOperation` keeps the state in an attribute of the output's Zarr array, the record
beside the output's container (never inside it: readers of the container never see it), and
takes the writer lock of :mod:`cleftchunk.io.guard`; an HDF5 output (synth's CREMI file,
export) overrides the state's place only. :class:`MapOperation` is the common case: one image in
the input's frame, each block a function of the input block and some context.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import holds_nothing, output_lock, refuse_overlap
from cleftchunk.io.stores import is_url
from cleftchunk.io.volumes import chunk_shape, create_like, exists, open_volume, split_spec
from cleftchunk.run.executor import BlockwiseTask, RunReport
from cleftchunk.run.operation import Operation, Plan, Running
from cleftchunk.run.options import RunOptions
from cleftchunk.run.chunks import remove_partial_writes
from cleftchunk.run.records import record_path_beside


class VolumeOperation(Operation):
    """An operation writing the volume at ``self.output`` (a Zarr image spec by default)."""

    def exists(self) -> bool:
        return exists(self.output)

    def read_state(self) -> dict | None:
        try:
            attrs = dict(open_volume(self.output).array.attrs)
        except CleftchunkError:  # not a volume cleftchunk can open: not this stage's output
            return None
        state = attrs.get(self.attribute)
        return state if isinstance(state, dict) and "identity_hash" in state else None

    def write_state(self, handle: Any, state: dict) -> None:
        handle.array.attrs[self.attribute] = state

    def reopen(self) -> Any:
        """The output, to resume: without the temporary files of writes a kill cut short (each
        chunk lands by a rename, so a killed write leaves a ``*.partial`` file, never a chunk)."""
        volume = open_volume(self.output, mode="r+")
        if hasattr(volume.array, "store_path"):  # a Zarr array (precomputed outputs have no such files)
            remove_partial_writes(volume.array)
        return volume

    def holds_nothing(self) -> bool:
        container, inner = split_spec(self.output)
        return not is_url(container) and holds_nothing(Path(container) / inner if inner else Path(container))

    def record_path(self) -> Path:
        return record_path_beside(*split_spec(self.output), self.stage)

    @contextlib.contextmanager
    def guard(self, log):
        refuse_overlap(self.output, self.inputs, volume=True)
        with output_lock(self.output, self.stage, log):
            yield


def create_image(operation: Operation, like: Any, dtype: Any, chunks: Sequence[int], state: dict, overwrite: bool, **options: Any) -> Any:
    """A Zarr image in the frame of ``like`` (shape, voxel size, offset) holding ``state``."""
    attrs = {operation.attribute: state, **options.pop("attrs", {})}
    return create_like(operation.output, like, dtype, chunks=chunks, attrs=attrs, overwrite=overwrite, **options)


class MapOperation(VolumeOperation):
    """An output image of the input's frame whose every block is ``compute`` of the input block
    grown by ``context`` voxels (clipped at the volume's edges; ``compute`` gets the grown data
    and its ROI, returns the block's data). Exact whatever the block shape as long as ``compute``
    of a voxel depends only on the input within ``context`` of it."""

    dtype: Any = np.uint8
    context: tuple[int, int, int] = (0, 0, 0)
    chunks: tuple[int, int, int] | None = None
    default_block_shape: tuple[int, int, int] = (32, 512, 512)
    source: Any = None

    def compute(self, data: np.ndarray, roi: Any, block_roi: Any) -> np.ndarray:
        raise NotImplementedError

    def _chunks(self) -> tuple[int, ...]:
        return chunk_shape(self.chunks, self.source.shape)

    def _layout(self, options: RunOptions):
        from cleftchunk.geometry import Roi
        from cleftchunk.run.layout import GridLayout
        from cleftchunk.run.options import block_shape_for

        shape = block_shape_for(options.block_shape, self._chunks(), self.source.shape, self.default_block_shape)
        return GridLayout(Roi.from_shape(self.source.shape), shape)

    def plan(self, options: RunOptions) -> Plan:
        layout = self._layout(options)
        itemsize = np.dtype(self.dtype).itemsize
        block = int(np.prod(layout.block_shape))
        return Plan(f"{self.stage} {self.source.spec} -> {self.output}", layout, len(layout),
                    self.source.roi.size * itemsize, block * (self.source.dtype.itemsize + itemsize))

    def create(self, state: dict, overwrite: bool) -> Any:
        return create_image(self, self.source, self.dtype, self._chunks(), state, overwrite)

    def execute(self, running: Running, handle: Any) -> RunReport:
        layout = self._layout(running.options)
        process = functools.partial(_map_block, self, handle)
        return running.run(BlockwiseTask(self.stage, layout, process), recorded=True)


def _map_block(operation: MapOperation, target: Any, block: Any, _prepared: Any = None) -> dict:
    from cleftchunk.geometry import Roi

    roi = block.write_roi.grow(operation.context, operation.context).intersect(Roi.from_shape(operation.source.shape))
    out = operation.compute(np.asarray(operation.source[roi.to_slices()]), roi, block.write_roi)
    target.array[block.write_roi.to_slices()] = out
    return {"voxels": block.write_roi.size}
