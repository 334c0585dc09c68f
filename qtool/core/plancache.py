"""Tensor plans without torch where possible.

  presets/shorthands  configs/plans/<preset>.json, written by tools/gen_plans.py from qtool.core.meta.build_plan
                      (tests/core/test_presets.py rebuilds each one and compares, so the cache cannot go stale;
                      a cache whose config hash differs from the preset file is ignored)
  approximations      built analytically (the dense Llama-style config of qtool.core.models.approximate_config;
                      tests compare it to build_plan)
  anything else       qtool.core.meta.build_plan on the meta device (imports torch/transformers)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from qtool.core import presets
from qtool.core.plan import KEEP, QUANTIZE, REASON_LINEAR, REASON_NOT_LINEAR, REASON_SKIPPED, ModelPlan, TensorPlan, group_tensors

CACHE_VERSION = 1


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def plans_dir() -> Path:
    return presets.configs_dir() / "plans"


def linear_shapes(plan: ModelPlan) -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """Quantized Linear weights by module short name ('q_proj') -> [(shape, count)], for LoRA targets.

    Needs the full tensor list (a fresh plan); cached plans store the result.
    """
    out: dict[str, dict[tuple[int, ...], int]] = {}
    for t in plan.tensors or []:
        if t.action != QUANTIZE:
            continue
        short = t.name.rsplit(".", 2)[-2] if t.name.count(".") >= 1 else t.name
        shapes = out.setdefault(short, {})
        shapes[t.shape] = shapes.get(t.shape, 0) + 1
    return {k: [(s, n) for s, n in v.items()] for k, v in out.items()}


class CachedPlan:
    """A plan plus its Linear shapes by name."""

    def __init__(self, plan: ModelPlan, linears: dict[str, list[tuple[tuple[int, ...], int]]], source: str):
        self.plan = plan
        self.linears = linears
        self.source = source  # "cache" | "analytic" | "meta"


def cache_record(preset: str, plan: ModelPlan) -> dict:
    """What tools/gen_plans.py writes for one preset."""
    return {
        "version": CACHE_VERSION,
        "preset": preset,
        "config_sha256": config_hash(presets.load_model_preset(preset)),
        "generated_by": "tools/gen_plans.py (qtool.core.meta.build_plan)",
        "plan": plan.to_dict(),
        "linears": {k: [[list(s), n] for s, n in v] for k, v in linear_shapes(plan).items()},
    }


def load_cached(preset: str, config: dict) -> CachedPlan | None:
    path = plans_dir() / f"{preset}.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("version") != CACHE_VERSION or rec.get("config_sha256") != config_hash(config):
        return None
    linears = {k: [(tuple(s), n) for s, n in v] for k, v in rec["linears"].items()}
    return CachedPlan(ModelPlan.from_dict(rec["plan"]), linears, "cache")


def llama_tensors(cfg: dict) -> list[TensorPlan]:
    """The tensors of a plain LlamaForCausalLM (no biases), in named_modules order, as build_plan sees them."""
    h, n_layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    q = lambda name, shape: TensorPlan(name, shape, QUANTIZE, REASON_LINEAR)  # noqa: E731
    k = lambda name, shape: TensorPlan(name, shape, KEEP, REASON_NOT_LINEAR)  # noqa: E731
    out = [k("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out += [
            q(p + "self_attn.q_proj.weight", (heads * hd, h)), q(p + "self_attn.k_proj.weight", (kv * hd, h)),
            q(p + "self_attn.v_proj.weight", (kv * hd, h)), q(p + "self_attn.o_proj.weight", (h, heads * hd)),
            q(p + "mlp.gate_proj.weight", (inter, h)), q(p + "mlp.up_proj.weight", (inter, h)),
            q(p + "mlp.down_proj.weight", (h, inter)),
            k(p + "input_layernorm.weight", (h,)), k(p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(k("model.norm.weight", (h,)))
    if cfg.get("tie_word_embeddings", True) is False:
        out.append(TensorPlan("lm_head.weight", (vocab, h), KEEP, REASON_SKIPPED))
    return out


def analytic_plan(cfg: dict) -> CachedPlan:
    tensors = llama_tensors(cfg)
    plan = ModelPlan(model_type="llama", architecture="LlamaForCausalLM", groups=group_tensors(tensors), tensors=tensors)
    return CachedPlan(plan, linear_shapes(plan), "analytic")


def meta_plan(config: dict, *, skip_modules: Sequence[str] = (), source: object = "config.json",
              trust_remote_code: bool = False) -> CachedPlan:
    from qtool.core.meta import build_plan

    plan = build_plan(config, skip_modules=list(skip_modules) or None, source=source,
                      trust_remote_code=trust_remote_code)
    return CachedPlan(plan, linear_shapes(plan), "meta")


def plan_for(spec, *, skip_modules: Sequence[str] = (), trust_remote_code: bool = False) -> CachedPlan:
    """The plan for a resolved ModelSpec: cache, analytic, or meta device (in that order of preference)."""
    if not skip_modules:
        if spec.preset:
            cached = load_cached(spec.preset, spec.config)
            if cached is not None:
                return cached
        if spec.kind == "approximation":
            return analytic_plan(spec.config)
    return meta_plan(spec.config, skip_modules=skip_modules, source=spec.config_path or spec.name,
                     trust_remote_code=trust_remote_code)
