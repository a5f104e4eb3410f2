"""The command line's shared option rules: one Z,Y,X parser, one label-kind choice, one threshold check.

Every command that takes a triple (chunks, block shapes, voxel sizes, offsets, halos, model inputs)
parses it here, so that ``--chunks 16,256,256``, ``--chunks 16x256x256`` and ``--halo 0`` (one
number: the same on every axis) mean the same thing everywhere.
"""

from __future__ import annotations

import math

import click

from cleftchunk.errors import CleftchunkError
from cleftchunk.labels import KINDS

KIND_CHOICE = click.Choice(("auto",) + KINDS)


def parse_zyx(text: str | None, option: str, cast: type = int, minimum: float | None = None, exclusive: bool = False) -> tuple | None:
    """``"40,4,4"`` / ``"40x4x4"`` / ``"8"`` → a tuple of three numbers; None stays None.

    ``minimum``: the smallest allowed value (``exclusive``: values must be above it). Non-finite
    numbers are always refused. Errors name the option and show a valid example.
    """
    if text is None:
        return None
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(cast(p) for p in parts)
    except ValueError:
        what = "integers" if cast is int else "numbers"
        raise CleftchunkError(f"{option} {text!r} must be {what} Z,Y,X, e.g. {option} 16,256,256") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise CleftchunkError(f"{option} {text!r} has {len(values)} values: write 3 values Z,Y,X")
    if not all(math.isfinite(v) for v in values):
        raise CleftchunkError(f"{option} {text!r} must hold finite numbers")
    if minimum is not None:
        bad = [v for v in values if (v <= minimum if exclusive else v < minimum)]
        if bad:
            bound = ("positive" if minimum == 0 else f"above {minimum:g}") if exclusive else f"at least {minimum:g}"
            raise CleftchunkError(f"{option} {text!r}: every value must be {bound}")
    return values


def positive_zyx(text: str | None, option: str, cast: type = int) -> tuple | None:
    """A shape or size: three numbers above 0."""
    return parse_zyx(text, option, cast, minimum=0, exclusive=True)


def parse_fraction(text: str | None, option: str) -> float | None:
    """``"1/255"`` or ``"0.00392"`` → a positive finite float; None stays None."""
    if text is None:
        return None
    try:
        top, _, bottom = str(text).partition("/")
        value = float(top) / float(bottom) if bottom else float(top)
    except (ValueError, ZeroDivisionError):
        raise CleftchunkError(f"{option} {text!r} must be a number or a fraction, e.g. {option} 1/255") from None
    if not (math.isfinite(value) and value > 0):
        raise CleftchunkError(f"{option} {text!r} must be positive and finite, e.g. {option} 1/255")
    return value


def check_threshold(threshold: float) -> float:
    if not 0 < threshold <= 255:
        raise CleftchunkError(f"--threshold {threshold:g} is outside (0, 255]: it applies to uint8 probabilities (p*255)")
    return threshold
