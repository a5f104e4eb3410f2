"""The block-wise operation base: one lifecycle for every stage that writes an output.

A stage declares an :class:`Operation` (modelled on daisy's ``Task`` and volara's blockwise
operations): its inputs, its output, the parameters that decide its bytes (its *identity*), its
plan (blocks, tasks, memory) and how to execute it on the executor. :func:`run_operation` owns
everything around that, the same way for every stage:

1. checks first (the operation's constructor and :meth:`Operation.plan`), so bad input fails
   before anything exists;
2. ``--dry-run``: the plan, in words; nothing is created, no folder, no lock;
3. the output must not overlap an input, and is locked while this process writes it;
4. create, or reopen to resume, or refuse: an existing output is resumed only when its stored
   identity equals this run's; with other parameters the refusal names the keys that differ;
   an output of something else is refused with "--overwrite" as the fix; an error while reading
   it (a permission, a network fault) is reported as what it is, never as "pass --overwrite";
5. an output already complete is not redone ("already complete");
6. the completion record (one byte per block, :class:`~cleftchunk.run.records.BlockRecord`) of
   the pass that writes, trusted only with this identity and block layout;
7. the passes run on the client :class:`~cleftchunk.run.options.RunOptions` chooses (threads of
   this process, local worker processes, or a cluster), with one progress display per pass and
   per-block failure reporting: a failed block fails the command with the blocks that failed,
   after every other block was written;
8. the output is marked complete and the record removed.

Why a resume gives the bytes of an uninterrupted run: the record says "done" only for blocks
whose data was written (the executor marks a block after its task returned), every operation is
deterministic, and a record or output with another identity is never trusted.
"""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from cleftchunk.errors import CleftchunkError
from cleftchunk.run.executor import BlockwiseTask, RunReport, run_blockwise
from cleftchunk.run.options import RunOptions
from cleftchunk.run.records import BlockRecord, identity_hash, remove_record

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def differing_keys(mine: dict, stored: dict) -> list[str]:
    """The top-level keys whose values differ between two identities."""
    return sorted(k for k in set(mine) | set(stored) if mine.get(k) != stored.get(k))


@dataclass
class Plan:
    """What a run will do: the layout of the pass that writes (its blocks are recorded), the
    tasks of all passes, the output's bytes and the memory a worker thread needs."""

    what: str
    layout: Any
    tasks: int
    output_bytes: int
    memory: int
    extra: tuple[str, ...] = ()

    def describe(self, options: RunOptions) -> str:
        from cleftchunk.run.local import describe_plan

        return describe_plan(self.what, self.layout, options.where(), self.tasks, self.output_bytes, self.memory, self.extra)


@dataclass
class Running:
    """What an operation's :meth:`Operation.execute` gets: the client, the options, the record of
    the writing pass (``trusted``: it was kept from an earlier run of this identity and block
    layout, not created afresh), and :meth:`run` to run one pass on the executor."""

    client: Any
    options: RunOptions
    record: BlockRecord | None
    log: Log
    already_done: int = 0
    reports: list[RunReport] = field(default_factory=list)
    trusted: bool = False

    def run(self, task: BlockwiseTask, recorded: bool = False, in_flight: int | None = None, check: bool = True) -> RunReport:
        """Run one pass; ``recorded``: the pass that writes, whose blocks go to the record. A pass
        with failed blocks fails the command (naming them) after the others are done (``check``
        False: the caller reports them, from the report it gets back). ``in_flight``: at most this
        many blocks open at once (results the client collects)."""
        import dataclasses

        if recorded and self.record is not None:
            task = dataclasses.replace(task, record=self.record)
        report = run_blockwise(self.client, task, retries=self.options.retries, progress=self.options.progress, in_flight=in_flight)
        self.reports.append(report)
        if recorded:
            self.already_done += report.already_done
        return raise_if_failed(report) if check else report


def raise_if_failed(report: RunReport) -> RunReport:
    if report.failed:
        shown = "; ".join(f"{roi}: {error}" for roi, error in report.failed[:3])
        more = "; ..." if len(report.failed) > 3 else ""
        raise CleftchunkError(
            f"{len(report.failed)} of {report.blocks} blocks of {report.name} failed ({shown}{more}): "
            "fix the cause and re-run the same command to finish them (written blocks are kept)"
        )
    return report


