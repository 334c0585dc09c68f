"""The `qtool` command: wires subcommands together and maps errors to exit codes, in one place.

(No `from __future__ import annotations` here: the Typer callback below is defined inside a function, and
Typer must see its annotations as objects.)"""

import functools
import os
import signal
import sys
import threading
from typing import Annotated, Optional

from qtool import __version__
from qtool.cli.fast import parse_estimate, run_estimate
from qtool.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, Interrupted, QtoolError, Terminated

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
    """Ctrl-C inside a command becomes an Interrupted error (exit 130), not click's 'Aborted!'; a closed stdout
    ends quietly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None
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
            "--debug", metavar="", help="Show tracebacks for errors (or set QTOOL_DEBUG=1).")] = False,
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


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"qtool: error: {message}\n")
    sys.stderr.flush()
    return code


def _on_sigterm(signum, frame) -> None:
    # raised in the main thread wherever it is, so staging directories unwind exactly as for Ctrl-C
    raise Terminated("terminated (SIGTERM)")


def main(argv: list[str] | None = None) -> int:
    """Entry point. The only place that turns exceptions into messages and exit codes.

    Typer runs in standalone mode: it reports usage errors itself (exit 2) and ends with SystemExit;
    our own errors and anything unexpected propagate out of it and are mapped here.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        fast = parse_estimate(sys.argv[1:] if argv is None else argv)
        if fast is not None:
            _guarded(run_estimate)(*fast)  # the same command, without Typer's per-option start-up cost
        else:
            typer_app()(args=argv, prog_name="qtool")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except QtoolError as exc:
        if _debug():
            raise
        code = _fail(str(exc), exc.exit_code)
    except _PipeClosed:
        _quiet_stdout()
        code = EXIT_PIPE_CLOSED
    except KeyboardInterrupt:
        code = _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if _debug():
            raise
        code = _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_INTERNAL)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if argv is None:
        sys.exit(code)
    return code
