"""Unsloth's terms (qtool.estimate.unsloth_terms), each against the arithmetic of the unsloth/unsloth_zoo 2026.10.9
source it models: the RoPE cache of Unsloth's own classes (unsloth/models/llama.py), Mistral's prefill mask
(unsloth/models/mistral.py), the grouped-GEMM path of MoE experts kept 4-bit
(unsloth_zoo/temporary_patches/moe_utils.py) and the fp32 cast of every LoRA adapter (unsloth_zoo/training_utils.py);
and what GPU traces showed (tools/peak_trace.py): the first step of a fresh process on the MoE path under
Unsloth's block compile, Gemma-2's soft-capped attention and its static masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool.core.config import resolve_settings
from qtool.core.models import resolve_model
from qtool.estimate import memory, unsloth_terms
from qtool.estimate.report import estimate_basis

ROOT = Path(__file__).resolve().parents[2]


def _config(name: str) -> dict:
    return json.loads((ROOT / "configs" / "models" / f"{name}.json").read_text())


def _inputs(tmp_path, name: str, layers: int = 4, **flags) -> memory.MemoryInputs:
    """MemoryInputs of `name`'s config cut to `layers` decoder layers, under Unsloth's recipe."""
    path = tmp_path / name / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({**_config(name), "num_hidden_layers": layers}))
    settings = resolve_settings({"recipe": "unsloth", "optimizer": "adamw8bit", **flags}, env={}, cwd=tmp_path)
    return estimate_basis(resolve_model(str(path)), settings).inputs


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


@pytest.mark.parametrize("name", ["mistral-7b", "llama-3-8b"])
def test_rope_cache_is_cos_and_sin_of_min_32768_and_max_positions(tmp_path, name):
    """LlamaRotaryEmbedding: current_rope_size = min(4 * 8192, max_position_embeddings) rows, cos and sin, in the
    dtype the model was built in (bf16); grown in steps of 8192 rows for a longer sequence."""
    cfg = _config(name)
    rows = min(32768, cfg["max_position_embeddings"])
    m = _inputs(tmp_path, name, mode="qlora", seq_len=512)
    assert unsloth_terms.rope_cache_bytes(m) == 2 * rows * _head_dim(cfg) * 2
    longer = _inputs(tmp_path, name, mode="qlora", seq_len=rows + 1)
    assert unsloth_terms.rope_cache_bytes(longer) == 2 * (rows + 8192) * _head_dim(cfg) * 2
    assert memory.memory_breakdown(m)["rope_cache"] == unsloth_terms.rope_cache_bytes(m)


def test_fastmodel_architectures_cache_no_rope(tmp_path):
    """Phi-3 goes through FastModel (transformers' own rotary, computed per forward): no cache."""
    m = _inputs(tmp_path, "phi-3-mini", mode="qlora", seq_len=512)
    assert unsloth_terms.rope_cache_bytes(m) == 0
    assert "rope_cache" not in memory.memory_breakdown(m)


def test_mistral_prefill_holds_its_additive_mask(tmp_path):
    """MistralForCausalLM_fast_forward without xformers: torch.full's fp32 S x S values (a local for the whole
    forward), their B x S x S copy in bf16 and _unmask_unattended's product; Llama's class builds none."""
    seq = 2048
    mistral = memory.memory_breakdown(_inputs(tmp_path, "mistral-7b", mode="inference", seq_len=seq))
    llama = memory.memory_breakdown(_inputs(tmp_path, "llama-3-8b", mode="inference", seq_len=seq))
    assert mistral["prefill_mask"] == seq * seq * 4 + 2 * seq * seq * 2
    assert "prefill_mask" not in llama
    assert mistral["rope_cache"] == 2 * 32768 * 128 * 2  # built by the first forward, generate's


def test_moe_grouped_path_peaks_at_the_gate_gradient_for_long_sequences(tmp_path):
    """Mixtral at 8192 tokens: the recomputed layer saves, per routed row (tokens x top_k), the gathered input,
    gate_up's output and the activation; _MoEGateGradIdentity then upcasts the activation and its grad to fp32 and
    multiplies them (three fp32 rows x inter) beside the activation's grad. No expert stack is saved."""
    cfg, seq = _config("mixtral-8x7b"), 8192
    h, i, rows = cfg["hidden_size"], cfg["intermediate_size"], seq * cfg["num_experts_per_tok"]
    m = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=seq)
    saved = rows * (h + 3 * i) * 2
    assert unsloth_terms.moe_grouped_bytes(m) == saved + rows * i * 2 + 3 * rows * i * 4
    terms = unsloth_terms.unsloth_steps(m)  # a later step: the first one is test_moe_first_step_...
    assert terms["moe_experts"] == unsloth_terms.moe_grouped_bytes(m)
    assert "mlp_backward" not in terms and "dequant_buffer" not in terms


