"""SIGINT, SIGTERM and SIGHUP end a run the same way at any moment.

The rule: exit 130 (SIGINT), 143 (SIGTERM) or 129 (SIGHUP) with one line, nothing at the destination and no
staging folder; or, if the work was already complete and renamed into place, exit 0 with nothing printed.

How it holds at every moment:
  * The handlers raise `Stopped`, a BaseException: library code that catches `Exception` (bitsandbytes'
    `_try_torch_compile`, transformers' import fallbacks) cannot swallow it, and `finally`/`except
    BaseException` cleanups (the staging folder) still run.
  * Whatever exception a signal turns into on its way out (an ImportError or RecursionError from a
    half-finished import, a wrapped ConfigError), the CLI asks `received()` and reports the signal.
  * Only the first signal raises; later ones are recorded, so they cannot cut a cleanup short. If that first
    `Stopped` is swallowed on its way out (a library's bare `except:`), `check()` raises it again where the
    run goes on: as a command starts and before the final rename.
  * A signal that comes while a module is being imported is held until the import is over: torch's extension
    modules run Python from C++ as they initialise (`torch._C._c10d_init()`), and an exception raised there
    cannot cross the C++ frames; pybind11 ends the process with `terminate` (seen: SIGTERM 0.57 s into
    `qtool quantize`, exit -6 and a C++ message). The watchdog delivers the held signal again to the main
    thread the moment its stack has no import left in it.
  * The commit (the final rename) is a critical section: a signal inside it is held until the section ends,
    then ignored if the output is in place. After the CLI has decided its exit code, signals are ignored, so
    atexit callbacks are never interrupted.
  * A long native operation (a matmul of a huge batch) does not return to Python to run a handler. A
    watchdog thread reads the signal from a wakeup fd (written by the C-level handler, at once) and, if the
    main thread has not finished `GRACE_SECONDS` later, runs the registered cleanups, prints the line and
    leaves with os._exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

GRACE_SECONDS = 5.0
CODES = {signal.SIGINT: (130, "interrupted"),
         signal.SIGTERM: (143, "terminated (SIGTERM)"),
         signal.SIGHUP: (129, "terminated (SIGHUP)")}


class Stopped(BaseException):
    """Raised in the main thread by a handled signal. Not an Exception, on purpose (see the module doc)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code, self.message = CODES[signum]
        super().__init__(self.message)


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()  # held by the commit section and by the watchdog's exit
        self.received: int | None = None
        self.raised = False
        self.deferred = False  # received inside an import: the watchdog delivers it again after
        self.critical = 0
        self.committed = False
        self.finished = False
        self.cleanups: list[Callable[[], None]] = []
        self.emit: Callable[[str], None] | None = None
        self.emitted = False
        self.installed = False
        self.previous: dict[int, object] = {}
        self.wakeup: tuple[int, int] | None = None
        self.old_wakeup = -1


_state = _State()


def _handler(signum: int, frame) -> None:
    if _state.received is None:
        _state.received = signum
    if _state.raised or _state.critical or _state.committed or _state.finished:
        return  # held (commit), ignored (done), or a second signal during cleanup
    if _state.wakeup is not None and _importing(frame):
        _state.deferred = True  # the watchdog sends it again once the import is over
        return
    _state.deferred = False
    _state.raised = True
    raise Stopped(signum)


def _importing(frame) -> bool:
    """Whether this stack is inside an import (importlib's frames are in every import, `import x` and
    `importlib.import_module` alike)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def install(emit: Callable[[str], None]) -> None:
    """Take over the three signals in the main thread. `emit(line)` prints the one error line (once)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _state.installed:  # the console script installs before the CLI's imports; keep what it saw
        _state.emit = emit
        return
    _state.__init__()
    _state.emit = emit
    for sig in CODES:
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue  # `nohup`, or a background job: the caller chose to ignore it, and so do we
        _state.previous[sig] = signal.signal(sig, _handler)
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        _state.old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread of the main interpreter
        os.close(r), os.close(w)
    else:
        _state.wakeup = (r, w)
        threading.Thread(target=_watchdog, args=(r,), name="qtool-signal-watchdog", daemon=True).start()
    _state.installed = True


