"""Step 2: the plan. Everything the run will do, decided before a byte is written.

Open the checkpoint (headers only), build the architecture on the meta device with the dtype transformers
would load it in, take the shared per-parameter plan (`qtool.core.meta.build_plan`), map every checkpoint
tensor to a model parameter with transformers' own key renaming/conversion rules, and fail on anything
missing, unexpected or mis-shaped. The result lists every output tensor in the order `save_pretrained`
would write it; `--dry-run` prints it and the real run executes the same object.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from qtool.core.config import QuantSettings
from qtool.core.dtypes import is_float_dtype
from qtool.core.errors import ConfigError, WeightsError, one_line
from qtool.core.plan import KEEP, QUANTIZE, REASON_CONV1D, REASON_FUSED
from qtool.core.sizes import format_bytes

DEFAULT_MAX_SHARD_SIZE = 50 * 10**9  # save_pretrained's default "50GB"
# Buffers some checkpoints carry that current transformers recomputes and drops on load (unexpected keys).
_DROPPABLE_BUFFERS = re.compile(r"(\.rotary_emb\.inv_freq|\.inv_freq|\.attn\.bias|\.attn\.masked_bias|\.position_ids)$")



@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the model as it will be written (a quantized one expands to several files entries)."""

    name: str  # output name (the checkpoint's own name, as save_pretrained writes it back)
    source: str  # checkpoint tensor it comes from
    action: str  # QUANTIZE | KEEP
    reason: str
    dtype: str  # torch dtype the tensor is cast to before quantizing/keeping, e.g. "bfloat16"
    shape: tuple[int, ...]  # shape in the checkpoint
    source_dtype: str  # safetensors dtype in the checkpoint
    source_bytes: int
    out_bytes: int  # exact for kept tensors; for quantized ones the JSON blob length is estimated
    transpose: bool = False  # Conv1D weights are stored (in, out); bitsandbytes quantizes (out, in)


@dataclass
class QuantizePlan:
    source: Path
    source_name: str
    revision: str | None
    config: dict
    settings: QuantSettings
    architecture: str
    model_dtype: str  # the dtype transformers loads this checkpoint in (config dtype, or --dtype)
    tensors: list[OutputTensor]  # every output tensor, in save_pretrained's state-dict order
    slots: list[tuple[str, int, str]]  # (output name, index into tensors, part suffix) in write order
    dropped: list[tuple[str, str]]  # (checkpoint name, why) tensors transformers drops on load
    warnings: list[str] = field(default_factory=list)
    total_parameters: int = 0  # what save_pretrained puts in the index metadata
    header_bytes: int = 0  # safetensors header estimate (one shard)
    timings: dict = field(default_factory=dict)  # seconds: process start -> planning, imports, planning
    known_architecture: bool = False  # planned by qtool.quantize.archplan, without transformers

    @property
    def input_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        """Estimated bytes of the output shards (the quant-state JSON blobs vary by a few bytes)."""
        return sum(t.out_bytes for t in self.tensors) + self.header_bytes

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.source_bytes for t in self.tensors), default=0)

    def peak_host_bytes(self, device: str) -> int:
        """Rough bound on the extra host memory the stream needs: a few copies of the largest tensor.

        The read-ahead arena (qtool.quantize.streamio: two of the largest tensors on CUDA, pinned; one on CPU) plus,
        on CPU, the cast + transposed/contiguous copy + packed output; on CUDA the work copies live on the
        GPU. The process baseline (Python + torch, ~0.5 GB) comes on top.
        """
        big = max((max(t.source_bytes, t.out_bytes) for t in self.tensors), default=0)
        return (2 if device == "cuda" else 3) * big

    def counts(self) -> dict:
        q = [t for t in self.tensors if t.action == QUANTIZE]
        k = [t for t in self.tensors if t.action == KEEP]
        reasons: dict[str, dict] = {}
        for t in k:
            r = reasons.setdefault(t.reason, {"tensors": 0, "bytes": 0})
            r["tensors"] += 1
            r["bytes"] += t.out_bytes
        return {"quantized": len(q), "kept": len(k), "dropped": len(self.dropped), "kept_by_reason": reasons}

    def to_dict(self, device: str = "cpu") -> dict:
        return {
            "source": str(self.source),
            "revision": self.revision,
            "architecture": self.architecture,
            "dtype": self.model_dtype,
            "settings": self.settings.to_dict(),
            "tensors": self.counts(),
            "parameters": self.total_parameters,
            "input_bytes": self.input_bytes,
            "output_bytes_estimate": self.output_bytes,
            "peak_host_bytes_estimate": self.peak_host_bytes(device),
            "dropped": [{"name": n, "why": w} for n, w in self.dropped],
            "warnings": list(self.warnings),
        }



