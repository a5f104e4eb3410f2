"""The message catalogue's last step: a library message, as the command that printed it says it.

Library messages name parameters (``overwrite=True``, rewritten by :func:`options.in_flags`) and
a few flags of the commands most of their callers are (``--kind``, ``--dataset``, ``--channel``).
Here a flag the printing command does not have becomes the one it has for the same thing
(evaluate's ``--pred-kind``/``--gt-kind``, train's ``--label-mode``), or the way to get there
(``FILE:DATASET``, ``cleftchunk convert --channel K``), so that every hint can be followed as
written. tests/test_bad_input.py checks every flag every case's message names.
"""

from __future__ import annotations

import re

import click

from cleftchunk_cli.options import in_flags

#: Group options, valid on every command line.
GROUP_FLAGS = frozenset({"--debug", "--help", "--version"})
#: Label kinds (--kind) as train's --label-mode names them.
LABEL_MODES = {"ids": "cremi", "cremi": "cremi", "main": "zero-background", "zero-background": "zero-background", "mask": "nonzero", "nonzero": "nonzero"}
_KIND = re.compile(r"--kind\b( ([a-z-]+(?:\|[a-z-]+)*))?")
#: Sub-command modules of the command line (cli/main.py imports them); each defines a click command named ``command``.
COMMANDS = ("convert", "info", "synth", "train", "count_clefts", "predict", "segment", "threshold", "export", "evaluate", "view", "demo")
COMMAND_NAMES = frozenset(COMMANDS)
#: A hint in parentheses for another command, e.g. "(evaluate: --pred-kind/--gt-kind)".
_OTHER_COMMAND = re.compile(r"\s*\((\w+): [^()]*\)")
#: Flags in a quoted command line (`cleftchunk convert --channel 0`) belong to that command.
QUOTED = re.compile(r"`cleftchunk [^`]*`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def flags_of(command: click.Command) -> set[str]:
    options = [p for p in command.params if isinstance(p, click.Option)]
    return set(GROUP_FLAGS) | {opt for p in options for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}


def unknown_flags(message: str, command: click.Command) -> set[str]:
    """The flags ``message`` names that ``command`` does not have (quoted other commands aside)."""
    return set(FLAG.findall(QUOTED.sub("", message))) - flags_of(command)


def for_command(message: str, command: click.Command | None, params: dict | None = None) -> str:
    """``message`` in ``command``'s own flags; ``params``: the command's arguments as given, to
    tell which of its volumes a message is about."""
    message = in_flags(message, command)
    if command is None:
        return message
    flags = flags_of(command)
    message = _OTHER_COMMAND.sub(lambda m: "" if m.group(1) in COMMAND_NAMES - {command.name} else m.group(0), message)
    if "--kind" not in flags:
        message = _KIND.sub(lambda m: _kind_flag(m, flags, message, params or {}), message)
    if "--dataset" not in flags:
        message = message.replace("with --dataset or FILE:DATASET", "with FILE:DATASET").replace("--dataset or ", "")
    if "--channel" not in flags:
        message = re.sub(r"with --channel (\w+)", r"with `cleftchunk convert --channel \1` first", message)
    return message


def _kind_flag(match: re.Match, flags: set[str], message: str, params: dict) -> str:
    values = match.group(2)
    if "--label-mode" in flags:  # train: the same kinds under their label-mode names
        if not values:
            return "--label-mode"
        if not any(v in LABEL_MODES for v in values.split("|")):  # prob: no label mode reads probabilities
            return "give cleft labels as --labels (train learns from labels, not probabilities)"
        return "--label-mode " + "|".join(dict.fromkeys(LABEL_MODES.get(v, v) for v in values.split("|")))
    if "--gt-kind" in flags:  # evaluate: the kind of the volume the message is about
        gt, pred = (str(params.get(k) or "") for k in ("gt", "pred"))
        about_gt = bool(gt) and gt.rstrip("/") in message and not (pred and message.find(pred) != -1 and message.find(pred) < message.find(gt))
        name = "--gt-kind" if about_gt or not (pred and pred in message) else "--pred-kind"
        return f"{name}{match.group(1) or ''}"
    # no flag for it (view, info, convert): the metadata attribute every stage reads the kind from
    return f"the attribute cleft_kind={match.group(2)}" if match.group(2) else "the attribute cleft_kind"
