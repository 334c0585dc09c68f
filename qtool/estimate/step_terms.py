"""The dynamic peak of a training step, term by term (qtool's loop and the Trainer/trl recipes; Unsloth's is in
unsloth_terms.py): pure arithmetic on qtool.estimate.memory's inputs, no torch.

A step's peak (second step: grads and optimizer states already exist) is checkpointed layer inputs plus the
larger of two phases:
  loss phase:  logits + log_softmax output (fp32) + its grad (fp32, and a 16-bit copy for 16-bit logits)
               + hidden-state grads; under trl (recipe sft) its fused LM head's tiles instead of any logits
  layer phase: hidden-state grads + the larger of attention backward (SDPA's math kernel materialises
               B x H x S x S scores when it cannot use flash/efficient kernels: fp32 inputs with grouped-query
               attention) and MLP backward of the recomputed layer; a dequantized weight; the attention mask
               of a sliding window shorter than the sequence.
The counts are fitted on per-phase GPU peaks (docs/recipe_measurements.json, docs/gpu_measurements.json): which
rows fitted each one and which only checked it is in docs/benchmarks.md ("recipes")."""

from __future__ import annotations

from qtool.estimate.memory import (
    HIDDEN_GRAD_TENSORS, LAYER_SCORE_TENSORS, LOSS_FP32_TENSORS, RECIPES_16BIT_ADAPTERS, MemoryInputs, attention_scores_bytes, expert_adapter_params,
    logits_bytes, math_attention,
)

# The recomputed layer's MLP backward, B x S x inter in the stream's dtype: gate, up, act(gate), act*up, LoRA branch
# outputs and their grads. A 16-bit stream (lora, full, FSDP-QLoRA without the upcast): fitted before on the
# FSDP rows (docs/multigpu_measurements.json) ...
MLP_BACKWARD_TENSORS = 9
# ... and qtool's loop on QLoRA's fp32 stream (upcast norms, fp32 LoRA; the 4-bit layers compute in 16 bit, so some
# of these are 16-bit): fitted on the loop rows whose MLP phase wins, mistral-7b 512 and 8192 (full depth and 4
# layers) and llama-2-7b 2048; checked on phi-3-mini 512 and Mixtral 512/2048.
MLP_BACKWARD_TENSORS_FP32_STREAM = 7.5
ATTN_BACKWARD_TENSORS = 6  # flash/efficient SDPA: q, k, v, out + grads, B x S x hidden
# Under the Trainer's autocast (bf16/fp16) with the fp32 stream: the MLP's tensors are mostly 16-bit (counted here
# in fp32-sized units) and the recomputed layer keeps its hidden-size tensors (norm outputs, attention's inputs and
# output, the 16-bit casts of Linear4bit inputs) beside them, in the stream's dtype. Fitted on the sft 2048/8192
# rows of llama-3-8b, mistral-7b, qwen2.5-7b, phi-3-mini and gemma-2-9b together with the middle cards of the
# pipeline rows (docs/multigpu_measurements.json: no loss phase there, so a layer's backward alone); checked on
# qwen3-8b, gemma-3-12b, Mixtral's trainer/sft rows and mistral's trainer 8192.
AUTOCAST_MLP_TENSORS = 5.75
AUTOCAST_HIDDEN_TENSORS = 3.5
# The recomputed layer's extra norms (Dims.qk_norm, Dims.sandwich_norms) keep their tensors for backward beside the
# MLP's: q/k norms their fp32 queries and keys (B x S x (heads + kv_heads) x head_dim); sandwich norms the two
# sublayer outputs they normalise (B x S x hidden, in the compute dtype under autocast). Counts fitted on the sft
# 2048/8192 rows of gemma-3-12b (both), qwen3-8b (q/k) and gemma-2-9b (sandwich), the rows of the only
# architectures measured with them.
QK_NORM_TENSORS = 1
SANDWICH_NORM_TENSORS = 2
# A sliding window shorter than the sequence: transformers builds a boolean S x S mask (kept for every
# checkpointed layer) and SDPA turns it into an additive one in the attention inputs' dtype, saved for backward.
WINDOW_MASK_BOOL_BYTES = 1

# trl's SFTTrainer computes the loss through a fused LM head (trl.kernels.chunked_logprob) that walks the sequence
# in chunks of tokens and the vocabulary in chunks of rows of lm_head: never B x S x V logits.
SFT_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
SFT_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


def phases(m: MemoryInputs, act: int, logit_bytes: int) -> tuple[dict[str, int], dict[str, int]]:
    """The two candidates for a training step's dynamic peak: (loss phase, layer phase). `act`/`logit_bytes`:
    itemsize of the residual stream and of the logits."""
    d, b, s, c = m.dims, m.batch, m.seq, m.compute_bytes
    hidden_grads = HIDDEN_GRAD_TENSORS * b * s * d.hidden * act
    loss_phase = _loss_phase(m, act, logit_bytes)
    loss_phase["hidden_grads"] = hidden_grads
    # math SDPA: the recomputed layer's attention probabilities stay saved while its MLP runs backward
    probs = LAYER_SCORE_TENSORS * b * d.heads * s * s * act if math_attention(d, act, s, m.autocast) else 0
    attention = attention_scores_bytes(d, b, s, act) if probs else ATTN_BACKWARD_TENSORS * b * s * d.hidden * act
    autocast_fp32 = m.autocast and act == 4  # 16-bit compute inside an fp32 residual stream
    tokens = b * s * d.intermediate * d.experts_per_token
    count = AUTOCAST_MLP_TENSORS if autocast_fp32 else MLP_BACKWARD_TENSORS_FP32_STREAM if act == 4 else MLP_BACKWARD_TENSORS
    mlp = int(count * tokens * act)
    mlp += _expert_merge_bytes(m) + probs
    layer_phase = {  # logits and the loss' tensors are freed once lm_head's backward has run
        "hidden_grads": hidden_grads,
        "layer_hidden": int(AUTOCAST_HIDDEN_TENSORS * b * s * d.hidden * act) if autocast_fp32 else 0,
        # one layer recomputed (checkpointing) and run backward: attention or MLP, whichever is larger
        "attention_backward" if attention >= mlp else "mlp_backward": max(attention, mlp),
        "dequant_buffer": m.largest_linear * c if m.mode == "qlora" else 0,
        "window_mask": window_mask_bytes(m, c if m.autocast else act),
        "layer_norms": extra_norm_bytes(m, act),
    }
    return loss_phase, layer_phase


