"""The fast lane for the commonest call, `qtool estimate MODEL [setting flags] [--json]`.

Typer builds a pydantic validator for every parameter of a command on each run, even for options that were not
given: importing pydantic and building ~25 validators is most of the start-up time of `qtool estimate 70b`
(about 120 ms of 260 ms here). An argument list made only of the model and the settings table's own flags
(`--seq-len 4096`, `-b 2`, `--no-gradient-checkpointing`, `--vram=24GB`) needs none of that: it is read here,
from the same table (qtool.core.config.KEYS), and the command runs with the same resolved settings.

estimate's own --json, --revision, --config and --trust-remote-code are read too. Anything else (--help, an
unknown or malformed option, a value that looks like an option, shell completion) returns None and goes through
Typer as usual, with Typer's own messages. tests/cli/test_cli.py runs
the same argument lists both ways and compares the results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qtool.core.config import KEYS, flag_name

# estimate's own options (qtool.cli.options), read here too: name -> (parameter, True for a flag)
_OWN = {"--json": ("as_json", True), "--trust-remote-code": ("trust_remote_code", True),
        "--revision": ("revision", False), "--config": ("config", False)}


def setting_flags(command: str) -> dict[str, tuple[str, bool]]:
    """The settings table's flags for `command`: flag -> (setting name, the value of a bool flag, or None for a
    flag that takes a value)."""
    out: dict[str, Any] = {}
    for key in KEYS:
        if command not in key.commands:
            continue
        names = [flag_name(key.name), *key.aliases] + ([key.short] if key.short else [])
        if key.type is bool:
            out.update({name: (key.name, True) for name in names})
            out[flag_name("no_" + key.name)] = (key.name, False)
        else:
            for name in names:
                out[name] = (key.name, None)
    return out


def parse_estimate(argv: Sequence[str]) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """(model, given settings, estimate's own options) for `estimate MODEL ...`, or None to let Typer parse."""
    if len(argv) < 2 or argv[0] != "estimate" or "_QTOOL_COMPLETE" in os.environ:
        return None
    known = {**setting_flags("estimate"), **{flag: (None, None) for flag in _OWN}}
    model, flags, own = None, {}, {}
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name not in known:
            if arg.startswith("-") or model is not None:
                return None  # --help, -b2, an unknown option, a second argument ...: Typer's job
            model = arg
            i += 1
            continue
        key, flag_value = known[name]
        param, is_flag = _OWN.get(name, (None, flag_value is not None))
        target, dest = (own, param) if param else (flags, key)
        if dest in target or (is_flag and eq):
            return None  # given twice, or --json=1: Typer's rules
        if is_flag:
            target[dest] = True if param else flag_value
        else:
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                return None  # a missing value: Typer says so
            if value.startswith("-") or (key and not _plain(key, value)):
                return None
            target[dest] = value
        i += 1
    return (model, flags, own) if model else None


def _plain(key: str, value: str) -> bool:
    """A value Typer would pass on unchanged: int options must be integers (Typer reports the others)."""
    from qtool.core.config import KEY_BY_NAME

    return KEY_BY_NAME[key].type is not int or value.strip().lstrip("+").isdigit()


def run_estimate(model: str, flags: dict[str, Any], own: dict[str, Any]) -> None:
    """What the Typer command does with the same input: resolve the settings, run the command."""
    from pathlib import Path

    from qtool.cli import estimate
    from qtool.core.config import resolve_settings

    config = own.pop("config", None)
    settings = resolve_settings(flags, config_file=Path(config) if config is not None else None, command="estimate")
    estimate.run(model, settings, **own)
