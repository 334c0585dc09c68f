"""device_map="auto" over several cards, card by card.

The placement is transformers' own (qtool.estimate.placement over the module tree of qtool.estimate.layout),
with each card's free memory (its budget less the CUDA context; no budget: unbounded) as max_memory. Then each
card holds:

- the weights of the modules placed on it, byte for byte as on one GPU (4-bit parts rounded to the
  allocator's blocks; QLoRA's fp32 upcast of the kept tensors on the card that holds them);
- the adapters, their gradients and optimizer states, the checkpointed layer inputs, of its own decoder layers;
- the transients of a backward through one of its layers (the layer phase of the one-GPU model);
- on the card of the output head, the loss phase (logits, log-softmax and grads) instead where that is larger;
- its own cuBLAS workspace and CUDA context.
"""

from __future__ import annotations

from typing import Any

from qtool.core.dtypes import itemsize
from qtool.estimate import formats, memory, step_terms
from qtool.estimate.placement import BNB_MAX_MEMORY, Node, balanced_memory, infer_device_map, leaf_rule

UNBOUNDED = 2**50  # a card without a budget: placement only balances
_PER_LAYER = ("lora_params", "lora_grads", "optimizer_states", "optimizer_states_paged", "expert_adapters",
              "activation_checkpoints", "activations")


def device_map(root: Node, tied: dict, budgets: list[int | None], *, quantized: bool = True,
               transformers_version: str | None = None) -> dict[str, int | str]:
    """What from_pretrained(device_map="auto") decides for cards with these budgets (host RAM as the real run
    has it, unbounded here: anything placed there does not fit the cards). `quantized`: the bnb quantizer is
    in play (its x 0.90); `root` carries the matching sizes (Layout.nodes). `transformers_version`: whose
    placement (None: the installed transformers')."""
    free = {i: UNBOUNDED if b is None else max(b - memory.CUDA_CONTEXT_BYTES, 0) for i, b in enumerate(budgets)}
    free["cpu"] = UNBOUNDED
    balanced = balanced_memory(root, free, set(tied), leaf=leaf_rule(transformers_version))
    factor = BNB_MAX_MEMORY if quantized else 1
    return infer_device_map(root, {k: v * factor for k, v in balanced.items()}, tied)


def _device_of(name: str, dmap: dict) -> int | str:
    while name not in dmap:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return dmap[name]


def _weights_by_card(layout, dmap: dict, basis, settings, n: int) -> tuple[list[int], ...]:
    """(weights' GPU bytes, kept elements, largest kept tensor's elements, decoder layers) per card; quantized
    tensors as the chosen 4-bit format where the mode loads 4-bit, 16-bit otherwise."""
    q = settings.quant
    fmt = formats.FORMATS[basis.chosen if basis.inputs.mode in ("qlora", "inference") else "fp16"]
    gpu, kept, largest, layers = [0] * n, [0] * n, [0] * n, [0] * n
    for name, (count, quantized) in layout.params().items():
        card = _device_of(name, dmap)
        if not isinstance(card, int):
            continue
        if quantized and fmt.quant_type:
            gpu[card] += formats.gpu_bytes(formats.quantized_parts((count,), fmt, blocksize=q.blocksize,
                                                                   dtype=basis.dtype, quant_storage=q.quant_storage))
        else:
            gpu[card] += formats.gpu_bytes([formats.Part("", basis.dtype, (count,))])
            kept[card] += 0 if quantized else count
            largest[card] = max(largest[card], 0 if quantized else count)
    for node in layout.nodes(basis.dtype).walk():
        card = _device_of(node.name, dmap) if node.no_split else None
        if isinstance(card, int):
            layers[card] += 1
    return gpu, kept, largest, layers


def _share(value: int, before: int, mine: int, total: int) -> int:
    """This card's part of a per-layer term, rounded so that the parts add up to the whole."""
    return value * (before + mine) // total - value * before // total


