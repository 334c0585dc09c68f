"""`qtool estimate` as a library: ModelSpec + Settings -> one JSON-able report dict. Never prints.

Report keys (also what `qtool estimate --json` prints):
  model            ref, name, kind (preset|shorthand|approximation|local|hub), architecture, plan_source
  mode, settings   the run mode and every resolved setting
  params           total, quantized, kept, kept_by_reason, lora (trainable adapter params)
  format           the format the settings choose (nf4_dq, nf4, fp4_dq, fp4)
  weights_bytes    format key -> checkpoint bytes (fp32, fp16, int8, fp4, fp4_dq, nf4, nf4_dq)
  weights          format key -> {checkpoint, gpu, data, quantized, kept, header, bits_per_param,
                   reduction_vs_fp16}
  kept             params and bytes of what stays 16-bit in the 4-bit formats, and why
  breakdown        component -> bytes at the peak (qtool.estimate.memory), peak_bytes its sum,
                   allocated_peak_bytes what torch.cuda.max_memory_allocated() should show
  budget_bytes, gpu, fits, headroom_bytes, fits_on (catalogue GPUs that hold the peak)
  approximation    true when no exact config stands behind the numbers; warnings: list of lines
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from qtool.estimate import formats
from qtool.estimate import memory
from qtool.core import presets
from qtool.core.config import Settings
from qtool.core.dtypes import MODEL_DTYPES, itemsize
from qtool.core.errors import ConfigError
from qtool.core.models import ModelSpec
from qtool.core.plan import QUANTIZE, REASON_FUSED
from qtool.core.sizes import parse_size

# Architectures whose output is vocabulary logits (and, in training, a loss over them). A bare encoder
# (BertModel, a sentence-transformers checkpoint) returns hidden states: no logits, no softmax.
_VOCAB_HEADS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration", "WithLMHead",
                "ForPreTraining")


def display_name(spec: ModelSpec) -> str:
    """What the report calls the model. A config.json given as a file is named after its checkpoint: a hub id
    in `_name_or_path`, else the folder it sits in (not 'config')."""
    if spec.kind != "local" or spec.config_path is None or spec.path is None or spec.name != spec.config_path.stem:
        return spec.name
    named = spec.config.get("_name_or_path")
    if isinstance(named, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", named.strip()):
        return named.strip()
    return spec.path.resolve().name or spec.name


def has_vocab_head(architecture: str) -> bool:
    return architecture.endswith(_VOCAB_HEADS)


def kept_dtype(spec: ModelSpec, settings: Settings) -> str:
    """dtype="auto" means what transformers does: the config's dtype, else the checkpoint's weights' dtype
    (when there are weights beside the config), else float32."""
    if settings.quant.dtype != "auto":
        return settings.quant.dtype
    cfg_dtype = spec.config.get("dtype") or spec.config.get("torch_dtype")
    if cfg_dtype in MODEL_DTYPES:
        return cfg_dtype
    if spec.path is not None:
        from qtool.core.checkpoint import weights_dtype

        found = weights_dtype(spec.path)
        if found in MODEL_DTYPES:
            return found
    return "float32"


def lora_linears(linears: dict, targets: tuple[str, ...]) -> list[tuple[tuple[int, ...], int]]:
    """Shapes of the Linears LoRA adapts. 'all-linear' = every quantized Linear (peft skips lm_head)."""
    if not targets or "all-linear" in targets:
        return [sc for v in linears.values() for sc in v]
    missing = [t for t in targets if t not in linears]
    if missing:
        raise ConfigError(f"LoRA target {missing[0]!r} matches no quantized Linear "
                          f"(this model has: {', '.join(sorted(linears))}, or all-linear)")
    return [sc for t in targets for sc in linears[t]]


def _warnings(spec: ModelSpec, run, plan, positions: int | None, dims: memory.Dims) -> list[str]:
    warnings = list(plan.warnings)
    if spec.kind == "approximation" and spec.note:
        warnings.insert(0, f"approximation: {spec.note}")
    if run.recipe == "unsloth" and run.mode == "qlora":
        warnings += _unsloth_warnings(plan, dims, run.unsloth_block_compile and run.gradient_checkpointing)
    if positions is not None and run.seq_len > positions:
        warnings.append(f"--seq-len {run.seq_len} is beyond the model's {positions} positions "
                        f"(max_position_embeddings): the model was not trained for sequences that long")
    return warnings


def _moe_layout_warnings(config: dict, dims: memory.Dims) -> list[str]:
    """MoE layouts the activation terms do not model: every layer is counted as routed experts of the experts'
    width (memory.dims_from_config), so shared experts and dense layers are left out."""
    if dims.num_experts <= 1:
        return []
    shared = config.get("shared_expert_intermediate_size") or config.get("n_shared_experts")
    dense = config.get("mlp_only_layers") or config.get("first_k_dense_replace")
    if not (shared or dense):
        return []
    what = " and ".join(w for w, present in (("shared experts", shared), ("dense MLP layers", dense)) if present)
    return [f"MoE with {what}: the activation terms count every layer as routed experts only "
            f"({dims.intermediate} wide), so the estimate is low by what those hold"]


def _unsloth_warnings(plan, dims: memory.Dims, first_step: bool) -> list[str]:
    """What Unsloth's QLoRA estimate assumes about Unsloth's own switches (docs/benchmarks.md, "recipes").
    first_step: the block compile is on and the layers are checkpointed (unsloth_terms.moe_first_step applies)."""
    out = []
    if first_step and any(g.reason == REASON_FUSED for g in plan.groups):
        out.append("--recipe unsloth with MoE experts: a fresh run's first step holds every layer's activations "
                   "(Unsloth's per-layer torch.compile, its default from torch 2.11) and is the peak estimated here; "
                   "--no-unsloth-block-compile (UNSLOTH_BLOCK_COMPILE=0) avoids it (measured on Mixtral and Qwen3-MoE)")
    if dims.attn_softcapping and plan.model_type == "gemma2":  # unsloth_terms.softcap_attention
        out.append("--recipe unsloth with soft-capped attention (Gemma-2): Unsloth 2026.10.9's per-layer compile "
                   "failed inside Inductor on torch 2.11, so this was measured with UNSLOTH_BLOCK_COMPILE=0; without "
                   "flash-attn's soft-capping kernel attention holds B x heads x S x S scores and two "
                   "max_seq_length x max_seq_length masks (taken as --seq-len)")
    return out


def _weights_table(weights: dict, total: int) -> dict:
    fp16 = weights["fp16"].checkpoint
    return {k: {**w.as_dict(), "bits_per_param": round(8 * w.checkpoint / total, 4) if total else 0.0,
                "reduction_vs_fp16": round(1 - w.checkpoint / fp16, 4) if fp16 else 0.0}
            for k, w in weights.items()}


@dataclasses.dataclass(frozen=True)
class Basis:
    """What every estimate starts from: the tensor plan, the weights per format and the memory model's inputs.
    Shared by the one-GPU report and the per-card estimates (qtool.estimate.cards)."""

    cached: Any  # qtool.core.plancache.CachedPlan
    weights: dict  # format key -> formats.WeightBytes
    chosen: str  # the format the settings choose
    dtype: str  # dtype of the kept tensors
    config: dict  # config.json, completed with transformers' defaults when the plan came from the meta device
    inputs: memory.MemoryInputs


def estimate_basis(spec: ModelSpec, settings: Settings, *, trust_remote_code: bool = False) -> Basis:
    from qtool.core.plancache import plan_for

    q, run = settings.quant, settings.run
    cached = plan_for(spec, skip_modules=q.skip_modules, trust_remote_code=trust_remote_code)
    plan = cached.plan
    dtype = kept_dtype(spec, settings)
    total = plan.total_params

    weights = {key: formats.weights_for_format(plan, key, blocksize=q.blocksize, dtype=dtype,
                                               quant_storage=q.quant_storage) for key in formats.FORMATS}
    chosen = formats.format_key(q.quant_type, q.double_quant)

    plain_key = "fp32" if dtype == "float32" else "fp16"
    kept_params = plan.kept_params
    kept_gpu = sum(formats.gpu_bytes([formats.Part("", "float32" if g.keep_fp32 else dtype, g.shape)]) * g.count
                   for g in plan.groups if g.action != QUANTIZE)
    linears = lora_linears(cached.linears, run.lora_targets)
    lora = memory.lora_param_count(linears, run.lora_rank) if run.mode in ("qlora", "lora") else 0
    largest = max((g.numel for g in plan.groups if g.action == QUANTIZE), default=0)
    fused = [g for g in plan.groups if g.reason == REASON_FUSED]
    quant_gpu = weights[chosen].gpu
    if run.recipe == "unsloth" and fused and formats.FORMATS[chosen].quant_type in ("nf4", "fp4"):
        # Unsloth's loader quantizes fused 3-D expert tensors as well (bitsandbytes' path keeps them 16-bit)
        fmt = formats.FORMATS[chosen]
        quant_gpu += sum(g.count * (formats.gpu_bytes(formats.quantized_parts(g.shape, fmt, blocksize=q.blocksize,
                                                                              dtype=dtype))
                                    - formats.gpu_bytes([formats.Part("", dtype, g.shape)])) for g in fused)
    config = spec.config
    if cached.source == "meta":  # complete missing fields with transformers' defaults, as the plan did
        from qtool.core.meta import hf_config

        config = hf_config(spec.config, source=spec.config_path or spec.name,
                           trust_remote_code=trust_remote_code).to_dict()
    dims = memory.dims_from_config(config)
    if not has_vocab_head(plan.architecture):
        dims = dataclasses.replace(dims, vocab=0)  # no output head: logits and the loss over them are 0 bytes
    inputs = memory.MemoryInputs(
        dims=dims, mode=run.mode, batch=run.batch_size, seq=run.seq_len, total_params=total,
        kept_params=kept_params, quant_weights_gpu=quant_gpu, plain_weights_gpu=weights[plain_key].gpu,
        kept_weights_gpu=kept_gpu, lora_params=lora, largest_linear=largest,
        compute_bytes=itemsize(q.compute_dtype), optimizer=run.optimizer,
        gradient_checkpointing=run.gradient_checkpointing, weight_bytes=itemsize(dtype),
        recipe=run.recipe, precision=run.precision, lora_rank=run.lora_rank,
        expert_lora="all-linear" in run.lora_targets, model_type=plan.model_type or "",
        largest_fused=max((g.numel for g in fused), default=0), unsloth_block_compile=run.unsloth_block_compile,
    )
    return Basis(cached, weights, chosen, dtype, config, inputs)


def estimate_report(spec: ModelSpec, settings: Settings, *, trust_remote_code: bool = False) -> dict[str, Any]:
    run = settings.run
    basis = estimate_basis(spec, settings, trust_remote_code=trust_remote_code)
    cached, plan, weights, chosen, config = basis.cached, basis.cached.plan, basis.weights, basis.chosen, basis.config
    total, kept_params, lora, dtype = plan.total_params, plan.kept_params, basis.inputs.lora_params, basis.dtype
    breakdown = memory.memory_breakdown(basis.inputs)
    peak = memory.peak_bytes(breakdown)

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    positions = memory.max_positions(text)
    warnings = _warnings(spec, run, plan, positions, basis.inputs.dims) + _moe_layout_warnings(text, basis.inputs.dims)
    budget = run.budget_bytes
    fits = None if budget is None else peak <= budget
    fits_on = sorted(
        {(parse_size(g["vram"]), g["key"]) for g in presets.gpus().values() if parse_size(g["vram"]) >= peak}
    )
    kept_by_reason = plan.kept_by_reason()
    return {
        "model": {
            "ref": spec.ref, "name": display_name(spec), "kind": spec.kind, "preset": spec.preset,
            "architecture": plan.architecture, "model_type": plan.model_type, "plan_source": cached.source,
            "note": spec.note, "vocab_logits": has_vocab_head(plan.architecture), "max_positions": positions,
        },
        "approximation": spec.kind == "approximation",
        "mode": run.mode,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.values.items()},
        "params": {
            "total": total, "quantized": plan.quantized_params, "kept": kept_params,
            "kept_by_reason": kept_by_reason, "lora": lora,
        },
        "format": chosen,
        "weights_bytes": {k: w.checkpoint for k, w in weights.items()},
        "weights": _weights_table(weights, total),
        "kept": {"params": kept_params, "bytes": weights[chosen].kept, "dtype": dtype, "by_reason": kept_by_reason},
        "breakdown": breakdown,
        "peak_bytes": peak,
        "allocated_peak_bytes": memory.allocated_peak_bytes(breakdown),
        "budget_bytes": budget,
        "gpu": run.gpu,
        "fits": fits,
        "headroom_bytes": None if budget is None else budget - peak,
        "fits_on": [key for _, key in fits_on],
        "warnings": warnings,
    }
