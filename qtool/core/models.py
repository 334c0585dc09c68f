"""Model references: what the user typed -> a config.json dict and where it came from.

  '70b', '8B', '1.5b'         size shorthand (configs/shorthands.toml), else a dense approximation
  'llama-3-8b'                model preset (configs/models/<name>.json)
  './dir', './config.json'    local checkpoint directory or config file
  'org/name'                  hub id: only config.json is fetched (qtool.core.hub)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qtool.core import presets
from qtool.core.errors import ConfigError

_SIZE_RE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*[bB]$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_hub_id(text: str) -> bool:
    """'org/name' as the hub spells repository ids; never a path ('./x/y', '/x/y', '~/x')."""
    return not text.startswith((".", "/", "~")) and _HUB_ID_RE.match(text) is not None


@dataclass(frozen=True)
class ModelSpec:
    ref: str  # as typed
    kind: str  # "shorthand" | "preset" | "approximation" | "local" | "hub"
    name: str  # display name
    config: dict
    preset: str | None = None  # set for presets and shorthands: a cached plan may exist
    path: Path | None = None  # checkpoint directory (local, or hub snapshot)
    config_path: Path | None = None
    note: str | None = None  # e.g. why an approximation stands in


def approximate_config(n_params: float) -> dict:
    """A dense Llama-style config with about `n_params` parameters (for sizes with no preset).

    Shapes follow the Llama-3 family: hidden = 128 * round(sqrt(n / (12 * layers))...), GQA with
    8 KV heads, SwiGLU intermediate = 3.5 x hidden, vocab 128256, untied embeddings.
    """
    vocab = 128_256
    best = None
    for layers in range(8, 200, 2):
        for hidden in range(1024, 32768 + 1, 256):
            heads = hidden // 128
            kv = min(8, heads)
            inter = int(hidden * 3.5) // 256 * 256
            per_layer = hidden * hidden * 2 + 2 * hidden * kv * 128 + 3 * hidden * inter + 2 * hidden
            total = layers * per_layer + 2 * vocab * hidden + hidden
            aspect = hidden / layers  # Llama-3: 128 (8B) ... 100 (70B); keep it in that band
            if not 64 <= aspect <= 160:
                continue
            err = abs(total - n_params) / n_params
            if best is None or err < best[0]:
                best = (err, layers, hidden, heads, kv, inter)
    err, layers, hidden, heads, kv, inter = best
    if err > 0.10:
        raise ConfigError(f"no preset for {n_params / 1e9:g}b, and no dense Llama-style shape (vocab {vocab:,}) "
                          "comes within 10% of it: pass the model's config.json")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
    }


MAX_CONFIG_BYTES = 16 * 2**20  # real config.json files are a few KB
# Sizes a config.json may give, with the largest value any real model comes near (x several). Layers and
# experts bound the work of building the model on the meta device (a module each); the rest keep the
# arithmetic sane. Checked wherever they appear (top level, text_config, ...).
_SIZE_FIELDS = {
    "num_hidden_layers": 1024, "n_layer": 1024, "num_layers": 1024, "num_local_experts": 4096,
    "num_experts": 4096, "n_routed_experts": 4096, "num_experts_per_tok": 4096,
    "hidden_size": 1 << 20, "n_embd": 1 << 20, "d_model": 1 << 20, "intermediate_size": 1 << 22,
    "moe_intermediate_size": 1 << 22, "ffn_dim": 1 << 22, "n_inner": 1 << 22, "vocab_size": 1 << 24,
    "num_attention_heads": 1 << 16, "n_head": 1 << 16, "num_key_value_heads": 1 << 16, "head_dim": 1 << 16,
    "max_position_embeddings": 1 << 28, "n_positions": 1 << 28,
}
_DTYPES = {"float32", "float16", "bfloat16", "float", "half", "float64", "auto"}


def _check_fields(cfg: dict, path: Path, where: str = "") -> None:
    for key, limit in _SIZE_FIELDS.items():
        if key not in cfg or cfg[key] is None:
            continue
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"invalid config.json: {where}{key} is {v!r} ({type(v).__name__}), expected an integer",
                              path=path)
        if not 1 <= v <= limit:
            raise ConfigError(f"invalid config.json: {where}{key} {v:,} is not a real model's "
                              f"(expected 1 to {limit:,})", path=path)
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv and heads % kv:
        raise ConfigError(f"invalid config.json: {where}num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv}", path=path)
    arch = cfg.get("architectures")
    if arch is not None and (not isinstance(arch, list) or not all(isinstance(a, str) for a in arch)):
        raise ConfigError(f"invalid config.json: {where}architectures is {arch!r}, expected a list of class names",
                          path=path)
    for key in ("model_type", "torch_dtype", "dtype"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"invalid config.json: {where}{key} is {v!r}, expected a string", path=path)
        if key != "model_type" and v is not None and v not in _DTYPES:
            raise ConfigError(f"invalid config.json: {where}{key} {v!r} is not a floating-point dtype", path=path)
    for key, sub in cfg.items():
        if key.endswith("_config") and isinstance(sub, dict) and key != "quantization_config":
            _check_fields(sub, path, f"{where}{key}.")


def read_config_json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"too large for a config.json ({path.stat().st_size:,} bytes)", path=path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("invalid config.json: not UTF-8 text", path=path) from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid JSON: {exc}", path=path) from None
    except RecursionError:
        raise ConfigError("invalid config.json: nested too deeply", path=path) from None
    if not isinstance(data, dict):
        raise ConfigError("invalid config.json: expected a JSON object", path=path)
    if "model_type" not in data:
        raise ConfigError("invalid config.json: no 'model_type'", path=path)
    _check_fields(data, path)
    return data


def resolve_model(ref: str, *, revision: str | None = None) -> ModelSpec:
    """Turn a model reference into a ModelSpec. Presets and shorthands never touch torch or the network."""
    text = ref.strip()
    if not text:
        raise ConfigError("empty model reference")
    key = text.lower()

    if key in presets.model_presets():
        return ModelSpec(ref, "preset", key, presets.load_model_preset(key), preset=key,
                         config_path=presets.model_presets()[key])
    m = _SIZE_RE.match(text)
    shorthand = presets.shorthands().get(key)
    if m or shorthand:  # '70b', and shorthands that are not plain sizes ('8x7b')
        if shorthand:
            return ModelSpec(ref, "shorthand", shorthand, presets.load_model_preset(shorthand), preset=shorthand,
                             config_path=presets.model_presets()[shorthand])
        n = float(m["n"]) * 1e9
        if not 0.01e9 <= n <= 5000e9:
            raise ConfigError(f"unknown model size {ref!r}: shorthands run from 0.01b to 5000b")
        cfg = approximate_config(n)
        return ModelSpec(ref, "approximation", f"dense-{key}", cfg,
                         note=f"no preset for {key}: a dense Llama-style approximation "
                              f"({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}) stands in")

    path = Path(text).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the filesystem, say
        raise ConfigError(f"not a usable path ({exc.strerror})", path=text[:80] + ("..." if len(text) > 80 else "")) from None
    if exists or text.startswith((".", "/", "~")) or text.endswith(".json"):
        if path.is_dir():
            cfg_path = path / "config.json"
            if not cfg_path.is_file():
                raise ConfigError("no config.json in directory", path=path)
            return ModelSpec(ref, "local", path.name, read_config_json(cfg_path), path=path, config_path=cfg_path)
        if path.is_file():
            return ModelSpec(ref, "local", path.stem, read_config_json(path), path=path.parent, config_path=path)
        raise ConfigError("no such file or directory", path=path)

    if _HUB_ID_RE.match(text):
        from qtool.core import hub

        cfg_path = hub.fetch_config(text, revision=revision)
        return ModelSpec(ref, "hub", text, read_config_json(cfg_path), config_path=cfg_path)

    known = ", ".join(sorted(presets.model_presets()))
    raise ConfigError(
        f"unknown model {ref!r}: not a size (70b), a preset ({known}), an existing path or a hub id (org/name)"
    )
