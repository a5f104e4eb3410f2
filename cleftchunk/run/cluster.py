"""Where prediction runs: a local Dask cluster started for the job, or an existing one.

- CPU: ``workers`` processes, each one Dask thread; torch threads per worker = cores // workers,
  so that workers × torch threads ≤ cores (oversubscription makes PyTorch far slower).
- GPUs: one worker process per GPU, pinned with ``CUDA_VISIBLE_DEVICES`` set by its nanny before
  the process starts (so CUDA inside the worker only ever sees its own device), with a ``GPU``
  resource of 1 and two task threads (one computes while the other does I/O and blending).
- ``scheduler``: the address of a running scheduler (e.g. one started by dask-jobqueue on SLURM);
  its workers are used as they are. ``tls://`` addresses use ``security`` (certificates from
  files, or Dask's ``distributed.comm.tls`` configuration).

Security: a Dask scheduler runs any function a connecting client sends, so a local cluster binds
its scheduler, nannies, workers and dashboards to 127.0.0.1 unless ``listen`` names another
interface (which the caller is warned about); between machines, use TLS.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cleftchunk.backend import usable_cores
from cleftchunk.errors import CleftchunkError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ClusterSpec:
    workers: int | None = None  # CPU worker processes (default 1; 0: one worker thread in this process)
    gpus: int = 0  # one worker per GPU
    cores: int | None = None  # CPU cores to use in all (default: all)
    scheduler: str | None = None  # address of an existing scheduler
    processes: bool = True  # False: workers are threads of this process (tests, debugging)
    listen: str | None = None  # interface a local cluster binds (default: 127.0.0.1 only)
    security: Any = None  # a distributed.Security (TLS certificates) for the scheduler and workers
    threads: int | None = None  # task threads per worker process (default: 2 on a GPU, else 1)

    @property
    def host(self) -> str:
        return self.listen or LOOPBACK

    def __post_init__(self) -> None:
        for name in ("workers", "cores"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (name == "cores" and value == 0)):
                raise CleftchunkError(f"{name} {value} must be {'at least 1' if name == 'cores' else '0 or more'} (--workers, --cpus)")

    def torch_threads(self) -> int:
        cores = self.cores or usable_cores()
        return max(1, cores // max(1, self.n_workers))

    @property
    def n_workers(self) -> int:
        return self.gpus if self.gpus else max(1, self.workers if self.workers is not None else 1)

    @property
    def in_process(self) -> bool:
        return not self.processes or (self.workers == 0 and not self.gpus)


def available_gpus() -> int:
    """GPUs this process can use: 0 where torch has no CUDA or the machine no NVIDIA driver.

    A CUDA that is there but fails to start (a driver too old for the wheel, a broken install) is
    an error saying so: torch only warns and reports no GPU, and the run would silently go to the CPU.
    """
    import torch

    if not torch.backends.cuda.is_built():  # the CPU wheel
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return torch.cuda.device_count()
    failed = [str(w.message) for w in caught if "CUDA initialization" in str(w.message)]
    if failed:
        raise CleftchunkError(
            f"CUDA is installed but does not start ({failed[0].splitlines()[0][:200]}): fix the NVIDIA driver "
            "or the torch CUDA build, or run on the CPU with gpus=0"
        )
    return 0


def resolve_gpus(requested: int | None) -> int:
    """``None`` means: all GPUs of this machine (0 without CUDA)."""
    if requested is not None and requested < 0:
        raise CleftchunkError(f"--gpus {requested} must be 0 or more")
    if requested == 0:  # the CPU was asked for: whether CUDA works does not matter
        return 0
    have = available_gpus()
    if requested is None:
        return have
    if requested > have:
        raise CleftchunkError(f"--gpus {requested} asked, but this machine has {have} usable GPU(s): use --gpus {have}")
    return requested


def is_loopback(host: str) -> bool:
    """True for 127.x.y.z, ::1 and names that resolve only to them (``localhost``)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_listen(listen: str | None, warn: Callable[[str], None]) -> str | None:
    """Validate ``listen`` (a host name or IP, no port); warn when it is not loopback."""
    if listen is None:
        return None
    host = listen.strip()
    if not host or "://" in host or "/" in host or (host.count(":") == 1):
        raise CleftchunkError(f"--listen {listen!r} must be a host name or IP address of this machine (no port, no scheme), e.g. 127.0.0.1")
    if not is_loopback(host):
        warn(
            f"warning: --listen {host}: the Dask scheduler, workers and dashboard accept connections on {host}; "
            "anyone who can reach it can run code as you (use --scheduler tls://... with certificates between machines)"
        )
    return host