def _load_dtype(config: dict, ckpt, hf_cfg, setting: str):
    """The dtype from_pretrained(dtype="auto") loads in: config dtype, else the first float tensor's."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    dt = getattr(hf_cfg, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    if isinstance(dt, torch.dtype):
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            raise ConfigError(f"config.json dtype {str(dt).removeprefix('torch.')} cannot be loaded in 4-bit "
                              "(bitsandbytes takes float16, bfloat16 or float32)", path=ckpt.root / "config.json",
                              hint="pass --dtype bfloat16, float16 or float32")
        return dt
    from qtool.core.dtypes import is_float_dtype, torch_dtype

    first = sorted((n, t) for n, t in ckpt.tensors.items() if t.file == ckpt.files[0])
    for _, t in first:
        if is_float_dtype(t.dtype):
            return torch_dtype(t.dtype)
    return torch.float32


def _meta_model(hf_cfg, dtype, source):
    import torch

    from qtool.core.meta import model_class

    cls = model_class(hf_cfg)
    try:
        with torch.device("meta"):
            return cls._from_config(hf_cfg, dtype=dtype)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        raise ConfigError(f"cannot build {cls.__name__} from config.json: {one_line(exc)}", path=source) from exc


def plan_quantization(
    source: Path,
    settings: QuantSettings,
    *,
    source_name: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    ckpt=None,
    known_architectures: bool = True,
) -> QuantizePlan:
    """Everything the run will do, decided before any byte is written. Raises on any mismatch.
    `known_architectures=False` always goes through transformers (the tests compare both ways)."""
    from qtool.quantize.streamio import process_age

    from qtool.core.checkpoint import Checkpoint

    timings = {"startup": process_age()}  # interpreter start, CLI, up to planning
    t0 = time.perf_counter()
    source = Path(source)
    ckpt = ckpt or Checkpoint.open(source, allow_pickle=allow_pickle)
    config = ckpt.config or {}
    method = ckpt.prequantized_method()
    if method:
        raise WeightsError(f"checkpoint is already quantized ({method}); quantize the original FP16/BF16/FP32 model",
                           path=source)
    from qtool.quantize.archplan import arch_plan

    known = known_architectures and arch_plan(config, ckpt, dtype_setting=settings.dtype,
                                              skip_modules=settings.skip_modules, trust_remote_code=trust_remote_code)
    if known:  # a known architecture: no transformers (qtool.quantize.archplan)
        mapping = _Mapping(known.meta_sd, known.target_sources, set(), known.dropped, conversions=[])
        plan = _assemble(source, source_name, revision, config, settings, ckpt, known.model_plan, mapping,
                         known.architecture, known.dtype, lambda key, meta_t, quantize: known.dtype,
                         natural_order=known.natural_order)
        plan.timings = {**timings, "plan": time.perf_counter() - t0}
        plan.known_architecture = True
        return plan
    t1 = time.perf_counter()
    import transformers.core_model_loading  # noqa: F401

    from qtool.core.meta import build_plan, hf_config

    timings["imports"] = time.perf_counter() - t1  # transformers, when not yet imported
    cfg_path = source / "config.json"
    hf_cfg = hf_config(config, source=cfg_path, trust_remote_code=trust_remote_code)
    dtype = _load_dtype(config, ckpt, hf_cfg, settings.dtype)
    model = _meta_model(hf_cfg, dtype, cfg_path)
    model_plan = build_plan(config, skip_modules=settings.skip_modules, source=cfg_path, model=model)
    mapping = _map_checkpoint(ckpt, model, model_plan, source)
    plan = _assemble(source, source_name, revision, config, settings, ckpt, model_plan, mapping,
                     type(model).__name__, dtype, _dtype_rule(model, dtype), natural_order=bool(mapping.conversions))
    plan.timings = {**timings, "plan": time.perf_counter() - t0 - timings["imports"]}
    return plan


def _assemble(source: Path, source_name, revision, config: dict, settings: QuantSettings, ckpt, model_plan,
              mapping: "_Mapping", architecture: str, dtype, cast_dtype, *, natural_order: bool) -> QuantizePlan:
    """The output tensors and their write order from the model plan and the checkpoint mapping.
    `natural_order`: the model has weight conversions, which save_pretrained reverts over a state dict
    sorted by dot_natural_key."""
    from qtool.core.dtypes import name_of
    from qtool.quantize.archplan import dot_natural_key

    out = _output_tensors(ckpt, model_plan, mapping, settings, cast_dtype, source)
    header_bytes = _header_bytes(out.tensors, out.slots, settings)
    if natural_order:
        out.slots.sort(key=lambda s: dot_natural_key(s[0]))
    return QuantizePlan(
        source=source, source_name=source_name or source.resolve().name, revision=revision, config=config,
        settings=settings, architecture=architecture, model_dtype=name_of(dtype),
        tensors=out.tensors, slots=out.slots, dropped=mapping.dropped, warnings=_plan_warnings(model_plan, out),
        total_parameters=out.total_parameters, header_bytes=header_bytes,
    )


def _dtype_rule(model, dtype):
    """transformers' dtype rules (core_model_loading.convert_and_load_state_dict_in_model): the dtype each
    state-dict key is loaded in."""
    from transformers.core_model_loading import build_glob_alternation

    dtype_plan = model._get_dtype_plan(dtype)
    if dtype_plan:
        dt_alt, dt_group, _ = build_glob_alternation(list(dtype_plan.keys()))

    def cast_dtype(key: str, meta_t, quantize: bool):
        if dtype_plan:
            m = dt_alt.search(key)
            if m is not None:
                return dtype_plan[dt_group[m.lastgroup]]
        if meta_t is not None and meta_t.dtype != dtype and not quantize:
            return meta_t.dtype
        return dtype

    return cast_dtype


@dataclass
class _Mapping:
    """Checkpoint tensors -> model keys, with transformers' own renaming and conversion rules."""

    meta_sd: dict
    target_sources: dict[str, list[str]]  # model key -> checkpoint tensors that fill it
    converted: set[str]  # model keys produced by a weight conversion (renamed or assembled)
    dropped: list[tuple[str, str]]  # (checkpoint tensor, why it is not written)
    conversions: list


