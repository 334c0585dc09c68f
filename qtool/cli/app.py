"""The `qtool` command: wires subcommands together and maps errors to exit codes, in one place.

(No `from __future__ import annotations` here: the Typer callback below is defined inside a function, and
Typer must see its annotations as objects.)"""

import functools
import os
import signal
import sys
from typing import Annotated, Optional

from qtool import __version__
from qtool.cli.fast import parse_estimate, run_estimate
from qtool.core.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, QtoolError
from qtool.core.signals import Stopped

HELP = """Fit large language models onto the GPUs you have.

Examples:

  qtool estimate 70b                       # FP16 vs 8-bit vs 4-bit, QLoRA peak
  qtool estimate llama-3-8b --gpu rtx-4090 # does it fit? exit 3 if not
  qtool quantize meta-llama/Meta-Llama-3-8B  # -> ./Meta-Llama-3-8B-bnb-4bit
  qtool verify ./Meta-Llama-3-8B-bnb-4bit --max-vram 24GB --junit v.xml
  qtool config show llama-3-8b             # every setting, where it came from
"""

EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for `yes | head -1`


class _PipeClosed(Exception):
    """Stdout was closed by the reader (`qtool estimate 70b | head -1`). Not an OSError, so click's own EPIPE
    handling (exit 1, which means 'could not write' here) does not take it."""


def _guarded(fn):
    """A KeyboardInterrupt raised inside a command (qtool's own SIGINT handler raises Stopped) ends as SIGINT
    does (exit 130), not as click's 'Aborted!'; a closed stdout ends quietly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Stopped(signal.SIGINT) from None
        except BrokenPipeError:
            raise _PipeClosed() from None

    return wrapper


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not report the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a test's captured stdout)
        pass


def prose(text: str) -> str:
    """Help text as Typer's rich mode shows it well: the lines of a prose paragraph joined (rich wraps them to
    the terminal), example lines (indented) kept as they are."""
    paragraphs = text.strip("\n").split("\n\n")
    return "\n\n".join(p if p.startswith("  ") else " ".join(p.split("\n")) for p in paragraphs) + "\n"


@functools.lru_cache(maxsize=None)
def typer_app():
    """The Typer application: every command, --help, completion. Built on first use, so the fast lane
    (qtool.cli.fast) never imports Typer."""
    import typer

    from qtool.cli import config_cmd, estimate, quantize, verify

    app = typer.Typer(
        name="qtool",
        help=HELP,
        no_args_is_help=True,
        add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def version_flag(value: bool) -> None:
        if value:
            typer.echo(f"qtool {__version__}")
            raise typer.Exit()

    @app.callback()
    def root(
        version: Annotated[Optional[bool], typer.Option(
            "--version", callback=version_flag, is_eager=True, metavar="", help="Show the version and exit.")] = None,
        debug: Annotated[bool, typer.Option(
            "--debug", metavar="", help="Show tracebacks and what libraries print (or set QTOOL_DEBUG=1).")] = False,
        verbose: Annotated[bool, typer.Option(
            "--verbose", "-v", metavar="", help="Show what libraries print (their warnings and logs).")] = False,
    ) -> None:
        if debug:
            os.environ["QTOOL_DEBUG"] = "1"

    app.command("estimate", help=prose(estimate.HELP), no_args_is_help=True)(_guarded(estimate.typer_command()))
    app.command("quantize", help=prose(quantize.HELP), no_args_is_help=True)(_guarded(quantize.quantize))
    app.command("verify", help=prose(verify.HELP), no_args_is_help=True)(_guarded(verify.verify))
    config_cmd.app.command("show", help=prose(config_cmd.SHOW_HELP))(_guarded(config_cmd.show))
    app.add_typer(config_cmd.app, name="config")
    return app


def _debug() -> bool:
    return os.environ.get("QTOOL_DEBUG", "") not in ("", "0") or "--debug" in sys.argv[1:]


def _verbose(argv: list[str]) -> bool:
    """Whether library output is shown: -v/--debug, and typer's completion options, whose messages ("Shell sh
    not supported") are the answer."""
    return (_debug() or "--debug" in argv or any(a in ("-v", "--verbose") for a in argv)
            or any(a.startswith(("--show-completion", "--install-completion")) for a in argv))


def _emit(line: str) -> None:
    from qtool.core.logs import stderr

    err = stderr()
    try:
        err.write(line + "\n")
        err.flush()
    except (OSError, ValueError):
        pass


def _run(argv: list[str] | None) -> tuple[int, str | None]:
    """Run the command -> (exit code, error line or None). Tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    try:
        os.getcwd()
    except FileNotFoundError:  # every relative path, qtool.toml and the default --out depend on it
        if not {"-h", "--help", "--version"} & set(args):
            return EXIT_BAD_INPUT, "the working directory no longer exists (it was deleted): cd into one that does"
    try:
        fast = parse_estimate(args)
        if fast is not None:
            _guarded(run_estimate)(*fast)  # the same command, without Typer's per-option start-up cost
            return 0, None
        rv = typer_app()(args=argv, prog_name="qtool", standalone_mode=False)
        return (rv if isinstance(rv, int) else 0), None
    except SystemExit as exc:
        if isinstance(exc.__context__, BrokenPipeError):  # typer turns a closed stdout into exit 1
            return _pipe_closed()
        return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)), None
    except Stopped as exc:
        return exc.exit_code, exc.message
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, "interrupted"
    except (_PipeClosed, BrokenPipeError):
        return _pipe_closed()
    except QtoolError as exc:
        if _debug():
            raise
        return exc.exit_code, str(exc)
    except Exception as exc:
        usage = _usage_error(exc)
        if usage is not None:
            return usage
        if _debug():
            raise
        return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


def _pipe_closed() -> tuple[int, None]:
    _quiet_stdout()
    return EXIT_PIPE_CLOSED, None


def _usage_error(exc: Exception) -> tuple[int, str | None] | None:
    """Typer's usage errors (click's UsageError and kin, and Abort; typer exports only some by name) as one
    line; None for anything else."""
    if type(exc).__name__ == "Abort":
        return EXIT_INTERRUPTED, "interrupted"
    if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
        return None
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `qtool estimate` alone: its help
        sys.stdout.write(ctx.get_help() + "\n")
        return exc.exit_code, None
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return exc.exit_code, " ".join(exc.format_message().split()) + where


def main(argv: list[str] | None = None) -> int:
    """Entry point. The only place that turns exceptions into messages and exit codes.

    Typer runs in non-standalone mode: its usage errors come back as exceptions and are printed here as
    one line, like every other error. A signal wins over whatever exception it caused on its way out
    (qtool.core.signals); what libraries print to stderr is held unless -v/--debug (qtool.core.logs).
    """
    from qtool.core import logs
    from qtool.core import signals

    args = sys.argv[1:] if argv is None else list(argv)
    signals.install(_emit)
    logs.capture(show=_verbose(args))
    try:
        try:
            signals.check()  # a signal in the imports before main() whose Stopped something swallowed
            code, line = _run(argv)
        except BaseException:  # --debug: the traceback is the message
            if signals.received() is None:
                raise
            code, line = 1, None
        code, signal_line = signals.outcome(code)
        if signals.received() is not None:
            line = signal_line
        if line is not None:
            signals.emit_once(f"qtool: error: {line}")
        signals.finish()
    finally:
        if argv is not None:  # in-process callers (tests) run many commands; a real process keeps both
            logs.release()
            signals.uninstall()
    if argv is None:
        sys.exit(code)
    return code
