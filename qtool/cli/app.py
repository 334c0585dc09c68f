"""The `qtool` command: wires subcommands together and maps errors to exit codes, in one place."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Annotated, Optional

import typer

from qtool import __version__
from qtool.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, QtoolError
from qtool.signals import Stopped

HELP = """Fit large language models onto the GPUs you have.

Examples:

  qtool estimate 70b                         # FP16 vs 8-bit vs 4-bit weights, QLoRA peak

  qtool estimate llama-3-8b --gpu rtx-4090   # does it fit? exit 3 if not

  qtool quantize meta-llama/Meta-Llama-3-8B  # -> ./Meta-Llama-3-8B-bnb-4bit

  qtool verify ./Meta-Llama-3-8B-bnb-4bit --max-vram 24GB --junit report.xml

  qtool config show llama-3-8b               # every setting and where it came from
"""

app = typer.Typer(
    name="qtool",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors and what libraries print (or set QTOOL_DEBUG=1).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show what libraries print (warnings, logs).")] = False,
) -> None:
    if debug:
        os.environ["QTOOL_DEBUG"] = "1"


def _guarded(fn):
    """A KeyboardInterrupt raised inside a command (qtool's own SIGINT handler raises Stopped) ends as
    SIGINT does (exit 130), not as click's 'Aborted!'."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            import signal

            raise Stopped(signal.SIGINT) from None

    return wrapper


def _register() -> None:
    from qtool.cli import config_cmd, estimate, quantize, verify

    app.command("estimate", help=estimate.HELP, no_args_is_help=True)(_guarded(estimate.estimate))
    app.command("quantize", help=quantize.HELP, no_args_is_help=True)(_guarded(quantize.quantize))
    app.command("verify", help=verify.HELP, no_args_is_help=True)(_guarded(verify.verify))
    app.add_typer(config_cmd.app, name="config")


_register()


def _debug() -> bool:
    return os.environ.get("QTOOL_DEBUG", "") not in ("", "0") or "--debug" in sys.argv[1:]


def _verbose(argv: list[str]) -> bool:
    return _debug() or "--debug" in argv or any(a in ("-v", "--verbose") for a in argv)


def _emit(line: str) -> None:
    from qtool.logs import stderr

    err = stderr()
    try:
        err.write(line + "\n")
        err.flush()
    except (OSError, ValueError):
        pass


def _run(argv: list[str] | None) -> tuple[int, str | None]:
    """Run the command -> (exit code, error line or None). Tracebacks only with --debug."""
    try:
        os.getcwd()
    except FileNotFoundError:  # every relative path, qtool.toml and the default --out depend on it
        if not {"-h", "--help", "--version"} & set(sys.argv[1:] if argv is None else argv):
            return EXIT_BAD_INPUT, "the working directory no longer exists (it was deleted): cd into one that does"
    try:
        rv = app(args=argv, prog_name="qtool", standalone_mode=False)
        return (rv if isinstance(rv, int) else 0), None
    except SystemExit as exc:
        if isinstance(exc.__context__, BrokenPipeError):  # typer turns a closed stdout into exit 1
            return _closed_stdout()
        return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)), None
    except Stopped as exc:
        return exc.exit_code, exc.message
    except (KeyboardInterrupt, typer.Abort):
        return EXIT_INTERRUPTED, "interrupted"
    except BrokenPipeError:
        return _closed_stdout()
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


def _usage_error(exc: Exception) -> tuple[int, str | None] | None:
    """typer's usage errors (click's UsageError and kin; typer exports only BadParameter by name) as one
    line; None for anything else."""
    if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
        return None
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `qtool estimate` alone: its help
        sys.stdout.write(ctx.get_help() + "\n")
        return exc.exit_code, None
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return exc.exit_code, " ".join(exc.format_message().split()) + where


def _closed_stdout() -> tuple[int, None]:
    """The reader went away (`qtool estimate 70b | head -1`): end quietly, as other CLI tools do. Point
    stdout at /dev/null so the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0, None


def main(argv: list[str] | None = None) -> int:
    """Entry point. The only place that turns exceptions into messages and exit codes.

    Typer runs in standalone mode: it reports usage errors itself (exit 2) and ends with SystemExit;
    our own errors and anything unexpected propagate out of it and are mapped here. A signal wins over
    whatever exception it caused on its way out (qtool.signals).
    """
    from qtool import logs, signals

    args = sys.argv[1:] if argv is None else list(argv)
    signals.install(_emit)
    logs.capture(show=_verbose(args))
    try:
        try:
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
