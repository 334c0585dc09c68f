"""Recompute `qtool estimate` for every GPU measurement in docs/gpu_measurements.json and print the error.

The measurements come from `qtool verify` on a lent H200 (bench/verify_gpu.py, bench/gpu_run.sh); this
script needs no GPU, so CI (tests/test_estimate_accuracy.py) checks that the memory model still
predicts every recorded peak within 3%.

  python bench/compare_estimate.py            # markdown table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = ROOT / "docs" / "gpu_measurements.json"
_IGNORED = {"--steps"}  # verify-only options with a value


def flags_from_args(args: list[str]) -> dict:
    """verify's command-line options -> config-layer flags (later options win, as on the command line). The
    flag names come from the settings table (qtool.config.KEYS), as the CLI's own do."""
    from qtool.cli.fast import setting_flags

    known = setting_flags("verify")
    flags: dict = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in known and known[a][1] is None:
            flags[known[a][0]] = args[i + 1]
            i += 2
        elif a in known:
            flags[known[a][0]] = known[a][1]
            i += 1
        elif a in _IGNORED:
            i += 2
        else:
            raise ValueError(f"unexpected verify option {a!r}")
    return flags


def compare(rows: list[dict] | None = None) -> list[dict]:
    from qtool.config import resolve_settings
    from qtool.estimate import estimate_report
    from qtool.models import resolve_model

    rows = rows if rows is not None else json.loads(MEASUREMENTS.read_text())["rows"]
    out = []
    for r in rows:
        settings = resolve_settings(flags_from_args(r["args"]), env={}, cwd=ROOT / "docs")
        rep = estimate_report(resolve_model(r["model"]), settings)
        load_only = "--steps" in r["args"] and r["args"][r["args"].index("--steps") + 1] == "0"
        est = rep["weights"][rep["format"]]["gpu"] if load_only else rep["allocated_peak_bytes"]
        meas = r["measured_peak_allocated"]
        out.append({**r, "estimate": est, "error": (est - meas) / meas})
    return out


def table(rows: list[dict]) -> str:
    g = 2**30
    lines = ["| run | model | settings | measured GiB | estimate GiB | error |", "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        args = " ".join(a for a in r["args"] if a != "--json")
        lines.append(f"| {r['run']} | {r['model']} | `{args}` | {r['measured_peak_allocated'] / g:.2f} | "
                     f"{r['estimate'] / g:.2f} | {100 * r['error']:+.1f}% |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines.append("")
    lines.append(f"{len(rows)} rows; largest error {100 * worst['error']:+.2f}% ({worst['model']}, {worst['label']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(table(compare()))
