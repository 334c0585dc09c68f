"""Recompute `qtool estimate` for every GPU measurement in docs/gpu_measurements.json (qtool verify's loop)
and docs/recipe_measurements.json (loop, Trainer, SFTTrainer, Unsloth, generate) and print the error.

The measurements come from lent H200s (bench/verify_gpu.py, bench/recipe_gpu.py); this script needs no GPU,
so CI (tests/estimate/test_estimate_accuracy.py) checks that the memory model still predicts every recorded peak.
Rows of the recipe file name an architecture and a depth (`arch`, `layers`): the config is the preset's
(or bench/configs'), truncated to `layers` as the measurement was.

  python bench/compare_estimate.py            # markdown table
  python bench/compare_estimate.py --recipes  # the recipe rows as docs/benchmarks.md shows them
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = ROOT / "docs" / "gpu_measurements.json"
RECIPE_MEASUREMENTS = ROOT / "docs" / "recipe_measurements.json"
_IGNORED = {"--steps"}  # verify-only options with a value


def flags_from_args(args: list[str]) -> dict:
    """verify's command-line options -> config-layer flags (later options win, as on the command line). The
    flag names come from the settings table (qtool.core.config.KEYS), as the CLI's own do."""
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


def _spec(row: dict, tmp: Path):
    """The model a row measured: a preset, or an architecture's config truncated to `layers`."""
    from qtool.core.models import resolve_model

    if "arch" not in row:
        return resolve_model(row["model"])
    sys.path.insert(0, str(ROOT / "bench"))
    from recipe_gpu import case_config

    path = tmp / f"{row['arch']}-{row['layers'] or 'full'}" / "config.json"
    if not path.exists():
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(case_config(row["arch"], row["layers"])))
    return resolve_model(str(path))


def load_rows(excluded: bool = False) -> list[dict]:
    """The measured rows the estimate is held to; with excluded=True the others, each with its reason (a row
    that measured another situation than the one its settings name, e.g. a second length in one process)."""
    rows = json.loads(MEASUREMENTS.read_text())["rows"] + json.loads(RECIPE_MEASUREMENTS.read_text())["rows"]
    return [r for r in rows if bool(r.get("excluded")) == excluded]


def compare(rows: list[dict] | None = None) -> list[dict]:
    import tempfile

    from qtool.core.config import resolve_settings
    from qtool.estimate import estimate_report

    rows = rows if rows is not None else load_rows()
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="qtool-compare-"))
    for r in rows:
        flags = flags_from_args(r["args"])
        flags.setdefault("recipe", "loop")  # rows from before the recipe setting measured qtool verify's loop
        # the switches the run had (UNSLOTH_BLOCK_COMPILE=0, ...) as the run's environment
        settings = resolve_settings(flags, env=r.get("env") or {}, cwd=ROOT / "docs")
        rep = estimate_report(_spec(r, tmp), settings)
        load_only = "--steps" in r["args"] and r["args"][r["args"].index("--steps") + 1] == "0"
        est = rep["weights"][rep["format"]]["gpu"] if load_only else rep["allocated_peak_bytes"]
        meas = r["measured_peak_allocated"]
        out.append({**named(r), "recipe": flags["recipe"], "estimate": est, "error": (est - meas) / meas})
    return out


def named(r: dict) -> dict:
    """A measured row with the names the table shows (model, label, run), without estimating anything."""
    return {**r, "model": r.get("model") or r["arch"] + (f" ({r['layers']} layers)" if r["layers"] else ""),
            "label": r.get("label") or f"{r['recipe']} {r['mode']}", "run": r.get("run") or f"R{r['call']}"}


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


def recipe_table(rows: list[dict]) -> str:
    """The recipe rows (docs/recipe_measurements.json) as docs/benchmarks.md shows them, grouped by architecture,
    with reserved peaks, then a count per recipe and mode."""
    g, order = 2**30, {"loop": 0, "trainer": 1, "sft": 2, "unsloth": 3}
    recipe_rows = [r for r in rows if "arch" in r]
    archs = list(dict.fromkeys(r["model"] for r in recipe_rows))
    key = lambda r: (archs.index(r["model"]), r["mode"] != "inference", r["seq"], order[r["recipe"]], r["call"])  # noqa: E731
    lines = ["| model (depth) | mode | seq | recipe (runner) | measured GiB | reserved GiB | estimate GiB | error |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(recipe_rows, key=key):
        extra = " ".join(r["args"][r["args"].index("--recipe") + 2:])
        extra = " ".join(a for a in extra.split() if a not in ("--optimizer", "adamw8bit")) if extra else ""
        env = " ".join(f"{k}={v}" for k, v in (r.get("env") or {}).items())
        recipe = (f"{r['recipe']}{' ' + extra if extra else ''} ({r['runner']})" + (f" [{env}]" if env else "")
                  + (f", call {r['call']}" if r["call"] >= 6 else ""))
        lines.append(f"| {r['model'] if r['layers'] else r['model'] + ' (full)'} | {r['mode']} | "
                     f"{r['seq']} | {recipe} | {r['measured_peak_allocated'] / g:.2f} | {r['peak_reserved'] / g:.2f} | "
                     f"{r['estimate'] / g:.2f} | {100 * r['error']:+.1f}% |")
    lines.append("")
    for (recipe, mode) in sorted({(r["recipe"], r["mode"]) for r in recipe_rows}):
        group = [r for r in recipe_rows if (r["recipe"], r["mode"]) == (recipe, mode)]
        worst = max(group, key=lambda r: abs(r["error"]))
        lines.append(f"- {recipe} {mode}: {len(group)} rows, within 3%: {sum(abs(r['error']) < 0.03 for r in group)}, "
                     f"largest {100 * worst['error']:+.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(recipe_table(compare()) if "--recipes" in sys.argv[1:] else table(compare()))
    if "--recipes" in sys.argv[1:]:
        print("\nNot compared (measured another situation than their settings name):")
        for r in compare(load_rows(excluded=True)):
            print(f"- {named(r)['model']} {r['mode']} {r['seq']} {r['recipe']}, call {r['call']}: "
                  f"{r['measured_peak_allocated'] / 2**30:.2f} GiB (estimate {r['estimate'] / 2**30:.2f}): {r['excluded']}")
