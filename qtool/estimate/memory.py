"""GPU memory model: pure arithmetic, one named function per term, no torch.

`memory_breakdown(...)` returns component -> bytes at the moment of the peak, so a report can show it
term by term and a GPU measurement can check each term separately. The constants below are physical
counts (how many tensors of a given shape are alive), fitted once on measured per-phase peaks of
`qtool verify` (docs/benchmarks.md); none is per-model. Recipe per mode:

  inference  weights (GPU bytes of the chosen format) + KV cache + one layer's forward tensors
             + last-token logits (generate uses logits_to_keep=1) + one dequantized weight
             + cuBLAS workspace + CUDA context
  qlora      4-bit weights + kept params upcast to fp32 (prepare_model_for_kbit_training) + LoRA A/B
             (fp32) + their grads + optimizer states + workspace + context, plus the dynamic peak
  lora       as qlora with 16-bit base weights and no fp32 upcast
  full       16-bit weights + grads + optimizer states + workspace + context, plus the dynamic peak

Recipe (MemoryInputs.recipe: what runs the steps, qtool.verify.recipes): `loop` is the model above; `trainer`
(transformers.Trainer, autocast) adds a 16-bit copy of the fp32 lm_head and runs attention 16-bit; `sft` (trl)
has 16-bit adapters and a chunked loss; `unsloth` (unsloth_terms.py) no fp32 upcast, fp32 adapters, MoE
experts 4-bit on its grouped-GEMM path, checkpoints offloaded to host through two GPU buffers, its own chunked
loss and, for the architectures it serves with its own classes, fused LoRA kernels and a RoPE cache. Fitted on
per-recipe GPU peaks (docs/recipe_measurements.json).

Dynamic peak of a training step (second step: grads and optimizer states already exist) = checkpointed layer
inputs + the larger of the loss phase and the layer phase: step_terms.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from qtool.core.errors import ConfigError

GiB = 1024**3
MiB = 1024**2

CUDA_CONTEXT_BYTES = 736 * MiB  # CUDA context + cuBLAS/bitsandbytes kernels, outside torch's allocator
# (measured 0.68-0.73 GiB on H100/H200 with CUDA 13 once a 4-bit matmul and a backward have run)
CUBLAS_WORKSPACE_BYTES = 32 * MiB  # torch's cuBLAS(Lt) workspace on sm90, allocator-owned

# A rank of a process group (FSDP, DDP) also holds NCCL's buffers outside the allocator: measured 1.575 GiB
# outside torch on each FSDP rank (2 and 4 ranks, H200, docs/multigpu_measurements.json) less the context above.
NCCL_BYTES = 877 * MiB
OUTSIDE_ALLOCATOR = ("cuda_context", "nccl_buffers", "optimizer_states_paged")  # on the GPU, not allocated()

# Without gradient checkpointing every layer keeps its activations for backward; in units of
# batch x seq x (dim) x act bytes: norm in/out, q/k/v/o inputs & outputs, rotary q/k, SDPA out (hidden),
# k/v (kv), gate, up, act(gate), act*up (intermediate).
LAYER_HIDDEN_TENSORS = 7  # fitted on Llama-3-8B QLoRA without checkpointing (docs/benchmarks.md)
LAYER_KV_TENSORS = 2
LAYER_MLP_TENSORS = 4
LAYER_SCORE_TENSORS = 1  # where attention materialises scores: the probabilities, B x H x S x S
# Inference (no grad): inside one layer the MLP's gate, up and act(gate) coexist with the residual.
INFER_MLP_TENSORS = 3
INFER_HIDDEN_TENSORS = 1
# Training, recomputed layer in backward:
HIDDEN_GRAD_TENSORS = 2  # grad of a layer's output and of its input, B x S x hidden
ATTN_SCORE_COPIES = 4  # math SDPA backward: probs saved + recomputed scores + two grads, B x H x S x S
LOSS_FP32_TENSORS = 2  # cross_entropy: log_softmax output (saved) + the grad flowing back, B x S x V fp32

OPTIMIZER_BYTES_PER_PARAM = {
    "adamw": 8.0,  # exp_avg + exp_avg_sq in fp32 (trainable params are fp32)
    "adamw8bit": 2.0 + 2 * 4 / 256,  # two uint8 states + an fp32 absmax per 256-value block each
    "paged_adamw8bit": 2.0 + 2 * 4 / 256,  # same bytes, in paged (managed) memory
    "paged_adamw32bit": 8.0,  # two fp32 states, paged
    "adafactor": 0.0,  # factored: per matrix (rows + cols) fp32, counted by adafactor_bytes
    "sgd": 0.0,  # momentum 0: no state
}

# --- recipes (what runs the steps; docs/benchmarks.md "recipes") ---------------------------------------

RECIPES_16BIT_ADAPTERS = ("sft",)  # trl casts a quantized model's trainable adapters to bf16

# Unsloth (recipe unsloth; its terms: qtool/estimate/unsloth_terms.py). Its own model classes -- with fused
# LoRA kernels for the MLP and attention projections -- serve these model_types (unsloth/models/loader.py's
# dispatch); every other architecture goes through FastModel, the model's own (compiled) transformers code
# with peft's LoRA layers.
UNSLOTH_FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")

# Decoder layers with more norms than the pre-attention/pre-MLP pair (transformers' modeling code), read from the
# config's model_type: RMSNorm on each head's queries and keys ...
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2", "olmoe")
# ... and a norm after each sublayer, before the residual add ("sandwich" norms)
SANDWICH_NORM_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class Dims:
    """The shapes activations depend on, read from config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts_per_token: int = 1  # MoE: each token runs through top-k experts' MLPs
    num_experts: int = 1  # MoE: experts per layer (Mixtral's fused 3-D expert weights, kept 16-bit)
    sliding_window: int | None = None  # local attention window (Mistral), None when unused
    attn_softcapping: bool = False  # Gemma-2: attention logits soft-capped, so eager attention (no SDPA)
    logit_softcapping: bool = False  # Gemma-2: final logits soft-capped (tanh), one more B x S x V tensor
    qk_norm: bool = False  # Qwen3, Gemma-3: queries and keys normalised per head (QK_NORM_MODEL_TYPES)
    sandwich_norms: bool = False  # Gemma-2/3: post-attention and post-MLP norms (SANDWICH_NORM_MODEL_TYPES)
    max_positions: int | None = None  # max_position_embeddings (Unsloth sizes its RoPE cache by it)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def max_positions(config: Mapping) -> int | None:
    """The model's trained length from its config (the first positive integer among the usual keys), or None:
    read leniently, since only warnings and Unsloth's RoPE cache depend on it."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _first(cfg: Mapping, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def dims_from_config(cfg: Mapping) -> Dims:
    """Llama/Mistral/Qwen/Gemma names, with GPT-2/OPT/Phi aliases. Raises ConfigError for values that are
    not positive integers (a config with missing fields should first be completed by transformers' config
    class: see qtool.estimate)."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else cfg

    def size(*keys, default=None, minimum=1):
        value = _first(text, *keys, default=default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"config.json: {keys[0]} must be an integer >= {minimum}, not {value!r}")
        return value

    hidden = size("hidden_size", "n_embd", "d_model")
    layers = size("num_hidden_layers", "n_layer", "num_layers")
    heads = size("num_attention_heads", "n_head")
    kv_heads = size("num_key_value_heads", "multi_query_group_num", default=heads)
    head_dim = _first(text, "head_dim") and size("head_dim") or hidden // heads
    inter = _first(text, "intermediate_size", "n_inner", "ffn_dim") and size("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    vocab = size("vocab_size")
    top_k = size("num_experts_per_tok", "moe_topk", default=1)
    experts = size("num_local_experts", "num_experts", default=1)
    if experts > 1 and _first(text, "moe_intermediate_size") is not None:
        # Qwen3-MoE and its kind: each expert's MLP is moe_intermediate_size wide (intermediate_size is a dense
        # layer's, used only by mlp_only_layers; models mixing dense and MoE layers count as all-MoE here)
        inter = size("moe_intermediate_size")
    positions = max_positions(text)  # only sizes Unsloth's RoPE cache: lenient
    window = None
    if text.get("use_sliding_window", True) is not False and text.get("sliding_window") is not None:
        window = size("sliding_window")
    return Dims(hidden, layers, heads, kv_heads, head_dim, inter, vocab, top_k, experts,
                sliding_window=window,
                attn_softcapping=text.get("attn_logit_softcapping") is not None,
                logit_softcapping=text.get("final_logit_softcapping") is not None,
                qk_norm=text.get("model_type") in QK_NORM_MODEL_TYPES,
                sandwich_norms=text.get("model_type") in SANDWICH_NORM_MODEL_TYPES,
                max_positions=positions)


# --- one function per term -------------------------------------------------------------------

def kv_cache_bytes(d: Dims, batch: int, seq: int, dtype_bytes: int) -> int:
    # K and V for every layer and token, in the compute dtype
    return 2 * d.layers * batch * seq * d.kv_dim * dtype_bytes


def logits_bytes(d: Dims, batch: int, seq: int, dtype_bytes: int) -> int:
    # lm_head output for every position: batch x seq x vocab
    return batch * seq * d.vocab * dtype_bytes


def layer_activation_bytes(d: Dims, batch: int, seq: int, act_bytes: int) -> int:
    # what one decoder layer saves for backward (or holds in a forward pass)
    per_token = (LAYER_HIDDEN_TENSORS * d.hidden + LAYER_KV_TENSORS * d.kv_dim
                 + LAYER_MLP_TENSORS * d.intermediate * d.experts_per_token)
    return batch * seq * per_token * act_bytes


def checkpoint_bytes(d: Dims, batch: int, seq: int, act_bytes: int) -> int:
    # gradient checkpointing keeps each layer's input hidden states
    return d.layers * batch * seq * d.hidden * act_bytes


def lora_param_count(linears: Iterable[tuple[tuple[int, ...], int]], rank: int) -> int:
    # A is r x in, B is out x r, for every targeted Linear of shape (out, in)
    return sum(count * rank * (shape[0] + shape[1]) for shape, count in linears)


def optimizer_bytes(trainable: int, optimizer: str) -> int:
    return int(trainable * OPTIMIZER_BYTES_PER_PARAM[optimizer])


# --- the recipe ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryInputs:
    """Everything the model needs, as plain numbers (built by qtool.estimate)."""

    dims: Dims
    mode: str  # inference | qlora | lora | full
    batch: int
    seq: int
    total_params: int
    kept_params: int  # params not quantized (embeddings, norms, lm_head, biases)
    quant_weights_gpu: int  # GPU bytes of the quantized model (formats.weights_for_format(...).gpu)
    plain_weights_gpu: int  # GPU bytes of the 16-bit model
    kept_weights_gpu: int  # GPU bytes of the kept params in the 16-bit dtype they load in
    lora_params: int
    largest_linear: int  # numel of the largest quantized weight (dequantized one at a time)
    compute_bytes: int = 2  # bnb_4bit_compute_dtype / training dtype
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    weight_bytes: int = 2  # itemsize of 16-bit weights in lora/full modes
    recipe: str = "loop"  # trainer | sft | loop | unsloth (qtool.core.config.RECIPES)
    precision: str = "bf16"  # the Trainer's mixed precision: bf16 | fp16 | fp32
    lora_rank: int = 16
    expert_lora: bool = False  # LoRA targets all-linear: peft also wraps fused 3-D expert weights (MoE)
    upcast_kept: bool = True  # qlora: prepare_model_for_kbit_training upcasts the kept params (FSDP-QLoRA: not)
    model_type: str = ""  # config.json's model_type (Unsloth serves some with its own classes)
    largest_fused: int = 0  # numel of the largest fused 3-D expert tensor (MoE); Unsloth quantizes those too
    unsloth_block_compile: bool = True  # Unsloth's per-decoder-layer torch.compile (UNSLOTH_BLOCK_COMPILE)

    @property
    def fp32_head(self) -> bool:
        """QLoRA's upcast made lm_head fp32 (the trainer casts a 16-bit copy; the chunked loss an fp32 slice)."""
        return self.mode == "qlora" and self.upcast_kept

    @property
    def unsloth_fast(self) -> bool:
        """Unsloth runs this architecture with its own classes and fused LoRA kernels (not FastModel)."""
        return self.recipe == "unsloth" and self.model_type in UNSLOTH_FAST_MODEL_TYPES

    @property
    def autocast(self) -> bool:
        """The Trainer (accelerate) wraps the forward in torch.autocast for bf16/fp16; the loop does not."""
        return self.recipe != "loop" and self.precision != "fp32"


def math_attention(d: Dims, act_bytes: int, seq: int, autocast: bool = False) -> bool:
    """Whether attention materialises the S x S scores (SDPA's math kernel, or eager attention).

    Flash attention needs 16-bit inputs; the memory-efficient kernel takes fp32 but not grouped-query
    attention (enable_gqa), which transformers uses when kv_heads < heads and no explicit mask is needed.
    QLoRA's fp32 upcast of the norms makes attention inputs fp32, so a GQA model in QLoRA runs the math
    kernel -- unless a sliding window shorter than the sequence forces an explicit mask, when transformers
    repeats K/V and the memory-efficient kernel takes over. Soft-capped attention (Gemma-2) runs eager.
    Under the Trainer's autocast SDPA is in autocast's 16-bit list: q, k, v are cast down and the flash or
    memory-efficient kernel runs, whatever the residual stream's dtype.
    """
    if d.attn_softcapping and not autocast:  # measured: no S x S under autocast (bf16 SDPA), Gemma-2 too
        return True
    masked = d.sliding_window is not None and seq >= d.sliding_window
    return act_bytes == 4 and not autocast and d.kv_heads < d.heads and not masked


def attention_scores_bytes(d: Dims, batch: int, seq: int, act_bytes: int) -> int:
    # math SDPA backward: probabilities saved in forward + their grad + the scores' grad
    return int(ATTN_SCORE_COPIES * batch * d.heads * seq * seq * act_bytes)


def trainable_state(m: MemoryInputs) -> dict[str, int]:
    """What training keeps between steps: gradients and optimizer states of the trainable parameters
    (every parameter in full fine-tuning, the LoRA adapters otherwise)."""
    out: dict[str, int] = {}
    if m.mode == "full":
        trainable = m.total_params
        out["grads"] = trainable * m.weight_bytes  # grads in the params' dtype
        # torch AdamW states are zeros_like(param): 2 x itemsize per param; 8-bit ones 2 B + absmax
        per = 2 * m.weight_bytes if m.optimizer == "adamw" else OPTIMIZER_BYTES_PER_PARAM[m.optimizer]
        out["optimizer_states"] = int(trainable * per)
    else:
        # peft creates adapters in fp32 (Unsloth too); trl's SFTTrainer (sft) casts a quantized model's to bf16
        adapter = 2 if m.recipe in RECIPES_16BIT_ADAPTERS and m.mode == "qlora" else 4
        out["lora_params"] = m.lora_params * adapter
        out["lora_grads"] = m.lora_params * adapter
        # paged optimizers live in managed memory: on the GPU, but not in torch's allocator
        key = "optimizer_states_paged" if m.optimizer.startswith("paged_") else "optimizer_states"
        out[key] = _adapter_optimizer_bytes(m, adapter)
        experts = expert_adapter_params(m)
        if experts:
            # in the adapters' dtype: under Unsloth fp32 too (prepare_model_for_training upcasts every .lora_A./.lora_B.
            # parameter, the ParamWrapper's on fused experts included: Mixtral's start is its adapters x 4 bytes)
            per = 2 * adapter + OPTIMIZER_BYTES_PER_PARAM.get(m.optimizer, 0.0)
            out["expert_adapters"] = int(experts * per)  # params, grads and optimizer states
    return out


def memory_breakdown(m: MemoryInputs) -> dict[str, int]:
    """component -> bytes at the peak. The sum is the peak (see peak_bytes). Unsloth's QLoRA: unsloth_terms."""
    d, b, s, c = m.dims, m.batch, m.seq, m.compute_bytes
    out: dict[str, int] = {}
    if m.mode == "inference":
        out["weights"] = m.quant_weights_gpu
        out["kv_cache"] = kv_cache_bytes(d, b, s, c)
        # one layer at a time under no_grad: the MLP's wide tensors dominate
        out["activations"] = b * s * (INFER_MLP_TENSORS * d.intermediate * d.experts_per_token
                                      + INFER_HIDDEN_TENSORS * d.hidden) * c
        out["logits"] = logits_bytes(d, b, 1, 4)  # generate keeps the last position only, upcast to fp32
        out["dequant_buffer"] = largest_dequantized(m) * c  # bnb dequantizes one weight to compute dtype
        if m.recipe == "unsloth":
            from qtool.estimate.unsloth_terms import unsloth_prefill_terms  # it builds on this module's terms

            out.update(unsloth_prefill_terms(m))
        out["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES
        out["cuda_context"] = CUDA_CONTEXT_BYTES
        return out
    if m.recipe == "unsloth" and m.mode == "qlora":
        from qtool.estimate.unsloth_terms import unsloth_breakdown  # it builds on this module's terms

        return unsloth_breakdown(m)

    if m.mode == "qlora" and not m.upcast_kept:
        # no upcast (FSDP-QLoRA): embeddings, norms and lm_head stay 16-bit, and so does the residual stream
        out["weights"] = m.quant_weights_gpu
        act, logit_bytes = c, c
    elif m.mode == "qlora":
        # prepare_model_for_kbit_training casts every fp16/bf16 non-Params4bit param to fp32:
        # the kept params (embeddings, norms, lm_head) double in size ...
        out["weights"] = m.quant_weights_gpu - m.kept_weights_gpu
        out["kept_fp32"] = m.kept_params * 4
        # ... and fp32 norm weights turn the residual stream fp32 (Linear4bit casts outputs back)
        act = 4
        logit_bytes = 4  # lm_head is fp32 too
    else:  # lora, full: 16-bit weights, 16-bit activations
        out["weights"] = m.plain_weights_gpu
        act, logit_bytes = c, c

    out.update(trainable_state(m))
    out["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES

    if m.gradient_checkpointing:
        out["activation_checkpoints"] = checkpoint_bytes(d, b, s, act)
    else:
        per_layer = layer_activation_bytes(d, b, s, act)
        if math_attention(d, act, s, m.autocast):
            per_layer += LAYER_SCORE_TENSORS * b * d.heads * s * s * act
        out["activations"] = d.layers * per_layer

    from qtool.estimate.step_terms import phases  # it builds on this module's terms

    loss_phase, layer_phase = phases(m, act, logit_bytes)
    phase = loss_phase if sum(loss_phase.values()) >= sum(layer_phase.values()) else layer_phase
    out.update({k: v for k, v in phase.items() if v})
    out["cuda_context"] = CUDA_CONTEXT_BYTES
    return out


def largest_dequantized(m: MemoryInputs) -> int:
    """numel of the largest weight dequantized at once: Unsloth quantizes fused expert tensors too and
    dequantizes one whole (E x 2I x H gate_up) for a layer's experts."""
    return max(m.largest_linear, m.largest_fused if m.recipe == "unsloth" else 0)


def stream_bytes(m: MemoryInputs) -> tuple[int, int]:
    """(residual stream itemsize, logits itemsize) of a training mode: fp32 where QLoRA upcast the norms."""
    if m.mode == "qlora" and m.recipe != "unsloth" and m.upcast_kept:  # Unsloth does not upcast
        return 4, 4
    return m.compute_bytes, m.compute_bytes


def expert_adapter_params(m: MemoryInputs) -> int:
    """peft's target_parameters LoRA on fused expert weights (E x 2I x H gate_up, E x H x I down), which
    'all-linear' reaches in transformers 5: rank r per expert on both, in every layer."""
    d = m.dims
    if d.num_experts <= 1 or not m.expert_lora or m.mode not in ("qlora", "lora"):
        return 0
    return d.layers * d.num_experts * m.lora_rank * (2 * d.hidden + 3 * d.intermediate)


def _adapter_optimizer_bytes(m: MemoryInputs, adapter_bytes: int) -> int:
    if m.optimizer == "adafactor":
        # factored second moment, no first moment (the Trainer's adafactor): a row and a column vector in
        # fp32 per LoRA matrix, ~ params / rank each for A (r x in) and B (out x r)
        return int(4 * m.lora_params / m.lora_rank)
    if m.optimizer == "adamw":  # torch AdamW: zeros_like(param), twice
        return 2 * adapter_bytes * m.lora_params
    return optimizer_bytes(m.lora_params, m.optimizer)


def peak_bytes(breakdown: Mapping[str, int]) -> int:
    return sum(breakdown.values())


def allocated_peak_bytes(breakdown: Mapping[str, int]) -> int:
    """What torch.cuda.max_memory_allocated() should report: the peak less the CUDA context."""
    return peak_bytes(breakdown) - sum(breakdown.get(k, 0) for k in OUTSIDE_ALLOCATOR)
