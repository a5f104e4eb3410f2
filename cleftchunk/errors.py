"""The one exception type that reaches users as a one-line message."""


class CleftchunkError(Exception):
    """A problem the user can fix: the message names the problem and the fix, on one line.

    Messages speak the library's terms: a parameter is written ``name=value`` (``overwrite=True``,
    ``block_shape=32,512,512``), so that a Python caller reads the argument to change; the command
    line shows the matching flag instead (``--overwrite``, ``--block-shape 32,512,512``).
    The command line prints ``error: <message>`` and exits non-zero; anything else that
    escapes is a bug and is reported as such (with ``--debug`` showing the traceback).
    """

    exit_code = 2


def write_failure(what: str, folder, error: BaseException) -> BaseException:
    """What a failed write of ``what`` into ``folder`` is reported as: on a full disk (ENOSPC, or
    under 16 MiB left with the partial file still there: torch says only "enforce fail at
    inline_container.cc"), a one-line CleftchunkError; another failed write by torch, one naming
    its first line; anything else (a bug, a permission) as it was."""
    import errno
    import shutil

    try:
        full = getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(folder).free < 16 << 20
    except OSError:
        full = False
    if full:
        return CleftchunkError(f"{what} could not be written: no space left on the disk: free disk space, then re-run the same command")
    text = str(error)
    if isinstance(error, RuntimeError) and ("inline_container" in text or "write" in text.lower()):
        return CleftchunkError(f"{what} could not be written ({text.splitlines()[0][:120]}): check the folder and the disk, then re-run the same command")
    return error
