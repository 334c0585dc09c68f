"""qtool.core.hub against a real HTTP server on 127.0.0.1 (tests/hubserver.py), reached through HF_ENDPOINT.

Everything that talks to the server runs in subprocesses: huggingface_hub reads some HF_* variables at import
time, and a subprocess with its own environment is what a user's shell does (forked from conftest's hub_forks
where that is the same thing: _python). What was downloaded or written is
then loaded with stock transformers in the test's own process (local folders: no hub, no HF_* variable).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hubserver import HUB_ALLOWED_TOKEN, HUB_OTHER_TOKEN

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

WEIGHT_SUFFIXES_NOT_WANTED = (".bin", ".onnx")

DOWNLOAD = """
import json, sys
from qtool.core.errors import QtoolError
from qtool.core.hub import download_checkpoint
try:
    path, sha = download_checkpoint(sys.argv[1], revision=(sys.argv[2] if len(sys.argv) > 2 else None))
except QtoolError as exc:
    print(json.dumps({"error": str(exc), "type": type(exc).__name__, "exit": exc.exit_code}))
else:
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    print(json.dumps({"path": str(path), "sha": sha, "files": files}))
"""


def _python(hub_forks, args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`python ARGS` with exactly `env` in the checkout: forked from conftest's hub_forks where that is what a
    fresh process would be (the HF_* variables read at import are its own), else a fresh interpreter."""
    if not hub_forks.can_run(env):
        return subprocess.run([PY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if args[0] == "-m":
        child = hub_forks.qtool(*args[2:], cwd=ROOT, env=env)
    else:
        child = hub_forks.python(args[1], *args[2:], cwd=ROOT, env=env)
    out, err = child.communicate(timeout=timeout)
    return subprocess.CompletedProcess([PY, *args], child.returncode, out, err)


@pytest.fixture
def qtool(hub_forks):
    """qtool(args, env) -> CompletedProcess of `python -m qtool ARGS`."""
    def run(args: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
        return _python(hub_forks, ["-m", "qtool", *args], env, timeout)
    return run


@pytest.fixture
def download(hub_forks):
    """download(repo, env, revision=None) -> (qtool.core.hub.download_checkpoint's result as JSON, the output)."""
    def run(repo: str, env: dict, revision: str | None = None, timeout: int = 120) -> tuple[dict, str]:
        proc = _python(hub_forks, ["-c", DOWNLOAD, repo] + ([revision] if revision else []), env, timeout)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr
    return run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_text_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())  # follows cache symlinks


def assert_no_token(*texts: str | bytes, folders: tuple[Path, ...] = ()) -> None:
    for token in (HUB_ALLOWED_TOKEN, HUB_OTHER_TOKEN):
        for text in texts:
            data = text.encode() if isinstance(text, str) else text
            assert token.encode() not in data
            assert b"hf_test" not in data
        for folder in folders:
            assert token.encode() not in all_text_under(folder), f"token written under {folder}"


# ---------------------------------------------------------------------------------------------------
# config only
# ---------------------------------------------------------------------------------------------------

def test_config_show_fetches_only_config_json(qtool, hub_server, hub_env, hub_repos):
    proc = qtool(["config", "show", "org/tiny", "--json"], hub_env)
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)["model"]
    assert model["kind"] == "hub" and model["model_type"] == "llama"
    # the cached file is byte-identical to the repo's
    assert sha256(Path(model["config_path"])) == sha256(hub_repos["org/tiny"] / "config.json")
    assert Path(model["config_path"]).is_relative_to(Path(hub_env["HF_HOME"]))
    assert hub_server.files_fetched() == ["config.json"]
    assert not [r for r in hub_server.requests if ".safetensors" in r.path or ".bin" in r.path]


def test_config_show_offline_uses_cache_without_network(qtool, hub_server, hub_env):
    assert qtool(["config", "show", "org/tiny", "--json"], hub_env).returncode == 0
    hub_server.stop()  # nothing answers any more
    proc = qtool(["config", "show", "org/tiny", "--json"], {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["model_type"] == "llama"


def test_unreachable_hub_uses_the_cache_without_being_told_offline(qtool, hub_server, hub_env):
    assert qtool(["config", "show", "org/tiny", "--json"], hub_env).returncode == 0
    hub_server.stop()
    proc = qtool(["config", "show", "org/tiny", "--json"], hub_env)  # no HF_HUB_OFFLINE
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)["model"]["model_type"] == "llama"


def test_unreachable_hub_not_cached_is_one_line_naming_the_matching_preset(qtool, hub_server, hub_env):
    url = hub_server.url
    hub_server.stop()
    proc = qtool(["estimate", "mistralai/Mistral-7B-v0.1"], hub_env)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"qtool: error: mistralai/Mistral-7B-v0.1: cannot reach {url}")
    assert "qtool estimate mistral-7b" in lines[0]
    proc = qtool(["estimate", "org/tiny"], hub_env)  # no preset matches: the hint says what to check instead
    assert proc.returncode == 2 and "HF_ENDPOINT" in proc.stderr and proc.stderr.count("\n") == 1


def test_config_show_offline_not_cached_is_one_clear_line(qtool, hub_server, hub_env):
    proc = qtool(["config", "show", "org/tiny", "--json"], {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qtool: error: offline")
    assert "org/tiny" in lines[0] and f"HF_HOME={hub_env['HF_HOME']}" in lines[0]
    assert hub_server.requests == []
    assert proc.stdout == ""


def test_config_show_404_repo_and_revision(qtool, hub_server, hub_env):
    proc = qtool(["config", "show", "org/nope", "--json"], hub_env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "org/nope" in proc.stderr and "not found" in proc.stderr and "404" in proc.stderr

    proc = qtool(["config", "show", "org/binonly"], hub_env)  # config exists there: fine
    assert proc.returncode == 0, proc.stderr


def test_config_show_gated_without_token_401_with_hint(qtool, hub_server, hub_env):
    proc = qtool(["config", "show", "org/gated", "--json"], hub_env)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "401" in line and "org/gated" in line
    assert "set HF_TOKEN to a token with access; accept the model's license on the hub" in line
    assert proc.stdout == ""


def test_config_show_gated_wrong_token_403_no_leak(qtool, hub_server, hub_env):
    env = {**hub_env, "HF_TOKEN": HUB_OTHER_TOKEN}
    proc = qtool(["config", "show", "org/gated", "--json"], env)
    assert proc.returncode == 2
    assert "403" in proc.stderr and "set HF_TOKEN" in proc.stderr
    # the server did receive the token: it is the CLI's output that must not carry it
    assert {r.token for r in hub_server.requests if "/resolve/" in r.path} == {HUB_OTHER_TOKEN}
    assert_no_token(proc.stdout, proc.stderr, folders=(Path(hub_env["HF_HOME"]),))

    # the library's own debug logging (curl lines of every request) and qtool's traceback: still nothing
    proc = qtool(["--debug", "config", "show", "org/gated"], {**env, "HF_DEBUG": "1", "HF_HUB_VERBOSITY": "debug"})
    assert "authorization" in proc.stderr.lower()  # it did log the headers...
    assert "Traceback" in proc.stderr and "HubError" in proc.stderr  # ...and qtool re-raised
    assert_no_token(proc.stdout, proc.stderr)


def test_config_show_gated_right_token_works_no_leak(qtool, hub_server, hub_env):
    env = {**hub_env, "HF_TOKEN": HUB_ALLOWED_TOKEN}
    proc = qtool(["config", "show", "org/gated", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["model_type"] == "llama"
    assert_no_token(proc.stdout, proc.stderr, folders=(Path(hub_env["HF_HOME"]),))


# ---------------------------------------------------------------------------------------------------
# checkpoint snapshots
# ---------------------------------------------------------------------------------------------------

def test_download_fetches_only_what_quantizing_needs(download, hub_server, hub_env, hub_repos):
    result, _ = download("org/tiny", hub_env)
    repo = hub_server.repos["org/tiny"]
    assert result["sha"] == repo.sha
    snapshot = Path(result["path"])
    assert snapshot.name == repo.sha and snapshot.is_relative_to(Path(hub_env["HF_HOME"]))

    index = json.loads((hub_repos["org/tiny"] / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    expected = sorted(shards + ["config.json", "generation_config.json", "model.safetensors.index.json",
                                "tokenizer.json", "tokenizer_config.json", "README.md"])
    assert result["files"] == expected
    assert sorted(hub_server.files_fetched()) == expected  # not even requested: .bin, onnx/, consolidated
    assert not [r for r in hub_server.requests
                if any(s in r.path for s in ("pytorch_model.bin", "onnx", "consolidated", "original"))]
    for name in expected:
        assert sha256(snapshot / name) == sha256(hub_repos["org/tiny"] / name), name

    # the snapshot loads with stock transformers and holds the same weights
    import torch
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(snapshot).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(hub_repos["org/tiny"]).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_download_single_file_repo_and_revision_by_sha(download, hub_server, hub_env):
    sha = hub_server.repos["org/single"].sha
    result, out = download("org/single", hub_env, revision=sha)
    assert "Fetching" not in out and "%|" not in out  # progress=False: no progress bars
    assert result["sha"] == sha
    assert "model.safetensors" in result["files"]
    # a second run is served from the cache: no file is fetched again
    before = len(hub_server.files_fetched())
    again, _ = download("org/single", hub_env, revision=sha)
    assert again == result
    assert len(hub_server.files_fetched()) == before


def test_download_bin_only_repo_is_a_weights_error(download, hub_server, hub_env):
    result, _ = download("org/binonly", hub_env)
    assert result["type"] == "WeightsError" and result["exit"] == 2
    assert "safetensors" in result["error"]
    assert "pytorch_model.bin" not in hub_server.files_fetched()


def test_download_unknown_revision_404(download, hub_server, hub_env):
    result, _ = download("org/tiny", hub_env, revision="no-such-branch")
    assert result["type"] == "HubError" and result["exit"] == 2
    assert "no-such-branch" in result["error"] and "404" in result["error"]


def test_download_gated_hint_and_no_leak(download, hub_server, hub_env):
    result, out = download("org/gated", {**hub_env, "HF_TOKEN": HUB_OTHER_TOKEN})
    assert result["type"] == "HubError"
    assert "403" in result["error"] and "accept the model's license" in result["error"]
    assert_no_token(out, folders=(Path(hub_env["HF_HOME"]),))

    result, out = download("org/gated", {**hub_env, "HF_TOKEN": HUB_ALLOWED_TOKEN})
    assert "model.safetensors" in result["files"]
    assert_no_token(out, folders=(Path(hub_env["HF_HOME"]),))


def test_interrupted_download_resumes_with_range_and_is_byte_identical(download, hub_server, hub_env, hub_repos):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE  # bytes reach the file a chunk at a time

    name = "model.safetensors"
    size = (hub_repos["org/big"] / name).stat().st_size
    cut = DOWNLOAD_CHUNK_SIZE + 12345
    assert size > cut
    hub_server.drop(name, after=cut, times=1)
    result, _ = download("org/big", hub_env)
    gets = [r for r in hub_server.resolve_requests(name) if r.method == "GET"]
    assert len(gets) == 2
    assert gets[0].range is None
    assert gets[1].range == f"bytes={DOWNLOAD_CHUNK_SIZE}-"  # resumed from the last whole chunk, not restarted
    snapshot = Path(result["path"])
    assert sha256(snapshot / name) == sha256(hub_repos["org/big"] / name)
    assert not list(Path(hub_env["HF_HOME"]).rglob("*.incomplete"))


def test_connection_dropped_for_good_then_run_again_fetches_only_the_rest(download, hub_server, hub_env, hub_repos):
    name = "model.safetensors"
    hub_server.drop(name, after=0, times=100)  # every attempt dies before the first byte
    result, _ = download("org/single", hub_env)
    assert result["type"] == "HubError" and result["exit"] == 2
    assert result["error"].startswith(f"org/single: connection to {hub_server.url} failed; run again to resume")
    done = set(hub_server.files_fetched()) - {name}
    assert "config.json" in done

    hub_server.drop(name, after=0, times=0)
    hub_server.requests.clear()
    result, _ = download("org/single", hub_env)
    assert "model.safetensors" in result["files"]
    assert hub_server.files_fetched() == [name]  # finished files were kept, not fetched again
    assert sha256(Path(result["path"]) / name) == sha256(hub_repos["org/single"] / name)


def test_connection_refused_is_one_line(download, hub_server, hub_env):
    url = hub_server.url
    hub_server.stop()
    result, _ = download("org/tiny", hub_env)
    assert result["type"] == "HubError"
    # one short connection attempt, not huggingface_hub's retries: "cannot reach", said once
    assert f"cannot reach {url} (connection refused)" in result["error"]
    assert "\n" not in result["error"]


def test_download_offline(download, hub_server, hub_env):
    result, _ = download("org/tiny", {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert result["type"] == "HubError"
    assert result["error"].startswith("offline") and f"HF_HOME={hub_env['HF_HOME']}" in result["error"]
    assert hub_server.requests == []

    online, _ = download("org/tiny", hub_env)
    hub_server.stop()
    offline, _ = download("org/tiny", {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert offline == online


def test_redact(monkeypatch):
    from qtool.core.hub import redact

    assert redact(f"Authorization: Bearer {HUB_ALLOWED_TOKEN} x") == "Authorization: Bearer hf_*** x"
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    assert redact("token=plain-secret-value!") == "token=***!"
    assert redact("hf_hub_download failed") == "hf_hub_download failed"  # a function name is no token


# ---------------------------------------------------------------------------------------------------
# end to end: qtool quantize through the server
# ---------------------------------------------------------------------------------------------------

def test_quantize_from_hub_end_to_end_no_token_in_outputs(qtool, hub_server, hub_env, tmp_path):
    """`qtool quantize org/tiny --out DST` through the server (sharded repo, token sent on every request)."""
    dst = tmp_path / "out"
    env = {**hub_env, "HF_TOKEN": HUB_ALLOWED_TOKEN}
    proc = qtool(["quantize", "org/tiny", "--out", str(dst)], env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    fetched = hub_server.files_fetched("org/tiny")
    assert "model-00001-of-00004.safetensors" in fetched and "pytorch_model.bin" not in fetched
    assert {r.token for r in hub_server.requests if "/resolve/" in r.path} == {HUB_ALLOWED_TOKEN}
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    assert_no_token(proc.stdout, proc.stderr, folders=(dst, Path(hub_env["HF_HOME"])))
    assert "org/tiny" in (dst / "README.md").read_text()


QUANTIZE_LIB = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from qtool.core.config import resolve_settings
from qtool.quantize import quantize
plan, result = quantize(sys.argv[1], resolve_settings().quant, destination=Path(sys.argv[2]), device="cpu")
print("written")
"""


def test_quantize_library_from_hub_loads_in_transformers_no_token(hub_forks, hub_server, hub_env, hub_repos,
                                                                 tmp_path):
    """qtool.quantize.quantize('org/gated') downloads through qtool.core.hub, then writes a checkpoint that stock
    transformers loads; the token is used for the download and found nowhere afterwards."""
    dst = tmp_path / "out"
    env = {**hub_env, "HF_TOKEN": HUB_ALLOWED_TOKEN}
    proc = _python(hub_forks, ["-c", QUANTIZE_LIB, "org/gated", str(dst)], env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in hub_server.files_fetched("org/gated")
    assert {r.token for r in hub_server.requests if "/resolve/" in r.path} == {HUB_ALLOWED_TOKEN}
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    assert_no_token(proc.stdout, proc.stderr, folders=(dst, Path(hub_env["HF_HOME"])))
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dst)
    assert sum(isinstance(x, bnb.nn.Linear4bit) for x in model.modules()) == 2 * 7  # q,k,v,o,gate,up,down per layer
