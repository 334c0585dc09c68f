"""Fixtures of the hub-streaming tests (test_stream.py, test_stream_errors.py): module-scoped, so each module
builds its own repo and fork server, and pytest-xdist can run the two modules on different workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from forkserver import ForkServer
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


@pytest.fixture(scope="module")
def address(tmp_path_factory) -> dict:
    """The HF_ENDPOINT port and HF_HOME of this module's runs. Each test still gets a fresh server and an empty
    HF_HOME, at these same places, so that one fork server (imported with them) serves every run."""
    probe = HubServer().start()
    port = probe.port
    probe.stop()
    return {"port": port, "hf_home": tmp_path_factory.mktemp("hub_cache") / "hf_home"}


def _run_env(address: dict) -> dict[str, str]:
    """conftest's hub_env at this module's address: the caller's environment less HF_*/QTOOL_*, plus the hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "QTOOL_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{address['port']}", HF_HOME=str(address["hf_home"]),
               PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


@pytest.fixture
def hub_server(repo, odd_repo, address):
    """Overrides conftest's: a fresh server holding org/sharded and org/odd, at the module's address."""
    hub = HubServer()
    hub.add_repo(REPO, repo)
    hub.add_repo("org/odd", odd_repo)
    hub.start(address["port"])
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(hub_server, address) -> dict[str, str]:
    """Overrides conftest's: the module's HF_HOME, emptied, as a test's own would start."""
    shutil.rmtree(address["hf_home"], ignore_errors=True)
    return _run_env(address)


@pytest.fixture
def server(hub_server) -> HubServer:
    return hub_server


@pytest.fixture
def env(hub_env) -> dict[str, str]:
    return hub_env


@pytest.fixture(scope="module")
def qtool(address, tmp_path_factory):
    """qtool(args, env, rlimits=None) -> CompletedProcess of `python -m qtool quantize ARGS` run with exactly
    `env`; qtool.start(args, env) -> the running process (poll, send_signal, communicate). Each is a real
    process, forked from one that has imported torch, transformers and huggingface_hub with this module's
    HF_* variables (the ones huggingface_hub reads at import; tests/forkserver.py refuses others), but never
    qtool: that saves each run some 3 s of imports."""
    preload = ["torch", "safetensors.torch", "transformers", "transformers.modeling_utils",
               "transformers.core_model_loading", "transformers.conversion_mapping",
               "transformers.models.llama.modeling_llama", "huggingface_hub.hf_api", "huggingface_hub.file_download",
               "typer"]
    server = ForkServer(preload, env=_run_env(address), folder=tmp_path_factory.mktemp("forks"))

    def start(args: list[str], env: dict, **kw):
        return server.qtool("quantize", *args, cwd=ROOT, env=env, **kw)

    def run(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
        child = start(args, env, **kw)
        out, err = child.communicate(timeout=600)
        return subprocess.CompletedProcess(["qtool", "quantize", *args], child.returncode, out, err)

    run.start = start
    yield run
    server.close()