def _map_checkpoint(ckpt, model, model_plan, source: Path) -> _Mapping:
    """Every checkpoint tensor -> a model key (or dropped, or an error); every model key covered (tied aliases
    may be absent, and are dropped when present)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    conversions = get_model_conversion_mapping(model, None, None)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_sd = model.state_dict()
    prefix = model.base_model_prefix
    target_sources: dict[str, list[str]] = {}
    converted: set[str] = set()
    dropped: list[tuple[str, str]] = []
    unexpected: list[str] = []
    ignore_unexpected = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    for key in sorted(ckpt.tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_sd)
        if renamed in meta_sd:
            target_sources.setdefault(renamed, []).append(key)
            if pattern is not None and pattern != key:
                converted.add(renamed)
        elif any(p.search(key) for p in ignore_unexpected) or _DROPPABLE_BUFFERS.search(key):
            dropped.append((key, "buffer transformers recomputes on load (not saved)"))
        else:
            unexpected.append(key)
    _refuse_listed(unexpected, f"tensors do not belong to {type(model).__name__}", source)
    aliases = {alias: kept for kept, alias in model_plan.tied}
    missing = [key for key in meta_sd if key not in target_sources and key not in aliases]
    _refuse_listed(missing, f"tensors of {type(model).__name__} are missing from the checkpoint", source)
    for alias in aliases:
        for key in target_sources.pop(alias, []):
            dropped.append((key, f"tied to {aliases[alias]} (saved once)"))
    return _Mapping(meta_sd, target_sources, converted, dropped, conversions)


def _refuse_listed(names: list[str], what: str, source: Path) -> None:
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise WeightsError(f"{len(names)} {what}: {', '.join(names[:3])}{more}", path=source)


@dataclass
class _Outputs:
    tensors: list[OutputTensor]
    slots: list[tuple[str, int, str]]  # (output name, tensor index, part suffix) in state-dict order
    fused_kept: list[OutputTensor]
    total_parameters: int


def _check_sources(key: str, meta_t, srcs: list[str], ckpt, mapping: _Mapping, quantize: bool, source: Path) -> None:
    """The checkpoint tensors for one model key hold what the config expects, in a dtype that can be quantized."""
    if key in mapping.converted or len(srcs) > 1:
        if quantize:
            raise WeightsError(f"{key} is assembled from {len(srcs)} checkpoint tensors by a weight conversion; "
                               "qtool cannot stream-quantize it", path=source)
        numel = sum(ckpt.tensors[s].numel for s in srcs)
        if numel != meta_t.numel():
            raise WeightsError(f"{key}: checkpoint tensors hold {numel:,} values, config expects "
                               f"{meta_t.numel():,} (shape {tuple(meta_t.shape)})", path=source)
    else:
        info = ckpt.tensors[srcs[0]]
        if tuple(info.shape) != tuple(meta_t.shape):
            raise WeightsError(f"tensor {srcs[0]} has shape {list(info.shape)}, config.json expects "
                               f"{list(meta_t.shape)}", path=info.file)
    first = ckpt.tensors[srcs[0]]
    if quantize and not is_float_dtype(first.dtype):
        raise WeightsError(f"tensor {srcs[0]} is {first.dtype}, not a float: cannot quantize", path=first.file)


def _output_tensors(ckpt, model_plan, mapping: _Mapping, settings: QuantSettings, cast_dtype,
                    source: Path) -> _Outputs:
    """Output tensors and their slots in save_pretrained's state-dict order. A quantized weight's parts
    (absmax, quant map, ...) follow its module's bias when there is one."""
    from qtool.estimate import formats
    from qtool.core.dtypes import itemsize, name_of

    fmt = formats.FORMATS[formats.format_key(settings.quant_type, settings.double_quant)]
    by_param = {t.name: t for t in model_plan.tensors}
    suffixes = quant_suffixes(settings)
    out = _Outputs([], [], [], 0)
    pending_quant: dict[str, int] = {}  # module prefix -> tensor index whose quant parts follow the bias
    for key, meta_t in mapping.meta_sd.items():
        if key not in mapping.target_sources:
            continue
        plan_t = by_param.get(key)
        quantize = plan_t is not None and plan_t.action == QUANTIZE
        reason = plan_t.reason if plan_t is not None else "buffer"
        srcs = sorted(mapping.target_sources[key], key=_natural_key)
        _check_sources(key, meta_t, srcs, ckpt, mapping, quantize, source)
        out.total_parameters += meta_t.numel()
        cast = name_of(cast_dtype(key, meta_t, quantize))
        for src in srcs:
            info = ckpt.tensors[src]
            if quantize:
                out_bytes = formats.checkpoint_bytes(formats.quantized_parts(
                    tuple(meta_t.shape), fmt, blocksize=settings.blocksize, dtype=cast,
                    quant_storage=settings.quant_storage))
            else:
                out_bytes = info.numel * itemsize(cast)
            t = OutputTensor(src, src, QUANTIZE if quantize else KEEP, reason, cast, tuple(info.shape),
                             info.dtype, info.nbytes, out_bytes, transpose=quantize and reason == REASON_CONV1D)
            out.tensors.append(t)
            idx = len(out.tensors) - 1
            out.slots.append((src, idx, ""))
            module = key.rsplit(".", 1)[0]
            if quantize:
                pending_quant[module] = idx
                if module + ".bias" not in mapping.target_sources:
                    out.slots += [(src + s, idx, s) for s in suffixes]
                    del pending_quant[module]
            elif key.endswith(".bias") and module in pending_quant:
                qi = pending_quant.pop(module)
                out.slots += [(out.tensors[qi].name + s, qi, s) for s in suffixes]
            if reason == REASON_FUSED or (key in mapping.converted and not quantize):
                out.fused_kept.append(t)
    for qi in pending_quant.values():  # bias came before the weight in state-dict order
        out.slots += [(out.tensors[qi].name + s, qi, s) for s in suffixes]
    return out