def tls_security(ca_file: str | None = None, cert: str | None = None, key: str | None = None) -> Any:
    """A ``distributed.Security`` from certificate files; with none given, Dask's TLS configuration
    (``distributed.comm.tls.ca-file`` / ``client.cert`` / ``client.key``). None when neither has any."""
    from distributed import Security

    given = {"ca_file": ca_file, "cert": cert, "key": key}
    if any(given.values()):
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise CleftchunkError(f"TLS needs all of --tls-ca-file, --tls-cert and --tls-key ({', '.join(missing)} missing)")
        from cleftchunk.urls import local_file

        for name, value in given.items():
            local_file(value, f"--tls-{name.replace('_', '-')}")  # certificates are local files: a URL is refused as given
            if not os.path.isfile(value):
                raise CleftchunkError(f"TLS {name.replace('_', ' ')} {value} does not exist: check --tls-{name.replace('_', '-')}")
        return Security(
            tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key,
            tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key,
            require_encryption=True,
        )
    security = Security()
    return security if security.tls_ca_file else None


@contextlib.contextmanager
def dask_client(spec: ClusterSpec) -> Iterator[object]:
    """A ``distributed.Client`` on the cluster ``spec`` describes; a started cluster is closed after."""
    from distributed import Client

    if spec.scheduler:
        with _remote_client(spec) as client:
            yield client
        return
    cluster = _local_cluster(spec)
    with cluster, Client(cluster, security=spec.security) as client:
        yield client


@contextlib.contextmanager
def _remote_client(spec: ClusterSpec) -> Iterator[object]:
    from distributed import Client

    security = spec.security
    if spec.scheduler.startswith("tls://") and security is None:
        security = tls_security()
        if security is None:
            raise CleftchunkError(
                f"--scheduler {spec.scheduler} uses TLS: give --tls-ca-file, --tls-cert and --tls-key (or set distributed.comm.tls in the Dask config)"
            )
    probe_scheduler(spec.scheduler, security)
    try:
        client = Client(spec.scheduler, timeout="20s", security=security)
    except OSError as e:  # refused, timed out, or closed in the TLS handshake (CommClosedError, ssl errors)
        hint = "check --scheduler and the TLS certificates" if spec.scheduler.startswith("tls://") else "check --scheduler (and the TLS options, if the scheduler uses TLS)"
        raise CleftchunkError(f"cannot connect to the Dask scheduler at {spec.scheduler} ({type(e).__name__}: {_first_line(e)}): {hint}") from None
    except ValueError as e:  # an address distributed cannot parse
        raise CleftchunkError(f"--scheduler {spec.scheduler} is not a scheduler address ({_first_line(e)}): use tcp://host:port or tls://host:port") from None
    with client:
        yield client


#: A Dask message starts with its length in bytes (8, little-endian); the first message a
#: scheduler sends (its handshake) is small. Larger means the bytes are not Dask's: read as a
#: length, "HTTP/1.1" is 3.07 EiB, which distributed would try to allocate.
_HANDSHAKE_LIMIT = 1 << 26


def handshake_timeout() -> float:
    return float(os.environ.get("CLEFTCHUNK_CONNECT_TIMEOUT", 10.0))