def test_moe_grouped_path_peaks_at_the_dequantized_gate_up_for_short_sequences(tmp_path):
    """At 2048 tokens the largest moment is gate_up's dX in _GroupedMMRecompute.backward: the whole E x 2I x H
    stack dequantized again (bf16) beside the grad of its output, the gathered input and the input's grad."""
    cfg, seq = _config("mixtral-8x7b"), 2048
    h, i, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    rows = seq * cfg["num_experts_per_tok"]
    m = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=seq)
    assert unsloth_terms.moe_grouped_bytes(m) == e * 2 * i * h * 2 + rows * (2 * i + 2 * h) * 2


def test_moe_gate_gradient_has_no_fp32_product_under_fp16(tmp_path):
    """_moe_gategrad_enabled's identity is off for float16 activations (Unsloth keeps the plain multiply)."""
    bf16 = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=8192)
    fp16 = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=8192, precision="fp16")
    assert unsloth_terms.moe_grouped_bytes(fp16) < unsloth_terms.moe_grouped_bytes(bf16)


def test_expert_adapters_are_fp32_under_unsloth(tmp_path):
    """prepare_model_for_training upcasts every .lora_A./.lora_B. parameter, the ParamWrapper's on fused experts
    too: params and grads 4 bytes each, plus the optimizer's states (adamw8bit: 2 bytes + absmax)."""
    m = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=512)
    experts = memory.expert_adapter_params(m)
    assert experts > 0
    per = 2 * 4 + memory.OPTIMIZER_BYTES_PER_PARAM["adamw8bit"]
    assert memory.trainable_state(m)["expert_adapters"] == int(experts * per)


def test_training_holds_a_second_cublas_workspace(tmp_path):
    """autograd's device thread takes its own cuBLAS handle and the workspace is keyed by (handle, stream): a
    training step leaves a second 32 MiB workspace (sm90's size); generate has none."""
    train = memory.memory_breakdown(_inputs(tmp_path, "llama-3-8b", mode="qlora", seq_len=512))
    infer = memory.memory_breakdown(_inputs(tmp_path, "llama-3-8b", mode="inference", seq_len=512))
    assert train["cublas_workspace_backward"] == train["cublas_workspace"] == memory.CUBLAS_WORKSPACE_BYTES
    assert "cublas_workspace_backward" not in infer


@pytest.mark.parametrize("value, expected", [(4096, 4096), (None, None), ("4096", None), (0, None), (True, None)])
def test_max_positions_is_read_leniently(value, expected):
    """max_position_embeddings only sizes Unsloth's RoPE cache: an odd value leaves it unknown (no cache counted)
    rather than failing the estimate."""
    cfg = {**_config("llama-3-8b"), "max_position_embeddings": value}
    assert memory.dims_from_config(cfg).max_positions == expected


def test_moe_first_step_holds_every_layers_activations(tmp_path):
    """A fresh process's first step (Unsloth's per-layer compile, MoE grouped-GEMM path): no grads or optimizer
    states yet, every layer's activations -- per routed row 4 intermediate-sized tensors and 1.25 hidden-sized,
    per token 3 norm outputs, the queries twice, keys and values --, the stream's 2 and the gate_up stack. It is
    the peak at every length the traces ran (512-8192); with checkpointing off every layer is held anyway."""
    cfg = _config("mixtral-8x7b")
    h, i, e, k = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    for seq in (512, 2048, 8192):
        m = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=seq)
        first = unsloth_terms.moe_first_step(m)
        per_layer = int(seq * k * (4 * i + 1.25 * h) * 2) + seq * (3 * h + 2 * h + 2 * kv) * 2
        assert first["first_step_activations"] == 4 * per_layer + 2 * seq * h * 2
        assert first["moe_experts"] == e * 2 * i * h * 2
        assert first["expert_adapters"] == memory.expert_adapter_params(m) * 4
        assert not {"lora_grads", "optimizer_states", "cublas_workspace_backward"} & set(first)
        assert memory.memory_breakdown(m) == first
        assert sum(first.values()) > sum(unsloth_terms.unsloth_steps(m).values())
    plain = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=512, gradient_checkpointing=False)
    assert "first_step_activations" not in memory.memory_breakdown(plain)
    off = _inputs(tmp_path, "mixtral-8x7b", mode="qlora", seq_len=8192, unsloth_block_compile=False)
    assert memory.memory_breakdown(off) == unsloth_terms.unsloth_steps(off)  # UNSLOTH_BLOCK_COMPILE=0
    dense = memory.memory_breakdown(_inputs(tmp_path, "llama-3-8b", mode="qlora", seq_len=8192))
    assert "first_step_activations" not in dense


