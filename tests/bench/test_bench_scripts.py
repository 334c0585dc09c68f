"""bench/ scripts end to end on the CPU (slow): marked `bench`, outside the default run (`make test-bench`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymodels import llama_config

pytestmark = pytest.mark.bench
ROOT = Path(__file__).resolve().parents[2]


def test_bench_script_on_cpu(tmp_path):
    """bench/verify_gpu.py's plan, subprocesses and table, on a tiny preset-like config and the CPU."""
    (tmp_path / "tiny.json").write_text(json.dumps(llama_config(vocab_size=128, torch_dtype="bfloat16")))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "verify_gpu.py"), "--device", "cpu", "--models", str(tmp_path / "tiny.json"),
         "--seq-lens", "16", "--long-seq", "32", "--infer-seq", "16", "--steps", "1"],
        env={**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.name for p in out.glob("tiny-*.json"))
    # qlora at 16 and 32 (the first model gets the long run), inference at 16, load-only
    assert len(runs) == 4, runs
    for p in out.glob("tiny-*.json"):
        rep = json.loads(p.read_text())
        assert rep["exit_code"] == 0 and rep["versions"]["torch"]
    table = (out / "verify_gpu.md").read_text()
    assert "| tiny |" in table and "load only" in table and "qlora" in table and "inference" in table


def test_stream_bench_script(tmp_path):
    """bench/stream_bench.py end to end on a 2-layer model: both modes write the same bytes, streaming holds less."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stream_bench.py"), "--layers", "2", "--shard-mb", "20",
                           "--rates", "0", "--repeat", "1", "--workdir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[1]: line.split() for line in proc.stdout.splitlines() if line.startswith("  loopback")}
    assert set(rows) == {"download-first", "stream"}, proc.stdout
    assert rows["stream"][-1] == rows["download-first"][-1]  # the weights' hash
    assert int(rows["stream"][3]) < int(rows["download-first"][3])  # measured peak disk, MB
    assert list(tmp_path.iterdir()) == []
