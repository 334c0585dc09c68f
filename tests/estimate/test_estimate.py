"""qtool estimate: report contents, exit codes, no heavy imports, memory terms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qtool.core.errors import ConfigError

from qtool.estimate import memory
from qtool.cli.app import main
from qtool.core.config import resolve_settings
from qtool.estimate import estimate_report
from qtool.core.models import approximate_config, resolve_model
from tinymodels import llama_config

ROOT = Path(__file__).resolve().parents[2]


def _json(capsys, *args):
    code = main(["estimate", *args, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def test_no_heavy_imports_for_presets():
    """Nor typer and pydantic: `qtool estimate MODEL [settings]` takes the fast lane (qtool.cli.fast)."""
    code = ("import sys; from qtool.cli.app import main; rc = main(['estimate', '70b', '--json']); "
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'safetensors', 'peft', 'typer', 'pydantic')"
            " if m in sys.modules]; "
            "print('HEAVY', heavy, rc, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY [] 0" in r.stderr, r.stderr
    assert json.loads(r.stdout)["params"]["total"] == 70_553_706_496


def test_70b_report(capsys):
    code, r, _ = _json(capsys, "70b")
    assert code == 0
    assert r["params"]["total"] == 70_553_706_496
    assert r["model"]["plan_source"] == "cache"
    # FP16 is exactly 2 bytes/param of data; NF4 keeps embeddings/lm_head/norms at 2 bytes
    assert r["weights"]["fp16"]["data"] == 2 * 70_553_706_496
    kept = r["params"]["kept"]
    assert kept == 2 * 128256 * 8192 + (2 * 80 + 1) * 8192
    q = r["params"]["quantized"]
    # 560 quantized Linears each add a 16-entry fp32 code and a ~80-byte quant_state JSON blob
    extra = r["weights"]["nf4"]["data"] - (2 * kept + q // 2 + 4 * (q // 64))
    assert 560 * (64 + 60) < extra < 560 * (64 + 120)
    assert 141e9 < r["weights_bytes"]["fp16"] < 141.2e9
    assert 39.3e9 < r["weights_bytes"]["nf4_dq"] < 39.7e9
    for key in ("peak_bytes", "breakdown", "budget_bytes", "fits", "model", "mode", "settings", "warnings"):
        assert key in r
    assert sum(r["breakdown"].values()) == r["peak_bytes"]


def test_8b_nf4_dq_matches_real_checkpoint(capsys):
    """Measured: Llama-3-8B NF4+DQ saved by transformers is 5,702,747,770 bytes (reference README)."""
    _, r, _ = _json(capsys, "8b")
    assert r["params"]["total"] == 8_030_261_248
    assert abs(r["weights_bytes"]["nf4_dq"] - 5_702_747_770) / 5_702_747_770 < 0.005
    assert abs(r["weights"]["fp16"]["data"] - 16_060_522_496) == 0


@pytest.mark.parametrize("vram, expected", [("24GB", 3), ("80GB", 0)])
def test_fit_exit_codes(capsys, vram, expected):
    code, r, err = _json(capsys, "70b", "--vram", vram)
    assert code == expected
    assert r["fits"] is (expected == 0)  # the report is emitted either way
    assert r["budget_bytes"] == int(vram[:-2]) * 10**9
    if expected == 3:
        assert "qtool: error:" in err and "over the" in err


def test_gpu_budget_and_catalogue(capsys):
    code, r, _ = _json(capsys, "8b", "--gpu", "rtx-4090")
    assert code == 0 and r["fits"] and r["budget_bytes"] == 24 * 2**30 and r["gpu"] == "rtx-4090"
    _, r, _ = _json(capsys, "8b")
    assert r["budget_bytes"] is None and r["fits"] is None
    assert "rtx-4090" in r["fits_on"] and ("rtx-3060" in r["fits_on"]) == (r["peak_bytes"] <= 12 * 2**30)


def test_human_output_formats_first(capsys):
    assert main(["estimate", "70b"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert "70,553,706,496" in lines[0]
    for label in ("FP32", "FP16/BF16", "INT8", "FP4", "NF4", "NF4+DQ"):
        assert label in out
    assert out.index("NF4+DQ") < out.index("Peak memory")
    assert "75%" in out and "Fits on" in out


def test_approximation_is_labelled(capsys):
    code, r, err = _json(capsys, "30b")
    assert code == 0 and r["approximation"] is True
    assert "approximation" in err
    assert abs(r["params"]["total"] - 30e9) / 30e9 < 0.05


def test_analytic_plan_equals_meta_plan():
    from qtool.core.meta import build_plan
    from qtool.core.plancache import analytic_plan, linear_shapes

    for n in (0.45e9, 1.5e9):
        cfg = approximate_config(n)
        fresh = build_plan(cfg)
        cached = analytic_plan(cfg)
        assert cached.plan.to_dict() == fresh.to_dict()
        assert cached.linears == linear_shapes(fresh)


def test_mixtral_warns_fused_experts(capsys):
    code, r, err = _json(capsys, "mixtral-8x7b")
    assert code == 0
    assert "fused MoE expert tensors" in err and "experts" in err
    assert any("fused" in w for w in r["warnings"])


@pytest.mark.parametrize("model,says", [
    ("gemma-2-9b", "UNSLOTH_BLOCK_COMPILE=0"), ("mixtral-8x7b", "first step"), ("qwen2.5-7b", None),
    ("llama-3-8b", None)])
def test_unsloth_qlora_says_which_unsloth_switches_it_assumes(capsys, model, says):
    """Unsloth's QLoRA estimate names what it assumes of Unsloth's own switches where they change the peak
    (soft-capped attention: measured with the per-layer compile off, which failed on Gemma-2; MoE experts: the
    first step under that compile is the peak), and nothing else; the other recipes say nothing of it."""
    code, r, _ = _json(capsys, model, "--recipe", "unsloth", "--mode", "qlora")
    unsloth = [w for w in r["warnings"] if w.startswith("--recipe unsloth")]
    assert code == 0 and (unsloth == [] if says is None else len(unsloth) == 1 and says in unsloth[0])
    code, r, _ = _json(capsys, model, "--recipe", "trainer", "--mode", "qlora")
    assert code == 0 and not [w for w in r["warnings"] if w.startswith("--recipe unsloth")]


@pytest.mark.parametrize("args", [
    ["7000000b"], ["no-such-model"], ["70b", "--gpu", "gtx-9999"], ["70b", "--vram", "24XB"],
    ["70b", "--vram", "lots"], ["70b", "--lora-targets", "nope"],
])
def test_bad_input_one_line_exit_2(capsys, args):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtool: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_files(capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "unknown.json").write_text('{"model_type": "no-such-arch"}')
    (tmp_path / "nomt.json").write_text('{"hidden_size": 4}')
    for name in ("bad.json", "unknown.json", "nomt.json", "missing.json"):
        assert main(["estimate", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("qtool: error:") and name in err and err.count("\n") == 1


def test_local_config_builds_plan(capsys, tmp_path):
    cfg = json.loads((ROOT / "configs/models/qwen2.5-0.5b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, r, _ = _json(capsys, str(tmp_path))
    assert code == 0 and r["model"]["plan_source"] == "meta" and r["params"]["total"] == 494_032_768


# --- memory terms ---------------------------------------------------------------------------

def test_kv_cache_formula():
    d = memory.dims_from_config(json.loads((ROOT / "configs/models/llama-3-70b.json").read_text()))
    # 80 layers x 8 KV heads x 128 dims, K and V, bf16: 320 KiB per token
    assert memory.kv_cache_bytes(d, 1, 1, 2) == 327_680
    assert memory.kv_cache_bytes(d, 2, 4096, 2) == 2 * 4096 * 327_680


def test_lora_params_match_peft(tmp_path):
    """LoRA A/B counts from the plan's Linear shapes equal what peft creates on the real architecture."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtool.estimate import lora_linears
    from qtool.core.plancache import meta_plan

    cfg = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    plan = meta_plan(cfg)
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    for targets in (("all-linear",), ("q_proj", "v_proj")):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets) if targets != ("all-linear",) else "all-linear"))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert memory.lora_param_count(lora_linears(plan.linears, targets), 8) == trainable


