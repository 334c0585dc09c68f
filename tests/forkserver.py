"""Real `python -m qtool` processes without paying torch's and transformers' imports each time.

A fresh `python -m qtool quantize` spends about 4 s of CPU importing torch and transformers before it touches
a tensor. Tests that signal a run once its work has begun (tests/core/test_signals.py) need a real process (its own pid,
signal dispositions, exit code, atexit, files left behind) but not those imports. `ForkServer` starts one
interpreter that imports the heavy libraries (never qtool), then forks a child per run; the child sets its
working directory, environment, signal dispositions and output files as a fresh interpreter would have them
and runs `python -m qtool ARGS` from the start. qtool itself is imported in the child, after fork.

Moments that fall *during* the imports still need a fresh interpreter: those tests use subprocess.Popen.

Libraries that read environment variables at import (huggingface_hub's constants: HF_ENDPOINT, HF_HOME,
HF_HUB_OFFLINE...; transformers' TRANSFORMERS_*) were imported with the server's environment, so a child may
differ from it only in variables read later: `qtool()` refuses a run whose HF_*/HUGGINGFACE_*/TRANSFORMERS_*
variables differ from the server's, since a fresh process would have seen values the fork does not.
`python()` runs `python -c CODE` the same way.

Run as a script, this file is the server: it reads one JSON request a line on stdin and answers on stdout.
"""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")


READ_AT_CALL = ("HF_TOKEN",)  # huggingface_hub's get_token() reads it each time


def _read_at_import(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(READ_AT_IMPORT) and k not in READ_AT_CALL}


