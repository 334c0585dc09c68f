"""Hardening round 2 (issue 8): any machine, any input, one line, nothing unsafe.

Each test names the item of the issue it covers. Signals are in tests/core/test_signals.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("bitsandbytes") is None:  # installed, not imported: its import (~3 s) is the tests'
    pytest.skip("bitsandbytes is not installed", allow_module_level=True)
from safetensors.torch import load_file, save_file  # noqa: E402

from qtool.cli.app import main  # noqa: E402
from tinymodels import llama_config, one_error_line  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = llama_config(max_position_embeddings=128)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    line = one_error_line(err)
    assert "internal error" not in line, err
    return line


@pytest.fixture
def ckpt(tmp_path, tiny_model) -> Path:
    return tiny_model(max_position_embeddings=128, into=tmp_path / "tiny")  # config.json is TINY


# --- 1. any CPU -------------------------------------------------------------------------------------

def test_avx512_bf16_repacking_is_not_taken_on_any_cpu(ckpt, capsys, monkeypatch):
    """On AVX512-BF16 CPUs bitsandbytes' eval forward repacks weights, which dies for in_features 96 that is
    not a multiple of the blocksize. Make every Linear4bit believe it is on such a CPU (the repacking is
    pure torch, so this is the real code path on any machine): verify --mode inference still runs."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    code, out, err = run(capsys, "verify", ckpt, "--device", "cpu", "--mode", "inference", "--seq-len", "16",
                         "--steps", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["checks"]["finite_loss"]["passed"] is True


def test_the_repacking_really_fails_without_qtools_choice():
    """The test above is not vacuous: the same layer on the AVX512-BF16 path refuses this shape."""
    import bitsandbytes as bnb

    from qtool.verify import portable_cpu_kernels

    layer = bnb.nn.Linear4bit(96, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(64, 96)})
    layer = layer.to("cpu")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 96), requires_grad=False, quant_type="nf4")._quantize("cpu")
    layer.eval()
    layer.support_avx512bf16_for_cpu = True
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError), torch.no_grad():
        layer(x)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 96), requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert portable_cpu_kernels(torch.nn.Sequential(layer)) == 1
    with torch.no_grad():
        assert layer(x).shape == (2, 64)


# --- 2. one line ------------------------------------------------------------------------------------

def test_library_warnings_are_held_unless_verbose(ckpt, capsys):
    """bitsandbytes warns (UserWarning) that paged optimizers fall back on CPU; the run then fails its budget.
    The user sees one line; -v shows what the libraries said."""
    argv = ["verify", ckpt, "--device", "cpu", "--seq-len", "16", "--steps", "1", "--optimizer", "paged_adamw8bit",
            "--max-vram", "2MB"]
    code, _, err = run(capsys, *argv)
    assert code == 3
    # verify's own progress lines ("loading ...") may precede the error; nothing from the libraries does
    assert [line for line in err.splitlines() if line.startswith("qtool: error: ")] == [err.splitlines()[-1]]
    assert "budget" in err.splitlines()[-1]
    assert "Paged optimizers" not in err and "Warning" not in err and "warn(" not in err
    code, _, err = run(capsys, "-v", *argv)
    assert code == 3 and "Paged optimizers are not supported on CPU" in err


