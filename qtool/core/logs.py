"""What libraries print goes through qtool.

bitsandbytes, transformers, huggingface_hub and torch write warnings, log records and progress bars to
stderr (bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on
AVX512-BF16 CPUs; transformers its `[transformers] ...` advice and loading bars; huggingface_hub its retry
lines; torch its UserWarnings). qtool promises one line per failure, so while a command runs `sys.stderr`
is a `LibraryStream`: text written to it is kept in memory (the last `KEEP_BYTES`) and shown only with
`--debug` or `-v`/`--verbose`. Python warnings and logging reach it too, whoever created the handler,
because they write to whatever `sys.stderr` is at the time of writing or at handler creation (which
happens at import, inside the command).

qtool's own messages (the error line, warnings, progress) go to `stderr()`, the real stream.
Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator

KEEP_BYTES = 64 * 1024

_real = None  # the stream qtool writes to
_show = False  # forward library output (debug / verbose)
_kept: deque[str] = deque()
_kept_bytes = 0
_showwarning = None


class LibraryStream(io.TextIOBase):
    """A stand-in for sys.stderr that holds what libraries write; forwards it only when asked to."""

    def write(self, text: str) -> int:
        global _kept_bytes
        if isinstance(text, (bytes, bytearray)):  # click.echo writes bytes where a stream has no .buffer
            text = bytes(text).decode("utf-8", "replace")
        elif not isinstance(text, str):
            text = str(text)
        if _show:
            target = _real or sys.__stderr__
            try:
                target.write(text)
                target.flush()
            except (OSError, ValueError):
                pass
        _kept.append(text)
        _kept_bytes += len(text)
        while _kept_bytes > KEEP_BYTES and len(_kept) > 1:
            _kept_bytes -= len(_kept.popleft())
        return len(text)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # no live progress bars or colours from libraries

    def flush(self) -> None:
        pass

    @property
    def encoding(self) -> str:
        return "utf-8"


def stderr():
    """The stream for qtool's own messages."""
    return _real if _real is not None else sys.stderr


def captured() -> str:
    """What libraries wrote during this command (the last KEEP_BYTES)."""
    return "".join(_kept)


def capture(*, show: bool) -> None:
    """From now on, library output to stderr is held (or forwarded when `show`)."""
    global _real, _show, _kept_bytes
    if _real is None:
        _real = sys.stderr
        sys.stderr = LibraryStream()
    _show = show
    _kept.clear()
    _kept_bytes = 0
    if not show:
        # Libraries that read these at import keep quiet at the source as well.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    global _showwarning
    if _showwarning is None:
        _showwarning = warnings.showwarning
        warnings.showwarning = _show_warning
    warnings.simplefilter("always" if show else "ignore")


@contextlib.contextmanager
def passthrough() -> Iterator[None]:
    """Let library output through while this block runs (a download's progress bars the user asked for)."""
    global _show
    was = _show
    _show = True
    try:
        yield
    finally:
        _show = was


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings go to the held stream, whatever showwarning a host installed (pytest records them)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def release() -> None:
    """Put the real stderr back (in-process callers run several commands)."""
    global _real, _showwarning
    if _showwarning is not None:
        warnings.showwarning = _showwarning
        _showwarning = None
    if _real is not None and isinstance(sys.stderr, LibraryStream):
        sys.stderr = _real
    _real = None
    warnings.resetwarnings()
