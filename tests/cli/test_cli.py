"""The command line as people use it: help, options derived from the settings table, config files, pipes,
units, progress, completion. In-process (qtool.cli.app.main) unless the real process is what matters."""

from __future__ import annotations

import io
import os
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qtool.cli.app import main
from qtool.core.config import KEYS, QuantSettings, RunSettings, flag_name, resolve_settings
from qtool.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("estimate", "quantize", "verify")


def _help(capsys, monkeypatch, *cmd: str, columns: int = 80) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("TERM", "dumb")
    assert main([*cmd, "--help"]) == 0
    return capsys.readouterr().out


# --- the settings table drives the options --------------------------------------------------------

def test_top_level_help_fits_80_columns(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert all(c in text for c in ("estimate", "quantize", "verify", "config", "--install-completion"))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_shows_every_default_from_the_table(command, capsys, monkeypatch):
    text = _help(capsys, monkeypatch, command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text  # no option name or example cut short
    assert "<bool>" not in text.replace("--help               -h      <bool>", "")  # flags take no value
    flat = re.sub(r"[\s│]+", " ", text)  # help cells wrap: read them as one line
    for key in KEYS:
        if command not in key.commands:
            assert flag_name(key.name) + " " not in flat, key.name
            continue
        assert flag_name(key.name) in flat, key.name
        if key.default not in (None, ()):
            shown = {True: "on", False: "off"}.get(key.default, None) if isinstance(key.default, bool) else None
            shown = shown or (",".join(key.default) if isinstance(key.default, tuple) else str(key.default))
            assert f"[default: {shown}]" in flat, (key.name, shown)


def _value_for(key):
    """A flag list and the value it should resolve to, for a row (None: no simple value to try)."""
    if key.type is bool:
        return ([flag_name("no_" + key.name)] if key.default else [flag_name(key.name)]), not key.default
    if key.choices:
        want = [c for c in key.choices if c != key.default][0]
        return [flag_name(key.name), str(want)], want
    if key.type is int:
        return [flag_name(key.name), str(key.default + 1)], key.default + 1
    return None, None


@pytest.mark.parametrize("command", COMMANDS)
def test_every_table_row_becomes_an_option_of_its_commands(command, tmp_path, monkeypatch):
    """One row is the whole declaration: with_settings turns it into a flag that reaches resolve_settings,
    and the row's env name and default work the same way."""
    import typer
    from typer.testing import CliRunner

    from qtool.cli.options import with_settings

    monkeypatch.chdir(tmp_path)
    seen = {}
    app = typer.Typer()

    @app.command()
    @with_settings(command)
    def probe(settings: object) -> None:
        seen["settings"] = settings

    runner = CliRunner()
    for key in KEYS:
        if command not in key.commands:
            continue
        argv, want = _value_for(key)
        if argv is None:
            continue
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (key.name, result.output)
        s = seen["settings"]
        assert s.values[key.name] == want and s.sources[key.name] == f"flag {flag_name(key.name)}", key.name
        assert s.command == command
        assert runner.invoke(app, [], env={f"QTOOL_{key.name.upper()}": str(want)}).exit_code == 0
        assert seen["settings"].values[key.name] == want, key.name
    assert runner.invoke(app, []).exit_code == 0
    assert all(seen["settings"].values[k.name] == k.default for k in KEYS)


def test_settings_dataclasses_validate_at_construction():
    with pytest.raises(ConfigError, match="quant_type 'int3'"):
        QuantSettings(quant_type="int3")
    with pytest.raises(ConfigError, match="blocksize"):
        QuantSettings(blocksize=48)
    with pytest.raises(ConfigError, match="seq_len"):
        RunSettings(seq_len=0)
    with pytest.raises(ConfigError, match="GPU"):
        RunSettings(gpu="rtx-9999")
    assert QuantSettings(compute_dtype="bf16").compute_dtype == "bfloat16"  # aliases are stored normalised
    assert QuantSettings(skip_modules=["lm_head"]).skip_modules == ("lm_head",)


def test_cli_adds_only_parsing(monkeypatch, tmp_path, capsys):
    """The estimate command hands the library exactly what resolve_settings makes of the same flags."""
    monkeypatch.chdir(tmp_path)
    import qtool.estimate

    got = {}
    real = qtool.estimate.estimate_report

    def spy(spec, settings, **kw):
        got["settings"] = settings
        return real(spec, settings, **kw)

    monkeypatch.setattr(qtool.estimate, "estimate_report", spy)
    assert main(["estimate", "8b", "--seq-len", "512", "-b", "2", "--no-gradient-checkpointing", "--quant-type",
                 "fp4", "--lora-targets", "q_proj,v_proj", "--json"]) == 0
    capsys.readouterr()
    want = resolve_settings({"seq_len": "512", "batch_size": "2", "gradient_checkpointing": False,
                             "quant_type": "fp4", "lora_targets": "q_proj,v_proj"}, command="estimate")
    assert got["settings"].quant == want.quant and got["settings"].run == want.run


def test_positive_and_negative_flag_together_is_a_usage_error(capsys):
    assert main(["estimate", "8b", "--double-quant", "--no-double-quant"]) == 2
    assert "not both" in capsys.readouterr().err


# --- config files --------------------------------------------------------------------------------

def test_command_tables_apply_to_their_command_only(tmp_path, monkeypatch, capsys):
    (tmp_path / "qtool.toml").write_text('seq_len = 1000\n[verify]\nseq_len = 99\n[quant]\nblocksize = 128\n')
    s = resolve_settings({}, env={}, cwd=tmp_path, command="estimate")
    assert s.run.seq_len == 1000 and s.quant.blocksize == 128
    s = resolve_settings({}, env={}, cwd=tmp_path, command="verify")
    assert s.run.seq_len == 99 and s.sources["seq_len"].endswith("qtool.toml [verify]")
    assert resolve_settings({"seq_len": 5}, env={}, cwd=tmp_path, command="verify").run.seq_len == 5  # flag wins
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", "8b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["seq_len"] == 1000


def test_command_table_with_a_setting_the_command_does_not_use_is_refused(tmp_path):
    (tmp_path / "qtool.toml").write_text("[quantize]\nseq_len = 99\n")
    with pytest.raises(ConfigError, match="does not apply to qtool quantize"):
        resolve_settings({}, env={}, cwd=tmp_path, command="estimate")
    (tmp_path / "qtool.toml").write_text("[estimat]\nseq_len = 99\n")
    with pytest.raises(ConfigError, match=r"unknown table \[estimat\]"):
        resolve_settings({}, env={}, cwd=tmp_path)


def test_unknown_qtool_variable_warns_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTOOL_SEQLEN", "4096")
    monkeypatch.setenv("QTOOL_DEBUG", "0")  # known, not a setting: no warning
    assert main(["estimate", "8b", "--json"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: ignoring unknown environment variable QTOOL_SEQLEN (did you mean QTOOL_SEQ_LEN?)"]


def test_config_show_says_which_file_was_used(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["config", "show"]) == 0
    assert "settings file: none" in capsys.readouterr().out
    (tmp_path / "pyproject.toml").write_text("[tool.qtool]\nseq_len = 3\n")
    (tmp_path / "qtool.toml").write_text("seq_len = 7\n[verify]\nseq_len = 9\n")
    assert main(["config", "show"]) == 0
    assert f"settings file: {tmp_path / 'qtool.toml'} (top level)" in capsys.readouterr().out
    assert main(["config", "show", "--for", "verify", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config_file"] == str(tmp_path / "qtool.toml") and data["settings"]["seq_len"]["value"] == 9


# --- pipes, units, completion -----------------------------------------------------------------------

def test_closed_stdout_ends_quietly():
    """`qtool estimate 70b | head -0`: the reader is gone before qtool writes. No message, no traceback, and
    128 + SIGPIPE as a shell reports for other tools, not 1 (could not write)."""
    proc = subprocess.Popen([sys.executable, "-m", "qtool", "estimate", "70b"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""


def test_units_one_convention_gib_by_default(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["estimate", "8b"]) == 0
    text = capsys.readouterr().out
    assert "GiB" in text and not re.search(r"\d [KMGT]B\b", text)
    assert main(["estimate", "8b", "--units", "gb"]) == 0
    text = capsys.readouterr().out
    assert "GB" in text and "GiB" not in text
    assert main(["estimate", "8b", "--units", "parsecs"]) == 2
    assert "expected one of gib, gb" in capsys.readouterr().err


def test_shell_completion_is_offered(capsys, monkeypatch, tmp_path):
    """--install-completion and --show-completion are offered. Without a shell name typer detects the nearest
    shell in the process tree (under `make` that is sh, which it refuses), so the script is asked for by name,
    through typer's own switch for that (read when the app is built: a fresh process)."""
    import subprocess
    import sys

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["--help"]) == 0
    assert "--install-completion" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    proc = subprocess.run([sys.executable, "-m", "qtool", "--show-completion", "bash"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "_QTOOL_COMPLETE=complete_bash" in proc.stdout, proc.stderr


# --- progress --------------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _progress(tty: bool, width: int = 80):
    from qtool.cli.progress import ProgressLine
    from qtool.core.sizes import format_bytes

    stream, clock = io.StringIO(), _Clock()
    line = ProgressLine(stream, total=100 * 2**30, size=format_bytes, tty=tty, width=width, clock=clock)
    return line, stream, clock


def test_progress_in_a_log_is_a_plain_line_every_few_seconds():
    line, stream, clock = _progress(tty=False)
    gib = 2**30
    for second in range(1, 21):  # 20 s at 1 GiB/s, a callback every 0.5 s
        for half in (0.5, 1.0):
            clock.t = 100 + second - 1 + half
            line(int((second - 1 + half) * gib), 100 * gib, "model.layers.0.mlp.up_proj.weight")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # one per 5 s, not one per tensor
    assert lines[0] == "quantize 5.0 GiB / 100.0 GiB (5%), 1.0 GiB/s, ETA 0:01:35"
    clock.t += 0.1
    line(100 * gib, 100 * gib, "lm_head.weight")
    assert stream.getvalue().splitlines()[-1].startswith("quantize 100.0 GiB / 100.0 GiB (100%)")


def test_progress_shows_no_rate_before_a_second_has_passed():
    """The first tensors may be copied at memory speed: no '564.8 GB/s' from a 2 ms sample."""
    line, stream, clock = _progress(tty=True)
    clock.t += 0.002
    line(2**30, 100 * 2**30, "model.embed_tokens.weight")
    assert "/s" not in stream.getvalue() and "ETA" not in stream.getvalue()


@pytest.mark.parametrize("width", [40, 80, 120])
def test_progress_in_a_terminal_is_one_line_that_fits(width):
    line, stream, clock = _progress(tty=True, width=width)
    for i in range(1, 50):
        clock.t += 0.5
        line(i * 2**30, 100 * 2**30, "model.layers.31.block_sparse_moe.experts.7.w3.weight" * (i % 3))
    line.close()
    frames = stream.getvalue().split("\r")
    assert "\n" not in stream.getvalue()
    assert all(len(frame) <= width - 1 for frame in frames)
    assert frames[-1].strip() == ""  # cleared at the end


def test_licence_file_and_modern_pyproject_licence():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]  # PEP 639, not a table
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


# --- the fast lane ---------------------------------------------------------------------------------

SAME_BOTH_WAYS = [
    ["estimate", "70b"],
    ["estimate", "8b", "--json"],
    ["estimate", "8b", "--seq-len", "4096", "-b", "2", "--vram", "24GB", "--json"],
    ["estimate", "8b", "--seq-len=4096", "--no-gradient-checkpointing", "--quant-type", "fp4", "--json"],
    ["estimate", "--mode", "inference", "llama-3-8b", "--units", "gb", "--max-vram", "rtx-4090"],
    ["estimate", "8b", "--double-quant", "--lora-targets", "q_proj,v_proj", "--optimizer", "adamw8bit", "--json"],
    ["estimate", "8b", "--compute-dtype", "bf16", "--dtype", "float16", "--blocksize", "128", "--json"],
    ["estimate", "70b", "--vram", "24GB"],  # exit 3
    ["estimate", "8b", "--seq-len", "0"],  # the table's parser refuses it
    ["estimate", "8b", "--gpu", "rtx-9999"],
    ["estimate", "8b", "--preset", "qlora-nf4", "--revision", "main", "--trust-remote-code", "--json"],
    ["estimate", "8b", "--config", "qtool.toml", "--json"],
    ["estimate", "nope-model"],
]


@pytest.mark.parametrize("argv", SAME_BOTH_WAYS, ids=lambda a: " ".join(a[1:]))
def test_fast_lane_gives_what_typer_gives(argv, capsys, monkeypatch, tmp_path):
    """The fast lane reads these argument lists itself; Typer must produce the same output and exit code."""
    import qtool.cli.app as app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "120")
    (tmp_path / "qtool.toml").write_text("[estimate]\nseq_len = 1000\n")
    assert app.parse_estimate(argv) is not None
    fast = (main(argv), *capsys.readouterr())
    monkeypatch.setattr(app, "parse_estimate", lambda argv: None)
    slow = (main(argv), *capsys.readouterr())
    assert fast == slow


@pytest.mark.parametrize("argv", [
    ["estimate", "--help"], ["estimate"], ["estimate", "8b", "--seq-len"], ["estimate", "8b", "--seq-len", "abc"],
    ["estimate", "8b", "--vram", "-1GB"], ["estimate", "8b", "extra"], ["estimate", "8b", "--bogus"],
    ["estimate", "8b", "-b2"], ["estimate", "8b", "--json", "--json"], ["--debug", "estimate", "8b"],
    ["estimate", "8b", "--no-double-quant", "--double-quant"], ["quantize", "x"],
])
def test_fast_lane_leaves_everything_else_to_typer(argv):
    from qtool.cli.fast import parse_estimate

    assert parse_estimate(argv) is None
