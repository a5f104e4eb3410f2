"""What protects outputs and inputs: one writer per output, and no output on top of an input.

- **One writer per output**: a command that writes an output holds a small lock file beside it
  (``.<container>.<array>.lock``: host, PID, start time, command). A second command on the same
  output refuses and names the first. A lock left by a process that is gone (same host, PID not
  running) is taken over with a warning, so a killed run can always be resumed.
- **No output on an input**: an output equal to, inside, or containing one of the command's inputs
  is refused whatever ``overwrite`` says, because writing it would destroy the input.
- **No output inside a volume**: nor is any output inside an existing Zarr store or HDF5 file
  (a JSON file, checkpoint folder or PNG there would replace the volume's own files), whether
  the command reads that volume or not.

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
from cleftchunk.io.specs import HDF5_SUFFIXES
from cleftchunk.io.stores import is_url, parse_location, resolved
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


def refuse_overlap(output: Any, inputs: Iterable[Any], what: str = "output", volume: bool = False) -> None:
    """Raise when ``output`` equals, lies inside, or contains one of ``inputs``, or lies inside
    any existing Zarr store or HDF5 file (:func:`refuse_inside_container`): the one rule every
    output path of every command goes through, whatever ``overwrite`` says."""
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
    refuse_inside_container(output, what, volume)


def _zarr_node(path: Path) -> str | None:
    """"array" or "group" for a folder holding Zarr (or N5) metadata, else None."""
    if not path.is_dir():
        return None
    if (path / ".zarray").is_file():
        return "array"
    meta = path / "zarr.json"
    if meta.is_file():
        try:
            return "array" if json.loads(meta.read_text()).get("node_type") == "array" else "group"
        except (OSError, ValueError, AttributeError):  # damaged metadata is still someone's volume
            return "array"
    if (path / ".zgroup").is_file():
        return "group"
    if (path / "attributes.json").is_file():  # N5, if it says so (the name alone is common)
        try:
            meta = json.loads((path / "attributes.json").read_text())
        except (OSError, ValueError):
            return None
        if isinstance(meta, dict) and "dimensions" in meta:
            return "array"
        return "group" if isinstance(meta, dict) and "n5" in meta else None
    return None


def _store(path: Path) -> str:
    has_zarr = any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))
    return "the Zarr store" if has_zarr else "the N5 container"


def _is_hdf5_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def refuse_inside_container(output: Any, what: str = "output", volume: bool = False) -> None:
    """Refuse an output written inside an existing Zarr store or HDF5 file, whatever
    ``overwrite`` says: a JSON file, checkpoint or PNG written there replaces or corrupts the
    volume's own files. ``volume``: the output is a volume spec (``out.zarr/name``, ``out.hdf``),
    which may be a new image in an existing Zarr container but never inside another image (an
    array), and whose container (or HDF5 file, which it may replace) lies inside no other store. Object-store outputs are not checked (no folders there)."""
    if isinstance(output, Volume):
        return
    if isinstance(output, str) and precomputed.is_precomputed(output):  # checked where its files lie
        output = precomputed.place(output)
        if "://" in output:
            return
    if isinstance(parse_location(output, what), str):
        return
    text = os.fspath(output)
    hdf5 = _hdf5_file_part(text)
    if volume and hdf5 is None:
        container, inner = split_spec(text)
        container = Path(container).absolute()
        node = container
        for part in (inner or "").strip("/").split("/")[:-1]:
            node = node / part
            if _zarr_node(node) == "array":
                _refuse_inside(output, what, node, "the Zarr image")
    else:
        container = ((hdf5 if volume else None) or Path(text)).absolute()
        if not volume and container.exists() and not container.is_symlink():
            if _zarr_node(container):
                _refuse_inside(output, what, container, _store(container), itself=True)
            if container.is_file() and _is_hdf5_file(container):
                _refuse_inside(output, what, container, "the HDF5 file", itself=True)
    for parent in container.parents:
        if _zarr_node(parent):
            _refuse_inside(output, what, parent, _store(parent))
        if parent.is_file() and _is_hdf5_file(parent):
            _refuse_inside(output, what, parent, "the HDF5 file")
        if parent.is_file():
            raise CleftchunkError(f"{what} {output}: {parent} is a file, not a folder: choose another place for the {what}")


def holds_nothing(place: Path, bare_group: bool = False) -> bool:
    """True for what a run leaves that failed while creating an output (a full disk): folders,
    empty files, the metadata of image groups with nothing but their OME metadata (the groups
    below them: none of their own) and HDF5 files with nothing in them. Any array, chunk or
    other file is someone's data, and so is an empty group at ``place`` itself without OME
    metadata (a user's), unless ``bare_group`` (a place inside an output already known ours)."""
    if place.is_symlink():
        return False
    if place.is_file():
        return place.stat().st_size == 0 or _empty_hdf5(place)
    if not place.is_dir():
        return not place.exists()
    for path in place.rglob("*"):
        if path.is_symlink() or (path.is_file() and path.stat().st_size and not _empty_group_metadata(path, path.parent != place or bare_group)):
            return False
    return True


def _empty_group_metadata(path: Path, bare: bool) -> bool:
    """Group metadata with OME attributes only (or, ``bare``, none at all)."""
    if path.name != "zarr.json":
        return False
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    attrs = meta.get("attributes") or {} if isinstance(meta, dict) else None
    if not isinstance(attrs, dict) or meta.get("node_type") != "group" or not set(attrs) <= {"ome", "multiscales"}:
        return False
    return bare or bool(attrs)


def _empty_hdf5(path: Path) -> bool:
    import h5py

    if not _is_hdf5_file(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return not len(f) and not len(f.attrs)
    except OSError:  # a superblock cut short: nothing readable was written
        return True


def _hdf5_file_part(text: str) -> Path | None:
    """The HDF5 file a volume spec names (``a/b.hdf:volumes/x`` -> ``a/b.hdf``), or None."""
    parts = Path(text.rsplit(":", 1)[0] if ":" in text else text).parts
    for i, part in enumerate(parts):
        if part.lower().endswith(HDF5_SUFFIXES):
            return Path(*parts[: i + 1])
    return None


def _refuse_inside(output: Any, what: str, place: Path, kind: str, itself: bool = False) -> None:
    where = "is" if itself else "lies inside"
    raise CleftchunkError(
        f"{what} {output} {where} {kind} {place}: writing there would damage it: choose a place outside it for the {what}"
    )


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
