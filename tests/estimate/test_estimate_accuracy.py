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


def test_rows_measured_in_another_situation_say_why_and_are_not_held(rows):
    """A row that measured something else than its settings name (a second length in one process, a load for a
    longer max_seq_length) carries its reason and stays out of the rows above."""
    excluded = compare_estimate.load_rows(excluded=True)
    assert excluded and all(len(r["excluded"]) > 40 for r in excluded)
    assert not any(r.get("excluded") for r in compare_estimate.load_rows())
    assert len(rows) == len(MEASURED)
