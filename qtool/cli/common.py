"""Glue between typer options and the config layer, shared by the command files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.config import Settings, resolve_settings


def settings_from_flags(config: Path | None = None, **flags: Any) -> Settings:
    """Flags given as None were not given; lists arrive comma-separated."""
    return resolve_settings({k: v for k, v in flags.items() if v is not None}, config_file=config)
