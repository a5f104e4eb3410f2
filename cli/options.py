"""The command line's shared option rules: one Z,Y,X parser, one label-kind choice, one threshold check.

Every command that takes a triple (chunks, block shapes, voxel sizes, offsets, halos, model inputs)
parses it here, so that ``--chunks 16,256,256``, ``--chunks 16x256x256`` and ``--halo 0`` (one
number: the same on every axis) mean the same thing everywhere.
"""

from __future__ import annotations

import functools
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


# -- numeric options: every one has a range, checked here -------------------------------------------
class Number(click.ParamType):
    """An int or float option within [low, high] (``open_low``/``open_high``: the bound itself is
    refused), always finite. The message names the flag, the value and the range (``message``:
    the library's own wording of the same rule, formatted with ``number``)."""

    def __init__(self, cast: type = int, low: float | None = None, high: float | None = None, open_low: bool = False,
                 open_high: bool = False, example: str | None = None, message: str | None = None):
        self.cast, self.low, self.high, self.open_low, self.open_high, self.example = cast, low, high, open_low, open_high, example
        self.message = message
        self.name = "integer" if cast is int else "number"

    def describe(self) -> str:
        parts = []
        if self.low == 0:
            parts.append("positive" if self.open_low else "non-negative")
        elif self.low is not None:
            parts.append(("above " if self.open_low else "at least ") + f"{self.low:g}")
        if self.high is not None:
            parts.append(("below " if self.open_high else "at most ") + f"{self.high:g}")
        return " and ".join(parts) or "finite"

    def convert(self, value, param, ctx):
        flag = max(param.opts, key=len) if param is not None and param.opts else "value"
        example = f", e.g. {flag} {self.example}" if self.example else ""
        try:
            number = self.cast(value)
            if self.cast is int and isinstance(value, float) and number != value:
                raise ValueError
        except (TypeError, ValueError):
            raise CleftchunkError(f"{flag} {value!r} must be {'a whole number' if self.cast is int else 'a number'}{example}") from None
        below = self.low is not None and (number <= self.low if self.open_low else number < self.low)
        above = self.high is not None and (number >= self.high if self.open_high else number > self.high)
        if not math.isfinite(number) or below or above:
            raise CleftchunkError(self.message.format(number=number) if self.message else f"{flag} {value}: must be {self.describe()}{example}")
        return number


def count(low: int = 1, high: int | None = None, example: str | None = None, message: str | None = None) -> Number:
    """A whole number of things (iterations, threads, voxels, ...): at least ``low`` (default 1)."""
    return Number(int, low, high, example=example, message=message)


def amount(low: float = 0, high: float | None = None, open_low: bool = False, open_high: bool = False, example: str | None = None,
           message: str | None = None) -> Number:
    """A finite real number in a range (rates, sizes in MiB, weights, ...)."""
    return Number(float, low, high, open_low, open_high, example, message)


#: Probability thresholds of uint8 probabilities (p*255), for segment, threshold and evaluate.
THRESHOLD = amount(0, 255, open_low=True, example="128")
#: Shares in [0, 1] (rates, difficulty, overlap...).
SHARE = amount(0, 1, example="0.5")


IGNORE_FRAME_HELP = ("Use the volumes voxel for voxel from their first voxels, whatever voxel sizes and offsets their "
                     "metadata state (default: they must share a voxel size and are placed by their offsets).")


def ignore_frame_option(function):
    """``--ignore-frame``: for commands that combine volumes (cleftchunk.frames)."""
    return click.option("--ignore-frame", is_flag=True, help=IGNORE_FRAME_HELP)(function)


#: Library parameter names whose command-line option is named differently.
LIBRARY_NAMES = {"window": "model_input", "compile": "compile_model", "input_size": "input_size", "kind": "pred_kind"}

# (not after # or &: a precomputed spec's own #mip=..&roi=.. selection stays as written)
_PARAMETER = re.compile(r"(?<![\w#&-])([a-z][a-z0-9_]*)=(\S*?)(?=[\s,;:)]*(?:\s|$))")


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


