"""`qtool verify --gpus N --parallel fsdp|ddp`: the real thing, launched the way users launch it.

The parent writes an accelerate config generated from the settings (FSDP as peft documents FSDP-QLoRA:
FSDP1, TRANSFORMER_BASED_WRAP, use_orig_params false, sync_module_states, bf16 mixed precision; DDP as
MULTI_GPU) and a job file into a temporary folder, and runs `python -m accelerate.commands.launch -m
qtool.verify.worker JOB`: torchrun starts one process per rank, each runs the same Trainer recipe on its
card and writes rank<N>.json (qtool/verify/worker.py). The parent waits, then gathers the rank files
(qtool/verify/cards.py).

No orphans: the launcher runs in its own session (process group), torchrun puts every rank in a session
of its own, and each rank writes its pid first; a signal, an error or the end of the run terminates the
launcher's group and then every rank pid still alive (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qtool.core.config import Settings
from qtool.core.errors import BadInput, DeviceError

# accelerate's names for qtool's sharding strategies (FSDP1's ShardingStrategy)
SHARDING = {"full_shard": "FULL_SHARD", "shard_grad_op": "SHARD_GRAD_OP", "hybrid_shard": "HYBRID_SHARD",
            "no_shard": "NO_SHARD"}
GRACE_SECONDS = 10.0
# NVLink multicast stays off in every rank, whatever the caller's environment (a program that uses it can
# take a shared host's GPUs out of service)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def card_count(settings: Settings) -> int:
    gpus = settings.run.gpus
    return len(gpus) if isinstance(gpus, tuple) else int(gpus)


def card_budgets(settings: Settings) -> list[int | None]:
    """Each card's budget, by qtool estimate's rule (qtool.estimate.cards.card_budgets): --gpus names give each
    card its catalogue memory, a count repeats --vram/--gpu."""
    from qtool.estimate.cards import card_budgets as budgets

    return [b for _, b in budgets(settings.run)]


def accelerate_config(settings: Settings, *, cpu: bool = False) -> dict:
    """The accelerate config file (JSON, which `accelerate launch --config_file` reads like YAML) for the run."""
    run = settings.run
    n = card_count(settings)
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(run.precision, "no")
    config = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0, "num_processes": n,
              "main_training_function": "main", "mixed_precision": "no" if cpu else mixed, "rdzv_backend": "static",
              "same_network": True, "use_cpu": False, "downcast_bf16": "no"}
    if run.parallel == "ddp":
        return {**config, "distributed_type": "MULTI_GPU"}
    if run.parallel != "fsdp":
        raise BadInput(f"--parallel {run.parallel} runs in one process (device_map='auto'); no launcher")
    config["distributed_type"] = "FSDP"
    config["fsdp_config"] = {
        "fsdp_version": 1,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_sharding_strategy": SHARDING[run.fsdp_sharding],
        "fsdp_offload_params": bool(run.fsdp_offload_params),
        "fsdp_cpu_ram_efficient_loading": bool(run.fsdp_ram_efficient),
        # accelerate refuses ram-efficient loading without it: rank 0's weights are broadcast to the others
        "fsdp_sync_module_states": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_use_orig_params": False,
        "fsdp_activation_checkpointing": False,  # the Trainer's gradient checkpointing does it, as in peft's recipe
    }
    return config


def check_cards(settings: Settings, device: str) -> None:
    """--gpus N over the visible GPUs is refused in one line, before anything is launched."""
    n = card_count(settings)
    if device == "cpu":
        if n > 1 and settings.run.parallel == "pipeline":
            raise DeviceError(f"--gpus {n} --parallel pipeline spreads the layers over GPUs; with --device cpu "
                              "leave --gpus out (or --parallel ddp: CPU ranks)")
        return
    import torch

    have = torch.cuda.device_count()
    if n > have:
        raise DeviceError(f"--gpus {n}: only {have} GPU(s) visible"
                          + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                             if "CUDA_VISIBLE_DEVICES" in os.environ else ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launched:
    """What came back from the ranks: rank -> its JSON (None: it wrote none), the launcher's exit code and log."""

    results: dict[int, dict | None]
    exit_code: int
    log_tail: list[str]


def launch(job: dict, settings: Settings, workdir: Path, *, cpu: bool = False, timeout: float | None = None,
           say=lambda _m: None, module: str = "qtool.verify.worker") -> Launched:
    """Run the ranks (`python -m module JOB` each) and wait for them. `job` is what every rank reads
    (qtool/verify/worker.py); each rank writes rank<N>.pid first and rank<N>.json last into `workdir`."""
    from qtool.core import signals

    n = card_count(settings)
    cfg = workdir / "accelerate_config.json"
    cfg.write_text(json.dumps(accelerate_config(settings, cpu=cpu), indent=2))
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps({**job, "out_dir": str(workdir), "cpu": cpu}, default=str))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
           "--main_process_port", str(_free_port()), "-m", module, str(job_path)]
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if cpu else "4")}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    log_path = workdir / "launcher.log"
    say(f"launching {n} ranks ({settings.run.parallel}) with accelerate")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=os.getcwd())
        stop = lambda: terminate(proc, workdir)  # noqa: E731
        with signals.cleanup(stop):
            try:
                code = _wait(proc, workdir, n, timeout)
            finally:
                stop()
    results = {r: _read_json(workdir / f"rank{r}.json") for r in range(n)}
    return Launched(results, code, _tail(log_path))


def _wait(proc: subprocess.Popen, workdir: Path, n: int, timeout: float | None) -> int:
    """The launcher's exit code. A rank that failed (its result says so) and ranks stuck in a collective
    waiting for it: torchrun ends the others once the failed one exits; if they outlive the grace period,
    they are stopped here (exit code -1)."""
    start = time.monotonic()
    failed_at: float | None = None
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=0.5)
        if timeout is not None and time.monotonic() - start > timeout:
            return -1
        if failed_at is None and any((_read_json(workdir / f"rank{r}.json") or {}).get("failed") for r in range(n)):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 3 * GRACE_SECONDS:
            return -1


def terminate(proc: subprocess.Popen, workdir: Path) -> None:
    """Stop the launcher's process group and every rank that wrote its pid, by pid: SIGTERM, then SIGKILL."""
    pids = [p for p in (_read_pid(f) for f in workdir.glob("rank*.pid")) if p]
    groups = [proc.pid] if proc.poll() is None else []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and (proc.poll() is None or any(_alive(p) for p in pids)):
            time.sleep(0.1)
        if proc.poll() is not None and not any(_alive(p) for p in pids):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=GRACE_SECONDS)


def _alive(pid: int) -> bool:
    """A pid that still runs (a zombie of another parent counts as gone: it holds no memory)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
