"""How fast is `qtool estimate 70b`? Best of N wall times against `python -c pass`.

    .venv/bin/python bench/estimate_speed.py [-n 7] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def best_of(cmd: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=7)
    ap.add_argument("--write", type=Path, help="replace the 'estimate speed' section of this markdown file")
    args = ap.parse_args()
    py = sys.executable
    base = best_of([py, "-c", "pass"], args.n)
    human = best_of([py, "-m", "qtool", "estimate", "70b"], args.n)
    js = best_of([py, "-m", "qtool", "estimate", "70b", "--json"], args.n)
    from importlib.metadata import version

    from qtool import __version__

    lines = [
        "## estimate speed",
        "",
        f"`bench/estimate_speed.py -n {args.n}`, best of {args.n}, {datetime.date.today().isoformat()}, "
        f"{platform.processor() or platform.machine()} ({platform.system()} {platform.release()}), "
        f"Python {platform.python_version()}, qtool {__version__}, typer {version('typer')}, rich {version('rich')}.",
        "",
        "| command | wall time | vs `python -c pass` |",
        "|---|---|---|",
        f"| `python -c pass` | {base * 1000:.0f} ms | 1.0x |",
        f"| `qtool estimate 70b` | {human * 1000:.0f} ms | {human / base:.1f}x |",
        f"| `qtool estimate 70b --json` | {js * 1000:.0f} ms | {js / base:.1f}x |",
        "",
        "Presets and size shorthands read a cached plan (configs/plans/) and never import torch,",
        "transformers or bitsandbytes; the time is Python start-up plus typer and rich.",
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