# -- the run vocabulary: the same flags, meaning and help on every block-wise command ------------
#: Batch systems of --cluster (cleftchunk.run.jobqueue.SYSTEMS; listed here so that --help does not import it).
BATCH_SYSTEMS = ("slurm", "pbs", "lsf", "sge")
#: Help texts of the run options, defined once.
RUN_HELP = {
    "workers": "Worker processes of a local Dask cluster; 0 runs on threads of this process (the default without GPUs).",
    "threads": "Task threads: of each worker process (default 1), or of this process with --workers 0 (default: one per core).",
    "scheduler": "Address of a running Dask scheduler to run on (tcp://HOST:PORT, or tls://HOST:PORT with the --tls-* options).",
    "listen": "Interface a local Dask cluster listens on (default 127.0.0.1: nothing beyond this machine can connect).",
    "cluster": "Run on batch jobs of this system (dask-jobqueue), cancelled when the command ends; queue, account, walltime from ~/.config/dask/jobqueue.yaml.",
    "jobs": "Batch jobs to submit with --cluster (each: --gpus GPUs, one worker each, or --workers CPU worker processes).",
    "job_memory": "Memory of each batch job, e.g. 32GB (default: jobqueue.yaml's).",
    "job_extra": "A directive added to each batch job's script, repeatable, e.g. --job-extra=--partition=gpu (SLURM).",
    "cluster_tcp": "Let --cluster's scheduler take plain TCP from compute nodes (default: TLS with temporary certificates).",
    "tls_ca_file": "CA certificate (PEM) that signed the cluster's certificates (with --scheduler tls://..., --listen or --cluster).",
    "tls_cert": "This client's certificate (PEM) (with --scheduler tls://..., --listen or --cluster).",
    "tls_key": "This client's private key (PEM) (with --scheduler tls://..., --listen or --cluster).",
    "gpus": "GPUs to use, one worker process each (default: all of this machine's; 0: CPU only; with --cluster: per job).",
    "block_shape": "Block of work Z,Y,X in voxels, a multiple of the output chunks (default: the command's, see --dry-run).",
    "dry_run": "Print the plan (blocks, tasks, output bytes, memory per worker thread); run nothing, create nothing.",
    "overwrite": "Replace an existing output (otherwise the same command resumes it, and other parameters are refused).",
    "progress": "Progress bars on stderr (default: when stderr is a terminal).",
    "retries": "Retries of a failing block before it is reported as failed.",
}

_RUN_KEYS = tuple(RUN_HELP)


def _run_decorators(gpus: bool) -> list:
    path = click.Path(dir_okay=False)
    options = [
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help=RUN_HELP["workers"]),
        click.option("--threads", type=click.IntRange(min=1), help=RUN_HELP["threads"]),
        click.option("--scheduler", metavar="ADDRESS", help=RUN_HELP["scheduler"]),
        click.option("--listen", metavar="HOST", help=RUN_HELP["listen"]),
        click.option("--cluster", type=click.Choice(BATCH_SYSTEMS, case_sensitive=False), help=RUN_HELP["cluster"]),
        click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help=RUN_HELP["jobs"]),
        click.option("--job-memory", metavar="SIZE", help=RUN_HELP["job_memory"]),
        click.option("--job-extra", metavar="DIRECTIVE", multiple=True, help=RUN_HELP["job_extra"]),
        click.option("--cluster-tcp", is_flag=True, help=RUN_HELP["cluster_tcp"]),
        click.option("--tls-ca-file", type=path, help=RUN_HELP["tls_ca_file"]),
        click.option("--tls-cert", type=path, help=RUN_HELP["tls_cert"]),
        click.option("--tls-key", type=path, help=RUN_HELP["tls_key"]),
    ]
    if gpus:
        options.append(click.option("--gpus", "-g", type=click.IntRange(min=0), help=RUN_HELP["gpus"]))
    options += [
        click.option("--block-shape", metavar="Z,Y,X", help=RUN_HELP["block_shape"]),
        click.option("--dry-run", is_flag=True, help=RUN_HELP["dry_run"]),
        click.option("--overwrite", is_flag=True, help=RUN_HELP["overwrite"]),
        click.option("--progress/--no-progress", default=None, help=RUN_HELP["progress"]),
        click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help=RUN_HELP["retries"]),
        # spellings of earlier releases: a one-line error naming today's flag (see CHANGELOG.md)
        click.option("--processes", is_flag=True, hidden=True, expose_value=False, callback=_gone("--processes", "--workers N (N worker processes)")),
        click.option("--quiet", is_flag=True, hidden=True, expose_value=False, callback=_gone("--quiet", "--no-progress")),
    ]
    return options


