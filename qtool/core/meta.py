"""Instantiate an architecture on the meta device (no memory, no weights) and build its tensor plan.

The quantize/keep rule is transformers' own (`HfQuantizer.get_modules_to_not_convert` + `should_convert_module`
+ the Linear/Conv1D test of `replace_with_bnb_linear`),
called here rather than re-implemented, so qtool and `from_pretrained(quantization_config=...)`
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

from qtool.core.errors import ConfigError, one_line
from qtool.core.plan import (
    KEEP, QUANTIZE, REASON_BIAS, REASON_CONV1D, REASON_FP32, REASON_FUSED, REASON_LINEAR,
    REASON_NOT_LINEAR, REASON_SKIPPED, REASON_USER_SKIP, ModelPlan, TensorPlan, group_tensors,
)
from qtool.core.sizes import format_bytes


def hf_config(config: dict, *, source: object = "config.json", trust_remote_code: bool = False):
    """A transformers PretrainedConfig from a config.json dict, with one-line errors."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise ConfigError("no 'model_type' in config.json", path=source)
    if "auto_map" in config and model_type not in CONFIG_MAPPING:
        if not trust_remote_code:
            raise ConfigError(
                f"model_type {model_type!r} needs remote code (auto_map in config.json)",
                path=source, hint="pass --trust-remote-code if you trust this repository",
            )
        return _remote_config(source)
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"unknown model_type {model_type!r} (not in transformers' CONFIG_MAPPING)", path=source)
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "quantization_config")}
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:  # transformers 5 validates fields with its own exception types
        raise ConfigError(f"invalid config.json: {one_line(exc)}", path=source) from exc


def _remote_config(source: object):
    """--trust-remote-code: the repository's own config class, from its Python files beside config.json."""
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(str(source))
    if path.name != "config.json" or not path.is_file():
        raise ConfigError("remote code needs the repository's files: pass a local checkpoint directory", path=source)
    try:
        return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=True)
    except Exception as exc:
        raise ConfigError(f"cannot load the repository's config code: {one_line(exc)}", path=source) from exc


def model_class(cfg):
    """The class transformers would build for this config: its `architectures[0]`, else a causal LM."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    auto_map = getattr(cfg, "auto_map", None) or {}
    if auto_map and type(cfg).__module__.startswith("transformers_modules"):  # --trust-remote-code
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        ref = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoModel")
        if ref is None:
            raise ConfigError("auto_map in config.json names no AutoModelForCausalLM or AutoModel class")
        return get_class_from_dynamic_module(ref, cfg._name_or_path)
    for arch in cfg.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        return AutoModelForCausalLM._model_mapping[type(cfg)]
    except KeyError:
        return AutoModel._model_mapping[type(cfg)]


def meta_model(config: dict, *, source: object = "config.json", trust_remote_code: bool = False):
    """The model for `config` on the meta device: shapes and module types, no storage."""
    import torch

    cfg = hf_config(config, source=source, trust_remote_code=trust_remote_code)
    cls = model_class(cfg)
    try:
        with torch.device("meta"):
            return cls._from_config(cfg)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        raise ConfigError(f"cannot build {cls.__name__} from config.json: {one_line(exc)}", path=source) from exc


def modules_to_not_convert(model, skip_modules: Sequence[str] | None) -> list[str]:
    """Exactly what Bnb4BitHfQuantizer passes to replace_with_bnb_linear."""
    from transformers.quantizers.base import HfQuantizer

    return list(HfQuantizer.get_modules_to_not_convert(
        model, list(skip_modules) if skip_modules else None, model._keep_in_fp32_modules
    ))


def build_plan(
    config: dict,
    *,
    skip_modules: Sequence[str] | None = None,
    source: object = "config.json",
    trust_remote_code: bool = False,
    model=None,
) -> ModelPlan:
    """One TensorPlan per parameter of the architecture, tied parameters counted once."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = model if model is not None else meta_model(config, source=source, trust_remote_code=trust_remote_code)
    not_convert = modules_to_not_convert(model, skip_modules)
    user_skip = list(skip_modules or [])
    fp32_modules = list(model._keep_in_fp32_modules or [])

    tensors: list[TensorPlan] = []
    fused: list[TensorPlan] = []
    seen: dict[int, str] = {}
    tied: list[tuple[str, str]] = []
    for module_name, module in model.named_modules():
        is_linear = type(module) is nn.Linear or isinstance(module, Conv1D)
        convert = is_linear and should_convert_module(module_name, not_convert)
        in_fp32 = bool(fp32_modules) and not should_convert_module(module_name, fp32_modules)
        for pname, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if id(param) in seen:
                tied.append((seen[id(param)], full))
                continue
            seen[id(param)] = full
            shape = tuple(param.shape)
            if convert and pname == "weight":
                reason = REASON_CONV1D if isinstance(module, Conv1D) else REASON_LINEAR
                tensors.append(TensorPlan(full, shape, QUANTIZE, reason))
                continue
            if is_linear and pname == "bias":
                reason = REASON_BIAS
            elif is_linear and in_fp32:
                reason = REASON_FP32
            elif is_linear and user_skip and not should_convert_module(module_name, user_skip):
                reason = REASON_USER_SKIP
            elif is_linear:
                reason = REASON_SKIPPED
            elif param.dim() == 3 and "expert" in full:
                reason = REASON_FUSED
            else:
                reason = REASON_NOT_LINEAR
            plan = TensorPlan(full, shape, KEEP, reason, keep_fp32=in_fp32)
            tensors.append(plan)
            if reason == REASON_FUSED:
                fused.append(plan)

    warnings = []
    if fused:
        n = sum(t.numel for t in fused)
        warnings.append(
            f"{len(fused)} fused MoE expert tensors ({n:,} parameters, {format_bytes(2 * n)} in 16-bit) "
            f"cannot be quantized by bitsandbytes and stay 16-bit, e.g. {fused[0].name}"
        )
    return ModelPlan(
        model_type=config.get("model_type", ""),
        architecture=type(model).__name__,
        groups=group_tensors(tensors),
        tensors=tensors,
        tied=tied,
        warnings=warnings,
    )
