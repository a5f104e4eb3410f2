"""Entry point: the ``cleftchunk`` group, and the one place where errors become one-line messages."""

from __future__ import annotations

import importlib
import sys

import click

from cleftchunk import __version__
from cleftchunk.errors import CleftchunkError
from cleftchunk_cli.messages import COMMANDS, for_command



class ErrorReportingGroup(click.Group):
    """Turns expected failures into ``error: ...`` on one line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        # the sub-command's arguments, kept to tell which of its volumes a message is about
        given = [*getattr(ctx, "_protected_args", []), *ctx.args]
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
            click.echo(f"error: {for_command(str(e), command, _params(command, given, ctx))}", err=True)
            ctx.exit(e.exit_code)
        except BrokenPipeError:  # the reader of stdout went away (`| head -1`): as SIGPIPE ends a Unix tool, quietly
            _quiet_stdout()
            ctx.exit(141)
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


def _params(command: click.Command | None, given: list[str], parent: click.Context) -> dict:
    """The arguments ``command`` was given, parsed again without checks (empty when unknown)."""
    if command is None or len(given) < 1:
        return {}
    try:
        with command.make_context(given[0], list(given[1:]), parent=parent, resilient_parsing=True) as sub:
            return dict(sub.params)
    except click.ClickException:
        return {}


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind stdout (a test's capture): nothing to flush there
        pass


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the sub-command.
    if "--debug" in args:
        args = ["--debug"] + [a for a in args if a != "--debug"]
    try:
        cli.main(args=args, prog_name="cleftchunk")
    except BrokenPipeError:  # raised while click printed help or a usage error into a closed pipe
        _quiet_stdout()
        sys.exit(141)


if __name__ == "__main__":
    main()
