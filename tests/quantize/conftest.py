"""Fixtures of the hub-streaming tests (test_stream.py, test_stream_errors.py): module-scoped, so each module
builds its own repo and pytest-xdist can run the two modules on different workers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from forkserver import ForkServer
from hubserver import HubServer
from streamhub import PY, REPO, ROOT, SHARDS, shards_of
from tinymodels import llama_config, llama_weights, write_checkpoint


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """org/sharded: 6 safetensors shards + index, as save_pretrained names them (huggingface_hub's splitter)."""
    from huggingface_hub import save_torch_state_dict

    root = tmp_path_factory.mktemp("streamhub") / "org" / "sharded"
    root.mkdir(parents=True)
    config = llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=6, vocab_size=1024,
                          num_attention_heads=4, num_key_value_heads=2)
    weights = llama_weights(config)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    save_torch_state_dict(weights, root, max_shard_size=total // (SHARDS - 1), safe_serialization=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# sharded\n")
    assert len(shards_of(root)) == SHARDS
    return root


@pytest.fixture(scope="module")
def odd_repo(tmp_path_factory) -> Path:
    """org/odd: no index, and its one weight file is not named model.safetensors."""
    root = write_checkpoint(tmp_path_factory.mktemp("oddhub") / "org" / "odd", llama_config())
    (root / "model.safetensors").rename(root / "weights.safetensors")
    return root


@pytest.fixture
def hub_server(repo, odd_repo):
    """Overrides conftest's: this module's server holds org/sharded and org/odd (conftest's hub_env uses it)."""
    hub = HubServer()
    hub.add_repo(REPO, repo)
    hub.add_repo("org/odd", odd_repo)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def server(hub_server) -> HubServer:
    return hub_server


@pytest.fixture
def env(hub_env) -> dict[str, str]:
    return hub_env


@pytest.fixture(scope="session")
def qtool(tmp_path_factory):
    """qtool(args, env) -> CompletedProcess of `python -m qtool quantize ARGS` run with exactly `env`: a real
    process, forked from one that has imported torch but never huggingface_hub or qtool (huggingface_hub reads
    HF_* at import; the child imports it after taking `env`), which saves each run torch's import. With
    subprocess options (a preexec_fn), a fresh interpreter."""
    env0 = {k: v for k, v in os.environ.items() if not k.startswith(("QTOOL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env0["PYTHONPATH"] = str(ROOT) + os.pathsep + env0.get("PYTHONPATH", "")
    server = ForkServer(["torch", "safetensors.torch"], env=env0, folder=tmp_path_factory.mktemp("forks"))

    def run(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
        if kw:
            return subprocess.run([PY, "-m", "qtool", "quantize", *args], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=600, **kw)
        child = server.qtool("quantize", *args, cwd=ROOT, env=env)
        out, err = child.communicate(timeout=600)
        return subprocess.CompletedProcess(["qtool", "quantize", *args], child.returncode, out, err)

    yield run
    server.close()
