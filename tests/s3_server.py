"""A real S3-protocol server for the tests: moto's stand-alone server on 127.0.0.1, a free port.

Nothing leaves the machine: the endpoint, dummy credentials and region are put in the
environment (``AWS_ENDPOINT_URL`` and friends), which botocore (and so s3fs) reads the usual way,
and which subprocesses started by the tests inherit.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata endpoint for credentials
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def environment(values: dict[str, str | None]):
    """Set (or, for None, remove) environment variables; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    forget_filesystems()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        forget_filesystems()


def forget_filesystems() -> None:
    """fsspec caches filesystem instances; one made under other environment variables must not be reused."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with environment({**ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}):
            yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
