"""Unsloth's QLoRA, term by term (recipe `unsloth`; unsloth 2026.10.9 / unsloth_zoo 2026.10.9): pure arithmetic
on qtool.estimate.memory's inputs and terms, no torch. Fitted on the per-phase peaks of docs/recipe_measurements.json
(calls 4-5: which rows were fitted and which only check is in docs/benchmarks.md, "recipes"), the rest read in
unsloth/unsloth_zoo's source as named below."""

from __future__ import annotations

from qtool.estimate.memory import (
    CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, GiB, MemoryInputs, largest_dequantized, layer_activation_bytes,
    trainable_state,
)

# use_gradient_checkpointing="unsloth": each layer's input goes to host memory through a GPU buffer of
# B x S x hidden, and a second one once double buffering is on (from the second step); both stay allocated
UNSLOTH_OFFLOAD_BUFFERS = 2
# the fused loss (unsloth_zoo.fused_losses.chunked_logprob): rows of fp32 logits per chunk, at most
# 2 GiB / (vocab x 8 bytes), at least 512 or an eighth of the tokens
UNSLOTH_CE_CHUNK_BYTES = 2 * GiB
UNSLOTH_CE_BYTES_PER_LOGIT = 8
UNSLOTH_CE_MIN_ROWS = 512
UNSLOTH_LOSS_HIDDEN_TENSORS = 5  # B x S x hidden alive beside a loss chunk (final norm, its grad, ...)
# the recomputed layer's backward, B x S x (dim) in the compute dtype: hidden (grads of the layer's output
# and input, the input copied back from host, q/attention output and their grads, norm outputs) ...
UNSLOTH_LAYER_HIDDEN_TENSORS = 11
# ... and intermediate: Unsloth's fused LoRA MLP keeps gate, up and the gated product; under FastModel
# peft's LoRA layers keep their own inputs and outputs as well (fitted on Phi-3)
UNSLOTH_FAST_MLP_TENSORS = 3
UNSLOTH_GENERIC_MLP_TENSORS = 6


def unsloth_breakdown(m: MemoryInputs) -> dict[str, int]:
    """Unsloth's QLoRA (FastLanguageModel + get_peft_model(use_gradient_checkpointing="unsloth") under trl's
    SFTTrainer). Weights stay as loaded -- no prepare_model_for_kbit_training upcast: embeddings, norms and
    lm_head 16-bit, fused MoE experts 4-bit --, the adapters are fp32 (unsloth_zoo's prepare_model_for_training
    casts trainable parameters to float32), checkpoints live in host memory, the loss is chunked."""
    d, b, s, c = m.dims, m.batch, m.seq, m.compute_bytes
    hidden = b * s * d.hidden * c
    out: dict[str, int] = {"weights": m.quant_weights_gpu}
    out.update(trainable_state(m))
    out["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES
    if m.unsloth_fast:  # fast_dequantize keeps its output buffer (the largest weight) between calls
        out["unsloth_dequant_buffer"] = m.largest_linear * c
    if m.gradient_checkpointing:
        out["offload_buffers"] = UNSLOTH_OFFLOAD_BUFFERS * hidden
    else:
        out["activations"] = d.layers * layer_activation_bytes(d, b, s, c)
    rows = min(b * s, max(UNSLOTH_CE_MIN_ROWS, -(-b * s // 8)),
               UNSLOTH_CE_CHUNK_BYTES // max(d.vocab * UNSLOTH_CE_BYTES_PER_LOGIT, 1))
    loss_phase = {"loss_chunk": rows * d.vocab * 4, "loss_hidden": UNSLOTH_LOSS_HIDDEN_TENSORS * hidden}
    mlp = UNSLOTH_FAST_MLP_TENSORS if m.unsloth_fast else UNSLOTH_GENERIC_MLP_TENSORS
    layer_phase = {
        "layer_hidden": UNSLOTH_LAYER_HIDDEN_TENSORS * hidden,
        # MoE: the experts are 4-bit here, so no W + B @ A merge; a whole fused expert tensor is dequantized
        "mlp_backward": int(mlp * b * s * d.intermediate * d.experts_per_token * c),
        "dequant_buffer": largest_dequantized(m) * c,
        # a sliding window shorter than the sequence: the attention mask is built, S x S in 16 bit
        "window_mask": b * s * s * c if d.sliding_window is not None and s > d.sliding_window else 0,
    }
    phase = loss_phase if sum(loss_phase.values()) >= sum(layer_phase.values()) else layer_phase
    out.update({k: v for k, v in phase.items() if v})
    out["cuda_context"] = CUDA_CONTEXT_BYTES
    return out
