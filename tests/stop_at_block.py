"""Stop a run at a known block, for kill-and-resume tests that do not race the clock.

As a script, ``python stop_at_block.py N ARGS...`` runs ``cleftchunk ARGS...`` with :func:`install`'s
hook: once this run has written N blocks, the completion record is flushed, ``RECORDED <done>``
printed, and the whole process group SIGKILLed (the client and its worker processes, as a
``kill -9`` of the job would do); N = 0 runs to the end. A run that ends prints
``SUMMARY <already done> <written> <blocks>`` for each block-wise pass.

The process must lead its own process group (``subprocess.Popen(..., start_new_session=True)``),
so that the kill cannot reach the test that started it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys


def install(stop_after: int) -> None:
    """Register the stopping hook on the executor (see the module docstring)."""
    from cleftchunk.run.executor import BLOCK_DONE_HOOKS

    if stop_after and os.getpgrp() != os.getpid():
        raise RuntimeError("stop_at_block kills its process group: start it with start_new_session=True")
    reports: list = []

    def stop(task, block, report) -> None:
        if not any(r is report for r in reports):
            reports.append(report)
        if stop_after and report.written == stop_after:
            if task.record is not None:
                task.record.flush()  # what the record says now is what the next run must trust
            print("RECORDED", report.already_done + report.written, flush=True)
            os.killpg(os.getpgrp(), signal.SIGKILL)

    BLOCK_DONE_HOOKS.append(stop)
    atexit.register(lambda: [print("SUMMARY", r.already_done, r.written, r.blocks, flush=True) for r in reports])


def summary(output: str) -> tuple[int, int, int]:
    """(already done, written, blocks) of the last pass a finished run printed."""
    return tuple(map(int, output.split("SUMMARY")[-1].split()[:3]))  # type: ignore[return-value]


def recorded(output: str) -> int:
    """Blocks the record held when the run was killed (``RECORDED`` line)."""
    return int(output.split("RECORDED")[-1].split()[0])


if __name__ == "__main__":
    install(int(sys.argv[1]))
    from cleftchunk_cli.main import main

    main(sys.argv[2:])
