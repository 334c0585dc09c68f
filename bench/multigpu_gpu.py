"""GPU evidence for `qtool verify --gpus N --parallel fsdp|pipeline` (issue 13): per-card peaks of real runs.

Each run is one `qtool verify ... --json` in a fresh process, on the first N cards of the machine
(CUDA_VISIBLE_DEVICES), random weights, batch 1, 2 steps. After every run the rows are rewritten to
$OUT/multigpu_measurements.json, so a cut-off call still returns what ran. A run that crashes (exit 1)
skips the later runs of the same --parallel (they would crash the same way). `--deadline S` skips runs once
S seconds have passed since the start.

Usage: OUT=out python bench/multigpu_gpu.py --runs "8b:2:fsdp:512,70b:2:fsdp:512:rtx-4090" [--deadline 500]
  a run is MODEL:GPUS:PARALLEL:SEQ[:CAP_GPU[:FLAGS]] (CAP_GPU: --gpu CAP_GPU --cap-memory; FLAGS: more
  qtool verify flags without dashes, joined by '+', e.g. no-fsdp-ram-efficient).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_runs(text: str) -> list[dict]:
    runs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        model, gpus, parallel, seq = parts[:4]
        runs.append({"model": model, "gpus": int(gpus), "parallel": parallel, "seq_len": int(seq),
                     "cap_gpu": parts[4] if len(parts) > 4 and parts[4] else None,
                     "flags": ["--" + f for f in parts[5].split("+")] if len(parts) > 5 and parts[5] else []})
    return runs


def command(run: dict, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "qtool", "verify", run["model"], "--json", "--gpus", str(run["gpus"]),
           "--parallel", run["parallel"], "--mode", "qlora", "--seq-len", str(run["seq_len"]), "--batch-size", "1",
           "--steps", str(steps)]
    if run["cap_gpu"]:
        cmd += ["--gpu", run["cap_gpu"], "--cap-memory"]
    return cmd + run["flags"]


def row_of(run: dict, code, report: dict | None, wall: float, stderr: str) -> dict:
    row = {"model": run["model"], "hf_config": f"qtool preset {run['model']} (qtool/configs/models)",
           "gpus": run["gpus"], "parallel": run["parallel"], "mode": "qlora", "seq_len": run["seq_len"],
           "batch_size": 1, "flags": run["flags"], "exit": code, "wall_s": round(wall, 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if report is None:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        return {**row, "outcome": "error", "error": lines[-1] if lines else f"exit {code}"}
    cards = report.get("cards") or []
    err = report.get("error") or {}
    row.update({
        "settings": report.get("settings"),
        "outcome": "oom" if err.get("kind") == "out_of_memory" else "ok" if code == 0 else f"exit {code}",
        "oom_stage": err.get("stage") if err else None, "oom_rank": err.get("rank"),
        "per_rank_peak_bytes": [c.get("peak_allocated_bytes") for c in cards],
        "per_rank_reserved_bytes": [c.get("peak_reserved_bytes") for c in cards],
        "per_rank_load_peak_bytes": [c.get("load_peak_allocated_bytes") for c in cards],
        "per_rank_steps_peak_bytes": [c.get("steps_peak_allocated_bytes") for c in cards],
        "per_rank_outside_torch_bytes": [c.get("outside_torch_bytes") for c in cards],
        "per_rank_estimate_peak_bytes": [c.get("estimate_peak_bytes") for c in cards],
        "per_rank_phase_peaks_bytes": [c.get("phase_peaks_allocated_bytes") for c in cards],
        "device_map": (report.get("model") or {}).get("device_map"),
        "cap_bytes": [c.get("cap_bytes") for c in cards] if run["cap_gpu"] else None,
        "cap_gpu": run["cap_gpu"], "card": (report.get("device") or {}).get("name"),
        "versions": report.get("versions"), "loss": report.get("loss"), "trainer": report.get("trainer"),
        "checks": {k: v.get("passed") for k, v in (report.get("checks") or {}).items()},
        "notes": report.get("notes"), "estimate_cards": (report.get("estimate") or {}).get("cards"),
    })
    return row


def run_one(cmd: list[str], env: dict, timeout: float) -> tuple:
    """(exit code, stdout, stderr). Past the timeout qtool gets SIGINT, so it stops its ranks itself."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        return "timeout", stdout or "", stderr  # a report printed before the signal still counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    ap.add_argument("--deadline", type=float, default=None, help="skip runs after this many seconds")
    ap.add_argument("--name", default="multigpu_measurements.json")
    ap.add_argument("--first-gpu", type=int, default=0, help="the runs use cards K, K+1, ... (two lanes side by side)")
    args = ap.parse_args(argv)
    out = Path(os.environ.get("OUT") or "./out")
    out.mkdir(parents=True, exist_ok=True)
    rows, broken, t0 = [], set(), time.perf_counter()
    for i, run in enumerate(parse_runs(args.runs), 1):
        label = f"{run['model']} x{run['gpus']} {run['parallel']} {run['seq_len']}" + (
            f" cap {run['cap_gpu']}" if run["cap_gpu"] else "") + "".join(f" {f}" for f in run["flags"])
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - t0)
        kind = (run["parallel"], tuple(run["flags"]))
        if kind in broken and run["parallel"] == "fsdp" and not run["flags"]:
            # parked loading broke: the rest runs on transformers' own loading path
            run["flags"], kind = ["--no-fsdp-ram-efficient"], ("fsdp", ("--no-fsdp-ram-efficient",))
        if kind in broken or (left is not None and left < 30):
            print(f"[{i}] {label}: skipped", flush=True)
            continue
        env = {**os.environ, "QTOOL_DEBUG": "1",
               "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(args.first_gpu, args.first_gpu + run["gpus"])))}
        t = time.perf_counter()
        code, stdout, stderr = run_one(command(run, args.steps), env, min(args.timeout, left) if left else args.timeout)
        wall = time.perf_counter() - t
        try:
            report = json.loads(stdout)
        except json.JSONDecodeError:
            report = None
        if report is not None and report.get("exit_code") is not None:
            code = report["exit_code"]  # --debug (for the launcher's lines on a crash) exits 1 on any error
        row = row_of(run, code, report, wall, stderr)
        row["cuda_visible_devices"] = env["CUDA_VISIBLE_DEVICES"]
        rows.append(row)
        if code not in (0, 3, 4):  # 4 (not finite) ran; only a crash says the path is broken
            broken.add(kind)
            with open(out / args.name.replace(".json", ".err"), "a") as f:
                f.write(f"=== [{i}] {label}: exit {code}\n{stderr[-20000:]}\n")
        (out / args.name).write_text(json.dumps(rows, indent=2, default=str))
        gib = lambda xs: "/".join(f"{x / 2**30:.2f}" if x else "-" for x in xs or [])  # noqa: E731
        print(f"[{i}] {label}: {row['outcome']} in {wall:.0f}s; peak GiB {gib(row.get('per_rank_peak_bytes'))}; "
              f"load {gib(row.get('per_rank_load_peak_bytes'))}; steps {gib(row.get('per_rank_steps_peak_bytes'))}; "
              f"est {gib(row.get('per_rank_estimate_peak_bytes'))}" + (f"  ERROR {row.get('error')}" if
                                                                       row.get("error") else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