def probe_scheduler(address: str, security: Any = None, timeout: float | None = None) -> None:
    """Make sure a Dask scheduler answers at ``address`` before distributed connects to it.

    distributed's connect timeout does not cover its handshake: a server that accepts the
    connection and says nothing (an HTTP server waits for a request) hangs the command, and one
    that answers something else (a proxy's HTTP error) is read as a message length. A scheduler
    sends its handshake as soon as a connection is accepted; this reads the first 8 bytes of it,
    within ``timeout`` seconds, and names what answered otherwise."""
    import ssl
    from urllib.parse import urlsplit

    timeout = handshake_timeout() if timeout is None else timeout
    scheme, _, rest = address.partition("://")
    given = bool(rest)  # a scheme was written: the address must be complete
    if not rest:
        scheme, rest = "tcp", address
    if scheme not in ("tcp", "tls"):
        return  # inproc://, ucx://: not a socket this can look at
    try:
        parts = urlsplit(f"//{rest}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if (not host or not port) and given:
        raise CleftchunkError(f"--scheduler {address} is not a scheduler address: use tcp://host:port or tls://host:port")
    if not host or not port:
        return  # distributed names what is wrong with a schemeless address
    where = f"the Dask scheduler at {address}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise CleftchunkError(f"cannot connect to {where}: the host {host} cannot be resolved (no address for it): check --scheduler") from None
    except TimeoutError:
        raise CleftchunkError(f"cannot connect to {where}: no answer within {timeout:g} s (a firewall, or the machine is down): check --scheduler") from None
    except OSError as e:
        raise CleftchunkError(f"cannot connect to {where} ({e.strerror or type(e).__name__}): check --scheduler and that the scheduler runs") from None
    with sock:
        sock.settimeout(timeout)
        try:
            if scheme == "tls":
                context = security.get_connection_args("client").get("ssl_context") if security is not None else None
                if context is None:  # no certificates yet (the caller finds them): reachable is all this can tell
                    return
                context.check_hostname = False  # distributed checks the certificate itself, by its own rules
                sock = context.wrap_socket(sock, server_hostname=host)
            first = _receive(sock, 8)
            if not first:
                sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")  # silent: ask it whether it speaks HTTP
                reply = _receive(sock, 5)
                what = "answered like an HTTP server" if reply.startswith(b"HTTP/") else f"sent nothing within {timeout:g} s"
                raise CleftchunkError(f"{address} {what}, not a Dask scheduler: check the port of --scheduler (a scheduler's is 8786 by default; 8787 is its dashboard)")
        except ssl.SSLError as e:
            raise CleftchunkError(f"{address} did not complete a TLS handshake ({e.reason or e}): check that it is a Dask scheduler with TLS and the --tls-* certificates") from None
        except OSError as e:
            raise CleftchunkError(f"cannot talk to {where} ({e.strerror or type(e).__name__}): check --scheduler") from None
    if first.startswith(b"HTTP/") or int.from_bytes(first.ljust(8, b"\0"), "little") > _HANDSHAKE_LIMIT:
        shown = first.decode("ascii", "replace")
        what = "answered like an HTTP server (a proxy?)" if first.startswith(b"HTTP/") else f"answered {shown!r}"
        raise CleftchunkError(f"{address} {what}, not a Dask scheduler: check --scheduler (and unset HTTP proxies for it)")


def _receive(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes; b"" when the peer sends nothing within the socket's timeout or closes."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _local_cluster(spec: ClusterSpec):
    import dask
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    threads = spec.torch_threads()
    host = spec.host
    protocol = "tls" if spec.security is not None else "tcp"
    # Port 0: several runs (and test sessions) on one machine must not fight over 8786/8787.
    scheduler = {
        "cls": Scheduler,
        "options": {"host": host, "port": 0, "dashboard_address": f"{host}:0", "protocol": protocol, "security": spec.security},
    }
    with dask.config.set({"distributed.worker.daemon": False}):
        if spec.in_process:
            # Threads of this process talk over inproc:// (no socket); only the dashboards listen.
            return LocalCluster(
                n_workers=spec.n_workers, threads_per_worker=1, processes=False, dashboard_address=f"{host}:0",
                worker_dashboard_address=f"{host}:0", scheduler_port=0,
            )
        workers = {}
        for i in range(spec.n_workers):
            env = {"OMP_NUM_THREADS": str(threads)}  # torch threads are set per job (Job.torch_threads)
            resources = {}
            if spec.gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(i)
                resources = {"GPU": 1}
            workers[f"predict-{i}"] = {
                "cls": Nanny,
                "options": {
                    # On a GPU, a second task thread reads, blends and writes while the first keeps the
                    # device busy; on a CPU, torch's own threads already use the cores.
                    "nthreads": spec.threads or (2 if spec.gpus else 1), "env": env, "resources": resources, "memory_limit": 0, "silence_logs": logging.ERROR,
                    "host": host, "dashboard_address": f"{host}:0", "protocol": protocol, "security": spec.security,
                },
            }
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40, security=spec.security)
