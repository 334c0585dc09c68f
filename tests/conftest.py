"""Shared pytest fixtures for every folder under tests/ (this is the rootdir's conftest, so its autouse
fixture reaches them all). The helper modules next to it (tinymodels, hubserver, forkserver, reference_models)
are importable from any test: pyproject's `pythonpath` puts tests/ (and the checkout) on sys.path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hubserver import HUB_ALLOWED_TOKEN, HubServer

# ---------------------------------------------------------------------------------------------------
# Every test: a clean environment and a temporary working directory (as simonw/llm isolates user state).
# ---------------------------------------------------------------------------------------------------

_USER_PREFIXES = ("QTOOL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path_factory):
    """No QTOOL_*/HF_* variable, qtool.toml or pyproject.toml of the caller's reaches a test; the hub is
    offline unless a test points HF_ENDPOINT at the local server (and sets HF_HUB_OFFLINE itself)."""
    for key in list(os.environ):
        if key.startswith(_USER_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield


# ---------------------------------------------------------------------------------------------------
# Hub fixtures: a tiny real Llama checkpoint served over HTTP on 127.0.0.1 (see tests/hubserver.py).
# ---------------------------------------------------------------------------------------------------

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)


def _tiny_tokenizer(dst: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(dst)


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory) -> dict[str, Path]:
    """Repo folders in the hub's layout, built once per session:

    org/tiny    sharded safetensors + index, tokenizer, generation_config, README, plus files qtool must NOT
                fetch: pytorch_model.bin, consolidated.safetensors, onnx/model.onnx, original/params.json
    org/single  one model.safetensors, no index
    org/gated   copy of org/single, files need HUB_ALLOWED_TOKEN
    org/binonly config + pytorch_model.bin only
    org/big     config + one 24 MB model.safetensors (random), bigger than huggingface_hub's 10 MB
                download chunk, so a cut connection can resume part-way
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA))

    tiny = root / "org" / "tiny"
    model.save_pretrained(tiny, max_shard_size="100KB")
    _tiny_tokenizer(tiny)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tiny)
    (tiny / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (tiny / "pytorch_model.bin").write_bytes(os.urandom(4096))
    (tiny / "consolidated.safetensors").write_bytes(os.urandom(4096))
    (tiny / "onnx").mkdir()
    (tiny / "onnx" / "model.onnx").write_bytes(os.urandom(2048))
    (tiny / "original").mkdir()
    (tiny / "original" / "params.json").write_text("{}")

    single = root / "org" / "single"
    model.save_pretrained(single)
    _tiny_tokenizer(single)

    gated = root / "org" / "gated"
    shutil.copytree(single, gated)

    binonly = root / "org" / "binonly"
    binonly.mkdir(parents=True)
    shutil.copy(single / "config.json", binonly / "config.json")
    (binonly / "pytorch_model.bin").write_bytes(os.urandom(4096))

    from safetensors.torch import save_file

    big = root / "org" / "big"
    big.mkdir(parents=True)
    shutil.copy(single / "config.json", big / "config.json")
    save_file({"model.embed_tokens.weight": torch.randn(3 * 1024 * 1024, 2)}, str(big / "model.safetensors"))
    return {"org/tiny": tiny, "org/single": single, "org/gated": gated, "org/binonly": binonly, "org/big": big}


@pytest.fixture
def hub_server(hub_repos):
    """A fresh server (empty request log, no faults) serving hub_repos; stopped after the test."""
    server = HubServer()
    for repo_id, path in hub_repos.items():
        server.add_repo(repo_id, path, gated=repo_id == "org/gated", allowed_tokens={HUB_ALLOWED_TOKEN})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub_server, tmp_path) -> dict[str, str]:
    """Environment for a subprocess that talks to hub_server, with its own empty HF_HOME and no token."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "QTOOL_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=hub_server.url, HF_HOME=str(tmp_path / "hf_home"),
               PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env
