"""The memory model against reality: every peak `qtool verify` measured on a GPU (docs/gpu_measurements.json,
recorded by bench/verify_gpu.py on an H200) must be predicted within 3% by today's `qtool estimate`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_estimate", ROOT / "bench" / "compare_estimate.py")
compare_estimate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_estimate)

ROWS = compare_estimate.compare()


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['model']}-{r['label']}-{r['run']}".replace(" ", "_") for r in ROWS])
def test_estimate_within_3_percent_of_measured_peak(row):
    assert abs(row["error"]) < 0.03, f"estimate {row['estimate']:,} vs measured {row['measured_peak_allocated']:,}"


def test_measurements_cover_the_issue_matrix():
    seen = {(r["model"], r["args"][r["args"].index("--mode") + 1], int(r["args"][r["args"].index("--seq-len") + 1]))
            for r in ROWS}
    for model in ("llama-3-8b", "mistral-7b", "qwen2.5-7b"):
        for seq in (512, 2048):
            assert (model, "qlora", seq) in seen
        assert (model, "inference", 2048) in seen
    assert ("llama-3-8b", "qlora", 8192) in seen
