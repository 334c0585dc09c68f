"""`qtool verify --json` reports from a GPU call -> rows of docs/recipe_measurements.json (appended), in the form
bench/recipe_gpu.py writes: which architecture and depth ran comes from the command line (the report names the
temp config.json), as do the environment switches the run had (UNSLOTH_BLOCK_COMPILE=0, ...).

  python bench/verify_rows.py --call 8 --arch mixtral-8x7b --layers 4 [--env UNSLOTH_BLOCK_COMPILE=0] REPORT.json...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEASUREMENTS = ROOT / "docs" / "recipe_measurements.json"
PHASES = ("forward_peak", "backward_peak", "optimizer_step_peak", "after_step")


# settings a row's args carry; any other that differs from its default would be re-estimated wrongly
CARRIED = {"mode", "seq_len", "batch_size", "recipe", "optimizer", "precision", "unsloth_block_compile"}


def uncarried(settings: dict) -> list[str]:
    """The report's settings that differ from their defaults and that a row's args do not carry."""
    from qtool.core.config import resolve_settings

    default = resolve_settings({}, env={}, cwd=ROOT / "docs")
    want = {**dataclasses.asdict(default.run), "quant": dataclasses.asdict(default.quant)}
    out = []
    for key, value in settings.items():
        if key in CARRIED or key not in want:
            continue
        norm = list(value) if isinstance(value, (list, tuple)) else value
        base = want[key]
        base = list(base) if isinstance(base, (list, tuple)) else base
        if key == "quant":
            base = {k: list(v) if isinstance(v, tuple) else v for k, v in base.items()}
        if norm != base:
            out.append(key)
    return out


def row_args(s: dict) -> list[str]:
    """The report's settings as the `qtool verify` options bench/compare_estimate.py reads back."""
    args = ["--mode", s["mode"], "--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"]),
            "--recipe", s["recipe"], "--optimizer", s["optimizer"]]
    if s.get("precision", "bf16") != "bf16":
        args += ["--precision", s["precision"]]
    if s.get("unsloth_block_compile") is False:
        args += ["--no-unsloth-block-compile"]
    return args


def row_from_report(rep: dict, call: int, arch: str, layers: int | None, env: dict) -> dict:
    s, mem, rec = rep["settings"], rep["memory"], rep["recipe"]
    extra = uncarried(s)
    if extra or not rep.get("steps_requested"):
        raise ValueError(f"settings a row cannot carry: {', '.join(extra) or '--steps 0'}")
    if mem.get("metric") != "cuda_allocator":
        raise ValueError(f"not a GPU run (memory metric {mem.get('metric')!r})")
    args = row_args(s)
    runner = "qtool verify --recipe {} ({})".format(s["recipe"], rec.get("runner") or "qtool loop")
    return {"call": call, "arch": arch, "layers": layers, "full_depth": layers is None, "num_hidden_layers": layers,
            "mode": s["mode"], "seq": s["seq_len"], "recipe": s["recipe"], "runner": runner, "args": args,
            "start_allocated": rep["phases"].get("after_peft_wrap", mem["after_load_bytes"]),
            "after_load": mem["after_load_bytes"], "measured_peak_allocated": mem["peak_allocated_bytes"],
            "peak_reserved": mem["peak_reserved_bytes"], "outside_torch": None,
            "phases": {k: rep["phases"][k] for k in PHASES if k in rep["phases"]},
            "step_phase_peaks": (mem.get("per_device") or [{}])[0].get("phase_peaks_allocated_bytes"),
            "loss": rep["loss"], "loss_finite": rep["loss_finite"], "trainable_params": rep["trainable_params"],
            "error": rep["error"], "notes": rep["notes"], "card": rep["device"].get("name"),
            "versions": {k: rep["versions"].get(k) for k in
                         ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "trl", "unsloth")},
            "env": env}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--call", type=int, required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE the run had")
    a = ap.parse_args(argv)
    env = dict(e.split("=", 1) for e in a.env)
    data = json.loads(MEASUREMENTS.read_text())
    for path in a.reports:
        rep = json.loads(path.read_text())
        if rep.get("exit_code") != 0:
            print(f"{path}: exit {rep.get('exit_code')}, not recorded", file=sys.stderr)
            continue
        try:
            row = row_from_report(rep, a.call, a.arch, a.layers, env)
        except ValueError as exc:
            print(f"{path}: {exc}, not recorded", file=sys.stderr)
            continue
        same = ("arch", "layers", "args", "measured_peak_allocated", "env")
        if any(all(r.get(k) == row[k] for k in same) for r in data["rows"]):
            print(f"{path}: recorded already", file=sys.stderr)
            continue
        data["rows"].append(row)
        print(f"{path.name}: {row['measured_peak_allocated'] / 2**30:.3f} GiB recorded")
    MEASUREMENTS.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