def _natural_key(name: str):
    from qtool.quantize.archplan import dot_natural_key

    return dot_natural_key(name)


def quant_suffixes(settings: QuantSettings) -> list[str]:
    """The tensors Linear4bit saves beside a quantized weight (QuantState.as_dict(packed=True)), in its order."""
    out = [".absmax", ".quant_map"] + ([".nested_absmax", ".nested_quant_map"] if settings.double_quant else [])
    return out + [f".quant_state.bitsandbytes__{settings.quant_type}"]


def _header_bytes(tensors: list[OutputTensor], slots: list[tuple[str, int, str]], settings: QuantSettings) -> int:
    """The exact size of the safetensors header of the whole output (one file)."""
    from qtool.estimate import formats

    fmt = formats.FORMATS[formats.format_key(settings.quant_type, settings.double_quant)]
    entries = []
    for name, idx, suffix in slots:
        t = tensors[idx]
        if t.action == KEEP:
            entries.append((name, t.dtype, t.shape))
            continue
        parts = {p.suffix.removeprefix(".weight"): p for p in formats.saved_parts(formats.quantized_parts(
            t.shape, fmt, blocksize=settings.blocksize, dtype=t.dtype, quant_storage=settings.quant_storage))}
        entries.append((name, parts[suffix].dtype, parts[suffix].shape))
    return formats.safetensors_header_bytes(entries)


