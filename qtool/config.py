"""The one config-resolution layer. Every subcommand gets its settings here.

Precedence, highest first:
  command-line flag > QTOOL_* environment variable > project file (--config FILE, else
  qtool.toml in the working directory, else [tool.qtool] in pyproject.toml) > settings preset
  from configs/presets (chosen by `preset` at any of the levels above) > built-in default.

Each resolved value remembers where it came from (`Settings.sources`), which `qtool config show` prints.
Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qtool import presets
from qtool.errors import ConfigError
from qtool.sizes import parse_size

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
STORAGE_DTYPES = ("uint8", "int8", "bfloat16", "float16", "float32")
KEPT_DTYPES = ("auto", "bfloat16", "float16", "float32")
MODES = ("inference", "qlora", "lora", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw32bit", "adafactor", "sgd")
# the names users type in transformers' TrainingArguments.optim, accepted as well
_OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_8bit": "adamw8bit",
                      "adamw_bnb_8bit": "adamw8bit", "paged_adamw_8bit": "paged_adamw8bit",
                      "paged_adamw_32bit": "paged_adamw32bit"}
RECIPES = ("trainer", "sft", "loop", "unsloth")
PRECISIONS = ("bf16", "fp16", "fp32")
_PRECISION_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid {key} {v!r}: expected true or false")


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    def parse(v: Any, key: str) -> int:
        if isinstance(v, bool):
            raise ConfigError(f"invalid {key} {v!r}: expected an integer")
        try:
            n = int(str(v).strip()) if not isinstance(v, int) else v
        except ValueError:
            raise ConfigError(f"invalid {key} {v!r}: expected an integer") from None
        if not lo <= n <= hi:
            raise ConfigError(f"invalid {key} {n}: must be between {lo} and {hi}")
        return n
    return parse


def _choice(choices: tuple, aliases: Mapping[str, str] | None = None) -> Callable[[Any, str], Any]:
    def parse(v: Any, key: str):
        s = str(v).strip().lower()
        s = (aliases or {}).get(s, s)
        if isinstance(choices[0], int):
            try:
                s = int(s)
            except ValueError:
                pass
        if s not in choices:
            raise ConfigError(f"invalid {key} {v!r}: expected one of {', '.join(map(str, choices))}")
        return s
    return parse


def _list(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, (list, tuple)):
        items = [str(x).strip() for x in v]
    else:
        items = [x.strip() for x in str(v).split(",")]
    return tuple(x for x in items if x)


def _size(v: Any, key: str) -> int | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "")):
        if isinstance(v, str) and v.strip() == "":
            raise ConfigError(f"invalid {key} '': expected a size such as 24GB")
        return None
    n = parse_size(v, what=key)
    if n < 2**20:  # '--vram 24' is 24 bytes: surely 24GB was meant
        raise ConfigError(f"invalid {key} {v!r}: {n} bytes is not a memory budget (give a unit: 24GB, 24GiB)")
    return n


def _gpu(v: Any, key: str) -> str:
    gpu = presets.find_gpu(str(v))
    if gpu is None:
        known = sorted({g["key"] for g in presets.gpus().values()})
        raise ConfigError(f"unknown GPU {v!r} (known: {', '.join(known)})")
    return gpu["key"]


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    parse: Callable[[Any, str], Any]
    help: str


# The settings every subcommand shares. Names are the file keys; env vars are QTOOL_<NAME upper>.
KEYS: tuple[Key, ...] = (
    Key("preset", None, lambda v, k: str(v), "settings preset from configs/presets"),
    # quantization, in BitsAndBytesConfig's vocabulary
    Key("quant_type", "nf4", _choice(QUANT_TYPES), "bnb_4bit_quant_type"),
    Key("double_quant", True, _bool, "bnb_4bit_use_double_quant"),
    Key("compute_dtype", "bfloat16", _choice(COMPUTE_DTYPES, _DTYPE_ALIASES), "bnb_4bit_compute_dtype"),
    Key("blocksize", 64, _choice(BLOCKSIZES), "4-bit quantization block size (bitsandbytes' default 64)"),
    Key("quant_storage", "uint8", _choice(STORAGE_DTYPES, _DTYPE_ALIASES), "bnb_4bit_quant_storage"),
    Key("skip_modules", (), _list, "llm_int8_skip_modules: modules kept in 16-bit"),
    Key("dtype", "auto", _choice(KEPT_DTYPES, _DTYPE_ALIASES), "dtype of tensors that are not quantized"),
    # run
    Key("mode", "qlora", _choice(MODES), "inference | qlora | lora | full"),
    Key("seq_len", 2048, _int(1, 10_000_000), "tokens per sequence"),
    Key("batch_size", 1, _int(1, 1_000_000), "sequences per step"),
    Key("lora_rank", 16, _int(1, 65536), "LoRA rank r"),
    Key("lora_alpha", 32, _int(1, 1_000_000), "LoRA alpha"),
    Key("lora_targets", ("all-linear",), _list, "LoRA target modules ('all-linear' = every quantized Linear)"),
    Key("optimizer", "adamw", _choice(OPTIMIZERS, _OPTIMIZER_ALIASES),
        "adamw | adamw8bit | paged_adamw8bit | paged_adamw32bit | adafactor | sgd (or TrainingArguments.optim names)"),
    Key("recipe", "trainer", _choice(RECIPES), "what runs the steps: trainer (transformers.Trainer) | sft (trl SFTTrainer) | loop | unsloth"),
    Key("precision", "bf16", _choice(PRECISIONS, _PRECISION_ALIASES), "Trainer mixed precision: bf16 | fp16 | fp32"),
    Key("gradient_checkpointing", True, _bool, "recompute activations in backward"),
    Key("vram", None, _size, "memory budget, e.g. 24GB or 24 GiB"),
    Key("gpu", None, _gpu, "GPU name from configs/gpus.toml; its memory is the budget"),
)
KEY_BY_NAME = {k.name: k for k in KEYS}


@dataclass(frozen=True)
class QuantSettings:
    """A BitsAndBytesConfig(load_in_4bit=True, ...) in plain values."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    blocksize: int = 64
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] = ()
    dtype: str = "auto"

    def to_dict(self) -> dict:
        return _plain(self)

    def bnb_config(self):
        """The transformers BitsAndBytesConfig for these settings (imports torch/transformers)."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
            llm_int8_skip_modules=list(self.skip_modules) or None,
        )


@dataclass(frozen=True)
class RunSettings:
    mode: str = "qlora"
    seq_len: int = 2048
    batch_size: int = 1
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("all-linear",)
    optimizer: str = "adamw"
    recipe: str = "trainer"
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    budget_bytes: int | None = None
    gpu: str | None = None

    def to_dict(self) -> dict:
        return _plain(self)


@dataclass(frozen=True)
class Settings:
    quant: QuantSettings
    run: RunSettings
    values: Mapping[str, Any]  # every key -> resolved value
    sources: Mapping[str, str]  # every key -> "flag --x" | "env QTOOL_X" | "file PATH" | "preset NAME" | "default"
    config_file: Path | None = None


def _plain(obj) -> dict:
    """A settings dataclass as JSON-ready values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(obj).items()}


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def env_name(key: str) -> str:
    return "QTOOL_" + key.upper()


