"""One output object decides human (rich) vs JSON. Results go to stdout; warnings and progress to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


class Output:
    def __init__(self, *, as_json: bool = False, quiet: bool = False):
        self.as_json = as_json
        self.quiet = quiet
        from rich.console import Console

        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=False)
        from qtool.logs import stderr

        self.err = Console(file=stderr(), highlight=False)  # the real stderr: libraries' is held (qtool.logs)

    def result(self, data: dict[str, Any], render: Callable[[Any], None] | None = None) -> None:
        """Print the command's result: JSON (one object) or the human rendering."""
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif render is not None:
            render(self.out)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)

    def info(self, message: str) -> None:
        if not self.quiet and not self.as_json:
            self.err.print(message, highlight=False)
