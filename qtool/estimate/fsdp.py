"""FSDP-QLoRA, one rank: what lives on each GPU when accelerate wraps a 4-bit model in FSDP (FSDP1).

The recipe (peft's examples/sft/configs/fsdp_config_qlora.yaml): TRANSFORMER_BASED_WRAP on the decoder layer,
peft's fsdp_auto_wrap_policy also wraps every LoRA Linear on its own (its weight is trainable, the layer's are
not: FSDP1 with use_orig_params=False needs one requires_grad per flat parameter), use_orig_params false,
mixed precision bf16, bnb_4bit_quant_storage = the model's dtype, so that a layer's packed 4-bit weights and its
norms flatten into one bf16 FlatParameter. What that means per rank (torch/distributed/fsdp/_flat_param.py,
_runtime_utils.py):

- every FlatParameter is padded to a multiple of N and each rank keeps one chunk: ceil(numel / N) elements;
- the quant states (absmax, quant_map, the nested statistics) are attributes of Params4bit, not parameters:
  FSDP does not shard them, every rank holds all of them;
- the root unit (embeddings, final norm, lm_head: what no decoder layer holds) is not resharded after the
  forward (_post_forward_reshard skips the root), so it stays gathered through the backward;
- a decoder layer is gathered (bf16, full size) for its forward, its recompute and its backward; with
  BACKWARD_PRE prefetch the next one is gathered too: two layers at a time;
- LoRA units: fp32 shards, fp32 sharded gradients and optimizer states of the shard, gathered in bf16;
- activations: each rank runs its own batch at full size, in bf16 (no fp32 upcast of the norms: FSDP needs
  one dtype per flat parameter, so prepare_model_for_kbit_training's upcast is not part of the recipe).

Strategies: shard_grad_op keeps every layer gathered from its forward to its backward (the whole model gathered
at the end of the forward); no_shard keeps everything whole (DDP-like); hybrid_shard shards within a host,
which for the cards of one host is full_shard. offload_params keeps the shards (params, grads) in host RAM and
runs the optimizer there.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from qtool.core.dtypes import itemsize
from qtool.core.plan import QUANTIZE
from qtool.estimate import formats, memory, step_terms

_LAYER = re.compile(r"\.(\d+)\.")  # the layer index in a parameter name: model.layers.0.mlp...
LORA_DTYPE_BYTES = 4  # peft creates adapters in fp32 (autocast_adapter_dtype casts 16-bit ones up)
PARAM_DTYPE_BYTES = 2  # MixedPrecision(param_dtype=bf16): what an all-gather materialises
GATHERED_LAYERS = 2  # the layer being computed and the one BACKWARD_PRE prefetches
# what qtool says beside an offloaded estimate, until the offloaded step is modelled (docs/benchmarks.md):
# the one setting measured (8B, 2 cards, 512 tokens, twice) peaked 3.64 GiB against 3.17 estimated
OFFLOAD_MEASURED_OVER = 0.15  # measured / estimate - 1 = +14.8%, rounded up
OFFLOAD_CAVEAT = ("--fsdp-offload-params: the training step is not fully modelled; on the one setting measured "
                  "(Llama-3-8B, 2 cards, 512 tokens) it peaked {:.0%} above this estimate: keep that headroom")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _block(n: int) -> int:
    return _ceil_div(n, formats.CUDA_BLOCK) * formats.CUDA_BLOCK


@dataclasses.dataclass(frozen=True)
class Units:
    """The model as FSDP wraps it: bytes of one decoder layer's flat parameter (all layers alike), of the root
    unit, the quant states, and the LoRA units' element counts."""

    layers: int
    layer_bytes: int  # packed 4-bit weights + kept tensors of one decoder layer, in storage bytes
    root_bytes: int  # embeddings, final norm, lm_head (and anything outside the layers)
    quant_state_gpu: int  # absmax & co. of every quantized weight, replicated on each rank
    lora_units: tuple[tuple[int, int], ...]  # (numel of one LoRA A or B, how many such units)
    storage_bytes: int  # itemsize of the flat parameters (the model dtype)

    def layer_lora_numel(self) -> int:
        return sum(n * c for n, c in self.lora_units) // max(self.layers, 1)