def uninstall() -> None:
    """Restore the previous handlers (in-process callers such as tests run main() many times)."""
    if not _state.installed:
        return
    for sig, prev in _state.previous.items():
        signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    if _state.wakeup is not None:
        signal.set_wakeup_fd(_state.old_wakeup)
        r, w = _state.wakeup
        os.close(w)  # the watchdog's read returns b"" and it ends
        _state.wakeup = None
    _state.installed = False
    # the run is over: what it received must not stop the next library call in this process (a test that
    # quantizes in-process after one that signalled itself)
    _state.received, _state.raised, _state.committed, _state.finished = None, False, False, False
    _state.deferred = False
    _state.cleanups.clear()


def received() -> int | None:
    return _state.received


def committed() -> bool:
    return _state.committed


def outcome(code: int) -> tuple[int, str | None]:
    """The exit code and error line to use, given what the run would exit with on its own."""
    if _state.received is None:
        return code, None
    if _state.committed:
        return 0, None
    exit_code, message = CODES[_state.received]
    return exit_code, message


def emit_once(line: str) -> None:
    with _state.lock:
        if _state.emitted or _state.emit is None:
            return
        _state.emitted = True
        _state.emit(line)


def finish() -> None:
    """The CLI has its exit code: from here on signals are ignored (atexit callbacks run undisturbed)."""
    _state.finished = True
    if threading.current_thread() is threading.main_thread():
        for sig in _state.previous:
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def cleanup(callback: Callable[[], None]) -> Iterator[None]:
    """Register what the watchdog must undo if it has to end the process while this block runs."""
    _state.cleanups.append(callback)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _state.cleanups.remove(callback)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A signal inside this block is held until its end (then raised, unless the work was committed): for the
    few statements that create or remove something and must not be cut in two (a folder made but not yet
    registered for removal). The final rename runs in one, and `mark_committed()` inside it makes a held
    signal harmless."""
    with _state.lock:
        _state.critical += 1
        try:
            yield
        finally:
            _state.critical -= 1
    if (_state.installed and _state.received is not None and not _state.committed and not _state.raised
            and not _state.finished):
        _state.raised = True
        raise Stopped(_state.received)


def check() -> None:
    """Raise the received signal again if it did not end the run: the first `Stopped` can be swallowed on its
    way out (a bare `except:` in some library's import fallback), and a run that reaches the start of a command
    or its final rename with a signal received must stop there, not commit as if none had come. Only while
    the handlers are installed: a program that calls qtool's functions itself owns its signals."""
    if _state.installed and _state.received is not None and not _state.committed and not _state.finished:
        _state.raised = True
        raise Stopped(_state.received)


@contextlib.contextmanager
def commit_section() -> Iterator[None]:
    """The final rename: a signal that came before it stops the run here; one inside it is held (`held`)."""
    check()
    with held():
        yield


def mark_committed() -> None:
    _state.committed = True


def _watchdog(fd: int) -> None:
    import time

    main = threading.main_thread().ident
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        signums = [b for b in data if b in CODES]
        if not signums:
            continue
        if _state.received is None:
            _state.received = signums[0]
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            if not _state.installed:
                return
            if _state.deferred and not _importing(sys._current_frames().get(main)):
                _state.deferred = False  # the import is over: the handler raises this time
                signal.pthread_kill(main, _state.received)
            time.sleep(0.01)
        _force_exit()


def _force_exit() -> None:
    """The main thread is stuck in native code: undo what is registered, say it once, and go."""
    with _state.lock:
        code, line = outcome(1)
        if line is not None:
            for fn in reversed(list(_state.cleanups)):
                with contextlib.suppress(BaseException):
                    fn()
            emit_once(f"qtool: error: {line}")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(code)
