"""GPU evidence for `qtool estimate`: run `qtool verify` on 7-8B shapes with random weights, each run in a
fresh process (so peaks never mix), and tabulate measured vs estimated memory.

Runs (defaults): a 4-bit load of the first model alone (allocated after load vs the estimate's weight
bytes); QLoRA at 512 and 2048 tokens for every model and 8192 for the first; inference (prefill + decode
with a KV cache) at 2048; batch 1. Weights are random, built through from_pretrained from an in-memory
state dict (see qtool/verify/load.py): nothing is downloaded, nothing 16 GB is written to disk.

Writes into $OUT (default ./out): one JSON report per run, <run>.log (its stderr), verify_gpu.json (all
rows) and verify_gpu.md (the table). Usage: OUT=out python bench/verify_gpu.py [--device cpu ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plan(models: list[str], seq_lens: list[int], long_seq: int | None, infer_seq: int | None,
         load_only: bool = True) -> list[dict]:
    runs = []
    first = models[0]
    if load_only:
        runs.append({"model": first, "mode": "qlora", "seq": min(seq_lens), "steps": 0, "label": "load only"})
    for i, m in enumerate(models):
        seqs = list(seq_lens) + ([long_seq] if long_seq and i == 0 else [])
        for s in seqs:
            runs.append({"model": m, "mode": "qlora", "seq": s, "label": "qlora"})
        if infer_seq:
            runs.append({"model": m, "mode": "inference", "seq": infer_seq, "label": "inference"})
    return runs


def _name(model: str) -> str:
    return Path(model).stem if model.endswith(".json") else model


def run_one(run: dict, args, out: Path) -> dict:
    steps = run.get("steps", args.steps)
    rid = f"{_name(run['model'])}-{run['label'].replace(' ', '-')}-{run['seq']}"
    cmd = [sys.executable, "-m", "qtool", "verify", run["model"], "--json", "--device", args.device,
           "--mode", run["mode"], "--seq-len", str(run["seq"]), "--batch-size", "1", "--steps", str(steps)]
    if args.optimizer:
        cmd += ["--optimizer", args.optimizer]
    cmd += args.extra.split()  # later options win: e.g. "--batch-size 4 --lora-rank 64"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
    wall = time.perf_counter() - t0
    (out / f"{rid}.log").write_text(stderr[-20000:])
    row = {"id": rid, **run, "steps": steps, "exit": code, "wall_seconds": round(wall, 1), "command": " ".join(cmd[1:])}
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        row["error"] = (stderr.strip().splitlines() or ["no output"])[-1]
        return row
    (out / f"{rid}.json").write_text(json.dumps(report, indent=2, default=str))
    row["report"] = report
    return row


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _row(r: dict) -> str:
    rep = r.get("report")
    if rep is None:
        return f"| {_name(r['model'])} | {r['label']} | {r['seq']} | failed: {r.get('error', '')} |" + " |" * 9 + f" {r['exit']} |"
    m, e, ph = rep["memory"], rep.get("estimate") or {}, rep["phases"]
    load_only = r.get("steps") == 0
    measured = m.get("after_load_bytes") if load_only else m.get("peak_allocated_bytes", m.get("peak_rss_bytes"))
    err = e.get("relative_error")
    tps = rep.get("tokens_per_second")
    loss = rep.get("loss")
    return (f"| {_name(r['model'])} | {r['label']} | {r['seq']} | {_gib(measured)} | {_gib(e.get('estimate_bytes'))} | "
            f"{'-' if err is None else f'{100 * err:+.1f}%'} | {_gib(m.get('peak_reserved_bytes'))} | "
            f"{_gib(m.get('outside_torch_bytes'))} | {_gib(ph.get('after_load'))} | "
            f"{_gib(ph.get('after_peft_wrap'))} | {'-' if not tps else f'{tps:,.0f}'} | "
            f"{loss if not isinstance(loss, float) else f'{loss:.3f}'} | {r['exit']} |")


def table(rows: list[dict]) -> str:
    first = next((r["report"] for r in rows if r.get("report")), None)
    lines = ["# qtool verify: measured vs estimated GPU memory", ""]
    if first:
        v, d = first["versions"], first["device"]
        lines += [f"- card: {d.get('name')}" + (f" ({_gib(d['total_bytes'][0])} GiB)" if d.get("total_bytes") else ""),
                  "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "transformers", "bitsandbytes",
                                                                       "peft", "accelerate") if v.get(k)),
                  "- weights: random (same layout as from_pretrained with BitsAndBytesConfig; memory does not depend on values)",
                  "- measured: torch.cuda.max_memory_allocated after the load (load only: memory_allocated after load); "
                  "estimate: qtool estimate's allocated_peak_bytes (load only: GPU bytes of the 4-bit weights); "
                  "error = (estimate - measured) / measured", ""]
    lines += ["| model | run | seq | measured GiB | estimate GiB | error | peak reserved GiB | outside torch GiB | "
              "after load GiB | after peft GiB | tokens/s | loss | exit |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(r) for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="llama-3-8b,mistral-7b,qwen2.5-7b", help="comma-separated presets or config.json paths")
    ap.add_argument("--seq-lens", default="512,2048")
    ap.add_argument("--long-seq", type=int, default=8192, help="extra QLoRA length for the first model (0: none)")
    ap.add_argument("--infer-seq", type=int, default=2048, help="inference prefill length (0: none)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--extra", default="", help="more `qtool verify` options for every run (later ones win)")
    ap.add_argument("--no-load-only", action="store_true", help="skip the load-only run")
    ap.add_argument("--tag", default="", help="suffix for run ids and labels, e.g. -b4-r64")
    args = ap.parse_args(argv)
    out = Path(os.environ.get("OUT") or "./out")
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args.models.split(","), [int(s) for s in args.seq_lens.split(",")], args.long_seq or None,
                args.infer_seq or None, load_only=not args.no_load_only)
    for run in runs:
        run["label"] += args.tag
    rows = []
    t0 = time.perf_counter()
    for i, run in enumerate(runs, 1):
        row = run_one(run, args, out)
        rows.append(row)
        rep = row.get("report") or {}
        m = rep.get("memory", {})
        print(f"[{i}/{len(runs)}] {row['id']}: exit {row['exit']} in {row['wall_seconds']}s, "
              f"peak allocated {_gib(m.get('peak_allocated_bytes', m.get('peak_rss_bytes')))} GiB, "
              f"estimate error {rep.get('estimate', {}).get('relative_error')}"
              + (f"  ERROR {row['error']}" if row.get("error") else ""), flush=True)
        # rewrite after every run, so a cut-off session still leaves evidence
        (out / "verify_gpu.json").write_text(json.dumps(
            [{k: v for k, v in r.items() if k != "report"} | {"report_file": f"{r['id']}.json"} for r in rows], indent=2))
        (out / "verify_gpu.md").write_text(table(rows))
    print(f"total {time.perf_counter() - t0:.0f}s; table in {out / 'verify_gpu.md'}", flush=True)
    print(table(rows), flush=True)
    return 0 if all(r.get("report") and r["exit"] in (0, 3) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
