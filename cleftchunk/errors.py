"""The one exception type that reaches users as a one-line message."""


class CleftchunkError(Exception):
    """A problem the user can fix: the message names the problem and the fix, on one line.

    The command line prints ``error: <message>`` and exits non-zero; anything else that
    escapes is a bug and is reported as such (with ``--debug`` showing the traceback).
    """

    exit_code = 2