def model_units(basis, settings) -> Units:
    """Units from the tensor plan: a group whose example sits in layer 0 repeats count // layers times per layer;
    what is left over (a final norm of a norm's shape) belongs to the root."""
    plan, q = basis.cached.plan, settings.quant
    fmt = formats.FORMATS[basis.chosen]
    layers = basis.inputs.dims.layers
    layer = root = states = 0
    for g in plan.groups:
        if g.action == QUANTIZE:
            parts = formats.quantized_parts(g.shape, fmt, blocksize=q.blocksize, dtype=basis.dtype,
                                            quant_storage=q.quant_storage)
            flat, states = parts[0].nbytes, states + formats.gpu_bytes(parts[1:]) * g.count
        else:
            flat = g.numel * (4 if g.keep_fp32 else itemsize(basis.dtype))
        in_layers = g.count // layers if _LAYER.search(g.example) else 0
        layer += flat * in_layers
        root += flat * (g.count - in_layers * layers)
    from qtool.estimate.report import lora_linears

    rank = settings.run.lora_rank
    lora: dict[int, int] = {}
    if basis.inputs.lora_params:
        for (out, inp), count in lora_linears(basis.cached.linears, settings.run.lora_targets):
            lora[rank * inp] = lora.get(rank * inp, 0) + count
            lora[out * rank] = lora.get(out * rank, 0) + count
    return Units(layers, layer, root, states, tuple(lora.items()), itemsize(basis.dtype))


def _shard(numel: int, n: int, item: int) -> int:
    return _block(_ceil_div(numel, n) * item)


def _weights(u: Units, n: int, strategy: str) -> dict[str, int]:
    """Resident parameters of one rank and what is gathered at the peak."""
    shards = 1 if strategy == "no_shard" else n
    item = u.storage_bytes
    layer_numel, root_numel = u.layer_bytes // item, u.root_bytes // item
    out = {"weights_shard": u.layers * _shard(layer_numel, shards, item) + _shard(root_numel, shards, item),
           "quant_state": u.quant_state_gpu}
    if shards == 1:
        return out
    gathered = u.layers if strategy == "shard_grad_op" else GATHERED_LAYERS
    lora_full = u.layer_lora_numel() * PARAM_DTYPE_BYTES
    out["root_gathered"] = _block(_ceil_div(root_numel, n) * n * item)
    out["layers_gathered"] = gathered * (_block(_ceil_div(layer_numel, n) * n * item) + lora_full)
    return out


def _trainable(u: Units, n: int, strategy: str, optimizer: str) -> dict[str, int]:
    shards = 1 if strategy == "no_shard" else n
    params = sum(_shard(numel, shards, LORA_DTYPE_BYTES) * c for numel, c in u.lora_units)
    shard_numel = sum(_ceil_div(numel, shards) * c for numel, c in u.lora_units)
    if optimizer in ("adamw", "paged_adamw32bit"):
        states = 2 * params
    else:
        states = memory.optimizer_bytes(shard_numel, optimizer)
    return {"lora_shard": params, "lora_grads_shard": params,
            "optimizer_states_paged" if optimizer.startswith("paged_") else "optimizer_states": states}


def _loading(basis, u: Units, ram_efficient: bool) -> dict[str, dict[str, int]]:
    """What a rank holds before training. Without ram-efficient loading every rank loads the whole 4-bit model
    on its own card (transformers 5 does so for quantized models; one weight at a time arrives 16-bit and is
    quantized there), then peft adds the fp32 adapters whole and FSDP flattens the first layer beside it all.
    With it, each weight is parked in host memory once quantized (qtool verify does so, as transformers 4 did
    for rank 0 under fsdp_cpu_ram_efficient_loading) and FSDP brings one unit at a time to the card: never more
    than the step's shards."""
    if ram_efficient:
        return {}
    plan = basis.cached.plan
    largest = max((g.numel for g in plan.groups if g.action == QUANTIZE), default=0) * itemsize(basis.dtype)
    full = basis.weights[basis.chosen].gpu
    lora_full = basis.inputs.lora_params * LORA_DTYPE_BYTES
    return {"load": {"weights_full": full, "load_transient": largest},
            "wrap": {"weights_full": full, "lora_full": lora_full, "layer_flat": _block(u.layer_bytes)}}


# transformers' caching_allocator_warmup (from_pretrained) allocates, once, what the model's parameters will take
# on the card, then frees it: max_memory_allocated sees the whole model even when ram-efficient loading parks
# each weight in host memory. Up to 5.19, with torch.distributed up, parameters of the model's tensor-parallel
# plan (the decoder layers' projections, lm_head) counted 1 / world size; from 5.20 they count whole.
WARMUP_WHOLE_SINCE = (5, 20)
WARMUP_SPARE = int(1.2 * 2**30)  # the warmup never asks more than the card's total less 1.2 GiB


