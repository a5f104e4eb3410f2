"""Where a Zarr container lives: a local folder or an object-store URL, turned into a zarr store here.

This is the one place that knows URL schemes. A *location* is either a :class:`~pathlib.Path`
(local) or a URL string ``scheme://...``:

- ``s3://bucket/path.zarr`` — read and write, through s3fs (``pip install s3fs``, or the
  ``cloud`` extra). Credentials and endpoint come the usual AWS way: ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ``~/.aws``, ``AWS_ENDPOINT_URL`` for MinIO,
  Ceph or a test server.
- ``gs://bucket/path.zarr`` (also ``gcs://``) — read and write, through gcsfs (``pip install gcsfs``);
  credentials from ``GOOGLE_APPLICATION_CREDENTIALS`` or ``gcloud auth application-default login``.
- ``https://host/path.zarr`` (and ``http://``) — read only.

Any other scheme is refused, and so is anything that starts like a URL but is not one
(``s3:/bucket/x.zarr``, ``s3:bucket``): :func:`parse_location` is the one rule every path argument
(volumes, checkpoints, JSON and other file outputs) goes through, so no local folder named ``s3:``
is ever created. A local path that really starts with ``name:`` is written ``./name:...``. Each object of an object store
is written by one PUT, so a chunk either exists whole or not at all: the resume rule of
:mod:`cleftchunk.run.chunks` (the store is the record of what is done) holds there too.

Connections fail fast rather than hang: :data:`CONNECT_TIMEOUT` seconds to connect and
:data:`ATTEMPTS` attempts per request (``CLEFTCHUNK_CONNECT_TIMEOUT`` overrides the timeout).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from cleftchunk.errors import CleftchunkError
from cleftchunk.urls import check_syntax, local_file, url_scheme

#: scheme -> (fsspec package that implements it, writable)
SCHEMES = {
    "s3": ("s3fs", True),
    "gs": ("gcsfs", True),
    "gcs": ("gcsfs", True),
    "https": ("aiohttp", False),
    "http": ("aiohttp", False),
}
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
ATTEMPTS = 3

Location = Path | str


def is_url(spec: Any) -> bool:
    return url_scheme(spec) is not None


def parse_location(spec: str | os.PathLike, what: str = "") -> Location:
    """The one rule for every path argument: a well-formed URL of a known scheme (returned as the
    string), or a local :class:`Path`. Text that starts with ``scheme:`` but is not
    ``scheme://...`` is refused (:func:`cleftchunk.urls.check_syntax`), never taken for a local
    folder named ``scheme:``."""
    location = check_syntax(spec, what)
    if isinstance(location, str):
        known_scheme(location)
    return location


def known_scheme(url: str) -> str:
    """The scheme of ``url`` if cleftchunk knows it, else a CleftchunkError (no package is needed yet)."""
    scheme = url_scheme(url)
    if scheme not in SCHEMES:
        raise CleftchunkError(
            f"{url}: unknown storage scheme {scheme}://; use a local path, s3://, gs:// or https:// (read only)"
        )
    return scheme


def check_url(url: str, write: bool = False) -> str:
    """The scheme of ``url`` if cleftchunk can use it (for writing, when ``write``); else a CleftchunkError."""
    scheme = known_scheme(url)
    package, writable = SCHEMES[scheme]
    if write and not writable:
        raise CleftchunkError(f"{url}: {scheme}:// is read-only; write to a local path, s3:// or gs://")
    if importlib.util.find_spec(package) is None:
        raise CleftchunkError(f"{url}: {scheme}:// needs the {package} package: pip install {package} (or cleftchunk[cloud])")
    return scheme


def local_only(url: str, kind: str) -> CleftchunkError:
    """The error for a format that can only be read from a local file."""
    return CleftchunkError(f"{url}: {kind} sources are read from local files only; copy it here first, or convert it to Zarr")


def resolved(location: Location) -> str:
    """A stable name for a location: the absolute path of a local one, a URL as given."""
    return str(location).rstrip("/") if is_url(location) else str(Path(location).resolve())


def join(location: Location, inner: str | None) -> Location:
    """``location/inner`` for paths and URLs alike."""
    if not inner:
        return location
    if is_url(location):
        return f"{str(location).rstrip('/')}/{inner.strip('/')}"
    return Path(location) / inner


def storage_options(scheme: str) -> dict:
    """fsspec options: short connect timeouts and few retries, so a dead endpoint fails, not hangs."""
    connect = float(os.environ.get("CLEFTCHUNK_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
    if scheme == "s3":
        return {
            # Listings are not cached: the sync filesystem (exists, info) and zarr's async one do
            # not share a cache, and a stale "not there" would defeat resuming.
            "use_listings_cache": False,
            "config_kwargs": {
                "connect_timeout": connect,
                "read_timeout": READ_TIMEOUT,
                "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
            }
        }
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(connect=connect, sock_read=READ_TIMEOUT)}}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """The (synchronous) fsspec filesystem behind ``url`` and the path inside it."""
    import fsspec

    scheme = check_url(url)
    return fsspec.core.url_to_fs(url, **storage_options(scheme))


def zarr_store(location: Location, mode: str = "r") -> Any:
    """What ``zarr.open*(store=...)`` takes for ``location``: the path itself, or an FsspecStore."""
    if not is_url(location):
        return str(location)
    from zarr.storage import FsspecStore

    scheme = check_url(str(location), write=mode != "r")
    try:
        return FsspecStore.from_url(str(location).rstrip("/"), storage_options=storage_options(scheme), read_only=mode == "r")
    except storage_errors() as e:
        raise explain(e, str(location)) from e


def exists(location: Location) -> bool:
    """Whether anything is stored at ``location`` (a folder, file, or object prefix)."""
    if not is_url(location):
        found = Path(location).exists()
        if not found:
            refuse_loop(Path(location))  # exists() is False for a symlink loop: say which it is
        return found
    fs, path = filesystem(str(location))
    try:
        if url_scheme(location) in ("http", "https"):
            # No listings over HTTP: a Zarr node exists when its metadata document does.
            found = any(fs.exists(f"{path.rstrip('/')}/{name}") for name in ("zarr.json", ".zgroup", ".zarray"))
        else:
            found = bool(fs.exists(path))
    except storage_errors() as e:
        raise explain(e, str(location)) from e
    if not found:
        # fsspec answers "not there" for a host it could not even look up: say which it is
        check_host(str(location))
    return found


def refuse_loop(path: Path) -> None:
    """A CleftchunkError when ``path`` or a folder above it is a symbolic link loop."""
    import errno

    for place in (path, *path.parents):
        if place.is_symlink():
            try:
                place.resolve(strict=True)
            except RuntimeError:  # Python < 3.13 reports a loop so
                raise CleftchunkError(f"{place} is a symbolic link loop: point it at a real file or folder") from None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CleftchunkError(f"{place} is a symbolic link loop: point it at a real file or folder") from None


def _host_of(url: str) -> str | None:
    """The host a URL's requests go to: its own (http, https) or the endpoint's (s3 with
    AWS_ENDPOINT_URL); None where the library's default endpoint is used."""
    from urllib.parse import urlsplit

    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        return urlsplit(url).hostname
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if scheme == "s3" else None
    return urlsplit(endpoint).hostname if endpoint else None