def test_modes_have_their_terms():
    spec = resolve_model("8b")
    base = dict(env={}, cwd=Path("/"))
    parts = {m: estimate_report(spec, resolve_settings({"mode": m}, **base))["breakdown"] for m in memory_modes()}
    assert "kv_cache" in parts["inference"] and "lora_params" not in parts["inference"]
    assert "kept_fp32" in parts["qlora"] and "kept_fp32" not in parts["lora"]
    assert "grads" in parts["full"] and "lora_grads" in parts["qlora"]
    # full fine-tuning of 8B in bf16: weights + grads + AdamW states = 8 bytes/param at least
    assert sum(parts["full"].values()) > 8 * 8_030_261_248
    # no checkpointing saves every layer's activations: more memory
    off = estimate_report(spec, resolve_settings({"gradient_checkpointing": False}, **base))
    assert off["peak_bytes"] > estimate_report(spec, resolve_settings({}, **base))["peak_bytes"]
    # the 8-bit optimizer needs less than AdamW; paged states are outside torch's allocator
    paged = estimate_report(spec, resolve_settings({"optimizer": "paged_adamw8bit"}, **base))
    assert paged["allocated_peak_bytes"] < paged["peak_bytes"] - paged["breakdown"]["cuda_context"]


def memory_modes():
    return ("inference", "qlora", "lora", "full")


