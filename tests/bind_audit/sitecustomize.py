"""Put on PYTHONPATH by tests/test_security.py: in a run and in every Python process it starts
(Dask nannies and workers inherit the environment), record each internet address a socket is
bound to, as ``pid host port`` lines appended to $CLEFTCHUNK_TEST_BIND_LOG.

An audit hook sees every ``socket.bind`` as it happens, so even a listener that lives for a
moment is recorded (sampling the open sockets now and then can miss one)."""

import os
import sys

_LOG = os.environ.get("CLEFTCHUNK_TEST_BIND_LOG")


def _record_bind(event, args):
    if event != "socket.bind":
        return
    address = args[1]
    if isinstance(address, tuple) and address and isinstance(address[0], str):  # AF_INET / AF_INET6
        with open(_LOG, "a") as log:  # one short line per write: lines of several processes do not mix
            log.write(f"{os.getpid()} {address[0]} {address[1]}\n")


if _LOG:
    sys.addaudithook(_record_bind)
