"""qtool.quantize.archplan (the plan without transformers) against the plan built from transformers' meta-device
model: the same QuantizePlan, field for field, for every family it knows and the config variants that change
its layout (biases, tied embeddings, head_dim given or defaulted, --skip-modules, --dtype, buffers and tied
aliases in the checkpoint); the same output bytes; and None, so that transformers decides, whenever the
checkpoint or the config is not the plain case."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qtool.core.config import QuantSettings
from qtool.core.errors import ConfigError, WeightsError
from qtool.quantize import plan_quantization, run_quantization
from qtool.quantize.archplan import FAMILIES, arch_plan

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)

# (name, config.json, QuantSettings overrides, what the checkpoint adds or leaves out)
CASES = [
    ("llama", dict(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", **SMALL), {}, {}),
    ("llama-head-dim", dict(model_type="llama", head_dim=32, dtype="float16", **SMALL), {}, {}),
    ("llama-biases", dict(model_type="llama", attention_bias=True, mlp_bias=True, **SMALL), {}, {}),
    ("llama-tied", dict(model_type="llama", tie_word_embeddings=True, **SMALL), {}, {}),
    ("llama-tied-alias-saved", dict(model_type="llama", tie_word_embeddings=True, **SMALL), {}, {"alias": True}),
    ("llama-inv-freq", dict(model_type="llama", **SMALL), {}, {"buffer": True}),
    ("llama-skip", dict(model_type="llama", **SMALL), {"skip_modules": ("o_proj", "mlp.down")}, {}),
    ("llama-skip-regex", dict(model_type="llama", **SMALL), {"skip_modules": (r"model\.layers\.1",)}, {}),
    ("llama-dtype-setting", dict(model_type="llama", torch_dtype="bfloat16", **SMALL), {"dtype": "float32"}, {}),
    ("llama-fp32-tensors", dict(model_type="llama", **SMALL), {}, {"dtype": torch.float32}),
    ("mistral", dict(model_type="mistral", **SMALL), {}, {}),
    ("mistral-head-dim", dict(model_type="mistral", head_dim=8, **SMALL), {}, {}),
    ("qwen2", dict(model_type="qwen2", **SMALL), {}, {}),
    ("qwen2-tied", dict(model_type="qwen2", tie_word_embeddings=True, torch_dtype="float16", **SMALL), {}, {}),
    ("qwen3", dict(model_type="qwen3", **SMALL), {}, {}),
    ("qwen3-bias-tied", dict(model_type="qwen3", head_dim=16, attention_bias=True, tie_word_embeddings=True,
                             **SMALL), {}, {}),
    ("gemma", dict(model_type="gemma", **SMALL), {}, {}),
    ("gemma-untied", dict(model_type="gemma", head_dim=16, tie_word_embeddings=False, **SMALL), {}, {}),
    ("gemma2", dict(model_type="gemma2", head_dim=16, **SMALL), {}, {}),
    ("gemma2-bias-untied", dict(model_type="gemma2", attention_bias=True, tie_word_embeddings=False, **SMALL),
     {}, {}),
]


def _write(root: Path, config: dict, *, alias: bool = False, buffer: bool = False,
           dtype=torch.bfloat16, edit=None) -> Path:
    """config.json + model.safetensors with the names and shapes transformers' own model has (built on the
    meta device from the config, so the expected layout does not come from the code under test)."""
    from safetensors.torch import save_file

    from qtool.core.meta import meta_model

    model = meta_model(config)
    tied = {alias_name for _, alias_name in _tied(model)}
    g = torch.Generator().manual_seed(0)
    sd = {k: ((torch.rand(v.shape, generator=g) - 0.5) * 0.1).to(dtype) for k, v in model.state_dict().items()
          if alias or k not in tied}
    if buffer:
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    if edit is not None:
        edit(sd)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    save_file(sd, root / "model.safetensors", metadata={"format": "pt"})
    return root


def _tied(model) -> list[tuple[str, str]]:
    seen, out = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.append((seen[id(p)], name))
        seen.setdefault(id(p), name)
    return out


def _both(src: Path, settings: QuantSettings):
    from qtool.core.checkpoint import Checkpoint

    with Checkpoint.open(src) as ckpt:
        assert arch_plan(ckpt.config, ckpt, dtype_setting=settings.dtype, skip_modules=settings.skip_modules) \
            is not None, "the known-architecture path did not take this checkpoint"
    fast = plan_quantization(src, settings)
    slow = plan_quantization(src, settings, known_architectures=False)
    assert fast.known_architecture and not slow.known_architecture
    assert "imports" not in fast.timings and "imports" in slow.timings  # transformers imported on one path only
    return fast, slow


def _fields(plan) -> dict:
    d = dataclasses.asdict(plan)
    d.pop("timings")
    d.pop("known_architecture")
    return d


@pytest.mark.parametrize("name,config,overrides,extra", CASES, ids=[c[0] for c in CASES])
def test_plan_equals_the_transformers_plan(tmp_path, name, config, overrides, extra):
    src = _write(tmp_path / name, config, **extra)
    settings = QuantSettings(**overrides)
    fast, slow = _both(src, settings)
    assert _fields(fast) == _fields(slow)
    assert fast.counts()["quantized"] > 0


def test_every_family_is_covered():
    assert {c[1]["model_type"] for c in CASES} == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_bytes_equal_both_ways(tmp_path, family):
    """Quantized with either plan, the checkpoint is the same files with the same bytes."""
    config = next(c[1] for c in CASES if c[1]["model_type"] == family)
    src = _write(tmp_path / "src", config, dtype=torch.float16)
    fast, slow = _both(src, QuantSettings(quant_type="fp4", double_quant=True))
    run_quantization(fast, tmp_path / "fast", device="cpu")
    run_quantization(slow, tmp_path / "slow", device="cpu")
    files = sorted(p.name for p in (tmp_path / "slow").iterdir())
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == files
    assert "model.safetensors" in files and "config.json" in files
    for f in files:
        assert (tmp_path / "fast" / f).read_bytes() == (tmp_path / "slow" / f).read_bytes(), f


def _not_plain(sd: dict) -> None:
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)


@pytest.mark.parametrize("config,settings,edit,raises", [
    (dict(model_type="llama", **SMALL), {}, _not_plain, "do not belong"),
    (dict(model_type="llama", **SMALL), {}, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing"),
    (dict(model_type="llama", **SMALL), {}, lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(65)),
     "expects"),
    (dict(model_type="llama", **SMALL), {},
     lambda sd: sd.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)), None),
    (dict(model_type="llama", architectures=["LlamaModel"], **SMALL), {}, None, "do not belong"),
    (dict(model_type="llama", torch_dtype="auto", **SMALL), {}, None, ConfigError),
    (dict(model_type="qwen3", head_dim=None, **SMALL), {}, None, ConfigError),
    (dict(model_type="llama", **{**SMALL, "num_key_value_heads": None}), {}, None, None),
    (dict(model_type="llama", **SMALL), {"skip_modules": ("(",)}, None, Exception),
    (dict(model_type="phi3", pad_token_id=0, **SMALL), {}, None, None),
])
def test_anything_else_goes_through_transformers(tmp_path, config, settings, edit, raises):
    """arch_plan declines; plan_quantization then gives what transformers' path gives, error or plan."""
    from qtool.core.checkpoint import Checkpoint

    good = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype") and v is not None}
    src = _write(tmp_path / "src", good, edit=edit)
    (src / "config.json").write_text(json.dumps(config))
    s = QuantSettings(**settings)
    with Checkpoint.open(src) as ckpt:
        assert arch_plan(ckpt.config, ckpt, dtype_setting=s.dtype, skip_modules=s.skip_modules) is None
    if raises is None:
        plan = plan_quantization(src, s)
        assert not plan.known_architecture and "imports" in plan.timings
    else:
        match = raises if isinstance(raises, str) else None
        with pytest.raises(WeightsError if match else raises, match=match):
            plan_quantization(src, s)
