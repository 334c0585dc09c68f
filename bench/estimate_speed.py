"""How fast is `qtool estimate 70b`? Wall times of whole processes against `python -c pass` and against
`python -c "import typer, rich"` (the floor of any Typer + rich CLI; issue 11's target is within 2x of it).
Runs are paired (baseline, then qtool, in turn), so load on a shared machine hits both alike; the table gives
the best and the median of N.

    .venv/bin/python bench/estimate_speed.py [-n 7] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what `qtool estimate 70b` costs when Typer parses it (as every other command line does): the fast lane's gain
THROUGH_TYPER = "from qtool.cli.app import typer_app; typer_app()(['estimate', '70b'], prog_name='qtool')"


# as an installed qtool runs: pip compiles every module at install time, so the warm-up run must be allowed to
# write the .pyc files a PYTHONDONTWRITEBYTECODE in the caller's environment would forbid (typer and rich,
# the baseline, are compiled in site-packages already)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - t0


def paired(cmds: list[list[str]], n: int) -> list[list[float]]:
    """n rounds; each round runs every command once, in order."""
    for cmd in cmds:  # warm the page cache and write the .pyc files first
        wall(cmd)
    times: list[list[float]] = [[] for _ in cmds]
    for _ in range(n):
        for i, cmd in enumerate(cmds):
            times[i].append(wall(cmd))
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=7)
    ap.add_argument("--write", type=Path, help="replace the 'estimate speed' section of this markdown file")
    args = ap.parse_args()
    py = sys.executable
    names = ["`python -c pass`", '`python -c "import typer, rich"`', "`qtool estimate 70b`",
             "`qtool estimate 70b --json`", "`qtool estimate 70b` through Typer (no fast lane)"]
    runs = paired([[py, "-c", "pass"], [py, "-c", "import typer, rich"], [py, "-m", "qtool", "estimate", "70b"],
                   [py, "-m", "qtool", "estimate", "70b", "--json"],
                   [py, "-c", THROUGH_TYPER]], args.n)
    best = [min(t) for t in runs]
    median = [statistics.median(t) for t in runs]
    from importlib.metadata import version

    from qtool import __version__

    lines = [
        "## estimate speed",
        "",
        f"`bench/estimate_speed.py -n {args.n}`, {args.n} paired rounds, {datetime.date.today().isoformat()}, "
        f"{platform.processor() or platform.machine()} ({platform.system()} {platform.release()}), "
        f"Python {platform.python_version()}, qtool {__version__}, typer {version('typer')}, rich {version('rich')}.",
        "",
        "| command | best | median | median vs `import typer, rich` |",
        "|---|---|---|---|",
        *(f"| {name} | {b * 1000:.0f} ms | {m * 1000:.0f} ms | {m / median[1]:.1f}x |"
          for name, b, m in zip(names, best, median)),
        "",
        "Presets and size shorthands read a cached plan (configs/plans/) and never import torch,",
        "transformers or bitsandbytes. `qtool estimate MODEL [setting flags]` takes the fast lane",
        "(qtool/cli/fast.py): no Typer, no pydantic; the rest is Python start-up, rich and the report.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        old = args.write.read_text() if args.write.exists() else "# Benchmarks\n\n"
        start = old.find("## estimate speed")
        if start >= 0:
            end = old.find("\n## ", start + 1)
            old = old[:start] + (old[end + 1:] if end >= 0 else "")
        args.write.write_text(old.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
