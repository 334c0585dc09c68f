"""Cached preset plans equal a fresh build_plan, and preset totals equal the published ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from qtool.core import presets
from qtool.core.config import resolve_settings
from qtool.estimate import estimate_report
from qtool.core.models import resolve_model
from qtool.core.plancache import load_cached, plans_dir

# Public config.json files and published parameter totals (facts, copied from the team's reference folder).
REFERENCE = Path(__file__).parents[1] / "data" / "reference"
SHAPE_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim",
              "num_local_experts", "ffn_dim", "word_embed_proj_dim")


def _signature(cfg: dict) -> tuple:
    return tuple(cfg.get(k) for k in SHAPE_KEYS)


@pytest.mark.parametrize("name", sorted(presets.model_presets()))
def test_cached_plan_equals_fresh_build(name):
    from qtool.core.meta import build_plan
    from qtool.core.plancache import linear_shapes

    config = presets.load_model_preset(name)
    cached = load_cached(name, config)
    assert cached is not None, f"configs/plans/{name}.json missing or stale: run tools/gen_plans.py"
    fresh = build_plan(config)
    assert cached.plan.to_dict() == fresh.to_dict()
    assert cached.linears == linear_shapes(fresh)


def test_every_cache_file_has_a_preset():
    assert {p.stem for p in plans_dir().glob("*.json")} == set(presets.model_presets())


def _csv_rows():
    with open(REFERENCE / "param_totals.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("row", _csv_rows(), ids=lambda r: r["config_file"])
def test_totals_equal_published(row):
    """Each reference model: its matching preset (cached plan, no torch) or its config file gives the total."""
    ref_cfg = json.loads((REFERENCE / "configs" / row["config_file"]).read_text())
    matches = [n for n in presets.model_presets() if _signature(presets.load_model_preset(n)) == _signature(ref_cfg)]
    settings = resolve_settings({}, env={}, cwd=Path("/"))
    refs = matches or [str(REFERENCE / "configs" / row["config_file"])]
    for ref in refs:
        report = estimate_report(resolve_model(ref), settings)
        assert report["params"]["total"] == int(row["parameters"]), ref


def test_every_preset_with_published_total_is_checked():
    sigs = {_signature(json.loads((REFERENCE / "configs" / r["config_file"]).read_text())) for r in _csv_rows()}
    covered = [n for n in presets.model_presets() if _signature(presets.load_model_preset(n)) in sigs]
    # the presets the shorthands 8b, 70b, 7b, 405b, 47b, 0.5b point at all have published totals
    for short in ("8b", "70b", "7b", "405b", "47b", "0.5b", "9b", "1.1b"):
        assert presets.shorthands()[short] in covered, short