def _plan_warnings(model_plan, out: _Outputs) -> list[str]:
    warnings = list(model_plan.warnings)
    if out.fused_kept:
        size = sum(t.out_bytes for t in out.fused_kept)
        warnings = [w for w in warnings if "fused MoE expert tensors" not in w]
        warnings.append(f"{len(out.fused_kept)} MoE expert tensors ({format_bytes(size)}) are kept in "
                        f"{out.fused_kept[0].dtype}: transformers loads them as fused 3-D tensors that bitsandbytes "
                        f"cannot quantize (e.g. {out.fused_kept[0].name})")
    return warnings



def entry_specs(plan: QuantizePlan) -> list:
    """Every output tensor in state-dict order with its exact size, or a size range for quant-state blobs."""
    from qtool.estimate import formats
    from qtool.core.dtypes import code
    from qtool.quantize.sink import EntrySpec

    fmt = formats.FORMATS[formats.format_key(plan.settings.quant_type, plan.settings.double_quant)]
    specs, parts_of = [], {}
    for name, idx, suffix in plan.slots:
        t = plan.tensors[idx]
        if t.action == KEEP:
            specs.append(EntrySpec(name, code(t.dtype), tuple(t.shape), t.out_bytes, t.out_bytes))
            continue
        if idx not in parts_of:
            parts = formats.saved_parts(formats.quantized_parts(
                t.shape, fmt, blocksize=plan.settings.blocksize, dtype=t.dtype,
                quant_storage=plan.settings.quant_storage, offset=0.0))
            parts_of[idx] = {p.suffix.removeprefix(".weight"): p for p in parts}
        p = parts_of[idx][suffix]
        if suffix.startswith(".quant_state."):
            # the double-quant offset is a float in the JSON: json.dumps gives 3 ("0.0") to 24 characters
            n = p.nbytes - 3 if plan.settings.double_quant else p.nbytes
            hi = n + 24 if plan.settings.double_quant else n
            specs.append(EntrySpec(name, "U8", None, n + 3 if plan.settings.double_quant else n, hi))
        else:
            specs.append(EntrySpec(name, code(p.dtype), tuple(p.shape), p.nbytes, p.nbytes))
    return specs
