"""`python -m qtool` and the `qtool` console script.

Signals are taken over first (qtool.core.signals), before typer, rich or anything heavy is imported, so that
Ctrl-C or a kill at any moment ends with one line and the right exit code."""

import sys


def run() -> None:
    from qtool.core import signals

    def emit(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    try:  # a signal from the moment the handlers are in: main() catches its own only once inside its try
        signals.install(emit)
        from qtool.cli.app import main

        main()  # exits itself; a signal in its first lines (its imports, before its own try) comes here
    except signals.Stopped as exc:
        signals.emit_once(f"qtool: error: {exc.message}")
        signals.finish()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    run()