def check_host(url: str) -> None:
    """A CleftchunkError when the host behind ``url`` has no address (a typo, no DNS, offline)."""
    import socket

    host = _host_of(url)
    if not host:
        return
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise CleftchunkError(f"{url}: the host {host} cannot be resolved (no address for it): check the name (and AWS_ENDPOINT_URL) and the network") from None


def check_reachable(location: Location) -> None:
    """For an object store, fail now with a one-line error if its bucket cannot be used.

    Turns the three common set-up problems (endpoint down, no credentials, bucket missing) into
    errors that name the fix, before any work is planned on them.
    """
    if not is_url(location) or url_scheme(location) in ("http", "https"):
        return
    fs, path = filesystem(str(location))
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError as e:
        raise CleftchunkError(
            f"{location}: bucket {bucket!r} does not exist{_endpoint_note()}: create it (e.g. aws s3 mb s3://{bucket}) or check the name"
        ) from e
    except storage_errors() as e:
        raise explain(e, str(location)) from e


#: Exception classes of the object-store libraries that reach callers untranslated (s3fs and
#: gcsfs turn most service errors into OSError, but not missing credentials or a refused
#: connection): module -> class names.
_LIBRARY_ERRORS = {
    "botocore.exceptions": ("BotoCoreError", "ClientError"),
    "google.auth.exceptions": ("GoogleAuthError",),
    "gcsfs.retry": ("HttpError",),
    "aiohttp": ("ClientError",),
}


def storage_errors() -> tuple[type[BaseException], ...]:
    """What reading or listing a store can raise for an unreachable, forbidden or missing object:
    OSError (TimeoutError and ConnectionError included) and the object-store libraries' own errors.

    A library's errors are only looked up once it is imported, as only then can it have raised
    them; anything else (a bug) is not caught with them.
    """
    errors: list[type[BaseException]] = [OSError]
    for module, names in _LIBRARY_ERRORS.items():
        if module in sys.modules:
            errors.extend(getattr(sys.modules[module], name) for name in names if hasattr(sys.modules[module], name))
    return tuple(errors)


def explain(error: BaseException, url: str) -> CleftchunkError:
    """A one-line CleftchunkError for a storage exception (connection, credentials, permission)."""
    name = type(error).__name__
    text = str(error).splitlines()[0] if str(error) else name
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return CleftchunkError(
            f"{url}: no credentials found ({text}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE (~/.aws/credentials); for gs://, GOOGLE_APPLICATION_CREDENTIALS"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError") or isinstance(
        error, (ConnectionError, TimeoutError)
    ):
        try:
            check_host(url)
        except CleftchunkError as unresolved:
            return unresolved
        return CleftchunkError(f"{url}: cannot reach the storage endpoint ({text}): check AWS_ENDPOINT_URL and the network")
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return CleftchunkError(f"{url}: access denied ({text}): check the credentials' permissions on this bucket")
    if isinstance(error, FileNotFoundError):
        return CleftchunkError(f"{url}: not found ({text}): check the bucket and path")
    return CleftchunkError(f"{url}: storage error ({name}: {text})")


def _endpoint_note() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" at {endpoint}" if endpoint else ""


__all__ = [
    "Location",
    "SCHEMES",
    "check_reachable",
    "check_host",
    "check_url",
    "exists",
    "explain",
    "filesystem",
    "is_url",
    "known_scheme",
    "local_file",
    "parse_location",
    "join",
    "local_only",
    "resolved",
    "storage_errors",
    "storage_options",
    "url_scheme",
    "zarr_store",
]
