"""Per-card estimate vs measured peaks of multi-GPU runs (`qtool verify --gpus N --parallel ...`).

Reads rows (model, gpus, parallel, mode, seq_len, batch_size, settings, per_rank_peak_bytes, cap_bytes,
outcome, card, versions) from docs/multigpu_measurements.json (or the path given), recomputes
qtool.estimate.cards.estimate_cards for each with the same settings, and prints one line per card: estimate,
measured (torch.cuda.max_memory_allocated() on that rank), error. A row with cap_bytes also gets the verdict
(fits under the cap?) against its outcome (ok | oom). No GPU needed.

  python bench/compare_multigpu.py [FILE] [--fit NAMES] # markdown table; --fit: rows used for fitting
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEASUREMENTS = ROOT / "docs" / "multigpu_measurements.json"
GiB = 2**30


def row_settings(row: dict):
    from qtool.core.config import resolve_settings

    from qtool.core.config import KEY_BY_NAME

    flags = {k: v for k, v in (row.get("settings") or {}).items() if v is not None and k in KEY_BY_NAME}
    for key in ("gpus", "parallel", "mode", "seq_len", "batch_size"):
        if row.get(key) is not None:
            flags[key] = row[key]
    flags.pop("vram", None), flags.pop("gpu", None)
    return resolve_settings(flags, command="estimate", env={}, cwd=ROOT / "bench")


def compare(row: dict) -> list[dict]:
    from qtool.core.models import resolve_model
    from qtool.estimate.cards import estimate_cards

    spec = resolve_model(row.get("config") or row["model"])
    # the pipeline placement of the transformers that ran (it changed in 5.18)
    est = estimate_cards(spec, row_settings(row), transformers_version=(row.get("versions") or {}).get("transformers"))
    out = []
    caps = row.get("cap_bytes")
    budgets = [c.budget_bytes for c in est.cards]
    for card, measured in zip(est.cards, row.get("per_rank_peak_bytes") or []):
        # an out-of-memory run stopped at its cap: its peak is the cap's, only the verdict compares
        err = None if not measured or row.get("outcome") in ("oom", "error") else (card.peak_bytes - measured) / measured
        cap = caps[card.index] if isinstance(caps, list) else caps
        # the cap is the allocator's share of the budget (the card less its CUDA context): compare the
        # allocated peak with it
        fits = None if cap is None else card.peak_bytes <= cap
        loads = row.get("per_rank_load_peak_bytes") or []
        load = loads[card.index] if card.index < len(loads) else None
        phases = est.detail.get("phases") or {}
        # the whole model loaded on every card, or (ram-efficient) the allocator warmup's one block
        load_est = phases.get("load", phases.get("warmup"))
        # the training steps alone (FSDP, DDP): what decides the fit when the load's warmup is the run's peak
        steps = row.get("per_rank_steps_peak_bytes") or []
        step = steps[card.index] if card.index < len(steps) and row.get("outcome") not in ("oom", "error") else None
        out.append({"card": card.index, "estimate": card.peak_bytes, "measured": measured, "error": err,
                    "fits": fits, "phase": est.detail.get("phase"), "budget": budgets[card.index],
                    "load": load, "load_estimate": load_est, "step": step, "step_estimate": phases.get("step")})
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv and not argv[0].startswith("--") else MEASUREMENTS
    rows = json.loads(path.read_text())
    print("| model | gpus | parallel | seq | flags | card | estimate | measured | error | verdict / outcome |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---|")
    worst = 0.0
    for row in rows:
        for c in compare(row):
            verdict = "" if c["fits"] is None else f"{'fits' if c['fits'] else 'over'} / {row.get('outcome')}"
            err = "-" if c["error"] is None else f"{100 * c['error']:+.1f}%"
            worst = max(worst, abs(c["error"] or 0))
            measured = "-" if not c["measured"] else f"{c['measured'] / GiB:.2f} GiB"
            flags = " ".join(row.get("flags") or []) + (f" cap {row['cap_gpu']}" if row.get("cap_gpu") else "")
            print(f"| {row.get('model')} | {row.get('gpus')} | {row.get('parallel')} | {row.get('seq_len')} | "
                  f"{flags.strip()} | {c['card']} | {c['estimate'] / GiB:.2f} GiB | {measured} | {err} | "
                  f"{verdict} |")
    print(f"\nlargest error: {100 * worst:.1f}%")
    print("\nLoading alone (FSDP: the allocator warmup's block, or with --no-fsdp-ram-efficient the whole 4-bit "
          "model on every rank):")
    for row in rows:
        for c in compare(row):
            if c["load"] and c["load_estimate"] and row.get("outcome") not in ("oom", "error"):
                err = (c["load_estimate"] - c["load"]) / c["load"]
                print(f"  {row['model']} x{row['gpus']} seq {row['seq_len']} card {c['card']}: estimate "
                      f"{c['load_estimate'] / GiB:.2f} GiB, measured {c['load'] / GiB:.2f} GiB ({100 * err:+.1f}%)")
    print("\nTraining steps alone (FSDP; the whole run's peak is the load's when the warmup is larger):")
    for row in rows:
        for c in compare(row):
            if c["step"] and c["step_estimate"] and c["card"] == 0:
                err = (c["step_estimate"] - c["step"]) / c["step"]
                flags = " ".join(row.get("flags") or [])
                print(f"  {row['model']} x{row['gpus']} seq {row['seq_len']} {flags} (transformers "
                      f"{(row.get('versions') or {}).get('transformers')}, card 0): estimate "
                      f"{c['step_estimate'] / GiB:.2f} GiB, measured {c['step'] / GiB:.2f} GiB ({100 * err:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