class Operation:
    """A block-wise stage as a declaration; :func:`run_operation` runs it (see the module docstring).

    A subclass sets ``stage`` and ``output`` (the output's spec), and defines :meth:`identity`,
    :meth:`plan`, :meth:`execute` and how its output is created (:meth:`create`). Where the
    lifecycle's state, record and lock live depends on the output's storage: a volume output
    inherits them from :class:`cleftchunk.io.outputs.VolumeOperation` (whose ``create_image``
    makes a Zarr image in an input's frame); outputs that are not one Zarr array (an HDF5 file,
    several images) override :meth:`read_state`, :meth:`write_state` and :meth:`exists` there.
    An operation with no ``output`` (evaluate) runs its passes with no lifecycle.
    """

    stage: ClassVar[str] = "operation"
    #: Version of the output's format: part of the identity, so an old output is not resumed.
    format: ClassVar[int] = 1
    output: str = ""  # empty: the operation writes no volume (e.g. evaluate); no lifecycle is kept
    inputs: tuple = ()
    #: What refusals call an output of this stage, and one written with other parameters
    #: (default: "a cleftchunk <stage> output", "written by <stage>").
    output_name: ClassVar[str] = ""
    written_by: ClassVar[str] = ""

    # -- what the stage declares ---------------------------------------------------------------
    def identity(self) -> dict:
        """Every parameter that can change a byte of the output (JSON-able)."""
        raise NotImplementedError

    def plan(self, options: RunOptions) -> Plan:
        raise NotImplementedError

    def full_identity(self) -> tuple[dict, str]:
        """The identity stored in the output (with the format) and its hash."""
        identity = {"format": f"cleftchunk-{self.stage}/{self.format}", **self.identity()}
        return identity, identity_hash(identity)

    def create(self, state: dict, overwrite: bool) -> Any:
        """Create the output (replacing one when ``overwrite``), storing ``state``; return a handle."""
        raise NotImplementedError

    def reopen(self) -> Any:
        """The existing output, for writing (a resume)."""
        raise NotImplementedError

    def execute(self, running: Running, handle: Any) -> Any:
        raise NotImplementedError

    def finished(self, handle: Any, result: Any) -> Any:
        """The result of a run that found the output complete already (default: None)."""
        return result

    # -- where the lifecycle state lives: declared by the output's kind (io.outputs.VolumeOperation
    # for volumes; run/ knows no storage, so that it stays below io in the stages' order) ---------
    @property
    def attribute(self) -> str:
        return f"cleftchunk_{self.stage}"

    def exists(self) -> bool:
        raise NotImplementedError

    def read_state(self) -> dict | None:
        """The stored state, or None when the output is not this stage's. Errors of the storage
        itself (permissions, network) are raised as they are, never taken for "not ours"."""
        raise NotImplementedError

    def write_state(self, handle: Any, state: dict) -> None:
        raise NotImplementedError

    def holds_nothing(self) -> bool:
        """Whether the existing output holds nothing at all (folders, empty files: what a run that
        failed while creating it leaves), so that it may be created afresh without --overwrite."""
        return False

    def record_path(self) -> Path:
        raise NotImplementedError

    def guard(self, log: Log) -> Any:
        """A context manager held while the output is written: refuses an output that overlaps an
        input, and holds the writer lock (see io.guard)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """More provenance to store with the state (not part of the identity)."""
        return {}

    def run(self, options: RunOptions | None = None, log: Log | None = None) -> Any:
        """Run this operation: :func:`run_operation`."""
        return run_operation(self, options, log)


def run_operation(operation: Operation, options: RunOptions | None = None, log: Log | None = None, client: Any = None) -> Any:
    """Run ``operation`` with ``options`` (see the module docstring); None for a dry run.
    ``client``: an open client to run on instead of one started for this operation (a command
    running several operations, e.g. the volumes of a CREMI file, starts one cluster for all)."""
    options = options or RunOptions()
    log = log or _stderr
    plan = operation.plan(options)
    if options.dry_run:
        log(plan.describe(options))
        return None
    if options.scheduler and client is None:  # a wrong address fails here, before the output is created
        from cleftchunk.run.cluster import probe_scheduler

        probe_scheduler(options.scheduler, options.security)
    if not operation.output:  # an operation that writes no volume (evaluate): no lifecycle to keep
        with _client(options, client) as c:
            return operation.execute(Running(c, options, None, log), None)
    with operation.guard(log):
        identity, digest = operation.full_identity()
        handle, state = _open(operation, identity, digest, options.overwrite)
        if state.get("complete"):
            log(f"{operation.output} is already complete with these parameters: nothing to do (--overwrite to redo it)")
            return operation.finished(handle, None)
        layout = plan.layout
        record_identity = identity_hash(digest, list(layout.roi.shape), list(layout.block_shape))
        record, trusted = BlockRecord.open(operation.record_path(), len(layout), record_identity, fresh=state.get("fresh", False))
        with _client(options, client) as c:
            running = Running(c, options, record, log, trusted=trusted)
            result = operation.execute(running, handle)
        state = {k: v for k, v in state.items() if k != "fresh"}
        state.update(complete=True, finished=now())
        operation.write_state(handle, state)
        remove_record(record.path)
        return result


def _client(options: RunOptions, client: Any):
    import contextlib

    return contextlib.nullcontext(client) if client is not None else options.client()


def _open(operation: Operation, identity: dict, digest: str, overwrite: bool) -> tuple[Any, dict]:
    """Reopen the output to resume (same identity), or create it; refuse anything else."""
    if operation.exists() and not overwrite:
        stored = operation.read_state()
        if stored is None and operation.holds_nothing():
            # what a run that created the output and failed before writing its state leaves (a
            # full disk): nothing of anyone's, so it is created afresh, never refused as foreign
            return _create(operation, identity, digest, overwrite=True)
        if stored is None:
            raise CleftchunkError(
                f"{operation.output} exists and is not {operation.output_name or f'a cleftchunk {operation.stage} output'}: "
                "pass --overwrite to replace it, or choose another output"
            )
        if stored["identity_hash"] != digest:
            changed = differing_keys(identity, stored.get("identity", {}))
            raise CleftchunkError(
                f"{operation.output} exists, {operation.written_by or f'written by {operation.stage}'} with other parameters "
                f"({', '.join(changed) or 'format'} differ): pass --overwrite to replace it, or choose another output"
            )
        return operation.reopen(), stored
    return _create(operation, identity, digest, overwrite)


def _create(operation: Operation, identity: dict, digest: str, overwrite: bool) -> tuple[Any, dict]:
    if overwrite:
        remove_record(operation.record_path())
    state = {"identity": identity, "identity_hash": digest, "complete": False, "started": now(), **operation.extra_state()}
    handle = operation.create(state, overwrite)
    return handle, {**state, "fresh": True}
