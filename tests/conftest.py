"""Shared pytest fixtures for every folder under tests/ (this is the rootdir's conftest, so its autouse
fixture reaches them all). The helper modules next to it (tinymodels, hubserver, forkserver, reference_models)
are importable from any test: pyproject's `pythonpath` puts tests/ (and the checkout) on sys.path."""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest

import safetensors_bytes as _safetensors_bytes
from forkserver import ForkServer
from hubserver import HUB_ALLOWED_TOKEN, HubServer
from tinymodels import llama_config, save_pretrained_model, write_checkpoint

# The files that take longest (they start processes), longest first. `make test` hands whole files to two
# pytest-xdist workers in collection order (--dist loadfile --no-loadscope-reorder), each worker taking the
# next file as it finishes one: long files first, the many short ones last, and the two finish together.
LONGEST_FIRST = ("verify/test_verify_multigpu.py", "core/test_hub.py", "core/test_signals.py",
                 "quantize/test_stream.py", "quantize/test_stream_errors.py", "estimate/test_estimate_cards.py",
                 "quantize/test_sidecar.py", "verify/test_verify.py", "quantize/test_kernel.py",
                 "estimate/test_estimate_accuracy.py", "cli/test_hardening.py", "quantize/test_quantize.py")


def pytest_collection_modifyitems(items):
    """Every test, in every folder, runs hermetic (the autouse fixture below): a folder's own conftest or a
    different rootdir would show here, not as a test that reads the caller's HF_TOKEN. Then the longest
    files go first (LONGEST_FIRST), the rest in their usual order."""
    outside = [item.nodeid for item in items if "_hermetic" not in getattr(item, "fixturenames", ())]
    assert not outside, f"tests without the _hermetic fixture: {outside[:5]}"
    here = Path(__file__).parent

    def rank(item) -> int:
        name = Path(item.path).relative_to(here).as_posix()
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


def pytest_collection_finish(session):
    """What collection imported (torch, transformers, every test module) lives until the end: move it out of
    the garbage collector's reach. qtool verify, accelerate and transformers call gc.collect(), and in a test
    process a full pass walks all of those objects (~0.3 s a call, several calls a verify run); in a qtool
    process it would not. The objects made by the tests themselves are collected as before."""
    gc.collect()
    gc.freeze()


# ---------------------------------------------------------------------------------------------------
# Every test: a clean environment and a temporary working directory (as simonw/llm isolates user state).
# ---------------------------------------------------------------------------------------------------

_USER_PREFIXES = ("QTOOL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "ACCELERATE_", "UNSLOTH_")
# What shapes a console (rich's and typer's width, colour and terminal detection; GitHub Actions makes typer
# draw for a terminal): the tests read qtool's output as a pipe shows it, whatever terminal or CI runs them.
_TERMINAL_VARIABLES = ("COLUMNS", "LINES", "JUPYTER_COLUMNS", "JUPYTER_LINES", "FORCE_COLOR", "NO_COLOR",
                       "PY_COLORS", "CLICOLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE",
                       "TERMINAL_WIDTH", "GITHUB_ACTIONS", "TYPER_USE_RICH", "_TYPER_FORCE_DISABLE_TERMINAL",
                       "TYPER_STANDARD_TRACEBACK", "_TYPER_STANDARD_TRACEBACK")


# torch reads these once, at import, and they turn torch.compile into a no-op (tests compile for real)
_TORCH_VARIABLES = ("TORCHDYNAMO_DISABLE", "TORCH_COMPILE_DISABLE")
# typer reads some of them once, at import (rich_utils' FORCE_TERMINAL): gone before any test module imports it
for _key in _TERMINAL_VARIABLES + _TORCH_VARIABLES:
    os.environ.pop(_key, None)


def _users(key: str) -> bool:
    """A variable of the caller's that a test must not see."""
    return key.startswith(_USER_PREFIXES) or key in _TERMINAL_VARIABLES or key in _TORCH_VARIABLES
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def hermetic_env(tmp_path_factory) -> dict[str, str]:
    """The environment every test runs in (_hermetic below), for a fixture wider than one test that starts
    processes before any test has set it (such as a tests/forkserver.py server)."""
    env = {k: v for k, v in os.environ.items() if not _users(k)}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path_factory.getbasetemp() / "hf_home")}


