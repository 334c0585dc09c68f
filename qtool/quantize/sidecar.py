"""config.json and generation_config.json made by a helper process, beside the stream.

They are what transformers' own `save_pretrained` writes, so they need transformers, whose import (2-4 s,
after torch) is most of what a CUDA run spends outside its reads and writes once the plan needs no
transformers (qtool.quantize.archplan). A `Sidecar` starts `python -m qtool.quantize.sidecar` as the run
begins: it imports torch and transformers on another core while this process imports torch, plans and
streams, then waits for one job on stdin (the plan's few fields), writes both files with the very
functions of qtool.quantize.finalize into a private temporary folder and answers with their bytes. The
main process puts them in the output at the end. It is only an optimisation: if the helper fails, dies
or answers anything unexpected, finalize makes the files itself, as before (with its own errors).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

_FILES = ("config.json", "generation_config.json")


class Sidecar:
    """The helper process; `send(plan)` once the plan is known, `write(dir, name)` at the end, `close()`."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # this qtool, whatever the child's sys.path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self._answer: dict | None = None
        self._sent = False
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "qtool.quantize.sidecar"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=root)
        except OSError:
            self.proc = None

    def send(self, plan, *, trust_remote_code: bool = False) -> None:
        """The job: what finalize.write_config / write_generation_config read of the plan."""
        if self.proc is None or self._sent:
            return
        # the source as an absolute path: the helper runs in qtool's folder
        job = {"source": str(Path(plan.source).resolve()), "config": plan.config, "model_dtype": plan.model_dtype,
               "architecture": plan.architecture, "settings": plan.settings.to_dict(),
               "trust_remote_code": trust_remote_code}
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.close()
            self._sent = True
        except (OSError, ValueError, TypeError):
            self.close()

    def _result(self) -> dict:
        if self._answer is None:
            self._answer = {}
            if self.proc is not None and self._sent:
                try:
                    out = self.proc.stdout.read()
                    if self.proc.wait() == 0:
                        self._answer = json.loads(out)
                except (OSError, ValueError):
                    pass
            self.close()
        return self._answer

    def write(self, out_dir: Path, name: str) -> bool | None:
        """Put the helper's `name` into `out_dir`: True written, False the helper made none (a model with no
        generation config), None the helper has no answer (make it here)."""
        answer = self._result()
        if name not in answer:
            return None
        if answer[name] is None:
            return False
        (Path(out_dir) / name).write_bytes(base64.b64decode(answer[name]))
        return True

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _job(job: dict) -> dict:
    import tempfile

    from qtool.core.config import QuantSettings
    from qtool.quantize.finalize import write_config, write_generation_config
    from qtool.quantize.plan import QuantizePlan

    settings = QuantSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["settings"].items()})
    plan = QuantizePlan(source=Path(job["source"]), source_name="", revision=None, config=job["config"],
                        settings=settings, architecture=job["architecture"], model_dtype=job["model_dtype"],
                        tensors=[], slots=[], dropped=[])
    with tempfile.TemporaryDirectory(prefix="qtool-sidecar-") as tmp:
        write_config(plan, Path(tmp), trust_remote_code=job["trust_remote_code"])
        write_generation_config(plan, Path(tmp))
        return {name: base64.b64encode((Path(tmp) / name).read_bytes()).decode() if (Path(tmp) / name).exists()
                else None for name in _FILES}


def main() -> int:
    import torch  # noqa: F401  the slow part, done while the parent is busy
    import transformers  # noqa: F401
    from transformers import AutoConfig, BitsAndBytesConfig, GenerationConfig  # noqa: F401

    line = sys.stdin.buffer.readline()
    if not line:  # the parent went another way (an error, transformers' own plan): nothing to do
        return 0
    sys.stdout.write(json.dumps(_job(json.loads(line))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
