"""The training step's dynamic terms (qtool.estimate.step_terms), each against the arithmetic of the source it
models: trl's fused LM head (trl.kernels.chunked_logprob), transformers' sliding-window mask as SDPA receives it,
the extra norms of Qwen3/Gemma layers, and math attention's probabilities beside the recomputed MLP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool.core.config import resolve_settings
from qtool.core.models import resolve_model
from qtool.estimate import memory, step_terms
from qtool.estimate.report import estimate_basis

ROOT = Path(__file__).resolve().parents[2]


def _config(name: str) -> dict:
    for folder in (ROOT / "configs" / "models", ROOT / "bench" / "configs"):
        if (folder / f"{name}.json").is_file():
            return json.loads((folder / f"{name}.json").read_text())
    raise FileNotFoundError(name)


def _phases(tmp_path, name: str, layers: int, **flags) -> tuple[dict, dict]:
    """(loss phase, layer phase) of `name`'s config cut to `layers` decoder layers (as the GPU rows were measured)."""
    cfg = {**_config(name), "num_hidden_layers": layers}
    cfg.pop("layer_types", None)
    path = tmp_path / name / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(cfg))
    settings = resolve_settings({"mode": "qlora", "optimizer": "adamw8bit", **flags}, env={}, cwd=tmp_path)
    inputs = estimate_basis(resolve_model(str(path)), settings).inputs
    return step_terms.phases(inputs, *memory.stream_bytes(inputs))


@pytest.mark.parametrize("name, slices", [("llama-3-8b", 2), ("mistral-7b", 1)])
def test_sft_lm_head_casts_vocabulary_chunks_to_bf16(tmp_path, name, slices):
    """Under autocast trl casts each 32768-row chunk of the fp32 lm_head to bf16; in backward the next chunk's copy
    is made while the last one is referenced (two alive) -- one for a vocabulary of a single chunk. Its tile buffer
    is token chunk x vocabulary chunk in bf16; the hidden states' grad accumulates in fp32 beside a bf16 chunk."""
    cfg, seq = _config(name), 512
    rows = min(cfg["vocab_size"], 32768)
    terms, _ = _phases(tmp_path, name, 4, recipe="sft", seq_len=seq)
    assert terms["lm_head_chunk"] == slices * rows * cfg["hidden_size"] * 2
    assert terms["loss_chunk"] == seq * rows * 2
    assert terms["loss_hidden"] == seq * cfg["hidden_size"] * (4 + 2)


def test_sft_in_fp32_uses_the_fp32_lm_head_in_place(tmp_path):
    """--precision fp32: no autocast, trl computes in the hidden states' dtype (fp32, QLoRA's upcast), and
    weight[start:end].to(float32) of an fp32 lm_head is the slice itself: no copy; the tile is fp32."""
    terms, _ = _phases(tmp_path, "llama-3-8b", 4, recipe="sft", seq_len=512, precision="fp32")
    assert terms["lm_head_chunk"] == 0
    assert terms["loss_chunk"] == 512 * 32768 * 4


@pytest.mark.parametrize("recipe, attn_bytes", [("sft", 2), ("loop", 4)])
def test_window_mask_past_the_window_only(tmp_path, recipe, attn_bytes):
    """A sliding window shorter than the sequence: transformers' boolean S x S mask and SDPA's additive copy in
    the attention inputs' dtype (bf16 under autocast, fp32 in the loop's upcast stream)."""
    window = _config("mistral-7b")["sliding_window"]
    _, inside = _phases(tmp_path, "mistral-7b", 4, recipe=recipe, seq_len=window - 1)
    _, at = _phases(tmp_path, "mistral-7b", 4, recipe=recipe, seq_len=window)
    _, past = _phases(tmp_path, "mistral-7b", 4, recipe=recipe, seq_len=2 * window)
    assert inside["window_mask"] == 0
    # transformers masks explicitly from kv_length >= window on (masking_utils), as math_attention counts
    assert at["window_mask"] == window ** 2 * (1 + attn_bytes)
    assert past["window_mask"] == (2 * window) ** 2 * (1 + attn_bytes)


def test_qk_and_sandwich_norms_keep_their_tensors(tmp_path):
    """Qwen3's per-head q/k norms keep fp32 queries and keys; Gemma-2's post-sublayer norms two bf16 B x S x hidden
    tensors (under autocast); Llama has neither."""
    seq = 8192
    qwen3, gemma2 = _config("qwen3-8b"), _config("gemma-2-9b")
    _, q = _phases(tmp_path, "qwen3-8b", 4, recipe="sft", seq_len=seq)
    _, g = _phases(tmp_path, "gemma-2-9b", 4, recipe="sft", seq_len=seq)
    _, llama = _phases(tmp_path, "llama-3-8b", 4, recipe="sft", seq_len=seq)
    head_dim = qwen3.get("head_dim") or qwen3["hidden_size"] // qwen3["num_attention_heads"]
    assert q["layer_norms"] == seq * (qwen3["num_attention_heads"] + qwen3["num_key_value_heads"]) * head_dim * 4
    assert g["layer_norms"] == 2 * seq * gemma2["hidden_size"] * 2
    assert llama["layer_norms"] == 0


def test_math_attention_probabilities_sit_beside_the_mlp_backward(tmp_path):
    """The loop's fp32 stream with grouped-query attention runs SDPA's math kernel: the recomputed layer's
    probabilities (heads x S x S, fp32) are saved while its MLP runs backward, so the MLP phase holds them."""
    cfg, seq = _config("mistral-7b"), 512
    _, loop = _phases(tmp_path, "mistral-7b", 4, recipe="loop", seq_len=seq)
    mlp_alone = int(step_terms.MLP_BACKWARD_TENSORS_FP32_STREAM * seq * cfg["intermediate_size"] * 4)
    assert loop["mlp_backward"] == mlp_alone + cfg["num_attention_heads"] * seq * seq * 4
