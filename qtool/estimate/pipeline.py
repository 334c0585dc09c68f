"""device_map="auto" over several cards, one card at a time (first pass: layers split evenly; replaced by
accelerate's own placement in qtool.estimate.placement)."""

from __future__ import annotations

from typing import Any

from qtool.estimate import memory

_LAYER_TERMS = ("weights", "kept_fp32", "lora_params", "lora_grads", "optimizer_states", "optimizer_states_paged",
                "expert_adapters", "activation_checkpoints", "activations")


def card_terms(basis, settings, budgets, **_) -> tuple[list[dict[str, int]], dict[str, Any]]:
    n = len(budgets)
    layers = basis.inputs.dims.layers
    split = [layers // n + (1 if i < layers % n else 0) for i in range(n)]
    single = memory.memory_breakdown(basis.inputs)
    out = []
    for i, count in enumerate(split):
        terms = {k: v * count // layers for k, v in single.items() if k in _LAYER_TERMS}
        if i == n - 1:
            terms.update({k: v for k, v in single.items() if k not in _LAYER_TERMS})
        else:
            terms.update({k: single[k] for k in ("cublas_workspace", "cuda_context")})
        out.append(terms)
    return out, {"layers_per_card": split}
