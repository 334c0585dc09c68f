"""`qtool config show`: every resolved setting, where it came from, and which file was read."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qtool.cli.options import ConfigOpt, JsonOpt, escape
from qtool.cli.output import Output
from qtool.core.config import COMMANDS, KEY_BY_NAME, env_name, flag_name, resolve_settings

app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)

SHOW_HELP = """Print every resolved setting and where it came from (flag, env QTOOL_*, file, preset,
default), and which settings file was read.

Examples:

  qtool config show
  qtool config show llama-3-8b --json
  qtool config show --for verify          # with the file's [verify] table
  QTOOL_SEQ_LEN=4096 qtool config show --preset qlora-nf4
"""

PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", metavar="NAME", show_default=False, help="Settings preset from configs/presets.")]
ForOpt = Annotated[Optional[str], typer.Option(
    "--for", metavar="COMMAND", show_default=False,
    help=escape(f"Resolve as this command would, with its table of the settings file: {' | '.join(COMMANDS)}"))]


def show(
    model: Annotated[Optional[str], typer.Argument(
        metavar="[MODEL]", help="Model reference to resolve too.", show_default=False)] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    command: ForOpt = None,
    as_json: JsonOpt = False,
) -> None:
    if command is not None and command not in COMMANDS:
        raise typer.BadParameter(f"expected one of {', '.join(COMMANDS)}", param_hint="--for")
    settings = resolve_settings({"preset": preset}, config_file=config, command=command)
    out = Output(as_json=as_json, units=settings.values["units"])
    for line in settings.warnings:
        out.warn(line)
    spec = None
    if model is not None:
        from qtool.core.models import resolve_model

        spec = resolve_model(model)
    data = {
        "settings": {
            k: {"value": list(v) if isinstance(v, tuple) else v, "source": settings.sources[k],
                "flag": flag_name(k), "env": env_name(k)}
            for k, v in settings.values.items()
        },
        "budget_bytes": settings.run.budget_bytes,
        "config_file": str(settings.config_file) if settings.config_file else None,
        "command": command,
    }
    if spec is not None:
        data["model"] = {"ref": spec.ref, "kind": spec.kind, "name": spec.name,
                         "config_path": str(spec.config_path) if spec.config_path else None,
                         "model_type": spec.config.get("model_type"), "note": spec.note}

    def render(console):
        from rich.markup import escape as esc
        from rich.table import Table

        if settings.config_file is not None:
            table_note = f" (top level and its [{command}] table)" if command else " (top level)"
            console.print(f"settings file: {esc(str(settings.config_file))}{esc(table_note)}")
        else:
            console.print(esc("settings file: none (no --config, no ./qtool.toml, no [tool.qtool] in ./pyproject.toml)"))
        if spec is not None:
            console.print(f"model: [bold]{esc(spec.name)}[/bold] ({spec.kind}"
                          + (f", {esc(str(spec.config_path))}" if spec.config_path else "") + ")")
            if spec.note:
                console.print(f"  note: {esc(spec.note)}")
        table = Table(title="Resolved settings")
        table.add_column("setting")
        table.add_column("value")
        table.add_column("source")
        table.add_column("meaning", style="dim")
        for k, v in settings.values.items():
            shown = ",".join(v) if isinstance(v, tuple) else ("-" if v is None else str(v))
            table.add_row(k, esc(shown), esc(settings.sources[k]), esc(KEY_BY_NAME[k].help))
        console.print(table)

    out.result(data, render)