class Child:
    """The part of subprocess.Popen the tests use; stdout and stderr go to files, read once it has ended."""

    def __init__(self, server: ForkServer, pid: int, out: Path, err: Path):
        self._server, self.pid, self._out, self._err = server, pid, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server._ask(op="wait", pid=self.pid)["returncode"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped before the answer: the pid is still this child's
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        pause = 0.005  # each look is a round trip to the server: look often at first, then every 50 ms
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(f"qtool (pid {self.pid})", timeout)
            time.sleep(pause)
            pause = min(0.05, pause * 1.5)
        return self.returncode

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.wait(timeout)
        return self._out.read_text(), self._err.read_text()

    def stderr_lines(self, timeout: float):
        """stderr as it is written, a line at a time (like iterating over a Popen's stderr pipe)."""
        deadline = time.monotonic() + timeout
        with open(self._err) as f:
            pending = ""
            while time.monotonic() < deadline:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        yield pending
                        pending = ""
                elif self.poll() is not None:
                    return
                else:
                    time.sleep(0.01)


class ForkServer:
    def __init__(self, preload: list[str], *, env: dict, folder: Path, preexec_fn=None):
        self._folder, self._env = Path(folder), dict(env)
        self._proc = subprocess.Popen([sys.executable, __file__, *preload], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env, cwd=folder, preexec_fn=preexec_fn)
        self._children: list[Child] = []
        self._started = False  # its imports go on while the caller builds its other fixtures

    def _ask(self, **request) -> dict:
        if not self._started:
            if not self._proc.stdout.readline():
                raise RuntimeError(f"fork server did not start (exit {self._proc.wait()})")
            self._started = True
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def can_run(self, env: dict) -> bool:
        """Whether a child with `env` would be what a fresh process is: the variables the preloaded libraries
        read at import are the server's (HF_TOKEN is read at each request, so it may differ)."""
        return _read_at_import(env) == _read_at_import(self._env)

    def qtool(self, *args: str, cwd: Path, env: dict, ignore: tuple[int, ...] = (), setattrs: dict | None = None,
              rlimits: dict[str, int] | None = None) -> Child:
        """`python -m qtool ARGS` in `cwd` with exactly `env`; signals in `ignore` start ignored (as after nohup);
        `setattrs` {"module.NAME": value} is set in the child before qtool runs (a module constant a test
        does not need at its real value, such as a grace period); `rlimits` {"RLIMIT_FSIZE": n} are set as a
        preexec_fn would (soft and hard)."""
        return self._spawn(["qtool", *map(str, args)], None, cwd, env, ignore, setattrs, rlimits)

    def python(self, code: str, *args: str, cwd: Path, env: dict) -> Child:
        """`python -c CODE ARGS` in `cwd` with exactly `env`."""
        return self._spawn(["-c", *map(str, args)], code, cwd, env, (), None, None)

    def _spawn(self, argv, code, cwd, env, ignore, setattrs, rlimits) -> Child:
        if not self.can_run(env):
            raise ValueError("the preloaded libraries read HF_*/TRANSFORMERS_* at import: start a ForkServer with "
                             f"this environment (server {_read_at_import(self._env)}, run {_read_at_import(env)})")
        fd, out = tempfile.mkstemp(dir=self._folder, suffix=".out")
        os.close(fd)
        fd, err = tempfile.mkstemp(dir=self._folder, suffix=".err")
        os.close(fd)
        pid = self._ask(op="spawn", argv=argv, code=code, cwd=str(cwd), env=env, stdout=out, stderr=err,
                        ignore=list(ignore), setattrs=setattrs or {}, rlimits=rlimits or {})["pid"]
        self._children.append(Child(self, pid, Path(out), Path(err)))
        return self._children[-1]

    def close(self) -> None:
        """End the server; a child a failed test left running is killed first."""
        for child in self._children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
        self._proc.stdin.close()
        self._proc.wait(timeout=120)  # it may still be importing


# --- the server side ---------------------------------------------------------------------------------

def _become(request: dict) -> None:
    """In the forked child: what a fresh `python -m qtool` would have had from its parent and its start-up."""
    import resource

    for name, limit in request["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (limit, limit))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for sig in SIGNALS:
        if sig in request["ignore"]:
            signal.signal(sig, signal.SIG_IGN)
        else:  # as the interpreter starts: SIGINT raises KeyboardInterrupt, the others end the process
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    tempfile.tempdir = None  # found again from TMPDIR, as a fresh process would (the server may have asked)
    sys.argv = request["argv"]
    sys.path.insert(0, os.getcwd())  # `python -m` puts the working directory first
    import importlib

    for target, value in request["setattrs"].items():
        module, name = target.rsplit(".", 1)
        setattr(importlib.import_module(module), name, value)


class _CurrentStderr(io.TextIOBase):
    """sys.stderr while the server preloads. A logging.StreamHandler() made at import (huggingface_hub's,
    transformers') keeps the sys.stderr of that moment: in a fresh `python -m qtool` that moment is inside the
    command, where sys.stderr is qtool's LibraryStream (qtool/core/logs.py). Holding this instead, such a handler
    writes to whatever sys.stderr is when it writes, which in the child is that same LibraryStream."""

    def write(self, text: str) -> int:
        return (sys.stderr if sys.stderr is not self else sys.__stderr__).write(text)

    def flush(self) -> None:
        (sys.stderr if sys.stderr is not self else sys.__stderr__).flush()

    def writable(self) -> bool:
        return True


def _serve(preload: list[str]) -> dict:
    """Answer requests until stdin closes; return only in a forked child (its request), which then runs qtool
    or the request's code."""
    import importlib

    sys.stderr = _CurrentStderr()
    for name in preload:
        importlib.import_module(name)
    sys.stderr = sys.__stderr__
    # What was imported lives as long as the children: out of the collector's reach, a child's collections do
    # not walk (and so copy, page by page) the server's heap (as the gc module's documentation advises).
    gc.collect()
    gc.freeze()
    assert not [m for m in sys.modules if m == "qtool" or m.startswith("qtool.")], "qtool must be imported after fork"
    requests, answers = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    answers.write("ready\n")
    answers.flush()
    for line in requests:
        request = json.loads(line)
        if request["op"] == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                requests.close()
                answers.close()
                _become(request)
                return request
            answer = {"pid": pid}
        else:  # wait
            pid, status = os.waitpid(request["pid"], os.WNOHANG)
            answer = {"returncode": os.waitstatus_to_exitcode(status) if pid else None}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    os._exit(0)  # nothing to clean up; tearing torch down would only take time


if __name__ == "__main__":
    sys.path.pop(0)  # this folder (tests/) is no place to import qtool from
    _request = _serve(sys.argv[1:])
    if _request["code"] is not None:  # as `python -c` runs it
        exec(compile(_request["code"], "<string>", "exec"), {"__name__": "__main__"})
    else:
        import runpy

        runpy.run_module("qtool", run_name="__main__", alter_sys=True)
