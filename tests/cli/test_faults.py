"""The fault and bad-input catalogue (issue 5), end to end through the `qtool` command.

Every case: the right exit code, exactly one `qtool: error: ...` line on stderr naming the file or
value, no traceback, and nothing left behind at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qtool.cli.app import main
from tinymodels import llama_config, llama_weights, one_error_line  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
TINY = llama_config(intermediate_size=128, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_weights():
    return llama_weights(TINY)


@pytest.fixture
def ckpt(tmp_path, tiny_model) -> Path:
    """config.json (TINY) and model.safetensors holding tiny_weights, the test's own copy."""
    return tiny_model(intermediate_size=128, max_position_embeddings=128, into=tmp_path / "tiny")


@pytest.fixture
def sharded(tmp_path, tiny_weights) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    names = list(tiny_weights)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fname = f"model-0000{i}-of-00002.safetensors"
        save_file({k: tiny_weights[k] for k in part}, d / fname, metadata={"format": "pt"})
        wm.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


def qtool(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(capsys, *argv, names: str | Path | None = None, match: str | None = None, code: int = 2) -> str:
    rc, out, err = qtool(capsys, *argv)
    line = one_error_line(err)
    assert rc == code, (rc, err)
    if names is not None:
        assert str(names) in line, line
    if match is not None:
        assert match in line, line
    return line


def quantize(capsys, src, dest, *extra, **kw) -> str:
    line = assert_bad_input(capsys, "quantize", src, "--out", dest, "--device", "cpu", *extra, **kw)
    assert not Path(dest).exists(), "destination was created on failure"
    leftovers = [p.name for p in Path(dest).parent.iterdir() if ".qtool-" in p.name]
    assert not leftovers, leftovers
    return line


# --- paths and config.json -------------------------------------------------------------------------

def test_missing_path(capsys, tmp_path):
    assert_bad_input(capsys, "estimate", tmp_path / "nope", names=tmp_path / "nope", match="no such file or directory")
    quantize(capsys, tmp_path / "nope", tmp_path / "out", names=tmp_path / "nope")


def test_directory_without_config_json(capsys, ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    assert_bad_input(capsys, "estimate", ckpt, names=ckpt, match="no config.json")
    quantize(capsys, ckpt, tmp_path / "out", names=ckpt, match="no config.json")


def test_no_weight_files(capsys, ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    quantize(capsys, ckpt, tmp_path / "out", names=ckpt, match="no weight files")


def test_invalid_json(capsys, ckpt, tmp_path):
    (ckpt / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,,}')
    assert_bad_input(capsys, "estimate", ckpt, names=ckpt / "config.json", match="invalid JSON")
    quantize(capsys, ckpt, tmp_path / "out", names=ckpt / "config.json", match="invalid JSON")


def test_unknown_model_type(capsys, ckpt, tmp_path):
    (ckpt / "config.json").write_text(json.dumps(TINY | {"model_type": "no-such-arch"}))
    assert_bad_input(capsys, "estimate", ckpt, names="config.json", match="unknown model_type 'no-such-arch'")
    quantize(capsys, ckpt, tmp_path / "out", names="config.json", match="unknown model_type")


def test_remote_code_is_never_implied(capsys, ckpt, tmp_path):
    cfg = TINY | {"model_type": "weirdo", "architectures": ["WeirdoForCausalLM"],
                  "auto_map": {"AutoConfig": "configuration_weirdo.WeirdoConfig",
                               "AutoModelForCausalLM": "modeling_weirdo.WeirdoForCausalLM"}}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    # a module that must never be imported: it would leave a marker
    (ckpt / "modeling_weirdo.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\n")
    (ckpt / "configuration_weirdo.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\n")
    for argv in (("estimate", ckpt), ("quantize", ckpt, "--out", tmp_path / "out", "--device", "cpu")):
        line = assert_bad_input(capsys, *argv, names="config.json", match="needs remote code")
        assert "--trust-remote-code" in line
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "out").exists()


# --- destination -------------------------------------------------------------------------------------

def test_destination_exists_is_refused_and_untouched(capsys, ckpt, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in dest.iterdir())
    assert_bad_input(capsys, "quantize", ckpt, "--out", dest, "--device", "cpu", names=dest,
                     match="destination already exists")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in dest.iterdir()) == before
    assert (dest / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".qtool-" in p.name]


@pytest.mark.parametrize("where", ["inside", "same"])
def test_destination_inside_the_source(capsys, ckpt, where):
    dest = ckpt / "q4" if where == "inside" else ckpt
    before = sorted(p.name for p in ckpt.iterdir())
    assert_bad_input(capsys, "quantize", ckpt, "--out", dest, "--device", "cpu", "--force", names=dest)
    assert sorted(p.name for p in ckpt.iterdir()) == before



def test_destination_parent_is_a_file(capsys, ckpt, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for dest in (afile / "out", afile / "sub" / "out"):
        assert_bad_input(capsys, "quantize", ckpt, "-o", dest, "--device", "cpu", names=afile,
                         match="not a directory")
    assert afile.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if ".qtool-" in p.name]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_destination_folder_cannot_be_created(capsys, ckpt, tmp_path):
    # not a place to write: bad input (2), found before any work; exit 1 is kept for a full disk
    line = assert_bad_input(capsys, "quantize", ckpt, "-o", "/proc/qout", "--device", "cpu", names="/proc",
                            match="cannot create the destination", code=2)
    assert "internal error" not in line
    line = assert_bad_input(capsys, "quantize", ckpt, "-o", "/proc/new/qout", "--device", "cpu", names="/proc",
                            match="cannot create the destination", code=2)
    assert not Path("/proc/new").exists()


def test_destination_parent_not_writable(capsys, ckpt, tmp_path):
    """Permission bits stop everyone but root; root (as in CI) gets a read-only tmpfs instead."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only filesystem")
    else:
        ro.chmod(0o555)
    try:
        line = assert_bad_input(capsys, "quantize", ckpt, "-o", ro / "a" / "out", "--device", "cpu", names=ro,
                                match="not writable")
        assert "internal error" not in line
        assert list(ro.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o755)


# --- weights -------------------------------------------------------------------------------------

def test_truncated_safetensors(capsys, ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    quantize(capsys, ckpt, tmp_path / "out", names=f, match="truncated")


def test_corrupted_header(capsys, ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(raw))
    quantize(capsys, ckpt, tmp_path / "out", names=f, match="corrupt safetensors header")


def test_header_length_claims_more_than_the_file(capsys, ckpt, tmp_path, safetensors_bytes):
    f = ckpt / "model.safetensors"
    safetensors_bytes.set_header_length(f, 10**12)
    quantize(capsys, ckpt, tmp_path / "out", names=f, match="exceeds the file")


def test_header_claims_more_tensor_bytes_than_the_file_has(capsys, ckpt, tmp_path, safetensors_bytes):
    f = ckpt / "model.safetensors"

    def grow(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        row = 4  # F32 bytes per element, times the elements of one row
        for d in h[last]["shape"][1:]:
            row *= d
        h[last]["data_offsets"][1] += row
        h[last]["shape"][0] += 1

    safetensors_bytes.rewrite_header(f, grow)
    quantize(capsys, ckpt, tmp_path / "out", names=f, match="truncated")


def test_tensor_shape_not_matching_config(capsys, ckpt, tmp_path):
    # config says a wider MLP than the weights have
    (ckpt / "config.json").write_text(json.dumps(TINY | {"intermediate_size": 256}))
    line = quantize(capsys, ckpt, tmp_path / "out", match="shape")
    assert "mlp" in line and "256" in line


def test_non_float_tensor_where_a_weight_is_expected(capsys, ckpt, tmp_path, tiny_weights):
    name = "model.layers.0.mlp.up_proj.weight"
    bad = dict(tiny_weights)
    bad[name] = torch.zeros(tiny_weights[name].shape, dtype=torch.int32)
    save_file(bad, ckpt / "model.safetensors")
    line = quantize(capsys, ckpt, tmp_path / "out", match=name)
    assert "float" in line


def test_already_quantized_checkpoint(capsys, ckpt, tmp_path):
    # a real bnb-4bit checkpoint, written by qtool itself
    q = tmp_path / "q4"
    rc, _, err = qtool(capsys, "quantize", ckpt, "--out", q, "--device", "cpu")
    assert rc == 0, err
    assert "quantization_config" in json.loads((q / "config.json").read_text())
    line = quantize(capsys, q, tmp_path / "again", names=q, match="already quantized")
    assert "bitsandbytes" in line
    # and without the config's quantization_config: the tensor names give it away
    cfg = json.loads((q / "config.json").read_text())
    del cfg["quantization_config"]
    (q / "config.json").write_text(json.dumps(cfg))
    quantize(capsys, q, tmp_path / "again", match="already quantized")


def test_index_naming_a_missing_shard(capsys, sharded, tmp_path):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    quantize(capsys, sharded, tmp_path / "out", names=sharded / "model.safetensors.index.json",
             match="model-00002-of-00002.safetensors")


_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event, args):
    if _RECORDING[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.mark.parametrize("shard", ["../model-00002-of-00002.safetensors", "ABS", "sub/../../model-00002-of-00002.safetensors"])
def test_index_with_escaping_shard_names_never_opens_them(capsys, sharded, tmp_path, shard):
    # The escaping name reaches a real, valid copy of the shard outside the checkpoint: a careless
    # reader would open it and succeed. Python's audit hook records every file opened.
    outside = tmp_path / "model-00002-of-00002.safetensors"
    shutil.move(sharded / "model-00002-of-00002.safetensors", outside)
    (sharded / "sub").mkdir()
    shard = str(outside) if shard == "ABS" else shard
    idx_path = sharded / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"] = {k: (shard if v.endswith("00002.safetensors") else v) for k, v in idx["weight_map"].items()}
    idx_path.write_text(json.dumps(idx))
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        quantize(capsys, sharded, tmp_path / "out", names=idx_path, match="refusing shard name")
    finally:
        _RECORDING[0] = False
    assert any(p.endswith("model.safetensors.index.json") for p in _OPENED), _OPENED  # the hook works
    assert not any(Path(p).name == outside.name for p in _OPENED), _OPENED
    assert not any(p.endswith(".safetensors") for p in _OPENED), _OPENED  # no shard at all, before the check


# --- pickle --------------------------------------------------------------------------------------

def test_pickle_refused_by_default_and_allowed_with_weights_only(capsys, ckpt, tmp_path, tiny_weights):
    (ckpt / "model.safetensors").unlink()
    torch.save(tiny_weights, ckpt / "pytorch_model.bin")
    line = quantize(capsys, ckpt, tmp_path / "out", names=ckpt, match="arbitrary code")
    assert "--allow-pickle" in line and "safetensors" in line

    rc, _, err = qtool(capsys, "quantize", ckpt, "--out", tmp_path / "out", "--device", "cpu", "--allow-pickle")
    assert rc == 0, err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        got = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(got, tiny_weights["model.embed_tokens.weight"])


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_allow_pickle_still_runs_no_code(capsys, ckpt, tmp_path, tiny_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (ckpt / "model.safetensors").unlink()
    torch.save(dict(tiny_weights) | {"x": _Payload()}, ckpt / "pytorch_model.bin")
    quantize(capsys, ckpt, tmp_path / "out", "--allow-pickle", names="pytorch_model.bin", match="weights_only=True")
    assert not (tmp_path / "PWNED").exists()


# --- sizes and GPU names ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, names", [
    (["--vram", "24XB"], "24XB"),
    (["--vram", "-1GB"], "-1GB"),
    (["--vram", ""], "--vram"),
    (["--vram", "GB"], "GB"),
    (["--vram", "1.5e9"], "1.5e9"),
    (["--gpu", "rtx-9999"], "rtx-9999"),
    (["--gpu", ""], "--gpu"),
])
def test_malformed_sizes_and_unknown_gpus(capsys, argv, names):
    assert_bad_input(capsys, "estimate", "70b", *argv, names=names)


# --- interruption and full disk: a real process ------------------------------------------------------

# Signals at every moment of a run (imports, staging, mid-shard, commit) are in tests/core/test_signals.py.


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory, tiny_model, qtool_forks, hermetic_env):
    """One real `qtool quantize` run whose writes fail past 40 KB (EFBIG, as on a full disk: CPython ignores
    SIGXFSZ); both tests below read what it did: (process, destination, the folder around it). The process is
    forked after torch's import (conftest's qtool_forks)."""
    folder = tmp_path_factory.mktemp("full_disk")
    ckpt = tiny_model(intermediate_size=128, max_position_embeddings=128, into=folder / "tiny")
    assert (ckpt / "model.safetensors").stat().st_size > 40_000 * 4  # output would be well over the limit
    dest = folder / "out"
    child = qtool_forks.qtool("quantize", str(ckpt), "--out", str(dest), "--device", "cpu", cwd=folder,
                              env={**hermetic_env, "PYTHONPATH": str(REPO)}, rlimits={"RLIMIT_FSIZE": 40_000})
    out, err = child.communicate(timeout=300)
    return subprocess.CompletedProcess(["qtool"], child.returncode, out, err), dest, folder


def test_full_disk_while_writing_leaves_nothing(full_disk):
    proc, dest, folder = full_disk
    line = one_error_line(proc.stderr)
    assert proc.returncode != 0
    assert "file too large" in line, line
    assert not dest.exists()
    assert not [p.name for p in folder.iterdir() if ".qtool-" in p.name]


def test_full_disk_message_is_not_an_internal_error(full_disk):
    proc, dest, folder = full_disk
    line = one_error_line(proc.stderr)
    assert "internal error" not in line and "out" in line, line
    assert proc.returncode == 1
    assert line.startswith(f"qtool: error: file too large (file-size limit reached) writing {dest}/model"), line
    assert line.endswith(f"; nothing was left at {dest}"), line
    assert not dest.exists()
    assert not [p.name for p in folder.iterdir() if ".qtool-" in p.name]
