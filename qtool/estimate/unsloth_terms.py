"""Unsloth's QLoRA, term by term (recipe `unsloth`; unsloth 2026.10.9 / unsloth_zoo 2026.10.9): pure arithmetic
on qtool.estimate.memory's inputs and terms, no torch. Fitted on the per-phase peaks of docs/recipe_measurements.json
(calls 4-5: which rows were fitted and which only check is in docs/benchmarks.md, "recipes"), the rest read in
unsloth/unsloth_zoo's source as named below (the RoPE cache, Mistral's prefill mask and the MoE grouped-GEMM
moments are source arithmetic, nothing fitted)."""

from __future__ import annotations

from qtool.estimate.memory import (
    CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, UNSLOTH_FAST_MODEL_TYPES, GiB, MemoryInputs, expert_adapter_params,
    largest_dequantized, layer_activation_bytes, trainable_state,
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
# autograd's backward runs on its own device thread, which takes its own cuBLAS handle, and PyTorch keys the
# cuBLAS(Lt) workspace by (handle, stream) (aten/src/ATen/cuda/CublasHandlePool.cpp): once a backward has run,
# a second workspace stays allocated (measured: after_step less the modelled state is 32.0 MiB on every Unsloth
# row, and on the Trainer's and trl's rows, whose fitted counts still absorb it)
UNSLOTH_BACKWARD_WORKSPACES = 1
# the recomputed layer's backward, B x S x (dim) in the compute dtype: hidden (grads of the layer's output
# and input, the input copied back from host, q/attention output and their grads, norm outputs) ...
UNSLOTH_LAYER_HIDDEN_TENSORS = 10
# ... and intermediate: Unsloth's fused LoRA MLP keeps gate, up and the gated product; under FastModel
# peft's LoRA layers keep their own inputs and outputs as well (fitted on Phi-3). Both counts refitted with the
# backward workspace named, on the rows that fitted them before (docs/benchmarks.md, "recipes")
UNSLOTH_FAST_MLP_TENSORS = 3
UNSLOTH_GENERIC_MLP_TENSORS = 5.5
# Its own classes' RoPE (unsloth/models/llama.py LlamaRotaryEmbedding, gemma.py GemmaFixedRotaryEmbedding, both
# _PerDeviceRopeCache): cos and sin cached on the GPU on first use, current_rope_size = min(4 x 8192,
# max_position_embeddings) rows of head_dim, grown in steps of 8192 past it, in the dtype the model was built in
UNSLOTH_ROPE_START_ROWS = 4 * 8192
UNSLOTH_ROPE_GROWTH_ROWS = 8192
# MistralForCausalLM_fast_forward (unsloth/models/mistral.py), prefill without xformers: it builds the additive
# S x S causal (or sliding-window) mask itself, torch.full's fp32 values kept by a local for the whole forward, a
# B x S x S copy in the model's dtype, and LlamaModel_fast_forward's _prepare_4d_causal_attention_mask_for_sdpa
# (_attn_mask_compat.py: _unmask_unattended multiplies it into a new one)
UNSLOTH_PREFILL_MASK_MODEL_TYPES = ("mistral",)
UNSLOTH_PREFILL_MASK_COPIES = 2
# MoE whose fused 3-D experts Unsloth keeps 4-bit: unsloth_zoo's grouped-GEMM path
# (temporary_patches/moe_utils_bnb4bit.forward_moe_backend_bnb4bit -> moe_utils.forward_native_grouped_mm), per
# routed row (B x S x top_k). The base GEMMs run through _GroupedMMRecompute: a whole stack (E x 2I x H gate_up,
# E x H x I down) is dequantized for the call and again for its backward, never saved. The recomputed layer saves
# the gathered input (hidden: the LoRA A grouped GEMM's weight grad), gate_up's output (2 x inter: the fused
# SwiGLU's backward) and the activation (inter: _MoEGateGradIdentity and the down projection's LoRA).
MOE_SAVED_INTER = 3
# _MoEGateGradIdentity.backward (bf16; under fp16 Unsloth keeps the plain multiply): dGate = <inter, dA> with both
# upcast to fp32, three routed-rows x inter fp32 tensors beside the saved ones and the activation's grad
MOE_GATE_GRAD_FP32 = 3
# forward_native_grouped_mm's separated LoRA, first (no-grad) pass: mm1_out + lora_delta * scaling holds the base
# output, the delta, its scaled copy and the sum, routed rows x 2 x inter each
MOE_LORA_ADD_TENSORS = 4
# Unsloth's per-decoder-layer torch.compile (unsloth/models/_block_compile.py: on by default from torch 2.11,
# UNSLOTH_BLOCK_COMPILE=0 turns it off) on that path: a fresh process's first step holds, through its forward,
# every layer's grad-mode activations, as if nothing were checkpointed (later steps do not: the second step of
# the same runs peaks at the terms above). From the allocations alive at that peak (tools/peak_trace.py, call 8
# Mixtral and call 10 Qwen3-MoE, 4 layers at 8192 tokens), per layer: per routed row gate_up's output (2 x inter),
# the activation and the gathered input, plus grouped-GEMM outputs that differ by architecture (Mixtral ~one
# more intermediate, Qwen3-MoE two down outputs and rank-sized LoRA ones): 4 intermediate + 1.25 hidden,
# the two traces' common fit; per token the three norm outputs, the queries twice (attention's output, RoPE),
# keys and values, and under QK norm one more query and key; beside them the layer's input and output, the
# gate_up stack being dequantized and one attention weight dequantized. Checked on 512 and 2048 tokens, batch 2
# and 6 layers (not used for the counts).
MOE_FIRST_STEP_INTER = 4
MOE_FIRST_STEP_ROUTED_HIDDEN = 1.25
MOE_FIRST_STEP_NORMS = 3
MOE_FIRST_STEP_QUERIES = 2
MOE_FIRST_STEP_KV = 2
MOE_FIRST_STEP_STREAM = 2
# Gemma-2 on Unsloth's own class without flash-attn's soft-capping kernel (flash-attn >= 2.6.3 is not among
# Unsloth's requirements; qtool assumes it absent): LlamaModel_fast_forward builds the sliding-window and the
# global causal mask once, max_seq_length x max_seq_length in the model's dtype, kept on the model (traced:
# 2 x 128 MiB at 8192); qtool takes max_seq_length = --seq-len
SOFTCAP_STATIC_MASKS = 2
# ... and attention runs unsloth/kernels/flex_attention.py's slow_attention_softcapping, compiled by Inductor:
# one layer's attention backward holds B x H x S x S scores three times, the soft-capped scores its forward
# saved and the probabilities the backward recomputes (both in the compute dtype) and their gradient in fp32
# (traced on Gemma-2 4 layers at 8192 tokens, call 7; checked at 2048)
SOFTCAP_SCORES_16BIT = 2
SOFTCAP_SCORES_FP32 = 1


def unsloth_breakdown(m: MemoryInputs) -> dict[str, int]:
    """Unsloth's QLoRA (FastLanguageModel + get_peft_model(use_gradient_checkpointing="unsloth") under trl's
    SFTTrainer): the larger of a step with the training state (unsloth_steps) and, on the MoE grouped-GEMM path,
    a fresh process's first step (moe_first_step)."""
    steps = unsloth_steps(m)
    if m.largest_fused > 0 and m.dims.num_experts > 1 and m.gradient_checkpointing and m.unsloth_block_compile:
        first = moe_first_step(m)
        if sum(first.values()) > sum(steps.values()):
            return first
    return steps


def unsloth_steps(m: MemoryInputs) -> dict[str, int]:
    """A step with gradients and optimizer states. Weights stay as loaded -- no prepare_model_for_kbit_training
    upcast: embeddings, norms and lm_head 16-bit, fused MoE experts 4-bit --, the adapters are fp32 (unsloth_zoo's
    prepare_model_for_training casts trainable parameters to float32), checkpoints live in host memory, the loss
    is chunked."""
    d, b, s, c = m.dims, m.batch, m.seq, m.compute_bytes
    hidden = b * s * d.hidden * c
    out: dict[str, int] = {"weights": m.quant_weights_gpu}
    out.update(trainable_state(m))
    out["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES
    out["cublas_workspace_backward"] = UNSLOTH_BACKWARD_WORKSPACES * CUBLAS_WORKSPACE_BYTES
    if rope_cache_bytes(m):
        out["rope_cache"] = rope_cache_bytes(m)
    if m.unsloth_fast:  # fast_dequantize keeps its output buffer (the largest weight) between calls
        out["unsloth_dequant_buffer"] = m.largest_linear * c
    if m.gradient_checkpointing:
        out["offload_buffers"] = UNSLOTH_OFFLOAD_BUFFERS * hidden
    else:
        out["activations"] = d.layers * layer_activation_bytes(d, b, s, c)
    softcap = softcap_attention(m)
    if softcap:  # built by the first forward and kept on the model, checkpointing or not
        out["attention_masks"] = SOFTCAP_STATIC_MASKS * s * s * c
    rows = min(b * s, max(UNSLOTH_CE_MIN_ROWS, -(-b * s // 8)),
               UNSLOTH_CE_CHUNK_BYTES // max(d.vocab * UNSLOTH_CE_BYTES_PER_LOGIT, 1))
    loss_phase = {"loss_chunk": rows * d.vocab * 4, "loss_hidden": UNSLOTH_LOSS_HIDDEN_TENSORS * hidden}
    mlp = UNSLOTH_FAST_MLP_TENSORS if m.unsloth_fast else UNSLOTH_GENERIC_MLP_TENSORS
    moe = m.largest_fused > 0 and d.num_experts > 1  # 4-bit fused experts: the grouped-GEMM path, not peft's
    layer_phase = {
        "layer_hidden": UNSLOTH_LAYER_HIDDEN_TENSORS * hidden,
        "mlp_backward": 0 if moe else int(mlp * b * s * d.intermediate * d.experts_per_token * c),
        "moe_experts": moe_grouped_bytes(m) if moe else 0,
        "dequant_buffer": 0 if moe else largest_dequantized(m) * c,
        # a sliding window shorter than the sequence: the attention mask is built, S x S in 16 bit (Gemma-2's
        # static masks above stand for it)
        "window_mask": b * s * s * c if d.sliding_window is not None and s > d.sliding_window and not softcap else 0,
    }
    phases = [loss_phase, layer_phase]
    if softcap:  # the recomputed layer's attention backward (its MLP's backward is over by then)
        phases.append({"layer_hidden": layer_phase["layer_hidden"], "dequant_buffer": layer_phase["dequant_buffer"],
                       "softcap_scores": b * d.heads * s * s * (SOFTCAP_SCORES_16BIT * c + SOFTCAP_SCORES_FP32 * 4)})
    phase = max(phases, key=lambda p: sum(p.values()))  # the first of equals: the loss phase
    out.update({k: v for k, v in phase.items() if v})
    out["cuda_context"] = CUDA_CONTEXT_BYTES
    return out


def softcap_attention(m: MemoryInputs) -> bool:
    """Gemma-2's soft-capped attention on Unsloth's own class: the compiled slow path (no flash-attn)."""
    return m.dims.attn_softcapping and m.model_type == "gemma2"


def moe_first_step(m: MemoryInputs) -> dict[str, int]:
    """A fresh process's first step on the grouped-GEMM MoE path under Unsloth's block compile (MOE_FIRST_STEP_*
    above): no gradients or optimizer states yet, every layer's forward activations, the gate_up stack."""
    d, b, s, c = m.dims, m.batch, m.seq, m.compute_bytes
    routed = b * s * d.experts_per_token
    q = d.heads * d.head_dim
    per_token = (MOE_FIRST_STEP_NORMS * d.hidden + MOE_FIRST_STEP_QUERIES * q + MOE_FIRST_STEP_KV * d.kv_dim
                 + (q + d.kv_dim if d.qk_norm else 0))
    per_layer = int(routed * (MOE_FIRST_STEP_INTER * d.intermediate + MOE_FIRST_STEP_ROUTED_HIDDEN * d.hidden) * c
                    + b * s * per_token * c)
    out = {"weights": m.quant_weights_gpu, "lora_params": m.lora_params * 4,
           "expert_adapters": expert_adapter_params(m) * 4,  # fp32, no grads or states before the first step
           "cublas_workspace": CUBLAS_WORKSPACE_BYTES}
    if rope_cache_bytes(m):
        out["rope_cache"] = rope_cache_bytes(m)
    out["first_step_activations"] = d.layers * per_layer + MOE_FIRST_STEP_STREAM * b * s * d.hidden * c
    out["moe_experts"] = m.largest_fused * c  # the gate_up stack dequantized for the layer that runs
    out["dequant_buffer"] = m.largest_linear * c
    out["cuda_context"] = CUDA_CONTEXT_BYTES
    return out


def moe_grouped_bytes(m: MemoryInputs) -> int:
    """The MoE layer's peak on Unsloth's grouped-GEMM path: the largest of its moments (see MOE_* above)."""
    d, c = m.dims, m.compute_bytes
    rows = m.batch * m.seq * d.experts_per_token
    h, i = d.hidden * c, d.intermediate * c
    saved = rows * (h + MOE_SAVED_INTER * i)
    gate_grad = rows * MOE_GATE_GRAD_FP32 * d.intermediate * 4 if m.precision != "fp16" else 0
    return max(
        saved + rows * i + gate_grad,  # the gate gradient: saved, the activation's grad, the fp32 product
        # down's dX: its stack dequantized, the rows' grad, the activation's grads from the base and the LoRA
        saved + d.num_experts * d.hidden * d.intermediate * c + rows * (h + 2 * i),
        # gate_up's dX: its stack dequantized, the grad of its output, the gathered input and its grad
        d.num_experts * 2 * d.intermediate * d.hidden * c + rows * (2 * i + 2 * h),
        rows * (h + MOE_LORA_ADD_TENSORS * 2 * i),  # the first forward's LoRA add, beside the gathered input
    )


def rope_cache_bytes(m: MemoryInputs) -> int:
    """cos and sin of Unsloth's own classes' RoPE cache (0 under FastModel: transformers' rotary caches none)."""
    d = m.dims
    if m.model_type not in UNSLOTH_FAST_MODEL_TYPES or not d.max_positions:
        return 0
    rows = min(UNSLOTH_ROPE_START_ROWS, d.max_positions)
    if m.seq > rows:
        rows = -(-m.seq // UNSLOTH_ROPE_GROWTH_ROWS) * UNSLOTH_ROPE_GROWTH_ROWS
    return 2 * rows * d.head_dim * m.compute_bytes


def unsloth_prefill_terms(m: MemoryInputs) -> dict[str, int]:
    """What Unsloth's generate holds at the prefill beside the terms every recipe has (memory_breakdown)."""
    d, b, s = m.dims, m.batch, m.seq
    out = {"rope_cache": rope_cache_bytes(m)}
    if m.model_type in UNSLOTH_PREFILL_MASK_MODEL_TYPES:
        out["prefill_mask"] = s * s * 4 + UNSLOTH_PREFILL_MASK_COPIES * b * s * s * m.compute_bytes
    if d.attn_softcapping:  # soft-capped attention (Gemma-2) without flash-attn: eager, fp32 scores
        out["attention_scores"] = b * d.heads * s * s * 4
    return {k: v for k, v in out.items() if v}
