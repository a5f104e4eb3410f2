"""What a path argument looks like: a URL ``scheme://...``, a local path, or a malformed URL.

The syntax only (a base module, so that the checkpoint reader in :mod:`cleftchunk.model` uses it
too); which schemes cleftchunk can read and write is :mod:`cleftchunk.io.stores`' business, whose
:func:`~cleftchunk.io.stores.parse_location` is the rule every path argument goes through.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cleftchunk.errors import CleftchunkError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: What a URL starts with: a scheme of two or more characters and a colon. No dot, so that
#: ``file.h5:volumes/raw`` (an HDF5 dataset) is not taken for one; two characters, so that a
#: drive letter is not either.
SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+-]+):")


def url_scheme(spec: str | os.PathLike) -> str | None:
    """The scheme of ``scheme://...`` (lower case), or None for anything else."""
    match = URL.match(str(spec))
    return match.group(1).lower() if match else None


def check_syntax(spec: str | os.PathLike, what: str = "") -> str | Path:
    """``spec`` as a URL string (``scheme://`` and something after it) or a local Path; text that
    starts with ``scheme:`` but is not ``scheme://...`` is refused, never taken for a local folder
    named ``scheme:`` (``./scheme:...`` is the way to name such a local path)."""
    if isinstance(spec, Path):
        return spec
    text = os.fspath(spec)
    label = f"{what} " if what else ""
    scheme = url_scheme(text)
    if scheme:
        if not text.partition("://")[2].strip("/"):
            raise CleftchunkError(f"{label}{text} names no bucket or host: write {scheme}://bucket/path")
        return text
    prefix = SCHEME_PREFIX.match(text)
    if prefix:
        name = prefix.group(1)
        raise CleftchunkError(
            f"{label}{text} starts like a {name}:// URL but is not one: write {name}://{text[len(name) + 1:].lstrip('/')} "
            f"(two slashes), or ./{text} for a local path"
        )
    return Path(text)


def local_file(spec: str | os.PathLike, what: str) -> Path:
    """A path argument read or written as a local file only (checkpoints, JSON files, PNGs): a
    URL, well-formed or not, is refused with its text intact (never mangled into a local path)."""
    location = check_syntax(spec, what)
    if isinstance(location, str):
        raise CleftchunkError(f"{what} {location}: this is a local file only, not a URL; copy it here first (or give a local path)")
    return location
