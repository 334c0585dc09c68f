"""Fixtures of the hub-streaming tests (test_stream.py, test_stream_errors.py): the repos are module-scoped, so
each module builds its own and pytest-xdist can run the two modules on different workers; the server's address
and the fork server are conftest's (hub_address, hub_forks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hubserver import HubServer
from streamhub import REPO, ROOT, SHARDS, shards_of
from tinymodels import llama_config, llama_weights, write_checkpoint


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """org/sharded: 6 safetensors shards + index, as save_pretrained names them (huggingface_hub's splitter)."""
    from huggingface_hub import save_torch_state_dict

    root = tmp_path_factory.mktemp("streamhub") / "org" / "sharded"
    root.mkdir(parents=True)
    config = llama_config(hidden_size=128, intermediate_size=256, num_hidden_layers=6, vocab_size=512,
                          num_attention_heads=4, num_key_value_heads=2)  # 4 MB: shards of ~0.8 MB
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
def hub_server(repo, odd_repo, hub_address):
    """Overrides conftest's: a fresh server holding org/sharded and org/odd (conftest's hub_env uses it)."""
    hub = HubServer()
    hub.add_repo(REPO, repo)
    hub.add_repo("org/odd", odd_repo)
    hub.start(hub_address["port"])
    yield hub
    hub.stop()


@pytest.fixture
def server(hub_server) -> HubServer:
    return hub_server


@pytest.fixture
def env(hub_env) -> dict[str, str]:
    return hub_env


@pytest.fixture
def qtool(hub_forks):
    """qtool(args, env, rlimits=None) -> CompletedProcess of `python -m qtool quantize ARGS` run with exactly
    `env`; qtool.start(args, env) -> the running process (poll, send_signal, communicate). Each is a real
    process, forked from conftest's hub_forks (torch, transformers and huggingface_hub imported), which saves
    each run some 3 s of imports."""

    def start(args: list[str], env: dict, **kw):
        return hub_forks.qtool("quantize", *args, cwd=ROOT, env=env, **kw)

    def run(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
        child = start(args, env, **kw)
        out, err = child.communicate(timeout=600)
        return subprocess.CompletedProcess(["qtool", "quantize", *args], child.returncode, out, err)

    run.start = start
    return run
