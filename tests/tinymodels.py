"""The tests' one source of tiny models and their checkpoints, and the one check of qtool's error line.

`llama_config(**overrides)` is a config.json dict; `llama_weights(config)` random weights with the names and
shapes transformers itself gives it (built on the meta device); `write_checkpoint(dir, config)` both, saved as
safetensors the way save_pretrained would name them; `save_pretrained_model(dir, config)` a model with
transformers' own initialisation, written by save_pretrained itself (a hub repo's layout and config.json).
Tests usually take them through the `tiny_model` fixture (tests/conftest.py), which writes each model once.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="float32")


def llama_config(**overrides) -> dict:
    return {**LLAMA, **overrides}


def llama_weights(config: dict, *, seed: int = 0, dtype=None) -> dict:
    """Uniform(-0.05, 0.05) weights for every tensor of the model `config` describes (float32 unless `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    keep = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**keep))
    g = torch.Generator().manual_seed(seed)
    return {k: ((torch.rand(v.shape, generator=g) - 0.5) * 0.1).to(dtype or torch.float32)
            for k, v in model.state_dict().items()}


def write_checkpoint(root: Path, config: dict, *, seed: int = 0, dtype=None, weights: dict | None = None) -> Path:
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    save_file(weights if weights is not None else llama_weights(config, seed=seed, dtype=dtype),
              root / "model.safetensors", metadata={"format": "pt"})
    return root


def save_pretrained_model(root: Path, config: dict, *, seed: int = 0, dtype=None, **save_kwargs) -> Path:
    """transformers' own init under torch.manual_seed(seed), cast to `dtype`, saved by save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    keep = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**keep))
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.save_pretrained(root, **save_kwargs)
    return Path(root)


def one_error_line(err: str) -> str:
    """qtool's contract for a failure: exactly one stderr line, `qtool: error: ...`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("qtool: error: "), err
    return lines[0]