def test_gemma2_softcapped_attention_and_static_masks(tmp_path):
    """Gemma-2 on Unsloth's own class without flash-attn: two max_seq_length^2 masks in bf16 kept on the model
    (the window mask is one of them), and a layer's attention backward holding B x H x S x S scores as the saved
    bf16 scores, the recomputed bf16 probabilities and their fp32 grad -- the peak at 8192 tokens, the loss
    chunk still at 512. Llama, whose attention is SDPA's, has neither."""
    cfg = _config("gemma-2-9b")
    heads = cfg["num_attention_heads"]
    long = memory.memory_breakdown(_inputs(tmp_path, "gemma-2-9b", mode="qlora", seq_len=8192))
    assert long["softcap_scores"] == heads * 8192 * 8192 * (2 + 2 + 4)
    assert long["attention_masks"] == 2 * 8192 * 8192 * 2
    assert "window_mask" not in long and "mlp_backward" not in long and "loss_chunk" not in long
    short = memory.memory_breakdown(_inputs(tmp_path, "gemma-2-9b", mode="qlora", seq_len=512))
    assert "softcap_scores" not in short and "loss_chunk" in short and short["attention_masks"] == 2 * 512 * 512 * 2
    llama = memory.memory_breakdown(_inputs(tmp_path, "llama-3-8b", mode="qlora", seq_len=8192))
    assert "softcap_scores" not in llama and "attention_masks" not in llama


def test_moe_first_step_keeps_the_qk_norm_inputs(tmp_path):
    """Under QK norm (Qwen3-MoE) each layer also keeps the projected queries and keys the norm reads."""
    cfg = json.loads((ROOT / "bench" / "configs" / "qwen3-30b-a3b.json").read_text())
    path = tmp_path / "q3" / "config.json"
    path.parent.mkdir()
    for qk in (True, False):
        path.write_text(json.dumps({**cfg, "num_hidden_layers": 4, "model_type": "qwen3_moe" if qk else "mixtral"}))
        settings = resolve_settings({"recipe": "unsloth", "mode": "qlora", "seq_len": 2048}, env={}, cwd=tmp_path)
        m = estimate_basis(resolve_model(str(path)), settings).inputs
        assert m.dims.intermediate == cfg["moe_intermediate_size"]  # an expert's width, not the dense layers'
        if qk:
            with_norm = unsloth_terms.moe_first_step(m)["first_step_activations"]
        else:
            q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
            assert with_norm - unsloth_terms.moe_first_step(m)["first_step_activations"] == 4 * 2048 * (q + kv) * 2


def test_moe_layouts_the_terms_leave_out_are_named(tmp_path, capsys):
    """A MoE config with shared experts (Qwen2-MoE) or dense layers: the estimate says its activation terms count
    routed experts only; Mixtral and Qwen3-MoE (all layers routed, no shared expert) get no such warning."""
    from qtool.cli.app import main

    qwen3 = json.loads((ROOT / "bench" / "configs" / "qwen3-30b-a3b.json").read_text())
    cases = {"qwen3": ({**qwen3, "num_hidden_layers": 2}, None),
             "shared": ({**qwen3, "num_hidden_layers": 2, "shared_expert_intermediate_size": 5632}, "shared experts"),
             "dense": ({**qwen3, "num_hidden_layers": 2, "mlp_only_layers": [0]}, "dense MLP layers")}
    for name, (cfg, says) in cases.items():
        path = tmp_path / name / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(cfg))
        assert main(["estimate", str(path), "--json"]) == 0
        named = [w for w in json.loads(capsys.readouterr().out)["warnings"] if w.startswith("MoE with")]
        assert named == [] if says is None else (len(named) == 1 and says in named[0] and "768 wide" in named[0])
