"""The config-resolution layer: precedence, sources, parsing, model references, `qtool config show`."""

from __future__ import annotations

import json

import pytest

from qtool.cli.app import main
from qtool.core.config import KEYS, resolve_settings
from qtool.core.errors import ConfigError
from qtool.core.models import approximate_config, resolve_model
from qtool.core.sizes import parse_size


def test_defaults_are_the_seed_recipe(tmp_path):
    s = resolve_settings({}, env={}, cwd=tmp_path)
    assert (s.quant.quant_type, s.quant.double_quant, s.quant.compute_dtype) == ("nf4", True, "bfloat16")
    assert s.quant.blocksize == 64 and s.quant.quant_storage == "uint8"
    assert all(src == "default" for src in s.sources.values())


def test_precedence_flag_env_file_preset_default(tmp_path):
    (tmp_path / "qtool.toml").write_text('seq_len = 1024\nbatch_size = 3\noptimizer = "adamw8bit"\npreset = "qlora-nf4"\n')
    env = {"QTOOL_SEQ_LEN": "4096", "QTOOL_BATCH_SIZE": "5"}
    s = resolve_settings({"seq_len": 512}, env=env, cwd=tmp_path)
    assert s.run.seq_len == 512 and s.sources["seq_len"] == "flag --seq-len"
    assert s.run.batch_size == 5 and s.sources["batch_size"] == "env QTOOL_BATCH_SIZE"
    assert s.run.optimizer == "adamw8bit" and s.sources["optimizer"].startswith("file ")
    # lora_rank comes from the preset the file names; lora_alpha from the built-in default
    assert s.run.lora_rank == 16 and s.sources["lora_rank"] == "preset qlora-nf4"
    assert s.sources["lora_alpha"] == "default"


def test_pyproject_tool_section_and_explicit_config_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.qtool]\nquant-type = "fp4"\n')
    s = resolve_settings({}, env={}, cwd=tmp_path)
    assert s.quant.quant_type == "fp4" and s.sources["quant_type"] == f"file {tmp_path / 'pyproject.toml'}"
    other = tmp_path / "other.toml"
    other.write_text("[quant]\ndouble_quant = false\n")
    s = resolve_settings({}, env={}, cwd=tmp_path, config_file=other)
    assert s.quant.double_quant is False and s.quant.quant_type == "nf4"  # --config replaces the discovered file


