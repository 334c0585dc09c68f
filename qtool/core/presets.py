"""The catalogues in configs/: model presets, size shorthands, GPUs, settings presets. Pure Python."""

from __future__ import annotations

import json
import os
import re
import tomllib
from functools import lru_cache
from pathlib import Path

from qtool.core.errors import ConfigError


def configs_dir() -> Path:
    """configs/ beside the package (repo checkout), or the copy installed inside it."""
    env = os.environ.get("QTOOL_CONFIGS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here.parent.parent / "configs"):
        if (cand / "models").is_dir():
            return cand
    raise ConfigError("configs/ directory not found (set QTOOL_CONFIGS_DIR)")


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


@lru_cache(maxsize=None)
def model_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted((configs_dir() / "models").glob("*.json"))}


def load_model_preset(name: str) -> dict:
    return json.loads(model_presets()[name].read_text())


@lru_cache(maxsize=None)
def _toml(name: str) -> dict:
    with open(configs_dir() / name, "rb") as f:
        return tomllib.load(f)


def shorthands() -> dict[str, str]:
    """'70b' -> 'llama-3-70b' (keys lower-case)."""
    return {k.lower(): v for k, v in _toml("shorthands.toml")["shorthand"].items()}


def gpus() -> dict[str, dict]:
    """Normalised GPU name -> {'name': display name, 'vram': size string, 'kind': consumer|datacenter}."""
    out = {}
    for key, entry in _toml("gpus.toml")["gpu"].items():
        out[_norm(key)] = {"key": key, **entry}
        for alias in entry.get("aliases", []):
            out[_norm(alias)] = {"key": key, **entry}
    return out


def find_gpu(name: str) -> dict | None:
    return gpus().get(_norm(name))


def settings_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted((configs_dir() / "presets").glob("*.toml"))}


def load_settings_preset(name: str) -> dict:
    presets = settings_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(presets)})")
    with open(presets[name], "rb") as f:
        data = tomllib.load(f)
    data.pop("description", None)
    return data


def preset_for_hub_id(repo_id: str) -> str | None:
    """The model preset a hub id most likely is: 'mistralai/Mistral-7B-v0.1' -> 'mistral-7b',
    'meta-llama/Meta-Llama-3-8B-Instruct' -> 'llama-3-8b' (the longest preset name inside the repo name)."""
    name = _norm(repo_id.rsplit("/", 1)[-1])
    found = []
    for preset in model_presets():
        m = re.search(rf"(^|-){re.escape(preset)}($|-)", name)
        # gpt2-xl is not gpt2: a size word after the match means another model
        if m and not set(name[m.end():].split("-")) & {"xs", "xl", "xxl", "small", "medium", "large"}:
            found.append(preset)
    return max(found, key=len) if found else None
