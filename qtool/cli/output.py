"""One output object decides human (rich) vs JSON, and the memory units. Results go to stdout; warnings and
progress to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from qtool.sizes import format_bytes


class Output:
    def __init__(self, *, as_json: bool = False, units: str = "gib"):
        self.as_json = as_json
        self.units = units
        from rich.console import Console

        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=False)
        self.err = Console(file=sys.stderr, highlight=False)

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