def card_terms(basis, settings, budgets, *, spec, trust_remote_code: bool = False,
               transformers_version: str | None = None) -> tuple[list, dict[str, Any]]:
    from qtool.estimate.layout import layout_for

    layout = layout_for(spec, basis.cached, skip_modules=settings.quant.skip_modules,
                        trust_remote_code=trust_remote_code)
    n, m = len(budgets), basis.inputs
    quantized = m.mode in ("qlora", "inference")  # lora and full load the 16-bit model: no quantizer
    dmap = device_map(layout.nodes(basis.dtype, quantized=quantized), layout.tied, budgets, quantized=quantized,
                      transformers_version=transformers_version)
    gpu, kept, largest, layers = _weights_by_card(layout, dmap, basis, settings, n)
    head = _device_of(_head_name(layout), dmap)
    single = memory.memory_breakdown(m)
    upcast = "kept_fp32" in single
    if m.mode == "inference":
        loss, layer = {"logits": single["logits"]}, {k: single[k] for k in ("activations", "dequant_buffer")}
    else:
        loss, layer = step_terms.phases(m, *memory.stream_bytes(m))
    total = max(sum(layers), 1)
    out = []
    for i in range(n):
        terms = {"weights": gpu[i] - (gpu_kept(kept[i], basis.dtype) if upcast else 0)}
        if upcast:
            terms["kept_fp32"] = kept[i] * 4
        per_layer = [k for k in _PER_LAYER if k in single and not (m.mode == "inference" and k == "activations")]
        per_layer += ["kv_cache"] if "kv_cache" in single else []
        terms.update({k: _share(single[k], sum(layers[:i]), layers[i], total) for k in per_layer})
        terms["cublas_workspace"] = single["cublas_workspace"]
        dynamic = dict(layer) if layers[i] else {}
        if i == head and (m.mode == "inference" or sum(loss.values()) >= sum(dynamic.values())):
            dynamic = {**dynamic, **loss} if m.mode == "inference" else dict(loss)
        copy = output_copy(m) if i == 0 != head else {}
        if sum(copy.values()) > sum(dynamic.values()):
            dynamic = copy
        terms.update({k: v for k, v in dynamic.items() if v})
        terms["cuda_context"] = single["cuda_context"]
        if upcast:
            terms = max(terms, upcast_terms(terms, largest[i], basis.dtype), key=memory.allocated_peak_bytes)
        out.append(terms if gpu[i] else {})  # a card nothing is placed on is never touched
    offloaded = sorted(k for k, v in dmap.items() if not isinstance(v, int))
    return out, {"device_map": dmap, "layers_per_card": layers, "offloaded": offloaded}


def upcast_terms(terms: dict[str, int], largest: int, dtype: str) -> dict[str, int]:
    """The card while prepare_model_for_kbit_training casts its kept tensors to fp32, one at a time, before any
    adapter, step or activation exists: the largest one is briefly there in 16 bit and fp32 both. On a card
    with the embeddings and few layers this is the card's peak (Llama-3-8B, 4 layers on card 0: 0.42 GiB of
    4-bit layers + 1.96 GiB fp32 embeddings + 0.98 GiB bf16 embeddings = the 3.35 GiB measured at 512 tokens)."""
    return {"weights": terms["weights"], "kept_fp32": terms["kept_fp32"], "upcast_copy": largest * itemsize(dtype),
            "cuda_context": terms["cuda_context"]}


def output_copy(m: memory.MemoryInputs) -> dict[str, int]:
    """What the first card holds at the end of the forward when the head sits elsewhere: accelerate's hook on
    the model (AlignDevicesHook(io_same_device=True)) sends the outputs back to the input's card, the logits
    included; under the Trainer's autocast they are 16-bit and accelerate's convert_outputs_to_fp32 then makes
    an fp32 copy beside them. trl's chunked loss returns no logits; generate keeps one position."""
    if m.mode == "inference" or m.recipe in memory.RECIPES_16BIT_ADAPTERS:
        return {}
    d, b, s = m.dims, m.batch, m.seq
    if m.autocast:
        return {"logits_copy": memory.logits_bytes(d, b, s, m.compute_bytes),
                "logits_copy_fp32": memory.logits_bytes(d, b, s, 4)}
    return {"logits_copy": memory.logits_bytes(d, b, s, memory.stream_bytes(m)[1])}


def gpu_kept(count: int, dtype: str) -> int:
    """The kept tensors' 16-bit bytes QLoRA's upcast replaces (the one-GPU model counts them per tensor,
    rounded; per card they are summed unrounded: at most 511 bytes per tensor apart)."""
    return count * itemsize(dtype)


def _head_name(layout) -> str:
    """The last parameter of the model: the output head (lm_head), or the final norm of a bare model."""
    return list(layout.params())[-1]
