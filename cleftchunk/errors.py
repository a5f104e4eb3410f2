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