def test_usage_errors_are_one_line(capsys):
    for argv in (["estimate", "70b", "--batch-size", "1e6"], ["estimat", "70b"], ["estimate", "70b", "--nope"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        one_line(err)


def test_closed_stdout_ends_quietly(tmp_path):
    """`qtool estimate 70b | head -1`: the reader goes away; qtool ends with 141 (128 + SIGPIPE) and says nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTOOL_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "qtool", "estimate", "70b"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.read(10)
    proc.stdout.close()  # like head after its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


# --- 4. security ------------------------------------------------------------------------------------

def test_symlinked_files_are_not_copied(ckpt, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("HF_TOKEN=hf_do_not_copy_me")
    (ckpt / "special_tokens_map.json").symlink_to(secret)
    (ckpt / "tokenizer_config.json").symlink_to("/proc/self/environ")
    (ckpt / "generation_config.json").write_text('{"bos_token_id": 1}')
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", ckpt, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert not (out / "special_tokens_map.json").exists() and not (out / "tokenizer_config.json").exists()
    assert (out / "generation_config.json").is_file()
    assert not any("hf_do_not_copy_me" in p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())
    assert "special_tokens_map.json" in err and "outside the checkpoint" in err


def test_large_tokenizer_is_copied(ckpt, tmp_path, capsys):
    """A 75 MB tokenizer.json (large vocabularies) is part of the model: copied whatever its size."""
    with open(ckpt / "tokenizer.json", "wb") as f:
        f.truncate(60 * 2**20)
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", ckpt, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert (out / "tokenizer.json").stat().st_size == 60 * 2**20


def test_data_tokenizer_never_runs_repository_code(ckpt, tmp_path, capsys):
    """A tokenizer_config.json with auto_map: without --trust-remote-code it is refused, never prompted for."""
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (ckpt / "evil.py").write_text("raise SystemExit('repository code ran')\n")
    data = tmp_path / "data.txt"
    data.write_text("hello world " * 20)
    code, _, err = run(capsys, "verify", ckpt, "--device", "cpu", "--seq-len", "16", "--steps", "1", "--data", data)
    assert code == 2, err
    assert "--trust-remote-code" in one_line(err)


# --- 5. input refused fast --------------------------------------------------------------------------

def test_nonfinite_weights_are_refused(ckpt, tmp_path, capsys):
    sd = load_file(ckpt / "model.safetensors")
    w = sd["model.layers.1.mlp.up_proj.weight"]
    w.view(-1)[:5] = float("nan")
    w.view(-1)[9] = float("inf")
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", ckpt, "--out", out, "--device", "cpu")
    line = one_line(err)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in line and "6 non-finite" in line
    assert "--allow-nonfinite" in line and str(ckpt / "model.safetensors") in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".qtool-" in p.name]
    assert run(capsys, "quantize", ckpt, "--out", out, "--device", "cpu", "--allow-nonfinite")[0] == 0


def test_float64_config_is_refused_for_quantize(ckpt, tmp_path, capsys):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float64"}))
    code, _, err = run(capsys, "quantize", ckpt, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 2 and "float64" in one_line(err) and "--dtype" in one_line(err)


WRONG = [1, -3, 0, 2.5, True, "256", None, [4], {"a": 1}, 10**12]
FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings", "head_dim", "tie_word_embeddings", "architectures",
          "model_type", "torch_dtype", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act"]


@pytest.mark.parametrize("field", FIELDS)
def test_config_fields_of_any_type_end_in_one_line(field, tmp_path, capsys):
    """Every wrong type or value of a config.json field: exit 0 (transformers accepts it) or 2 with one full
    line naming the file; never an internal error."""
    for value in WRONG:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**TINY, field: value}))
        code, _, err = run(capsys, "estimate", path, "--json")
        assert code in (0, 2), (field, value, err)
        if code == 2:
            line = one_line(err)
            assert str(path) in line and not line.endswith(":"), line


def test_absurd_layer_counts_are_refused_at_once(tmp_path, capsys):
    for n in (10**9, 10**12):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**TINY, "num_hidden_layers": n}))
        code, _, err = run(capsys, "estimate", path)
        assert code == 2 and "num_hidden_layers" in one_line(err)


def test_deep_nesting_is_bad_input(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text('{"model_type": "llama", "x": ' + deep + "}")
    code, _, err = run(capsys, "estimate", tmp_path / "config.json")
    assert code == 2 and "nested too deeply" in one_line(err)
    (tmp_path / "qtool.toml").write_text("a = " + deep + "\n")
    os.chdir(tmp_path)
    code, _, err = run(capsys, "estimate", "70b")
    assert code == 2 and "qtool.toml" in one_line(err)


def test_verify_refuses_what_cannot_work_before_loading(ckpt, tmp_path, capsys):
    # asked-for length beyond the model's 128 positions
    code, _, err = run(capsys, "verify", ckpt, "--device", "cpu", "--seq-len", "5000")
    assert code == 2 and "max_position_embeddings" in one_line(err)
    # an estimate over the machine's RAM: refused at once, not blamed on the tokenizer an hour later
    code, _, err = run(capsys, "verify", ckpt, "--device", "cpu", "--seq-len", "100", "--batch-size", "1000000")
    assert code == 2 and "available" in one_line(err)
    # a reference of another architecture
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=96)).save_pretrained(tmp_path / "bert")
    capsys.readouterr()  # transformers' own save progress, not qtool's
    code, _, err = run(capsys, "verify", ckpt, "--device", "cpu", "--seq-len", "16", "--reference", tmp_path / "bert")
    assert code == 2 and "not the same model" in one_line(err)
    # a --junit place that cannot be written: refused before the run
    code, _, err = run(capsys, "verify", ckpt, "--device", "cpu", "--seq-len", "16", "--junit", "/proc/x.xml")
    assert code == 2 and "--junit" in one_line(err)


def test_verify_answers_a_bad_directory_before_importing_torch(tmp_path):
    """A folder with config.json and no weights: the answer must not wait for torch to import."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    code = ("import sys; from qtool.cli.app import main; rc = main(['verify', sys.argv[1], '--device', 'cpu', "
            "'--seq-len', '16']); print('torch' in sys.modules, rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
    assert "no weight files" in proc.stderr


def test_index_beside_model_safetensors_follows_transformers(ckpt, tmp_path, capsys):
    """transformers loads model.safetensors when it is there, index or not; an empty weight_map is named."""
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"x": "gone.safetensors"}}))
    code, _, err = run(capsys, "quantize", ckpt, "--out", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    code, _, err = run(capsys, "quantize", ckpt, "--out", tmp_path / "out2", "--device", "cpu")
    assert code == 2 and "weight_map lists no tensors" in one_line(err)


def test_destinations_that_cannot_work_are_refused_first(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "quantize", ckpt, "--out", ".", "--force", "--device", "cpu")
    assert code == 2 and "working directory" in one_line(err)
    code, _, err = run(capsys, "quantize", ckpt, "--out", "/proc/x", "--device", "cpu")
    assert code == 2 and "/proc/x" in one_line(err)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    code, _, err = run(capsys, "quantize", ckpt, "--out", "sub", "--device", "cpu")
    assert code == 2 and "working directory" in one_line(err)


# --- 6. tests that hold anywhere --------------------------------------------------------------------

def test_every_test_runs_in_a_clean_environment():
    """conftest's autouse fixture: no QTOOL_*/HF_* of the caller's and a temporary working directory, so a
    QTOOL_BATCH_SIZE=64 or a qtool.toml where pytest was started changes nothing."""
    assert not [k for k in os.environ if k.startswith("QTOOL_")]
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and "HF_TOKEN" not in os.environ
    assert Path.cwd() != REPO and REPO not in Path.cwd().parents
    assert not (Path.cwd() / "qtool.toml").exists()


def test_unusable_paths_are_bad_input(ckpt, tmp_path, capsys, monkeypatch):
    """Names too long for the filesystem, a binary config.json, absurdly deep --out: one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    long = "x" * 5000
    for argv in (["estimate", long], ["quantize", long], ["verify", long, "--device", "cpu"],
                 ["quantize", ckpt, "--out", long, "--device", "cpu"],
                 ["quantize", ckpt, "--out", "y" * 250, "--device", "cpu"],
                 ["quantize", ckpt, "--out", "a/" * 2000 + "x", "--device", "cpu"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv[:2], err)
        one_line(err)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # nothing created for the refused destinations
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(capsys, "estimate", tmp_path / "bin")
    assert code == 2 and "not UTF-8" in one_line(err)