def _gone(flag: str, instead: str):
    """A click callback refusing a removed flag, naming what replaced it."""

    def refuse(ctx, param, value):
        if value:
            raise CleftchunkError(f"{flag} is gone: use {instead} (see CHANGELOG.md)")
        return value

    return refuse


def run_options(gpus: bool = False):
    """Add the run options to a click command; the command receives them as one ``run`` value
    (:class:`cleftchunk.run.options.RunOptions`), built and checked here."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(**kwargs):
            return function(run=run_options_of(kwargs), **kwargs)

        for option in reversed(_run_decorators(gpus)):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def run_options_of(kwargs: dict):
    """Pop the run options out of a command's ``kwargs`` into a RunOptions."""
    import sys

    from cleftchunk.run.cluster import tls_security
    from cleftchunk.run.options import RunOptions

    values = {key: kwargs.pop(key, None) for key in _RUN_KEYS}
    tls = (values["tls_ca_file"], values["tls_cert"], values["tls_key"])
    if any(tls) and not (values["scheduler"] or values["listen"] or values["cluster"]):
        raise CleftchunkError("--tls-ca-file/--tls-cert/--tls-key secure a cluster: use them with --scheduler tls://HOST:PORT or --listen")
    progress = values["progress"]
    run = RunOptions(
        workers=values["workers"],
        threads=values["threads"],
        scheduler=values["scheduler"],
        security=tls_security(*tls) if any(tls) else None,
        gpus=values["gpus"],
        listen=values["listen"],
        block_shape=positive_zyx(values["block_shape"], "--block-shape"),
        dry_run=values["dry_run"],
        overwrite=values["overwrite"],
        progress=sys.stderr.isatty() if progress is None else progress,
        retries=values["retries"],
        cluster=values["cluster"],
        jobs=values["jobs"],
        job_memory=values["job_memory"],
        job_extra=tuple(values["job_extra"]),
        cluster_tcp=values["cluster_tcp"],
    )
    if run.cluster and not run.dry_run:  # before any output is created
        from cleftchunk.run.jobqueue import preflight

        preflight(run)
    return run


# -- which part of a precomputed source: --mip and --roi, one rule for every command that reads one --
SELECTION_HELP = {
    "mip": "Scale of a precomputed:// input: its index in the info file (0: full resolution) or its voxel size Z,Y,X in nm, e.g. 40,8,8.",
    "roi": "Box of a precomputed:// input, Z0:Z1,Y0:Y1,X0:X1 in voxels of that scale (the volume's coordinates, as neuroglancer shows them).",
}


def source_selection(argument: str):
    """``--mip`` and ``--roi`` for the command's ``argument`` (a volume spec): they are written
    into a precomputed spec's ``#mip=..&roi=..`` selection (cleftchunk.io.precomputed), which
    every reader of the spec then honours; the box is checked here with the one box parser."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(**kwargs):
            from cleftchunk.io.precomputed import parse_box, with_selection

            mip, roi = kwargs.pop("mip", None), kwargs.pop("roi", None)
            if roi is not None:
                parse_box(roi, "--roi")
            if kwargs.get(argument) is not None:
                kwargs[argument] = with_selection(kwargs[argument], mip, roi)
            elif mip is not None or roi is not None:
                raise CleftchunkError("--mip and --roi choose a part of a precomputed:// input: give the input too")
            return function(**kwargs)

        wrapper = click.option("--roi", metavar="Z0:Z1,Y0:Y1,X0:X1", help=SELECTION_HELP["roi"])(wrapper)
        return click.option("--mip", metavar="N|Z,Y,X", help=SELECTION_HELP["mip"])(wrapper)

    return decorate
