"""Entry point: the ``cleftchunk`` group, and the one place where errors become one-line messages."""

from __future__ import annotations

import importlib
import sys

import click

from cleftchunk import __version__
from cleftchunk.errors import CleftchunkError
from cleftchunk_cli.options import in_flags

#: Sub-command modules of this package; each defines a click command named ``command``.
COMMANDS = ["convert", "info", "synth", "train", "count_clefts", "predict", "segment", "threshold", "export", "evaluate", "view", "demo"]


class ErrorReportingGroup(click.Group):
    """Turns expected failures into ``error: ...`` on one line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a malformed flag value: one line, like every other mistake
            if debug:
                raise
            command = e.ctx.command_path if e.ctx else "cleftchunk"
            click.echo(f"error: {e.format_message()} (see {command} --help)", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CleftchunkError as e:
            if debug:
                raise
            command = self.commands.get(ctx.invoked_subcommand or "")
            click.echo(f"error: {in_flags(str(e), command)}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("error: interrupted; re-run the same command to resume where it stopped", err=True)
            ctx.exit(130)
        except MemoryError:
            if debug:
                raise
            click.echo("error: out of memory; use smaller blocks / batch size or fewer workers", err=True)
            ctx.exit(1)
        except OSError as e:
            if debug:
                raise
            hint = "free disk space, then re-run to resume" if getattr(e, "errno", None) == 28 else "check the path and permissions"
            click.echo(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or type(e).__name__}): {hint}", err=True)
            ctx.exit(1)
        except Exception as e:  # a bug: say so briefly, the traceback is one flag away
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: unexpected {type(e).__name__}: {first} (re-run with --debug for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cleftchunk")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Synaptic cleft detection in EM volumes of any size (chunked Zarr + Dask + PyTorch)."""


for _name in COMMANDS:
    cli.add_command(importlib.import_module(f"cleftchunk_cli.{_name}").command)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the sub-command.
    if "--debug" in args:
        args = ["--debug"] + [a for a in args if a != "--debug"]
    cli.main(args=args, prog_name="cleftchunk")


if __name__ == "__main__":
    main()