def test_qlora_logits_term_fp32():
    # a large vocabulary, so the loss phase (logits alive) is the peak, not the attention backward
    d = memory.Dims(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=50_000)
    m = memory.MemoryInputs(dims=d, mode="qlora", batch=2, seq=512, total_params=10**6, kept_params=10**5,
                            quant_weights_gpu=10**6, plain_weights_gpu=2 * 10**6, kept_weights_gpu=2 * 10**5,
                            lora_params=1000, largest_linear=64 * 96)
    b = memory.memory_breakdown(m)
    assert b["logits"] == 2 * 512 * 50_000 * 4  # lm_head is fp32 after prepare_model_for_kbit_training
    assert b["loss_softmax_and_grad"] == 2 * b["logits"]  # log_softmax output + its grad, fp32
    assert b["kept_fp32"] == 4 * 10**5
    assert memory.peak_bytes(b) == sum(b.values())


def test_math_attention_dominates_long_gqa_sequences_in_qlora():
    """fp32 activations + GQA: SDPA's math kernel holds B x H x S x S scores, which win at long sequences."""
    d = memory.Dims(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
    kw = dict(total_params=8 * 10**9, kept_params=10**9, quant_weights_gpu=5 * 2**30, plain_weights_gpu=16 * 2**30,
              kept_weights_gpu=2 * 2**30, lora_params=42 * 10**6, largest_linear=4096 * 14336)
    short = memory.memory_breakdown(memory.MemoryInputs(dims=d, mode="qlora", batch=1, seq=512, **kw))
    long = memory.memory_breakdown(memory.MemoryInputs(dims=d, mode="qlora", batch=1, seq=8192, **kw))
    assert "logits" in short and "attention_backward" not in short
    assert long["attention_backward"] == 4 * 32 * 8192 * 8192 * 4
    mha = memory.Dims(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
    assert not memory.math_attention(mha, 4, 2048) and memory.math_attention(d, 4, 2048)
    assert not memory.math_attention(d, 2, 2048)  # 16-bit: flash attention
    windowed = memory.Dims(**{**d.__dict__, 'sliding_window': 4096})
    assert memory.math_attention(windowed, 4, 2048) and not memory.math_attention(windowed, 4, 8192)


def test_sizes_no_dense_shape_fits_are_refused():
    """0.01b would need a 128k vocabulary on a model smaller than its embeddings: say so, do not report 38x."""
    with pytest.raises(ConfigError, match="no preset for 0.01b"):
        approximate_config(0.01e9)


# --- report details ----------------------------------------------------------------------------------

TINY_LLAMA_CFG = llama_config(vocab_size=256, intermediate_size=128, max_position_embeddings=512)
TINY_BERT_CFG = {"model_type": "bert", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512}


def test_config_json_is_titled_after_its_checkpoint(capsys, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA_CFG))
    code, r, _ = _json(capsys, str(folder / "config.json"))
    assert code == 0 and r["model"]["name"] == "my-model"
    (folder / "config.json").write_text(json.dumps({**TINY_LLAMA_CFG, "_name_or_path": "org/Tiny-Llama"}))
    code, r, _ = _json(capsys, str(folder / "config.json"))
    assert r["model"]["name"] == "org/Tiny-Llama"


def test_seq_len_beyond_the_model_positions_warns(capsys):
    code, r, err = _json(capsys, "8b", "--seq-len", "100000")
    assert code == 0 and "beyond the model's 8192 positions" in err and err.count("\n") == 1
    code, r, err = _json(capsys, "8b", "--seq-len", "8192")
    assert "beyond" not in err


@pytest.mark.parametrize("arch, logits", [("BertModel", False), ("BertForMaskedLM", True)])
def test_encoder_without_lm_head_is_charged_no_logits(capsys, tmp_path, arch, logits):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_BERT_CFG, "architectures": [arch]}))
    code, r, _ = _json(capsys, str(tmp_path), "--mode", "full", "--seq-len", "128", "-b", "4")
    assert code == 0 and r["model"]["vocab_logits"] is logits
    # logits of the vocabulary: batch x seq x vocab, at least 2 bytes each
    assert (r["breakdown"].get("logits", 0) >= 4 * 128 * 256 * 2) is logits


def test_mixtral_explanation_names_the_expert_tensors(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["estimate", "mixtral-8x7b"]) == 0
    why = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Why not"))
    assert "mostly fused MoE expert tensors" in why
    assert main(["estimate", "8b"]) == 0
    why = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Why not"))
    assert "embeddings and norms, output head" in why and "MoE" not in why
