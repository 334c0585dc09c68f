"""One output object decides human (rich) vs JSON, and the memory units. Results go to stdout; warnings and
progress to stderr."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

from qtool.core.sizes import format_bytes


def _console(**kw):
    """A rich Console whose closed pipe raises BrokenPipeError for the CLI to end quietly (qtool.cli.app); rich's
    own on_broken_pipe would exit 1, which qtool uses for 'could not write'."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")

    return _Console(**kw)


class Output:
    def __init__(self, *, as_json: bool = False, units: str = "gib"):
        self.as_json = as_json
        self.units = units

    # Built on first use: a --json run never needs rich's Console (a fifth of `qtool estimate`'s start-up).
    @functools.cached_property
    def out(self):
        return _console(file=sys.stdout, highlight=False, soft_wrap=False)

    @functools.cached_property
    def err(self):
        from qtool.core.logs import stderr

        # the real stderr (what libraries write to sys.stderr is held: qtool.core.logs); one line per message
        return _console(file=stderr(), highlight=False, soft_wrap=True)

    def size(self, n: float | None) -> str:
        """Bytes in the units the user chose (--units): GiB/MiB by default, GB/MB with --units gb."""
        return "-" if n is None else format_bytes(n, binary=self.units != "gb")

    def result(self, data: dict[str, Any], render: Callable[[Any], None] | None = None) -> None:
        """Print the command's result: JSON (one object) or the human rendering."""
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif render is not None:
            render(self.out)

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self.err.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False)

    def info(self, message: str) -> None:
        if not self.as_json:
            self.err.print(message, highlight=False, markup=False)
