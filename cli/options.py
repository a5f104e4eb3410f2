"""The command line's shared option rules: one Z,Y,X parser, one label-kind choice, one threshold check.

Every command that takes a triple (chunks, block shapes, voxel sizes, offsets, halos, model inputs)
parses it here, so that ``--chunks 16,256,256``, ``--chunks 16x256x256`` and ``--halo 0`` (one
number: the same on every axis) mean the same thing everywhere.
"""

from __future__ import annotations

import math
import re

import click

from cleftchunk.errors import CleftchunkError
from cleftchunk.labels import ALIASES, KINDS

#: What a volume holds (cleftchunk.labels): auto reads its metadata; the aliases are CREMI's and
#: PyTorch Connectomics' names (cremi = ids, zero-background = main).
KIND_CHOICE = click.Choice(("auto",) + KINDS + tuple(ALIASES))


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


#: Library parameter names whose command-line option is named differently.
LIBRARY_NAMES = {"window": "model_input", "compile": "compile_model", "input_size": "input_size", "kind": "pred_kind"}

_PARAMETER = re.compile(r"(?<![\w-])([a-z][a-z0-9_]*)=(\S*?)(?=[\s,;:)]*(?:\s|$))")


def in_flags(message: str, command: click.Command | None) -> str:
    """A library message with its ``name=value`` parameters written as ``command``'s flags.

    Only names that are options of ``command`` change; a flag (``overwrite=True``) becomes
    ``--overwrite``, any other option ``--block-shape 32,512,512``."""
    if command is None:
        return message
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    for library_name, option_name in LIBRARY_NAMES.items():
        if option_name in options and library_name not in options:
            options[library_name] = options[option_name]

    def flag(match: re.Match) -> str:
        option = options.get(match.group(1))
        if option is None:
            return match.group(0)
        name = max(option.opts, key=len)
        if option.is_flag:
            return name if match.group(2) != "False" else (option.secondary_opts or [name])[0]
        return f"{name} {match.group(2)}"

    return _PARAMETER.sub(flag, message)
