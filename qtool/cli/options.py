"""Command-line options, derived from the settings table (qtool.core.config.KEYS) and declared once.

`with_settings("estimate")` adds one option per KEYS row that the command uses (name, short name, help with
the table's default, choices, --help panel) to the command's signature, and hands the command the resolved
`Settings` instead of the raw flags. Their defaults are None = 'not given', so the config layer can tell a flag
from a default (flag > env > file > preset > default).

Typer reads a command's parameters with `inspect.signature`, which honours `__signature__`: the decorated
function declares only its own parameters plus `settings`; everything else comes from the table.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from qtool.core.config import KEYS, Key, Settings, flag_name, resolve_settings
from qtool.core.errors import QtoolError

def escape(text: str) -> str:
    """Help text is rich markup: a literal '[' must be escaped or rich drops '[default: x]' as a tag."""
    return text.replace("[", "\\[")


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="Size (70b), preset (llama-3-8b), local dir or config.json, or hub id (org/name).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", metavar="FILE", show_default=False,
    help=escape("Settings file (TOML); default ./qtool.toml, else [tool.qtool] of ./pyproject.toml."))]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON report to stdout.")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", metavar="REV", show_default=False, help="Hub revision (branch, tag or commit).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", metavar="", help="Allow architectures that need code from the repository (never implied).")]


def shown_default(key: Key) -> str | None:
    """The table's default as a user writes it (None: no default to show)."""
    v = key.default
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return ",".join(v) if v else "none"
    return None if v is None else str(v)


def option_help(key: Key) -> str:
    text = key.help
    if key.choices and key.type is not int:
        text += f": {' | '.join(map(str, key.choices))}"
    if key.type is bool:
        text += f" ({flag_name('no_' + key.name)} turns it off)"
    default = shown_default(key)
    if default is not None:
        text += f"  [default: {default}]"
    return escape(text)


def _complete(choices: tuple):
    def complete(incomplete: str) -> list[str]:
        return [str(c) for c in choices if str(c).startswith(incomplete)]
    return complete


def _parameters(key: Key) -> list[inspect.Parameter]:
    """The typer parameter(s) of one row. A bool row is --x plus a hidden --no-x: two long names side by side
    do not fit an 80-column help screen."""
    names = [flag_name(key.name), *key.aliases] + ([key.short] if key.short else [])
    kw: dict[str, Any] = {"help": option_help(key), "rich_help_panel": key.panel, "show_default": False}
    if key.choices:
        kw["autocompletion"] = _complete(key.choices)
    if key.type is bool:
        pos = typer.Option(*names, metavar="", **kw)
        neg = typer.Option(flag_name("no_" + key.name), hidden=True, metavar="")
        return [inspect.Parameter(key.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                  annotation=Annotated[Optional[bool], pos]),
                inspect.Parameter("no_" + key.name, inspect.Parameter.KEYWORD_ONLY, default=False,
                                  annotation=Annotated[bool, neg])]
    metavar = key.metavar or ("N" if key.type is int else "NAME" if key.choices else "TEXT")
    opt = typer.Option(*names, metavar=metavar, **kw)
    return [inspect.Parameter(key.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[Optional[key.type], opt])]


def command_keys(command: str) -> list[Key]:
    return [k for k in KEYS if command in k.commands]


def with_settings(command: str, *, on_error=None):
    """Decorator: the command gets --config and the table's options, and receives `settings` resolved.
    `on_error(exc, kwargs)` runs when the settings cannot be resolved (verify still writes its JUnit file)."""
    keys = command_keys(command)

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "settings"]
        added = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt)]
        for key in keys:
            added += _parameters(key)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            config = kwargs.pop("config")
            flags = {}
            for key in keys:
                value = kwargs.pop(key.name)
                if key.type is bool and kwargs.pop("no_" + key.name):
                    if value:
                        raise typer.BadParameter(f"give {flag_name(key.name)} or {flag_name('no_' + key.name)}, "
                                                 "not both")
                    value = False
                flags[key.name] = value
            try:
                settings = resolve_settings(flags, config_file=config, command=command)
            except QtoolError as exc:
                if on_error is not None:
                    on_error(exc, kwargs)
                raise
            return fn(*args, settings=settings, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


__all__ = ["ConfigOpt", "JsonOpt", "ModelArg", "RevisionOpt", "Settings", "TrustRemoteCodeOpt", "with_settings"]