def _read_project_file(config_file: Path | None, cwd: Path) -> tuple[dict, Path | None]:
    """--config FILE, else ./qtool.toml, else [tool.qtool] of ./pyproject.toml."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("config file not found", path=path)
        data = _load_toml(path)
        if path.name == "pyproject.toml":
            section = _tool_section(data, path)
            if section is None:
                raise ConfigError("no [tool.qtool] section", path=path)
            return section, path
        return data, path
    if (cwd / "qtool.toml").is_file():
        return _load_toml(cwd / "qtool.toml"), cwd / "qtool.toml"
    if (cwd / "pyproject.toml").is_file():
        section = _tool_section(_load_toml(cwd / "pyproject.toml"), cwd / "pyproject.toml")
        if section is not None:
            return section, cwd / "pyproject.toml"
    return {}, None


def _tool_section(data: dict, path: Path) -> dict | None:
    """[tool.qtool] of a pyproject.toml, or None when there is none."""
    tool = data.get("tool")
    if tool is None:
        return None
    if not isinstance(tool, dict) or not isinstance(tool.get("qtool", {}), dict):
        raise ConfigError("[tool] / [tool.qtool] must be tables", path=path)
    return tool.get("qtool")


def _load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None


def _normalise_file(data: Mapping[str, Any], path: Path | None) -> dict[str, Any]:
    out = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if isinstance(value, dict):  # allow [quant] / [run] tables
            out.update(_normalise_file(value, path))
            continue
        if key not in KEY_BY_NAME:
            raise ConfigError(f"unknown setting {raw_key!r}", path=path,
                              hint=f"known: {', '.join(KEY_BY_NAME)}")
        out[key] = value
    return out


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve every key. `flags` holds only the options the user gave (None = not given)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    for k in flags:
        if k not in KEY_BY_NAME:
            raise ConfigError(f"unknown setting {k!r}")
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    file_data, file_path = _read_project_file(config_file, cwd)
    file_values = _normalise_file(file_data, file_path)
    env_values = {k.name: env[env_name(k.name)] for k in KEYS if env_name(k.name) in env}

    layers: list[tuple[str, dict]] = [
        (f"flag {{}}", flags),
        (f"env {{}}", env_values),
        (f"file {file_path}", file_values),
    ]
    # The preset is itself a setting; once known, its values form the layer below the file.
    preset_name = None
    for _, values in layers:
        if "preset" in values:
            preset_name = str(values["preset"])
            break
    preset_values = {}
    if preset_name:
        preset_values = _normalise_file(presets.load_settings_preset(preset_name), Path(f"configs/presets/{preset_name}.toml"))
    layers.append((f"preset {preset_name}", preset_values))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        for label, layer in layers:
            if key.name in layer:
                raw = layer[key.name]
                where = label.format(flag_name(key.name) if label.startswith("flag") else env_name(key.name))
                try:
                    values[key.name] = key.parse(raw, key.name)
                except ConfigError as exc:
                    raise ConfigError(f"{exc} (from {where})") from None
                sources[key.name] = where
                break
        else:
            values[key.name] = key.default
            sources[key.name] = "default"

    # --vram and --gpu both set the budget: the one from the higher-precedence layer wins
    rank = {label.split(" ")[0]: i for i, (label, _) in enumerate(layers)} | {"default": len(layers)}
    vram_rank, gpu_rank = rank[sources["vram"].split(" ")[0]], rank[sources["gpu"].split(" ")[0]]
    if values["vram"] is not None and values["gpu"] is not None and vram_rank == gpu_rank:
        raise ConfigError(f"both vram ({sources['vram']}) and gpu ({sources['gpu']}) give the budget: set one")
    if values["gpu"] is not None and (values["vram"] is None or gpu_rank < vram_rank):
        budget = parse_size(presets.find_gpu(values["gpu"])["vram"])
    else:
        budget = values["vram"]
    quant = QuantSettings(**{k: values[k] for k in QuantSettings.__dataclass_fields__})
    run = RunSettings(
        **{k: values[k] for k in RunSettings.__dataclass_fields__ if k in values and k != "gpu"},
        budget_bytes=budget, gpu=values["gpu"],
    )
    return Settings(quant=quant, run=run, values=values, sources=sources, config_file=file_path)
