"""`qtool config show`: every resolved setting and where it came from."""

from __future__ import annotations

from typing import Optional, Annotated

import typer

from qtool.cli.common import settings_from_flags
from qtool.cli.options import ConfigOpt, JsonOpt, PresetOpt
from qtool.cli.output import Output
from qtool.config import KEY_BY_NAME, env_name, flag_name

app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)

SHOW_HELP = """Print every resolved setting and where it came from (flag, env QTOOL_*, file, preset, default).

Examples:

  qtool config show

  qtool config show llama-3-8b --json

  QTOOL_SEQ_LEN=4096 qtool config show --preset qlora-nf4
"""


@app.command("show", help=SHOW_HELP)
def show(
    model: Annotated[Optional[str], typer.Argument(help="Model reference to resolve too.", show_default=False)] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    out = Output(as_json=as_json)
    settings = settings_from_flags(config, preset=preset)
    spec = None
    if model is not None:
        from qtool.models import resolve_model

        spec = resolve_model(model)
    data = {
        "settings": {
            k: {"value": list(v) if isinstance(v, tuple) else v, "source": settings.sources[k],
                "flag": flag_name(k), "env": env_name(k)}
            for k, v in settings.values.items()
        },
        "budget_bytes": settings.run.budget_bytes,
        "config_file": str(settings.config_file) if settings.config_file else None,
    }
    if spec is not None:
        data["model"] = {"ref": spec.ref, "kind": spec.kind, "name": spec.name,
                         "config_path": str(spec.config_path) if spec.config_path else None,
                         "model_type": spec.config.get("model_type"), "note": spec.note}

    def render(console):
        from rich.table import Table

        if spec is not None:
            console.print(f"model: [bold]{spec.name}[/bold] ({spec.kind}"
                          + (f", {spec.config_path}" if spec.config_path else "") + ")")
            if spec.note:
                console.print(f"  note: {spec.note}")
        table = Table(title="Resolved settings")
        table.add_column("setting")
        table.add_column("value")
        table.add_column("source")
        table.add_column("meaning", style="dim")
        for k, v in settings.values.items():
            shown = ",".join(v) if isinstance(v, tuple) else ("-" if v is None else str(v))
            table.add_row(k, shown, settings.sources[k], KEY_BY_NAME[k].help)
        console.print(table)

    out.result(data, render)
