"""The memory model against reality: every peak measured on a GPU -- qtool verify's loop
(docs/gpu_measurements.json, bench/verify_gpu.py) and the recipes users launch, transformers' Trainer, trl's
SFTTrainer, Unsloth and generate (docs/recipe_measurements.json, bench/recipe_gpu.py) -- is recomputed with
today's `qtool estimate` and held to a bound: the issue's 3%, except where docs/benchmarks.md says the model
is known to miss by more (named below, each with the bound it reaches today)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compare_estimate", ROOT / "bench" / "compare_estimate.py")
compare_estimate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_estimate)

MEASURED = [compare_estimate.named(r) for r in compare_estimate.load_rows()]  # for the ids: nothing estimated
BAR = 0.03
# Recipes the model does not yet predict within 3% on every recorded row (docs/benchmarks.md, "recipes"): none
RECIPE_BOUND: dict[str, float] = {}
# Single rows outside 3%: (architecture, layers, mode, seq, recipe) -> bound
KNOWN_MISSES = {
    # Unsloth: Mixtral's layer with 4-bit experts peaks at the same 5.78 GiB at 512 and 2048 tokens; the grouped-GEMM
    # terms account for 2048 and 8192, at 512 ~0.35 GiB seen in forward and backward has no source found yet
    ("mixtral-8x7b", 4, "qlora", 512, "unsloth"): 0.06,
}


def _key(row) -> tuple:
    return row.get("arch"), row.get("layers"), row.get("mode"), row.get("seq"), row["recipe"]


def _bound(row) -> float:
    return KNOWN_MISSES.get(_key(row)) or RECIPE_BOUND.get(row["recipe"], BAR)


def _id(r) -> str:
    seq = r["args"][r["args"].index("--seq-len") + 1]
    return f"{r['model']}-{r['label']}-{seq}-{r['run']}".replace(" ", "_")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Every measured row with today's estimate: computed once, by the worker that runs this file (at
    collection every xdist worker would pay for it)."""
    return compare_estimate.compare()


@pytest.mark.parametrize("i", range(len(MEASURED)), ids=[_id(r) for r in MEASURED])
def test_estimate_within_bound_of_measured_peak(rows, i):
    row = rows[i]
    assert _id(row) == _id(MEASURED[i])
    bound = _bound(row)
    assert abs(row["error"]) < bound, (f"estimate {row['estimate']:,} vs measured {row['measured_peak_allocated']:,} "
                                       f"({row['error']:+.2%}, bound {bound:.0%})")


def test_known_misses_are_still_misses(rows):
    """A named exception whose row came back within 3% should leave the list (the bound is not a licence)."""
    for row in rows:
        key = _key(row)
        if key in KNOWN_MISSES:
            assert abs(row["error"]) >= BAR, f"{key} is now within 3%: drop it from KNOWN_MISSES"


def test_the_unsloth_moe_warning_quotes_the_measured_miss(rows, capsys):
    """`qtool estimate ... --recipe unsloth` on MoE experts tells the user the miss as measured today (the
    known-miss row recomputed here), not a figure that went stale when the terms changed."""
    import json

    from qtool.cli.app import main

    miss = [r for r in rows if _key(r) == ("mixtral-8x7b", 4, "qlora", 512, "unsloth")]
    assert len(miss) == 1
    code = main(["estimate", "mixtral-8x7b", "--recipe", "unsloth", "--mode", "qlora", "--json"])
    warnings = [w for w in json.loads(capsys.readouterr().out)["warnings"] if "MoE experts" in w]
    assert code == 0 and len(warnings) == 1 and f"{100 * miss[0]['error']:.1f}% off at 512 tokens" in warnings[0]


def test_every_recipe_within_3_percent_but_the_named_rows(rows):
    strict = [r for r in rows if r["recipe"] in ("loop", "trainer", "sft", "unsloth") and _bound(r) == BAR]
    assert len(strict) >= 140
    assert all(abs(r["error"]) < BAR for r in strict)


def test_measurements_cover_the_issue_matrix(rows):
    seen = {(r["model"], r["args"][r["args"].index("--mode") + 1], int(r["args"][r["args"].index("--seq-len") + 1]))
            for r in rows}
    for model in ("llama-3-8b", "mistral-7b", "qwen2.5-7b"):
        for seq in (512, 2048):
            assert (model, "qlora", seq) in seen
        assert (model, "inference", 2048) in seen
    assert ("llama-3-8b", "qlora", 8192) in seen


def test_recipe_measurements_cover_architectures_and_lengths(rows):
    """Loop, Trainer, SFTTrainer and Unsloth at 512/2048/8192 and generate at 2048 on eight architectures (Llama-3
    at full depth; Mistral (sliding window), Qwen2.5, Qwen3, Gemma-2, Phi-3 (fused qkv), Mixtral (MoE) at 4
    layers, Gemma-3 (5:1 local/global attention, 262K vocabulary) at 6). Unsloth could not train Gemma-2 on the
    GPU machine (torch.compile failed in its compiled decoder block; docs/benchmarks.md): generate only."""
    recipe_rows = [r for r in rows if "arch" in r]
    archs = {r["arch"] for r in recipe_rows}
    assert len(archs) >= 8 and "gemma-3-12b" in archs
    for arch in archs:
        for recipe in ("loop", "trainer", "sft", "unsloth"):
            if arch == "gemma-2-9b" and recipe == "unsloth":
                continue
            seqs = {r["seq"] for r in recipe_rows if r["arch"] == arch and r["recipe"] == recipe and r["mode"] == "qlora"}
            if arch == "llama-3-8b" and recipe == "loop":
                seqs.add(8192)  # measured by qtool verify's loop in docs/gpu_measurements.json
            assert {512, 2048, 8192} <= seqs, (arch, recipe, seqs)
        for recipe in ("trainer", "unsloth"):
            assert any(r["arch"] == arch and r["mode"] == "inference" and r["recipe"] == recipe for r in recipe_rows)
    assert any(r["arch"] == "llama-3-8b" and r["full_depth"] and r["recipe"] == "unsloth" for r in recipe_rows)