@pytest.mark.parametrize("text,expected", [
    ("24GB", 24 * 10**9), ("24 GiB", 24 * 2**30), ("24000MB", 24 * 10**9), ("1.5 tb", 15 * 10**11), ("512", 512),
])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24XB", "-1GB", "", "GB", "1.2.3GB", "nan GB"])
def test_bad_sizes_are_config_errors(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_gpu_name_gives_budget_and_unknown_gpu_is_named(tmp_path):
    s = resolve_settings({"gpu": "RTX 4090"}, env={}, cwd=tmp_path)
    assert s.run.gpu == "rtx-4090" and s.run.budget_bytes == 24 * 2**30
    with pytest.raises(ConfigError, match="unknown GPU 'rtx-9999'"):
        resolve_settings({"gpu": "rtx-9999"}, env={}, cwd=tmp_path)


def test_gpus_is_a_count_or_one_catalogue_name_per_card(tmp_path):
    assert resolve_settings({"gpus": "2"}, env={}, cwd=tmp_path).run.gpus == 2
    assert resolve_settings({"gpus": "2,"}, env={}, cwd=tmp_path).run.gpus == 2
    s = resolve_settings({}, env={"QTOOL_GPUS": "RTX 4090, rtx-3090"}, cwd=tmp_path)
    assert s.run.gpus == ("rtx-4090", "rtx-3090") and s.sources["gpus"] == "env QTOOL_GPUS"
    (tmp_path / "qtool.toml").write_text('gpus = ["rtx-4090", "rtx-4090"]\nparallel = "FSDP"\n')
    s = resolve_settings({}, env={}, cwd=tmp_path)
    assert s.run.gpus == ("rtx-4090", "rtx-4090") and s.run.parallel == "fsdp"
    for bad, needle in (("0", "between 1 and"), ("rtx-9999", "unknown GPU 'rtx-9999'"), (True, "a count"),
                        (",", "a count"), ("2,2", "a count"), ("rtx-4090,2", "a count")):
        with pytest.raises(ConfigError, match=needle):
            resolve_settings({"gpus": bad}, env={}, cwd=tmp_path)


def test_bad_env_value_names_its_source(tmp_path):
    with pytest.raises(ConfigError, match="QTOOL_QUANT_TYPE"):
        resolve_settings({}, env={"QTOOL_QUANT_TYPE": "int3"}, cwd=tmp_path)


@pytest.mark.parametrize("env,expected,source", [
    ({}, True, "default"),
    ({"UNSLOTH_BLOCK_COMPILE": "0"}, False, "env UNSLOTH_BLOCK_COMPILE"),
    # Unsloth's rule (unsloth/models/_block_compile.py _enabled: os.environ.get(..., "1") != "0"): only "0" is off
    ({"UNSLOTH_BLOCK_COMPILE": ""}, True, "env UNSLOTH_BLOCK_COMPILE"),
    ({"UNSLOTH_BLOCK_COMPILE": "false"}, True, "env UNSLOTH_BLOCK_COMPILE"),
    ({"UNSLOTH_BLOCK_COMPILE": "0", "QTOOL_UNSLOTH_BLOCK_COMPILE": "true"}, True, "env QTOOL_UNSLOTH_BLOCK_COMPILE"),
    # ... and UNSLOTH_COMPILE_DISABLE "1"/"partial" turns it off too, whatever UNSLOTH_BLOCK_COMPILE says
    ({"UNSLOTH_COMPILE_DISABLE": "partial", "UNSLOTH_BLOCK_COMPILE": "1"}, False, "env UNSLOTH_COMPILE_DISABLE"),
    ({"UNSLOTH_COMPILE_DISABLE": "0"}, True, "default"),
])
def test_unsloth_block_compile_follows_unsloths_own_variable(tmp_path, env, expected, source):
    """The switch Unsloth reads from UNSLOTH_BLOCK_COMPILE is the same setting here (what a user exported for
    Unsloth changes the estimate as it changes the run); qtool's own variable and flags come first."""
    s = resolve_settings({}, env=env, cwd=tmp_path)
    assert (s.run.unsloth_block_compile, s.sources["unsloth_block_compile"]) == (expected, source)
    (tmp_path / "qtool.toml").write_text("unsloth_block_compile = false\n")  # the variable is above the file
    s = resolve_settings({}, env=env, cwd=tmp_path)
    assert s.run.unsloth_block_compile == (expected if source != "default" else False)
    (tmp_path / "qtool.toml").unlink()
    assert resolve_settings({"unsloth_block_compile": True}, env=env, cwd=tmp_path).run.unsloth_block_compile


def test_unknown_file_key_is_rejected(tmp_path):
    (tmp_path / "qtool.toml").write_text("seq_length = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'seq_length'"):
        resolve_settings({}, env={}, cwd=tmp_path)


def test_every_key_has_env_and_help():
    names = [k.name for k in KEYS]
    assert len(names) == len(set(names))
    assert all(k.help for k in KEYS)


@pytest.mark.parametrize("ref,preset", [("70b", "llama-3-70b"), ("8B", "llama-3-8b"), ("405b", "llama-3.1-405b"),
                                        ("llama-3-8b", "llama-3-8b"), ("Qwen2.5-7B", "qwen2.5-7b")])
def test_model_references_to_presets(ref, preset):
    spec = resolve_model(ref)
    assert spec.preset == preset and spec.config["model_type"]


def test_size_without_preset_is_an_approximation():
    spec = resolve_model("1.5b")
    assert spec.kind == "approximation" and "approximation" in spec.note
    cfg = approximate_config(30e9)
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] % 128 == 0