def extra_norm_bytes(m: MemoryInputs, act: int) -> int:
    """What q/k norms and sandwich norms of the recomputed layer keep for backward (0 without them)."""
    d, b, s = m.dims, m.batch, m.seq
    qk = QK_NORM_TENSORS * b * s * (d.heads + d.kv_heads) * d.head_dim * 4 if d.qk_norm else 0
    sublayer = m.compute_bytes if m.autocast else act
    return qk + (SANDWICH_NORM_TENSORS * b * s * d.hidden * sublayer if d.sandwich_norms else 0)


def window_mask_bytes(m: MemoryInputs, attn_bytes: int) -> int:
    """A sliding window no longer than the sequence: the boolean mask and SDPA's additive copy, B x S x S.
    transformers builds the explicit mask once kv_length >= the window (masking_utils'
    `_ignore_causal_mask_sdpa`), the same rule as memory.math_attention's."""
    d, b, s = m.dims, m.batch, m.seq
    if d.sliding_window is None or s < d.sliding_window:
        return 0
    return b * s * s * (WINDOW_MASK_BOOL_BYTES + attn_bytes)


def _expert_merge_bytes(m: MemoryInputs) -> int:
    """peft's ParamWrapper computes the expert weights as W + B @ A for the whole layer on each (re)compute:
    the merged gate_up (E x 2I x H) is saved for backward while the down projection's delta and merged
    weight (E x H x I each) are built -- 4/3 of a layer's expert weights, in fp32 (QLoRA's upcast)."""
    d = m.dims
    if not expert_adapter_params(m):
        return 0
    itemsize = 4 if m.mode == "qlora" else m.weight_bytes
    return d.num_experts * d.hidden * d.intermediate * 4 * itemsize


def sft_head_terms(m: MemoryInputs, act: int) -> dict[str, int]:
    """trl's fused LM head (chunked_logprob): it computes in autocast's dtype (else the hidden states'), in one
    tile buffer of token chunk x vocabulary chunk; each vocabulary chunk of lm_head is cast to that dtype -- a
    copy unless lm_head is in it already --, and in backward the next chunk's copy is made while the previous
    one is still referenced (two alive) when the vocabulary spans more than one chunk."""
    d, b, s = m.dims, m.batch, m.seq
    compute = m.compute_bytes if m.autocast else act
    head_bytes = 4 if m.fp32_head else m.compute_bytes
    rows = min(d.vocab, SFT_VOCAB_CHUNK)
    copies = 0 if head_bytes == compute else (1 if d.vocab <= SFT_VOCAB_CHUNK else 2)
    return {"lm_head_chunk": copies * rows * d.hidden * compute,
            "loss_chunk": min(b * s, SFT_TOKEN_CHUNK) * rows * compute,
            # backward: the hidden states' grad accumulates in fp32, beside a chunk of them cast to `compute`
            "loss_hidden": b * s * d.hidden * 4 + min(b * s, SFT_TOKEN_CHUNK) * d.hidden * compute}


def _loss_phase(m: MemoryInputs, act: int, logit_bytes: int) -> dict[str, int]:
    """What the loss holds at the start of backward, per recipe (B x S x V tensors unless said)."""
    d, b, s, c = m.dims, m.batch, m.seq, m.compute_bytes
    if m.recipe in RECIPES_16BIT_ADAPTERS:
        return sft_head_terms(m, act)
    logits = logits_bytes(d, b, s, logit_bytes)
    if m.autocast and m.fp32_head:
        return {
            # autocast runs lm_head in 16 bit: the fp32 lm_head weight (QLoRA's upcast) is cast down and the copy
            # is saved for backward -- vocab x hidden, large for big vocabularies (Qwen, Gemma)
            "lm_head_16bit": d.vocab * d.hidden * c,
            # 16-bit logits, upcast by the loss; log_softmax output and its grad in fp32
            "logits": logits, "loss_softmax_and_grad": LOSS_FP32_TENSORS * logits_bytes(d, b, s, 4),
            # final-logit soft-capping runs in the compute dtype under autocast: tanh output saved in 16 bit
            "logits_softcap": logits_bytes(d, b, s, c) if d.logit_softcapping else 0,
        }
    return {
        "logits": logits,  # kept alive by the model output
        # ForCausalLMLoss upcasts 16-bit logits to fp32 (freed once log_softmax has run); the grad that
        # flows back into 16-bit logits is cast down again
        "logits_grad_16bit": logits if logit_bytes != 4 else 0,
        "loss_softmax_and_grad": LOSS_FP32_TENSORS * logits_bytes(d, b, s, 4),
        "logits_softcap": logits if d.logit_softcapping else 0,  # tanh(logits / cap) saved for backward
    }