@pytest.fixture(scope="session")
def qtool_forks(hermetic_env, tmp_path_factory):
    """Real `python -m qtool` processes in the tests' environment (with this checkout on PYTHONPATH), forked
    from one that has imported torch, transformers and typer (tests/forkserver.py): a run pays none of those
    imports. CUDA is never touched before the fork, so CUDA_VISIBLE_DEVICES still counts in a child. torch
    was imported with OMP_NUM_THREADS=1: a child quantizes on one thread, whatever its own environment says
    (the same work on any machine, and two xdist workers do not fight over the cores)."""
    env = {**hermetic_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), hermetic_env.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    preload = ["torch", "safetensors.torch", "transformers", "transformers.modeling_utils",
               "transformers.models.llama.modeling_llama", "typer", "pydantic"]
    server = ForkServer(preload, env=env, folder=tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path_factory, hermetic_env):
    """No QTOOL_*/HF_* variable, qtool.toml or pyproject.toml of the caller's reaches a test; the hub is
    offline unless a test points HF_ENDPOINT at the local server (and sets HF_HUB_OFFLINE itself)."""
    for key in list(os.environ):
        if _users(key):
            monkeypatch.delenv(key)
    for key in ("HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.setenv(key, hermetic_env[key])
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield


# ---------------------------------------------------------------------------------------------------
# Tiny models and safetensors bytes: one factory, one helper (tests/tinymodels.py, tests/safetensors_bytes.py).
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tests' one tiny-model factory: `tiny_model(**config_overrides, init=, seed=, dtype=, into=)` returns
    the folder of a tiny Llama checkpoint (tinymodels.llama_config with the overrides).

    init="uniform"        tinymodels.llama_weights (uniform in +-0.05), written with safetensors (the default)
    init="transformers"   transformers' own init under torch.manual_seed(seed), written by save_pretrained

    Each distinct model is written once per session and shared: a test that changes its files passes
    `into=tmp_path / NAME` and gets its own copy there."""
    cache = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def make(*, init: str = "uniform", seed: int = 0, dtype=None, into: Path | None = None, **overrides) -> Path:
        key = repr((init, seed, str(dtype), sorted(overrides.items())))
        if key not in made:
            root, config = cache / f"model{len(made)}", llama_config(**overrides)
            if init == "transformers":
                save_pretrained_model(root, config, seed=seed, dtype=dtype)
            elif init == "uniform":
                write_checkpoint(root, config, seed=seed, dtype=dtype)
            else:
                raise ValueError(init)
            made[key] = root
        if into is None:
            return made[key]
        shutil.copytree(made[key], into)
        return Path(into)

    return make


@pytest.fixture(scope="session")
def safetensors_bytes():
    """Read and write safetensors files byte by byte (tests/safetensors_bytes.py): write, split,
    header_length, set_header_length, rewrite_header."""
    return _safetensors_bytes


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (CPU runs stay the same size on any machine, and two xdist
    workers do not fight over the cores); restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------
# Hub fixtures: a tiny real Llama checkpoint served over HTTP on 127.0.0.1 (see tests/hubserver.py).
# ---------------------------------------------------------------------------------------------------



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
    from transformers import GenerationConfig

    root = tmp_path_factory.mktemp("hub")
    config = llama_config(intermediate_size=128, max_position_embeddings=128)

    tiny = root / "org" / "tiny"
    save_pretrained_model(tiny, config, max_shard_size="100KB")
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
    save_pretrained_model(single, config)  # the same seed: the same weights as org/tiny
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


@pytest.fixture(scope="session")
def hub_address(tmp_path_factory) -> dict:
    """Where every hub test's processes look (HF_ENDPOINT's port, HF_HOME): the same for the whole session, so
    that one fork server (hub_forks), imported with those variables, can start them all. Each test still gets
    a fresh server at that port and an empty HF_HOME there (hub_server, hub_env)."""
    probe = HubServer().start()
    port = probe.port
    probe.stop()
    return {"port": port, "hf_home": tmp_path_factory.mktemp("hub_cache") / "hf_home"}


def _hub_env(hermetic_env: dict, address: dict) -> dict[str, str]:
    env = {k: v for k, v in hermetic_env.items() if not _users(k)}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{address['port']}", HF_HOME=str(address["hf_home"]),
               PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


@pytest.fixture
def hub_server(hub_repos, hub_address):
    """A fresh server (empty request log, no faults) serving hub_repos; stopped after the test."""
    server = HubServer()
    for repo_id, path in hub_repos.items():
        server.add_repo(repo_id, path, gated=repo_id == "org/gated", allowed_tokens={HUB_ALLOWED_TOKEN})
    server.start(hub_address["port"])
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub_server, hub_address, hermetic_env) -> dict[str, str]:
    """Environment for a subprocess that talks to hub_server: an empty HF_HOME and no token."""
    shutil.rmtree(hub_address["hf_home"], ignore_errors=True)
    return _hub_env(hermetic_env, hub_address)


@pytest.fixture(scope="session")
def hub_forks(hermetic_env, hub_address, tmp_path_factory):
    """Processes that talk to the hub server, forked from one that has imported torch, transformers and
    huggingface_hub with hub_env's HF_* variables (tests/forkserver.py; it refuses a run with other ones:
    those need a fresh interpreter). Run with cwd=ROOT."""
    preload = ["torch", "safetensors.torch", "transformers", "transformers.modeling_utils",
               "transformers.core_model_loading", "transformers.conversion_mapping",
               "transformers.models.llama.modeling_llama", "huggingface_hub.hf_api", "huggingface_hub.file_download",
               "typer"]
    server = ForkServer(preload, env=_hub_env(hermetic_env, hub_address), folder=tmp_path_factory.mktemp("forks"))
    yield server
    server.close()