def test_local_dir_and_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert resolve_model(str(tmp_path)).kind == "local"
    assert resolve_model(str(tmp_path / "config.json")).config["hidden_size"] == 64
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        resolve_model(str(tmp_path / "bad.json"))


def test_cli_config_show_json(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTOOL_SEQ_LEN", "777")
    assert main(["config", "show", "8b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["seq_len"] == {"value": 777, "source": "env QTOOL_SEQ_LEN", "flag": "--seq-len", "env": "QTOOL_SEQ_LEN"}
    assert data["model"]["name"] == "llama-3-8b"


def test_cli_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "qtool 0.1.0" in capsys.readouterr().out
    for cmd in (["--help"], ["estimate", "--help"], ["quantize", "--help"], ["verify", "--help"], ["config", "show", "--help"]):
        assert main(cmd) == 0
        assert "Example" in capsys.readouterr().out, cmd


def test_cli_bad_input_is_one_line_exit_2(capsys):
    assert main(["config", "show", "nope-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtool: error: unknown model 'nope-model'") and err.count("\n") == 1
    assert "Traceback" not in err


def test_gpu_flag_beats_vram_from_a_file_and_same_level_conflict_is_an_error(tmp_path):
    (tmp_path / "qtool.toml").write_text('vram = "24GB"\n')
    s = resolve_settings({"gpu": "h100"}, env={}, cwd=tmp_path)
    assert s.run.budget_bytes == 80 * 2**30  # the flag wins over the file, whichever key it uses
    s = resolve_settings({}, env={"QTOOL_GPU": "rtx-4090"}, cwd=tmp_path)
    assert s.run.budget_bytes == 24 * 2**30
    with pytest.raises(ConfigError, match="both vram .* and gpu"):
        resolve_settings({"gpu": "h100", "vram": "80GB"}, env={}, cwd=tmp_path)


@pytest.mark.parametrize("value", ["24", "0", "1000KB"])
def test_budget_without_a_unit_is_refused(value, tmp_path):
    with pytest.raises(ConfigError, match="not a memory budget"):
        resolve_settings({"vram": value}, env={}, cwd=tmp_path)


def test_project_files_that_are_not_what_they_claim(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"no \[tool.qtool\] section"):
        resolve_settings({}, env={}, cwd=tmp_path, config_file=tmp_path / "pyproject.toml")
    assert resolve_settings({}, env={}, cwd=tmp_path).config_file is None  # discovered: simply not used
    (tmp_path / "pyproject.toml").write_text('tool = "x"\n')
    with pytest.raises(ConfigError, match="must be tables"):
        resolve_settings({}, env={}, cwd=tmp_path)
    (tmp_path / "qtool.toml").write_bytes(b"\xff\xfe seq_len = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve_settings({}, env={}, cwd=tmp_path)


@pytest.mark.parametrize("fields,needle", [
    ({"hidden_size": "abc"}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
])
def test_invalid_config_fields_are_one_line_errors(tmp_path, capsys, fields, needle):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **fields}))
    assert main(["estimate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qtool: error: {path}: invalid config.json") and needle in err and err.count("\n") == 1


def test_remote_code_is_refused_unless_trusted_and_then_runs_the_repository_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'qtool_tiny'\n")
    (repo / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100)
    (repo / "config.json").write_text(json.dumps({
        "model_type": "qtool_tiny", "architectures": ["TinyForCausalLM"], **dims,
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"},
    }))
    assert main(["estimate", str(repo)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["estimate", str(repo), "--trust-remote-code", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the same shapes built by transformers' own Llama on the meta device
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        expected = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**dims)).parameters())
    assert report["params"]["total"] == expected and report["model"]["architecture"] == "TinyForCausalLM"
