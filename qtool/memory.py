"""GPU memory model: pure arithmetic, one named function per term, no torch.

`memory_breakdown(...)` returns component -> bytes for the moment of the peak, so a report can show
it term by term and a GPU measurement can calibrate each term separately (the constants below are
the knobs; none is per-model). Recipe per mode:

  inference  weights (GPU bytes of the chosen format) + KV cache + forward activations of one layer
             + logits (batch x seq x vocab) + one dequantized weight + cuBLAS workspace + CUDA context
  qlora      4-bit weights + kept params upcast to fp32 (prepare_model_for_kbit_training) + LoRA A/B
             (fp32) + their grads + optimizer states + activations + loss-phase or layer-phase
             transients + workspace + context
  lora       as qlora with 16-bit base weights and no fp32 upcast
  full       16-bit weights + grads + optimizer states + activations + transients + workspace + context

Peak of a training step = everything static + checkpointed activations + the larger of
  loss phase:  logits + log_softmax output + two logits-sized fp32 grads (cross_entropy backward)
  layer phase: one layer's activations recomputed in backward + their grads + one dequantized weight
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GiB = 1024**3
MiB = 1024**2

CUDA_CONTEXT_BYTES = 512 * MiB  # CUDA context + kernels: GPU memory torch's allocator never sees
CUBLAS_WORKSPACE_BYTES = 32 * MiB  # torch's cuBLAS(Lt) workspace on sm90 (":4096:8"), allocator-owned

OUTSIDE_ALLOCATOR = ("cuda_context", "optimizer_states_paged")  # on the GPU, not in memory_allocated()

# Tensors a Llama-style decoder layer keeps for backward, in units of batch x seq x (dim) x act bytes.
# Attention: norm in/out, q/k/v/o inputs & outputs, rotary q/k, SDPA out; MLP: gate, up, act(gate),
# act*up (down's input). Grads of one layer in backward take about the same again (GRAD_FACTOR).
LAYER_HIDDEN_TENSORS = 10  # hidden-sized tensors per layer
LAYER_KV_TENSORS = 6  # k/v-sized tensors (k, v, rotary k, repeat_kv'd k/v for SDPA count as hidden-sized/heads)
LAYER_MLP_TENSORS = 4  # intermediate-sized tensors (gate, up, act(gate), act*up)
GRAD_FACTOR = 1.0  # grads of one layer's activations alive during its backward, relative to the layer
LOSS_GRAD_COPIES = 2  # nll_loss backward grad + log_softmax backward grad, both B x S x V fp32

OPTIMIZER_BYTES_PER_PARAM = {
    "adamw": 8.0,  # exp_avg + exp_avg_sq in fp32 (trainable params are fp32)
    "adamw8bit": 2.0 + 2 * 4 / 256,  # two uint8 states + an fp32 absmax per 256-value block each
    "paged_adamw8bit": 2.0 + 2 * 4 / 256,  # same bytes, in paged (managed) memory
    "sgd": 0.0,  # momentum 0: no state
}


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

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _first(cfg: Mapping, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def dims_from_config(cfg: Mapping) -> Dims:
    """Llama/Mistral/Qwen/Gemma names, with GPT-2/OPT/Phi aliases."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else cfg
    hidden = int(_first(text, "hidden_size", "n_embd", "d_model", default=0))
    layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers", default=0))
    heads = int(_first(text, "num_attention_heads", "n_head", default=1))
    kv_heads = int(_first(text, "num_key_value_heads", "multi_query_group_num", default=heads))
    head_dim = int(_first(text, "head_dim", default=0) or hidden // max(heads, 1))
    inter = int(_first(text, "intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * hidden)
    vocab = int(_first(text, "vocab_size", default=0))
    top_k = int(_first(text, "num_experts_per_tok", "moe_topk", default=1))
    return Dims(hidden, layers, heads, kv_heads, head_dim, inter, vocab, top_k)


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


def memory_breakdown(m: MemoryInputs) -> dict[str, int]:
    """component -> bytes at the peak. The sum is the peak (see peak_bytes)."""
    d, b, s, c = m.dims, m.batch, m.seq, m.compute_bytes
    out: dict[str, int] = {}
    if m.mode == "inference":
        out["weights"] = m.quant_weights_gpu
        out["kv_cache"] = kv_cache_bytes(d, b, s, c)
        out["activations"] = layer_activation_bytes(d, b, s, c)  # one layer's forward tensors at a time
        out["logits"] = logits_bytes(d, b, s, c)  # lm_head output in the compute dtype
        out["dequant_buffer"] = m.largest_linear * c  # bnb dequantizes one weight to compute dtype
        out["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES
        out["cuda_context"] = CUDA_CONTEXT_BYTES
        return out

    if m.mode == "qlora":
        # prepare_model_for_kbit_training casts every fp16/bf16 non-Params4bit param to fp32:
        # the kept params (embeddings, norms, lm_head) double in size ...
        out["weights"] = m.quant_weights_gpu - m.kept_weights_gpu
        out["kept_fp32"] = m.kept_params * 4
        # ... and fp32 norm weights turn the residual stream fp32 (Linear4bit casts outputs back)
        act = 4
        logit_bytes = 4  # lm_head is fp32 too
    elif m.mode == "lora":
        out["weights"] = m.plain_weights_gpu
        act, logit_bytes = c, c
    else:  # full
        out["weights"] = m.plain_weights_gpu
        act, logit_bytes = c, c

    if m.mode == "full":
        trainable = m.total_params
        out["grads"] = trainable * m.weight_bytes  # grads in the params' dtype
        # torch AdamW states are zeros_like(param): 2 x itemsize per param; 8-bit ones 2 B + absmax
        per = 2 * m.weight_bytes if m.optimizer == "adamw" else OPTIMIZER_BYTES_PER_PARAM[m.optimizer]
        out["optimizer_states"] = int(trainable * per)
    else:
        out["lora_params"] = m.lora_params * 4  # peft creates adapters in fp32
        out["lora_grads"] = m.lora_params * 4
        # paged optimizers live in managed memory: on the GPU, but not in torch's allocator
        key = "optimizer_states_paged" if m.optimizer.startswith("paged_") else "optimizer_states"
        out[key] = optimizer_bytes(m.lora_params, m.optimizer)

    if m.gradient_checkpointing:
        out["activation_checkpoints"] = checkpoint_bytes(d, b, s, act)
        saved_layers = 0
    else:
        saved_layers = d.layers
        out["activations"] = saved_layers * layer_activation_bytes(d, b, s, act)

    logits = logits_bytes(d, b, s, logit_bytes)
    loss_phase = {
        "logits": logits,  # kept alive by the model output
        # ForCausalLMLoss: logits.float() copy when logits are 16-bit (freed with log_softmax's input)
        "logits_fp32_copy": logits_bytes(d, b, s, 4) if logit_bytes != 4 else 0,
        "loss_log_softmax": logits_bytes(d, b, s, 4),  # cross_entropy saves log_softmax output (fp32)
        "loss_grads": LOSS_GRAD_COPIES * logits_bytes(d, b, s, 4),  # backward through nll + log_softmax
    }
    layer = layer_activation_bytes(d, b, s, act)
    layer_phase = {
        "logits": logits,  # still referenced by the output while layers run backward
        # recompute of one layer (checkpointing) or nothing extra (already saved), + its grads
        "layer_recompute": layer if m.gradient_checkpointing else 0,
        "layer_grads": int(GRAD_FACTOR * layer),
        "dequant_buffer": m.largest_linear * c if m.mode == "qlora" else 0,
    }
    phase = loss_phase if sum(loss_phase.values()) >= sum(layer_phase.values()) else layer_phase
    out.update({k: v for k, v in phase.items() if v})
    out["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES
    out["cuda_context"] = CUDA_CONTEXT_BYTES
    return out


def peak_bytes(breakdown: Mapping[str, int]) -> int:
    return sum(breakdown.values())


def allocated_peak_bytes(breakdown: Mapping[str, int]) -> int:
    """What torch.cuda.max_memory_allocated() should report: the peak less the CUDA context."""
    return peak_bytes(breakdown) - sum(breakdown.get(k, 0) for k in OUTSIDE_ALLOCATOR)
