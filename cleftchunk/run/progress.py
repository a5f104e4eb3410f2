"""The one progress display of every block-wise command: blocks done of total, voxels/s, ETA,
failures (on stderr, updated at most a few times a second)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, name: str, enabled: bool = True):
        self.name, self.enabled = name, enabled
        self.bar = None
        self.voxels = 0
        self.failed = 0
        self.skipped = 0
        self.started = time.perf_counter()

    def start(self, total_blocks: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total_blocks, unit="block", desc=self.name, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        if self.skipped:
            self.bar.update(self.skipped)

    def skip(self, voxels: int) -> None:
        """A block already done by an earlier run."""
        self.skipped += 1
        if self.bar is not None:
            self.bar.update(1)

    def update(self, voxels: int, written: int, failed: int) -> None:
        self.voxels += voxels * written
        self.failed += failed
        if self.bar is None:
            return
        self.bar.update(written + failed)
        rate = self.voxels / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e6:.2f} Mvox/s, {self.failed} failed", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
