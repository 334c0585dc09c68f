"""One rank of `qtool verify --gpus N --parallel fsdp|ddp`, started by `accelerate launch` (qtool/verify/launch.py).

Every rank runs the same recipe a user launches with accelerate: from_pretrained on its own card (random
weights built in host memory and quantized on the card, as transformers does for every rank of an FSDP-QLoRA
script), the peft wrap, then transformers' Trainer, which reads the FSDP/DDP plugin that accelerate's
launcher put in the environment. The rank measures its own card over the whole run (load included) and
writes rank<N>.json: its VerifyReport as a dict plus the rank, the cap and the wall time. `failed` marks a
run that ended early (out of memory, a crash): the parent then stops the ranks stuck waiting for it.

Exit codes: 0 done, 3 out of memory, 1 anything else (the message is in the JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)  # the parent never reads half a file


def run_rank(job: dict, rank: int, local: int) -> dict:
    """Load, run, measure on this rank's card. -> the rank's result (its report as a dict and more)."""
    from qtool.core.config import resolve_settings
    from qtool.core.models import resolve_model
    from qtool.verify import _Run
    from qtool.verify.inputs import VerifyOptions, resolve_source

    cpu = bool(job.get("cpu"))
    out_dir = Path(job["out_dir"])
    settings = resolve_settings(job["values"], env={}, cwd=out_dir, command="verify")
    options = VerifyOptions(**{**job["options"], "device": "cpu" if cpu else f"cuda:{local}", "device_map": None})
    budget = job["budgets"][rank] if job.get("budgets") else None
    if not cpu:
        import torch

        torch.cuda.set_device(local)
    from accelerate import PartialState

    PartialState(cpu=cpu)  # the process group first: transformers' loading and the Trainer read it
    spec = resolve_model(job["model"], revision=options.revision)
    t0 = time.perf_counter()
    run = _Run(spec, settings, options, resolve_source(spec, options), None, lambda _m: None, budgets=[budget])
    for note in job.get("notes", []):
        run.report.notes.append(note)
    run.execute()
    run.measure()
    report = run.report.to_dict()
    failed = bool(run.report.error)
    return {"rank": rank, "local_rank": local, "cap_bytes": run.caps[0], "budget_bytes": budget,
            "wall_seconds": time.perf_counter() - t0, "report": report, "failed": failed,
            "out_of_memory": failed and run.report.error.get("kind") == "out_of_memory"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    out_dir = Path(job["out_dir"])
    (out_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    code = 0
    try:
        result = run_rank(job, rank, local)
        code = 3 if result["out_of_memory"] else 1 if result["failed"] else 0
    except Exception as exc:  # noqa: BLE001 - a rank reports every failure to the parent, which decides
        from qtool.core.errors import one_line

        result = {"rank": rank, "local_rank": local, "failed": True, "out_of_memory": _is_oom(exc),
                  "crash": f"{type(exc).__name__}: {one_line(exc, limit=300)}"}
        code = 3 if result["out_of_memory"] else 1
    _write(out_dir / f"rank{rank}.json", result)
    sys.stdout.flush()
    if code:
        os._exit(code)  # no teardown that could wait on ranks stuck in a collective
    _finish_process_group()
    return 0


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _finish_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is written; a teardown warning changes nothing
        pass


if __name__ == "__main__":
    sys.exit(main())
