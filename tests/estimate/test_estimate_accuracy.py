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
# Single rows outside 3%: (architecture, layers, mode, seq, recipe) -> bound. None today: Mixtral's Unsloth QLoRA
# at 512 tokens (-5.5%) was a fresh process's first step (unsloth_terms.moe_first_step)
KNOWN_MISSES: dict[tuple, float] = {}


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


def test_rows_measured_in_another_situation_say_why():
    """A row that measured something else than its settings name (a second length in one process, a load for a
    longer max_seq_length) carries its reason and stays out of the rows above."""
    excluded = compare_estimate.load_rows(excluded=True)
    assert len(excluded) == 4 and all(len(r["excluded"]) > 40 for r in excluded)


def test_every_recipe_within_3_percent_but_the_named_rows(rows):
    strict = [r for r in rows if r["recipe"] in ("loop", "trainer", "sft", "unsloth") and _bound(r) == BAR]
    assert len(strict) >= 160
    assert all(abs(r["error"]) < BAR for r in strict)


def test_measurements_cover_the_issue_matrix(rows):
    seen = {(r["model"], r["args"][r["args"].index("--mode") + 1], int(r["args"][r["args"].index("--seq-len") + 1]))
            for r in rows}
    for model in ("llama-3-8b", "mistral-7b", "qwen2.5-7b"):
        for seq in (512, 2048):
            assert (model, "qlora", seq) in seen
        assert (model, "inference", 2048) in seen
    assert ("llama-3-8b", "qlora", 8192) in seen


# Checks beyond issue 9's matrix: a second MoE, measured under two recipes only (docs/benchmarks.md, calls 9-10)
EXTRA_ARCHITECTURES = {"qwen3-30b-a3b"}


def test_recipe_measurements_cover_architectures_and_lengths(rows):
    """Loop, Trainer, SFTTrainer and Unsloth at 512/2048/8192 and generate at 2048 on eight architectures (Llama-3
    at full depth; Mistral (sliding window), Qwen2.5, Qwen3, Gemma-2, Phi-3 (fused qkv), Mixtral (MoE) at 4
    layers, Gemma-3 (5:1 local/global attention, 262K vocabulary) at 6). Gemma-2 under Unsloth ran with
    UNSLOTH_BLOCK_COMPILE=0 (its default compile fails on torch 2.11; docs/benchmarks.md)."""
    recipe_rows = [r for r in rows if "arch" in r]
    archs = {r["arch"] for r in recipe_rows} - EXTRA_ARCHITECTURES
    assert len(archs) >= 8 and {"gemma-3-12b", "gemma-2-9b", "mixtral-8x7b"} <= archs
    for arch in archs:
        for recipe in ("loop", "trainer", "sft", "unsloth"):
            seqs = {r["seq"] for r in recipe_rows if r["arch"] == arch and r["recipe"] == recipe and r["mode"] == "qlora"}
            if arch == "llama-3-8b" and recipe == "loop":
                seqs.add(8192)  # measured by qtool verify's loop in docs/gpu_measurements.json
            assert {512, 2048, 8192} <= seqs, (arch, recipe, seqs)
        for recipe in ("trainer", "unsloth"):
            assert any(r["arch"] == arch and r["mode"] == "inference" and r["recipe"] == recipe for r in recipe_rows)
    assert any(r["arch"] == "llama-3-8b" and r["full_depth"] and r["recipe"] == "unsloth" for r in recipe_rows)
