"""The one config-resolution layer. Every subcommand gets its settings here.

Precedence, highest first:
  command-line flag > QTOOL_* environment variable > the settings file's [<command>] table > its top level
  (--config FILE, else qtool.toml in the working directory, else [tool.qtool] in pyproject.toml; one file only)
  > settings preset from configs/presets (chosen by `preset` at any of the levels above) > built-in default.

Every setting is one row of KEYS; the CLI options, env names, file keys and the settings dataclasses are derived
from it. Each resolved value remembers where it came from (`Settings.sources`), which `qtool config show` prints.
Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from qtool.core import presets
from qtool.core.errors import ConfigError
from qtool.core.sizes import parse_size
from qtool.core.values import gpus as _gpus, boolean as _bool, integer as _int, choice as _choice, items as _list, budget as _budget, gpu as _gpu

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
PARALLEL = ("pipeline", "fsdp", "ddp")
FSDP_SHARDING = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
PRECISIONS = ("bf16", "fp16", "fp32")
_PRECISION_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
UNITS = ("gib", "gb")
_UNIT_ALIASES = {"binary": "gib", "iec": "gib", "mib": "gib", "decimal": "gb", "si": "gb", "mb": "gb"}
COMMANDS = ("estimate", "quantize", "verify")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True)
class Key:
    """One setting: the only place its name, default, parser, help, choices and commands are written.

    The CLI options (qtool/cli/options.py), env names, file keys, `config show` and the settings dataclasses
    below are all derived from these rows: adding a setting is adding a row (and using it)."""

    name: str
    default: Any
    parse: Callable[[Any, str], Any]
    help: str
    commands: tuple[str, ...] = COMMANDS
    group: str | None = None  # "quant" -> a QuantSettings field, "run" -> a RunSettings field
    panel: str | None = None  # --help section
    type: type = str  # what the command line hands over (bool -> --x/--no-x)
    choices: tuple = ()  # shown in --help, offered by shell completion
    metavar: str | None = None
    short: str | None = None  # e.g. -b
    aliases: tuple[str, ...] = ()  # more flag names
    # other tools' variables for the same switch, read after QTOOL_<NAME>: (name, that tool's rule: text -> the
    # setting's value, or None where the variable says nothing about it)
    env_aliases: tuple[tuple[str, Callable[[str], Any]], ...] = ()


Q = "Quantization (BitsAndBytesConfig)"
R = "Run settings"
M = "Several GPUs"
_QV = ("estimate", "quantize", "verify")
_EV = ("estimate", "verify")


# Unsloth's own rule (unsloth/models/_block_compile.py _enabled): the block compile runs unless
# UNSLOTH_BLOCK_COMPILE is "0" or UNSLOTH_COMPILE_DISABLE is "1" or "partial"
_UNSLOTH_COMPILE_SWITCHES = (
    ("UNSLOTH_BLOCK_COMPILE", lambda v: v.strip() != "0"),
    ("UNSLOTH_COMPILE_DISABLE", lambda v: False if v.strip() in ("1", "partial") else None),
)


def _k(name, default, parse, help, **kw) -> Key:
    """A row; choices are read from a _choice parser when not given."""
    if "choices" not in kw and hasattr(parse, "choices"):
        kw["choices"] = parse.choices
    return Key(name, default, parse, help, **kw)


# The settings. Names are the file keys; env vars are QTOOL_<NAME upper>; flags --<name with dashes>.
KEYS: tuple[Key, ...] = (
    _k("preset", None, lambda v, k: str(v), "Settings preset from configs/presets", metavar="NAME"),
    # quantization, in BitsAndBytesConfig's vocabulary
    _k("quant_type", "nf4", _choice(QUANT_TYPES), "4-bit data type (bnb_4bit_quant_type)", group="quant", panel=Q,
       commands=_QV, metavar="TYPE"),
    _k("double_quant", True, _bool, "Quantize the absmax too (bnb_4bit_use_double_quant)", group="quant", panel=Q,
       commands=_QV, type=bool),
    _k("compute_dtype", "bfloat16", _choice(COMPUTE_DTYPES, _DTYPE_ALIASES), "Matmul dtype (bnb_4bit_compute_dtype)",
       group="quant", panel=Q, commands=_QV, metavar="DTYPE"),
    _k("blocksize", 64, _choice(BLOCKSIZES), "4-bit quantization block size", group="quant", panel=Q, commands=_QV, type=int),
    _k("quant_storage", "uint8", _choice(STORAGE_DTYPES, _DTYPE_ALIASES), "Dtype the 4-bit values are packed in "
       "(bnb_4bit_quant_storage)", group="quant", panel=Q, commands=_QV, metavar="DTYPE"),
    _k("skip_modules", (), _list, "Modules kept in 16-bit, comma-separated (llm_int8_skip_modules)", group="quant",
       panel=Q, commands=_QV, metavar="LIST"),
    _k("dtype", "auto", _choice(KEPT_DTYPES, _DTYPE_ALIASES), "Dtype of the tensors that are not quantized",
       group="quant", panel=Q, commands=_QV, metavar="DTYPE"),
    # run
    _k("mode", "qlora", _choice(MODES), "What runs", group="run", panel=R, commands=_EV, metavar="MODE"),
    _k("seq_len", 2048, _int(1, 10_000_000), "Tokens per sequence", group="run", panel=R, commands=_EV, type=int,
       metavar="N"),
    _k("batch_size", 1, _int(1, 1_000_000), "Sequences per step", group="run", panel=R, commands=_EV, type=int,
       metavar="N", short="-b"),
    _k("lora_rank", 16, _int(1, 65536), "LoRA rank r", group="run", panel=R, commands=_EV, type=int, metavar="N",
       short="-r"),
    _k("lora_alpha", 32, _int(1, 1_000_000), "LoRA alpha", group="run", panel=R, commands=_EV, type=int, metavar="N"),
    _k("lora_targets", ("all-linear",), _list, "LoRA target modules, comma-separated (all-linear = every quantized "
       "Linear)", group="run", panel=R, commands=_EV, metavar="LIST"),
    _k("optimizer", "adamw", _choice(OPTIMIZERS, _OPTIMIZER_ALIASES), "Optimizer of the training modes (also "
       "TrainingArguments.optim names: adamw_torch, adamw_8bit, paged_adamw_32bit, ...)", group="run", panel=R,
       commands=_EV, metavar="NAME"),
    _k("recipe", "trainer", _choice(RECIPES), "What runs the steps: transformers.Trainer, trl's SFTTrainer "
       "(qtool[trl]), qtool's loop, or Unsloth", group="run", panel=R, commands=_EV, metavar="RECIPE"),
    _k("precision", "bf16", _choice(PRECISIONS, _PRECISION_ALIASES), "The Trainer's mixed precision (its bf16/fp16 "
       "flags; fp32: none)", group="run", panel=R, commands=_EV, metavar="P"),
    _k("gradient_checkpointing", True, _bool, "Recompute activations in the backward pass", group="run", panel=R,
       commands=_EV, type=bool),
    _k("unsloth_block_compile", True, _bool, "Unsloth's per-decoder-layer torch.compile, its default from torch "
       "2.11 (UNSLOTH_BLOCK_COMPILE=0 or UNSLOTH_COMPILE_DISABLE=1 turns it off): on MoE experts a run's first "
       "step then holds every layer's activations", group="run", panel=R, commands=_EV, type=bool,
       env_aliases=_UNSLOTH_COMPILE_SWITCHES),
    _k("vram", None, _budget, "Memory budget: a size (24GB, 24GiB) or a GPU from the catalogue; exit 3 over it",
       panel=R, commands=_EV, metavar="SIZE", aliases=("--max-vram",)),
    _k("gpu", None, _gpu, "GPU from configs/gpus.toml (rtx-4090, a100-80gb, ...): its memory is the budget",
       panel=R, commands=_EV, metavar="NAME"),
    # several GPUs (one card: these change nothing)
    _k("gpus", 1, _gpus, "GPUs the run spreads over: a count, or catalogue names one per card (rtx-4090,rtx-3090); "
       "--vram/--gpu is the budget of each card", group="run", panel=M, commands=_EV, metavar="N|LIST"),
    _k("parallel", "pipeline", _choice(PARALLEL), "How the model spreads over the GPUs: pipeline (device_map="
       "\"auto\": layers split across cards), fsdp (FSDP-QLoRA: weights sharded), ddp (a full copy per card)",
       group="run", panel=M, commands=_EV, metavar="HOW"),
    _k("fsdp_sharding", "full_shard", _choice(FSDP_SHARDING), "FSDP sharding strategy (fsdp_sharding_strategy)",
       group="run", panel=M, commands=_EV, metavar="STRATEGY"),
    _k("fsdp_offload_params", False, _bool, "FSDP: keep parameters in CPU RAM between uses (fsdp_offload_params)",
       group="run", panel=M, commands=_EV, type=bool),
    _k("fsdp_ram_efficient", True, _bool, "FSDP: no card ever holds the whole model while loading "
       "(fsdp_cpu_ram_efficient_loading; verify parks each 4-bit weight in host RAM until FSDP shards it)", group="run", panel=M, commands=_EV, type=bool),
    _k("cap_memory", False, _bool, "Hold each card to its budget (--gpu/--vram, or --gpus names) with torch's "
       "set_per_process_memory_fraction: a big card behaves like the smaller one", panel=M, commands=("verify",),
       type=bool),
    _k("allow_nonfinite", False, _bool, "Quantize weights that hold NaN/inf (refused by default: they spread "
       "over their blocks)", panel=Q, commands=("quantize",), type=bool),
    _k("stream", None, _bool, "Hub id: fetch shard i+1 while shard i is quantized, delete each once read (disk: "
       "output + ~2 shards)  [default: on when the HF cache lacks the shards]", commands=("quantize",), type=bool),
    _k("keep_source", False, _bool, "With --stream, keep the fetched shards in the HF cache for later runs",
       commands=("quantize",), type=bool),
    # output
    _k("units", "gib", _choice(UNITS, _UNIT_ALIASES), "Memory shown in GiB, MiB (as nvidia-smi and torch) or in "
       "GB, MB (powers of 1000)", metavar="UNITS"),
)
KEY_BY_NAME = {k.name: k for k in KEYS}
# QTOOL_* variables that are not settings (a typo of a setting's name gets a warning)
OTHER_ENV = ("QTOOL_DEBUG", "QTOOL_CONFIGS_DIR", "QTOOL_MEMORY_HISTORY")  # the last: tools/peak_trace.py


class _Validated:
    """Base of the settings dataclasses: each field that is a KEYS row is parsed at construction, so a bad
    value fails here as a ConfigError (and an alias such as bf16 is stored as bfloat16)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in KEY_BY_NAME and KEY_BY_NAME[f.name].group is not None:
                object.__setattr__(self, f.name, KEY_BY_NAME[f.name].parse(getattr(self, f.name), f.name))

    def to_dict(self) -> dict:
        """JSON-ready values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _group_fields(group: str, *extra: tuple) -> list[tuple]:
    return [(k.name, Any, field(default=k.default)) for k in KEYS if k.group == group] + list(extra)


class _Quant(_Validated):
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


class _Run(_Validated):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget_bytes is not None and (isinstance(self.budget_bytes, bool) or not isinstance(
                self.budget_bytes, int) or self.budget_bytes < 0):
            raise ConfigError(f"invalid budget_bytes {self.budget_bytes!r}: expected a byte count")
        if self.gpu is not None:
            object.__setattr__(self, "gpu", _gpu(self.gpu, "gpu"))


# A BitsAndBytesConfig(load_in_4bit=True, ...) in plain values: the KEYS rows of group "quant".
QuantSettings = make_dataclass("QuantSettings", _group_fields("quant"), bases=(_Quant,), frozen=True)
# The run recipe of estimate/verify: the KEYS rows of group "run", plus the budget vram/gpu resolve to.
RunSettings = make_dataclass("RunSettings", _group_fields(
    "run", ("budget_bytes", Any, field(default=None)), ("gpu", Any, field(default=None))),
    bases=(_Run,), frozen=True)
QuantSettings.__module__ = RunSettings.__module__ = __name__


@dataclass(frozen=True)
class Settings:
    quant: QuantSettings
    run: RunSettings
    values: Mapping[str, Any]  # every key -> resolved value
    sources: Mapping[str, str]  # every key -> "flag --x" | "env QTOOL_X" | "file PATH" | "preset NAME" | "default"
    config_file: Path | None = None
    command: str | None = None
    warnings: tuple[str, ...] = ()  # for the user (e.g. an unknown QTOOL_* variable); the CLI prints them


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
    except RecursionError:
        raise ConfigError("invalid TOML: nested too deeply", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None


def _file_layers(data: Mapping[str, Any], path: Path | None, command: str | None) -> tuple[dict, dict]:
    """(top-level values, values of the [<command>] table). [quant] / [run] tables are part of the top level;
    a table named after a command applies to that command only and may hold only its settings."""
    top: dict[str, Any] = {}
    mine: dict[str, Any] = {}
    for raw_key, value in data.items():
        if isinstance(value, dict) and raw_key in COMMANDS:
            table = _normalise_file(value, path, where=f"[{raw_key}]")
            for key in table:
                if raw_key not in KEY_BY_NAME[key].commands:
                    raise ConfigError(f"setting {key!r} in [{raw_key}] does not apply to qtool {raw_key}", path=path)
            if raw_key == command:
                mine = table
        elif isinstance(value, dict) and raw_key in ("quant", "run"):
            top.update(_normalise_file(value, path, where=f"[{raw_key}]"))
        else:
            top.update(_normalise_file({raw_key: value}, path))
    return top, mine


def _normalise_file(data: Mapping[str, Any], path: Path | None, where: str = "") -> dict[str, Any]:
    out = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if isinstance(value, dict):
            raise ConfigError(f"unknown table [{raw_key}]{' in ' + where if where else ''}", path=path,
                              hint=f"tables: {', '.join(('quant', 'run') + COMMANDS)}")
        if key not in KEY_BY_NAME:
            raise ConfigError(f"unknown setting {raw_key!r}{' in ' + where if where else ''}", path=path,
                              hint=f"known: {', '.join(KEY_BY_NAME)}")
        out[key] = value
    return out


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """QTOOL_* variables that name no setting (typos), each as a one-line warning."""
    from difflib import get_close_matches

    known = {env_name(k.name) for k in KEYS} | set(OTHER_ENV)
    out = []
    for name in sorted(v for v in env if v.startswith("QTOOL_") and v not in known):
        guess = get_close_matches(name, sorted(known), n=1)
        out.append(f"ignoring unknown environment variable {name}" + (f" (did you mean {guess[0]}?)" if guess else ""))
    return out


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    command: str | None = None,
) -> Settings:
    """Resolve every key for `command` (None: top-level file values only). `flags` holds only the options the
    user gave (None = not given)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    for k in flags:
        if k not in KEY_BY_NAME:
            raise ConfigError(f"unknown setting {k!r}")
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    file_data, file_path = _read_project_file(config_file, cwd)
    file_top, file_command = _file_layers(file_data, file_path, command)
    env_values, env_from = {}, {}
    for k in KEYS:
        if env_name(k.name) in env:
            env_values[k.name], env_from[k.name] = env[env_name(k.name)], env_name(k.name)
            continue
        said = [(name, rule(env[name])) for name, rule in k.env_aliases if name in env]
        said = [(name, value) for name, value in said if value is not None]
        if said:  # a switch another tool reads: off when any of its variables turns it off
            name, value = next(((n, v) for n, v in said if v is False), said[0])
            env_values[k.name], env_from[k.name] = value, name

    layers: list[tuple[str, dict]] = [
        ("flag {}", flags),
        ("env {}", env_values),
        (f"file {file_path} [{command}]", file_command),
        (f"file {file_path}", file_top),
    ]
    # The preset is itself a setting; once known, its values form the layer below the file.
    preset_name = None
    for _, values in layers:
        if "preset" in values:
            preset_name = str(values["preset"])
            break
    preset_values = {}
    if preset_name:
        preset_values = _normalise_file(presets.load_settings_preset(preset_name),
                                        Path(f"configs/presets/{preset_name}.toml"))
    layers.append((f"preset {preset_name}", preset_values))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    rank: dict[str, int] = {}
    for key in KEYS:
        for i, (label, layer) in enumerate(layers):
            if key.name in layer:
                where = label.format(flag_name(key.name) if label.startswith("flag") else env_from.get(key.name))
                try:
                    values[key.name] = key.parse(layer[key.name], key.name)
                except ConfigError as exc:
                    raise ConfigError(f"{exc} (from {where})") from None
                sources[key.name], rank[key.name] = where, i
                break
        else:
            values[key.name], sources[key.name], rank[key.name] = key.default, "default", len(layers)
    budget, gpu = _budget_of(values, sources, rank)
    quant = QuantSettings(**{k.name: values[k.name] for k in KEYS if k.group == "quant"})
    run = RunSettings(**{k.name: values[k.name] for k in KEYS if k.group == "run"}, budget_bytes=budget, gpu=gpu)
    return Settings(quant=quant, run=run, values=values, sources=sources, config_file=file_path, command=command,
                    warnings=tuple(unknown_env(env)))


def _budget_of(values: Mapping[str, Any], sources: Mapping[str, str], rank: Mapping[str, int]) -> tuple:
    """(budget bytes, GPU that gives it): vram (a size or a GPU name) and gpu both set the budget; the one from
    the higher-precedence layer wins, and at the same layer they must agree."""
    vram, gpu = values["vram"], values["gpu"]
    if isinstance(vram, str) and gpu is not None and rank["vram"] == rank["gpu"] and vram != gpu:
        raise ConfigError(f"vram {vram} ({sources['vram']}) and gpu {gpu} ({sources['gpu']}) name different GPUs: "
                          "give one of them")
    if vram is not None and gpu is not None and rank["vram"] == rank["gpu"] and vram != gpu:
        raise ConfigError(f"both vram ({sources['vram']}) and gpu ({sources['gpu']}) give the budget: set one")
    if gpu is not None and (vram is None or rank["gpu"] < rank["vram"]):
        vram = gpu
    if isinstance(vram, str):
        return parse_size(presets.find_gpu(vram)["vram"]), vram
    return vram, None