def allocator_warmup(basis, n: int, transformers_version: str | None, budget: int | None) -> int:
    """The warmup's bytes on one rank: quantized elements at 0.5 byte (the quantizer's element size), kept ones
    at their dtype's, tied aliases once; capped by the card (its budget) less 1.2 GiB."""
    from qtool.estimate.placement import transformers_at_least

    whole = transformers_at_least(WARMUP_WHOLE_SINCE, transformers_version)
    total = 0
    for g in basis.cached.plan.groups:
        numel = g.numel * g.count if hasattr(g, "count") else g.numel
        size = numel // 2 if g.action == QUANTIZE else numel * itemsize(basis.dtype)
        in_tp_plan = g.action == QUANTIZE or g.example.split(".")[0] == "lm_head"
        total += size if whole or not in_tp_plan else size // n
    return total if budget is None else min(total, budget - WARMUP_SPARE)


def _step(inputs: memory.MemoryInputs, resident: dict[str, int]) -> dict[str, int]:
    """The training step: the resident terms (the root and two decoder layers gathered among them), checkpoints
    and workspace, then the larger of the loss phase and a layer's backward. FULL_SHARD reshards each decoder
    layer after its forward; in a layer's backward that layer and the one BACKWARD_PRE prefetches are gathered.
    The loss phase holds two layers' gathers as well: measured on 4 cards (transformers 5.24, Llama-3-8B at
    512/2048 and Llama-3-70B at 2048), the loss-phase step was 0.25 GiB (8B) and 1.06 GiB (70B) over the
    estimate without them, two gathered layers being 0.21 and 0.81 GiB (docs/estimate.md)."""
    single = memory.memory_breakdown(inputs)
    terms = dict(resident)
    terms.update({k: single[k] for k in ("cublas_workspace", "activation_checkpoints", "activations") if k in single})
    loss, layer = step_terms.phases(inputs, *memory.stream_bytes(inputs))
    terms.update({k: v for k, v in (loss if sum(loss.values()) >= sum(layer.values()) else layer).items() if v})
    return terms


def rank_terms(basis, settings, n: int, *, transformers_version: str | None = None,
               **_) -> tuple[list[dict[str, int]], int, dict[str, Any]]:
    """(terms per rank at its peak, host RAM bytes, detail) for N ranks of FSDP-QLoRA: the larger of loading
    (qtool verify measures the whole run) and the training step."""
    run = settings.run
    u = model_units(basis, settings)
    strategy = "full_shard" if run.fsdp_sharding == "hybrid_shard" else run.fsdp_sharding
    inputs = dataclasses.replace(basis.inputs, upcast_kept=False)
    resident = _weights(u, n, strategy)
    trainable = _trainable(u, n, strategy, run.optimizer) if inputs.lora_params else {}
    host = 0
    if run.fsdp_offload_params:  # shards, their grads and the optimizer (CPU Adam) live in host RAM
        moved = resident.pop("weights_shard") + sum(trainable.values())
        host += n * moved
        trainable = {}
    phases = {"step": _step(inputs, {**resident, **trainable}),
              **_loading(basis, u, run.fsdp_ram_efficient),
              "warmup": {"allocator_warmup": allocator_warmup(basis, n, transformers_version, run.budget_bytes)}}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    outside = {"cuda_context": memory.CUDA_CONTEXT_BYTES, "nccl_buffers": memory.NCCL_BYTES}
    peak = {**phases[phase], **outside}
    need = None
    if phase == "warmup":  # NCCL creates its communicators at the first collective, after from_pretrained
        del peak["nccl_buffers"]
        # the warmup takes what the card has (less 1.2 GiB): the other phases decide the fit
        need = max(memory.peak_bytes({**terms, **outside}) for k, terms in phases.items() if k != "warmup")
    full_16bit = basis.weights["fp16"].data
    host += (n if not run.fsdp_ram_efficient else 1) * full_16bit
    detail = {"sharding": run.fsdp_sharding, "offload_params": run.fsdp_offload_params,
              "ram_efficient_loading": run.fsdp_ram_efficient, "layer_bytes": u.layer_bytes,
              "root_bytes": u.root_bytes, "quant_storage": settings.quant.quant_storage, "phase": phase,
              "phases": {k: sum(v.values()) for k, v in phases.items()}, "need_bytes": need}
    if run.fsdp_offload_params:
        detail["caveat"] = OFFLOAD_CAVEAT.format(OFFLOAD_MEASURED_OVER)
    return [dict(peak) for _ in range(n)], host, detail
