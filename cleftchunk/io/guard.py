"""What protects outputs and inputs: one writer per output, and no output on top of an input.

- **One writer per output**: a command that writes an output holds a small lock file beside it
  (``.<container>.<array>.lock``: host, PID, start time, command). A second command on the same
  output refuses and names the first. A lock left by a process that is gone (same host, PID not
  running) is taken over with a warning, so a killed run can always be resumed.
- **No output on an input**: an output equal to, inside, or containing one of the command's inputs
  is refused whatever ``overwrite`` says, because writing it would destroy the input.

Stages use :func:`writes_output`, a decorator naming the output argument and the input arguments.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import inspect
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from cleftchunk.errors import CleftchunkError
from cleftchunk.io import precomputed
from cleftchunk.io.stores import is_url, resolved
from cleftchunk.io.volumes import Volume, split_spec

LOCK_SUFFIX = ".lock"


# -- where a spec lives ------------------------------------------------------------------------
def location(spec: Any) -> PurePosixPath | None:
    """The absolute place a spec or Volume names: resolved container path + path inside it."""
    if spec is None or not isinstance(spec, (str, os.PathLike, Volume)):
        return None
    if isinstance(spec, Volume):
        container, inner = spec.container, spec.inner
    else:
        container, inner = split_spec(spec)
    if precomputed.is_precomputed(container):  # where its files lie, whatever the spelling or #selection
        return PurePosixPath(precomputed.place(str(container)))
    # URLs compare by their normalized text (s3://b/x.zarr and s3://b/x.zarr/ are one place)
    place = PurePosixPath(resolved(container) if is_url(container) else _resolve(Path(container)).as_posix())
    for part in (inner or "").strip("/").split("/"):
        if part:
            place = place / part
    return place


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CleftchunkError(f"{path} is a symbolic link loop: point it at a real file or folder") from e


def refuse_overlap(output: Any, inputs: Iterable[Any], what: str = "output") -> None:
    """Raise when ``output`` equals, lies inside, or contains one of ``inputs``."""
    out = location(output)
    if out is None:
        return
    for source in inputs:
        place = location(source)
        if place is None:
            continue
        name = source.spec if isinstance(source, Volume) else source
        if out == place:
            relation = "is where the source lives"
        elif place in out.parents:
            relation = "lies inside the source"
        elif out in place.parents:
            relation = "contains the source"
        else:
            continue
        raise CleftchunkError(f"{what} {output} {relation} ({name}): writing it would destroy the source, choose an {what} elsewhere")


# -- the lock ----------------------------------------------------------------------------------
def lock_path(output: Any) -> Path:
    """Beside the output's container, never inside it (readers and --overwrite never see it)."""
    container, inner = split_spec(output)
    container = _resolve(Path(container))
    inner = (inner or "").strip("/").replace("/", "_")
    name = f".{container.name}{'.' + inner if inner else ''}{LOCK_SUFFIX}"
    return container.parent / name


def _lock_record(stage: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else stage,
        "stage": stage,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: treated as held unless its owner is gone


def _is_stale(record: dict) -> bool:
    pid = record.get("pid")
    return record.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _take_over(path: Path, record: dict) -> bool:
    """Move a stale lock aside; only one of several processes doing this at once succeeds."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if (_read_lock(aside) or {}).get("pid") != record.get("pid"):  # another process replaced it meanwhile
        with contextlib.suppress(OSError):
            os.rename(aside, path)
        return False
    aside.unlink(missing_ok=True)
    return True


def _describe(output: Any, path: Path, record: dict) -> str:
    who = f"PID {record.get('pid', '?')} on {record.get('host', '?')}, started {record.get('started', '?')}"
    command = record.get("command")
    return (
        f"{output} is being written by another cleftchunk process ({who}{': ' + command if command else ''}): "
        f"wait for it to finish or stop it; if it is no longer running, delete {path}"
    )


@contextlib.contextmanager
def output_lock(output: Any, stage: str, log: Callable[[str], None] | None = None) -> Iterator[Path | None]:
    """Hold the lock of ``output`` while the block runs; refuse if another live process holds it.

    Object-store outputs are not locked (no atomic create-if-absent there): one writer per
    ``s3://`` or ``gs://`` output is the user's to ensure."""
    if is_url(output):
        yield None
        return
    path = lock_path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CleftchunkError(f"cannot create the folder of {output} ({e.strerror}): check the path and its permissions") from None
    record = _lock_record(stage)
    for _ in range(3):
        try:
            if _try_create(path, record):
                break
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise CleftchunkError(f"cannot write beside {output} ({e.strerror}): choose an output in a writable folder") from None
            raise
        held = _read_lock(path)
        if held is None:  # released between our attempt and the read
            continue
        if not _is_stale(held):
            raise CleftchunkError(_describe(output, path, held))
        if _take_over(path, held):
            (log or _stderr)(f"warning: taking over the lock of {output} left by PID {held['pid']}, which is no longer running")
    else:
        raise CleftchunkError(_describe(output, path, _read_lock(path) or {}))
    try:
        yield path
    finally:
        if (_read_lock(path) or {}).get("pid") == record["pid"]:
            path.unlink(missing_ok=True)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# -- the decorator stages use -----------------------------------------------------------------
def writes_output(stage: str, output: str, inputs: tuple[str, ...] = ()) -> Callable:
    """Decorate a stage function: its ``output`` argument is locked while it runs, and must not
    overlap any of its ``inputs`` arguments (checked before the lock, so before any work)."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs)
            target = bound.arguments.get(output)
            if target is None:
                return function(*args, **kwargs)
            refuse_overlap(target, [bound.arguments.get(name) for name in inputs])
            log = bound.arguments.get("log")
            with output_lock(target, stage, log if callable(log) else None):
                return function(*args, **kwargs)

        return guarded

    return decorate
