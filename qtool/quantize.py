"""`qtool quantize` as a library: plan -> stream -> write.

1. Plan (`plan_quantization`): open the checkpoint (headers only), build the architecture on the meta
   device with the dtype transformers would load it in, take the SHARED per-parameter plan
   (`qtool.meta.build_plan`), map every checkpoint tensor to a model parameter with transformers' own
   key renaming/conversion rules, and fail on anything missing, unexpected or mis-shaped before a byte
   is written. The result lists every output tensor in the order `save_pretrained` would write it.
   `--dry-run` prints this plan; the real run executes the same object.
2. Stream (`run_quantization`): tensors go in name order (the order of the U8 region of each output
   file). Each is pread in parallel chunks into a reused read-ahead arena (qtool.streamio), cast to
   the load dtype, Conv1D weights transposed, quantized with bitsandbytes exactly as
   `Params4bit._quantize` does, and its packed weight + `QuantState.as_dict(packed=True)` handed to a
   background writer. Kept tensors whose bytes do not change are copied file to file. Seconds per
   stage are returned as `stage_seconds`.
3. Write: each shard once, in place (`qtool.writer.LayoutWriter`; the two-pass `ShardWriter` when a
   shard boundary depends on blob lengths), config.json with `quantization_config`, index, small
   files, README.md, all in a staging directory renamed into place on success.

What "exactly as transformers" means here was read from transformers 5 (core_model_loading.py,
integrations/bitsandbytes.py, modeling_utils.save_pretrained) and is checked tensor for tensor by
tests/test_quantize.py against `from_pretrained(quantization_config=...)` + `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qtool.config import QuantSettings
from qtool.errors import BadInput, ConfigError, DeviceError, WeightsError, one_line
from qtool.plan import KEEP, QUANTIZE, REASON_CONV1D, REASON_FUSED, ModelPlan
from qtool.sizes import format_bytes

DEFAULT_MAX_SHARD_SIZE = 50 * 10**9  # save_pretrained's default "50GB"
# Files that are weights (never copied) or that we write ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx", ".onnx_data")
_OWN_FILES = {"config.json", "README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_SMALL_FILE_LIMIT = 50 * 2**20  # for extra files; tokenizer files are copied whatever their size
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "spm", "sentencepiece", "special_tokens_map", "added_tokens",
                       "chat_template", "preprocessor_config", "processor_config")
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
    model_plan: ModelPlan
    architecture: str
    model_dtype: str  # the dtype transformers loads this checkpoint in (config dtype, or --dtype)
    tensors: list[OutputTensor]  # every output tensor, in save_pretrained's state-dict order
    slots: list[tuple[str, int, str]]  # (output name, index into tensors, part suffix) in write order
    dropped: list[tuple[str, str]]  # (checkpoint name, why) tensors transformers drops on load
    warnings: list[str] = field(default_factory=list)
    total_parameters: int = 0  # what save_pretrained puts in the index metadata
    header_bytes: int = 0  # safetensors header estimate (one shard)
    timings: dict = field(default_factory=dict)  # seconds: process start -> planning, imports, planning

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

        The read-ahead arena (qtool.streamio: two of the largest tensors on CUDA, pinned; one on CPU) plus,
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


# ----------------------------------------------------------------------------------------------- source


def resolve_source(ref: str, *, revision: str | None = None, progress: bool = False) -> tuple[Path, str, str | None]:
    """A local checkpoint directory, or a hub id downloaded with qtool.hub. -> (dir, display name, revision)."""
    from qtool.models import is_hub_id

    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInput("expected a checkpoint directory (config.json + *.safetensors)", path=path)
        return path, path.resolve().name, revision
    if is_hub_id(ref):
        from qtool import hub

        folder, sha = hub.download_checkpoint(ref, revision=revision, progress=progress)
        return Path(folder), ref, sha or revision
    raise BadInput("no such checkpoint directory, and not a hub id (org/name)", path=ref)


def default_destination(source_name: str) -> Path:
    return Path.cwd() / f"{source_name.rstrip('/').split('/')[-1]}-bnb-4bit"


# ------------------------------------------------------------------------------------------------- plan


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
    from qtool.checkpoint import is_float_dtype, torch_dtype

    first = sorted((n, t) for n, t in ckpt.tensors.items() if t.file == ckpt.files[0])
    for _, t in first:
        if is_float_dtype(t.dtype):
            return torch_dtype(t.dtype)
    return torch.float32


def _meta_model(hf_cfg, dtype, source):
    import torch

    from qtool.meta import model_class

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
) -> QuantizePlan:
    """Everything the run will do, decided before any byte is written. Raises on any mismatch."""
    from qtool.streamio import process_age

    timings = {"startup": process_age()}  # interpreter start, CLI, up to planning
    t0 = time.perf_counter()
    import torch
    from transformers.core_model_loading import (
        WeightConverter, WeightRenaming, build_glob_alternation, dot_natural_key, rename_source_key,
    )
    from transformers.conversion_mapping import get_model_conversion_mapping

    from qtool import formats
    from qtool.checkpoint import Checkpoint, is_float_dtype
    from qtool.meta import build_plan, hf_config
    from qtool.writer import dtype_name

    timings["imports"] = time.perf_counter() - t0  # torch + transformers, when not yet imported
    t0 = time.perf_counter()
    source = Path(source)
    ckpt = ckpt or Checkpoint.open(source, allow_pickle=allow_pickle)
    config = ckpt.config or {}
    cfg_path = source / "config.json"
    method = ckpt.prequantized_method()
    if method:
        raise WeightsError(f"checkpoint is already quantized ({method}); quantize the original FP16/BF16/FP32 model",
                           path=source)
    hf_cfg = hf_config(config, source=cfg_path, trust_remote_code=trust_remote_code)
    dtype = _load_dtype(config, ckpt, hf_cfg, settings.dtype)
    model = _meta_model(hf_cfg, dtype, cfg_path)
    model_plan = build_plan(config, skip_modules=settings.skip_modules, source=cfg_path, model=model)
    by_param = {t.name: t for t in model_plan.tensors}
    aliases = {alias: kept for kept, alias in model_plan.tied}

    # transformers' dtype rules (core_model_loading.convert_and_load_state_dict_in_model)
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

    conversions = get_model_conversion_mapping(model, None, None)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_sd = model.state_dict()
    prefix = model.base_model_prefix

    # 1. every checkpoint tensor -> a model key (or dropped, or an error)
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
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise WeightsError(f"{len(unexpected)} tensors do not belong to {type(model).__name__}: "
                           f"{', '.join(unexpected[:3])}{more}", path=source)

    # 2. every model key covered (tied aliases may be absent, and are dropped when present)
    missing = []
    for key in meta_sd:
        if key in target_sources:
            continue
        if key in aliases:
            continue
        missing.append(key)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"{len(missing)} tensors of {type(model).__name__} are missing from the checkpoint: "
                           f"{', '.join(missing[:3])}{more}", path=source)
    for alias in aliases:
        for key in target_sources.pop(alias, []):
            dropped.append((key, f"tied to {aliases[alias]} (saved once)"))

    # 3. output tensors, in save_pretrained's state-dict order
    fmt = formats.FORMATS[formats.format_key(settings.quant_type, settings.double_quant)]
    tensors: list[OutputTensor] = []
    slots: list[tuple[str, int, str]] = []
    warnings = list(model_plan.warnings)
    fused_kept = []
    quant_suffixes = [".absmax", ".quant_map"] + ([".nested_absmax", ".nested_quant_map"] if settings.double_quant else [])
    quant_suffixes.append(f".quant_state.bitsandbytes__{settings.quant_type}")
    pending_quant: dict[str, int] = {}  # module prefix -> tensor index whose quant parts follow the bias
    total_parameters = 0
    for key, meta_t in meta_sd.items():
        if key not in target_sources:
            continue
        plan_t = by_param.get(key)
        quantize = plan_t is not None and plan_t.action == QUANTIZE
        reason = plan_t.reason if plan_t is not None else "buffer"
        srcs = sorted(target_sources[key], key=dot_natural_key)
        if key in converted or len(srcs) > 1:
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
        if quantize and not is_float_dtype(ckpt.tensors[srcs[0]].dtype):
            raise WeightsError(f"tensor {srcs[0]} is {ckpt.tensors[srcs[0]].dtype}, not a float: cannot quantize",
                               path=ckpt.tensors[srcs[0]].file)
        total_parameters += meta_t.numel()
        cast = cast_dtype(key, meta_t, quantize)
        for src in srcs:
            info = ckpt.tensors[src]
            if quantize:
                parts = formats.quantized_parts(tuple(meta_t.shape), fmt, blocksize=settings.blocksize,
                                                dtype=dtype_name(cast), quant_storage=settings.quant_storage)
                out_bytes = formats.checkpoint_bytes(parts)
            else:
                out_bytes = info.numel * torch.empty((), dtype=cast).element_size()
            out = OutputTensor(src, src, QUANTIZE if quantize else KEEP, reason, dtype_name(cast), tuple(info.shape),
                               info.dtype, info.nbytes, out_bytes, transpose=quantize and reason == REASON_CONV1D)
            tensors.append(out)
            idx = len(tensors) - 1
            slots.append((src, idx, ""))
            module = key.rsplit(".", 1)[0]
            if quantize:
                pending_quant[module] = idx
                if not (module + ".bias") in target_sources:
                    slots += [(src + s, idx, s) for s in quant_suffixes]
                    del pending_quant[module]
            elif key.endswith(".bias") and module in pending_quant:
                qi = pending_quant.pop(module)
                slots += [(tensors[qi].name + s, qi, s) for s in quant_suffixes]
            if reason == REASON_FUSED or (key in converted and not quantize):
                fused_kept.append(out)
    for module, qi in pending_quant.items():  # bias came before the weight in state-dict order
        slots += [(tensors[qi].name + s, qi, s) for s in quant_suffixes]
    entries = []
    for name, idx, suffix in slots:
        t = tensors[idx]
        if t.action == KEEP:
            entries.append((name, t.dtype, t.shape))
        else:
            part = {p.suffix.removeprefix(".weight"): p for p in formats.saved_parts(formats.quantized_parts(
                t.shape, fmt, blocksize=settings.blocksize, dtype=t.dtype, quant_storage=settings.quant_storage))}
            p = part[suffix]
            entries.append((name, p.dtype, p.shape))
    header_bytes = formats.safetensors_header_bytes(entries)
    if conversions:  # save_pretrained reverts conversions over a state dict sorted by dot_natural_key
        slots.sort(key=lambda s: dot_natural_key(s[0]))
    if fused_kept:
        size = sum(t.out_bytes for t in fused_kept)
        warnings.append(f"{len(fused_kept)} MoE expert tensors ({format_bytes(size)}) are kept in {fused_kept[0].dtype}: "
                        f"transformers loads them as fused 3-D tensors that bitsandbytes cannot quantize "
                        f"(e.g. {fused_kept[0].name})")
        warnings = [w for w in warnings if "fused MoE expert tensors" not in w]
    return QuantizePlan(
        source=source, source_name=source_name or source.resolve().name, revision=revision, config=config,
        settings=settings, model_plan=model_plan, architecture=type(model).__name__, model_dtype=dtype_name(dtype),
        tensors=tensors, slots=slots, dropped=dropped, warnings=warnings, total_parameters=total_parameters,
        header_bytes=header_bytes, timings={**timings, "plan": time.perf_counter() - t0},
    )


# ----------------------------------------------------------------------------------------------- stream


@dataclass
class QuantizeResult:
    destination: Path
    files: list[str]
    input_bytes: int
    output_bytes: int
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    device: str
    quantized: int
    kept: int
    stage_seconds: dict = field(default_factory=dict)  # where the time went (see qtool.streamio)
    single_pass: bool = True  # False: a shard boundary depended on blob lengths, written twice
    warnings: list[str] = field(default_factory=list)  # files of the source that were not copied, and why

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["destination"] = str(self.destination)
        d["reduction"] = round(1 - self.output_bytes / self.input_bytes, 4) if self.input_bytes else 0.0
        d["throughput_bytes_per_s"] = int(self.input_bytes / self.seconds) if self.seconds else 0
        return d


def pick_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"invalid --device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device available (torch.cuda.is_available() is False)")
    return device


def quantize_tensor(t, *, settings: QuantSettings):
    """bitsandbytes' Params4bit._quantize on one tensor -> {suffix: tensor} as Linear4bit saves it."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(t.contiguous(), blocksize=settings.blocksize,
                                  compress_statistics=settings.double_quant, quant_type=settings.quant_type,
                                  quant_storage=getattr(torch, settings.quant_storage))
    parts = {"": packed}
    parts.update({"." + k: v for k, v in state.as_dict(packed=True).items()})
    return parts


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_config(plan: QuantizePlan, out_dir: Path, trust_remote_code: bool = False) -> None:
    """config.json as save_pretrained writes it for a model loaded with this BitsAndBytesConfig."""
    from transformers import AutoConfig

    from qtool.meta import hf_config

    try:
        cfg = AutoConfig.from_pretrained(str(plan.source), trust_remote_code=trust_remote_code)
    except Exception:  # fall back to the dict we validated
        cfg = hf_config(plan.config, source=plan.source / "config.json", trust_remote_code=trust_remote_code)
    import torch

    cfg.dtype = getattr(torch, plan.model_dtype)
    for sub in getattr(cfg, "sub_configs", {}) or {}:
        if getattr(cfg, sub, None) is not None:
            getattr(cfg, sub).dtype = cfg.dtype
    cfg.quantization_config = plan.settings.bnb_config()
    cfg.architectures = [plan.architecture]
    cfg.save_pretrained(str(out_dir))


def _safe_file(path: Path, allowed: list[Path]) -> str | None:
    """Why `path` must not be copied, or None: only regular files whose real location is inside the
    checkpoint (a symlink to /proc/self/environ or /etc/shadow would copy secrets into the output)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "a broken or looping symlink"
    if not any(real == a or a in real.parents for a in allowed):
        return f"a symlink to {real}, outside the checkpoint"
    if not real.is_file():
        return "not a regular file"
    return None


def _copy_tree(src: Path, dst: Path, allowed: list[Path], skipped: list[tuple[str, str]], rel: str) -> None:
    """A sentence-transformers module folder (1_Pooling/, 2_Dense/ ...), with the same regular-file rule."""
    dst.mkdir(exist_ok=True)
    for p in sorted(src.iterdir()):
        name = f"{rel}/{p.name}"
        if p.is_dir() and not p.is_symlink():
            _copy_tree(p, dst / p.name, allowed, skipped, name)
            continue
        why = _safe_file(p, allowed)
        if why:
            skipped.append((name, why))
        else:
            shutil.copyfile(p, dst / p.name)


def _module_folders(source: Path) -> list[str]:
    """The folders sentence-transformers' modules.json names (its loader needs them beside the model)."""
    try:
        modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(modules, list):
        return []
    folders = []
    for m in modules:
        path = m.get("path") if isinstance(m, dict) else None
        if isinstance(path, str) and path and "/" not in path and path not in (".", "..") and not path.startswith("."):
            folders.append(path)
    return folders


def copy_small_files(source: Path, out_dir: Path, plan: QuantizePlan) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokenizer, generation config, other small files and sentence-transformers module folders; never
    weights, never our own files, never anything outside the checkpoint. -> (copied, [(skipped, why)])."""
    from qtool.checkpoint import _allowed_roots

    allowed = _allowed_roots(source)
    copied: list[str] = []
    skipped: list[tuple[str, str]] = []
    for p in sorted(source.iterdir()):
        if p.name.startswith(".") or p.name in _OWN_FILES or p.is_dir():
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        why = _safe_file(p, allowed)
        if why is None and p.stat().st_size > _SMALL_FILE_LIMIT and not p.name.startswith(_TOKENIZER_PREFIXES):
            why = f"{format_bytes(p.stat().st_size)}, over the {format_bytes(_SMALL_FILE_LIMIT)} limit for extra files"
        if why:
            skipped.append((p.name, why))
            continue
        shutil.copyfile(p, out_dir / p.name)
        copied.append(p.name)
    for folder in _module_folders(source):
        if (source / folder).is_dir() and not (source / folder).is_symlink():
            _copy_tree(source / folder, out_dir / folder, allowed, skipped, folder)
            copied.append(folder + "/")
    if "generation_config.json" not in copied:
        try:  # save_pretrained writes one for generative models
            from transformers import GenerationConfig

            from qtool.meta import hf_config

            if plan.architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
                gc = GenerationConfig.from_model_config(hf_config(plan.config))
                gc.save_pretrained(str(out_dir))
                copied.append("generation_config.json")
        except Exception:
            pass
    return copied, skipped


def run_quantization(
    plan: QuantizePlan,
    destination: Path,
    *,
    device: str = "auto",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int, str], None] | None = None,
    ckpt=None,
    allow_nonfinite: bool = False,
) -> QuantizeResult:
    """Stream the planned tensors into `destination`. Nothing is left behind on failure or Ctrl-C.
    A NaN/inf in a tensor that passes through memory is refused unless `allow_nonfinite`."""
    import torch

    from qtool.checkpoint import Checkpoint
    from qtool.writer import check_destination, output_error

    destination = Path(destination)
    check_destination(destination, force=force, source=plan.source)
    dev = pick_device(device)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ckpt = ckpt or Checkpoint.open(plan.source)
    try:
        return _stream(plan, destination, ckpt, dev, max_shard_size, force, trust_remote_code, on_progress,
                       allow_nonfinite=allow_nonfinite)
    except OSError as exc:
        err = output_error(exc, destination)
        if err is None:
            raise
        raise err from exc


def entry_specs(plan: QuantizePlan) -> list:
    """Every output tensor in state-dict order with its exact size, or a size range for quant-state blobs."""
    from qtool import formats
    from qtool.writer import ST_DTYPES, EntrySpec

    fmt = formats.FORMATS[formats.format_key(plan.settings.quant_type, plan.settings.double_quant)]
    specs, parts_of = [], {}
    for name, idx, suffix in plan.slots:
        t = plan.tensors[idx]
        if t.action == KEEP:
            specs.append(EntrySpec(name, ST_DTYPES[t.dtype], tuple(t.shape), t.out_bytes, t.out_bytes))
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
            specs.append(EntrySpec(name, ST_DTYPES[p.dtype], tuple(p.shape), p.nbytes, p.nbytes))
    return specs


def _arena_bytes(big: int, dev: str) -> int:
    """Read-ahead budget for tensors of at most `big` bytes: on CUDA two (one being used, the next
    arriving); on CPU, where quantizing is the slow part, one plus a little for the small ones around it."""
    return 2 * big if dev == "cuda" else big + min(big, 64 * 2**20)


def _copyable(plan: QuantizePlan, ckpt, sink, idx: int) -> bool:
    """A kept tensor whose bytes do not change goes file to file (copy_file_range), never through memory."""
    from qtool.writer import ST_DTYPES

    t = plan.tensors[idx]
    info = ckpt.tensors.get(t.source)
    return (t.action == KEEP and getattr(ckpt, "format", "safetensors") == "safetensors" and info is not None
            and info.start >= 0 and ST_DTYPES.get(t.dtype) == info.dtype and hasattr(sink, "can_copy")
            and sink.can_copy(t.name))


def check_finite(t, tensor, ckpt) -> None:
    """Refuse NaN/inf: bitsandbytes quantizes them silently, and with double quant a few NaNs make every
    value of their absmax group NaN (256 blocks). transformers does not check; a pre-flight tool should."""
    import torch

    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    nan = int(torch.isnan(tensor).sum())
    info = ckpt.tensors.get(t.source)
    raise WeightsError(f"{t.source} has {bad:,} non-finite value{'s' if bad > 1 else ''} ({nan:,} NaN, "
                       f"{bad - nan:,} inf) of {tensor.numel():,}", path=info.file if info else ckpt.root,
                       hint="pass --allow-nonfinite to quantize it anyway")


def _stream(plan, destination, ckpt, dev, max_shard_size, force, trust_remote_code, on_progress, *,
            allow_nonfinite: bool = False) -> QuantizeResult:
    import torch

    from qtool.modelcard import model_card
    from qtool.streamio import BackgroundWriter, Reader, StageClock
    from qtool.writer import LayoutWriter, ShardWriter, split_shards, staging_dir, write_index

    clock = StageClock()
    for k, v in plan.timings.items():
        clock.add(k, v)
    start = time.monotonic()
    with clock("import_bitsandbytes"):
        import bitsandbytes.functional  # noqa: F401
    if dev == "cuda":
        with clock("cuda_init"):
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
    specs = entry_specs(plan)
    shards = split_shards(specs, max_shard_size)
    slots_of: dict[int, list[tuple[str, str]]] = {}
    for name, idx, suffix in plan.slots:
        slots_of.setdefault(idx, []).append((name, suffix))
    if shards is not None:  # one pass, in name order: each file is written once, front to back
        order = sorted(slots_of, key=lambda i: plan.tensors[i].name)
    else:  # a shard boundary depends on blob lengths: state-dict order, assembled at the end
        order = [idx for _, idx, suffix in plan.slots if suffix == ""]
    total = plan.input_bytes
    done = 0
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def process(idx: int):
        """Read, cast, quantize one tensor -> ({suffix: CPU tensor}, lease of the arena block still in use)."""
        t = plan.tensors[idx]
        with clock("read_wait"):
            src, lease = reader.take(t.source)
        dtype = getattr(torch, t.dtype)
        if t.action == KEEP:
            with clock("cast"):
                value = src.to(dtype)
            if not allow_nonfinite:
                check_finite(t, value, ckpt)
            if value is not src:
                lease.release()
                lease = None
            return {"": value}, lease
        if dev == "cuda":
            with clock("h2d"):
                w = src.to(dev, dtype)
                sync()
            lease.release()
        else:
            with clock("cast"):
                w = src.to(dtype)
        if t.transpose:
            w = w.T
        if not allow_nonfinite:
            with clock("check_finite"):
                check_finite(t, w, ckpt)
        with clock("quantize"):
            parts = quantize_tensor(w, settings=plan.settings)
            sync()
        del w
        lease.release()
        with clock("d2h"):
            parts = {k: v.cpu() for k, v in parts.items()}
        return parts, None

    with staging_dir(destination, force=force) as tmp:
        sink = (LayoutWriter(tmp, specs, shards) if shards is not None
                else ShardWriter(tmp, max_shard_size=max_shard_size))
        reader = writer = None
        try:
            copies = {i for i in order if _copyable(plan, ckpt, sink, i)}
            reads = [i for i in order if i not in copies]
            big = max((plan.tensors[i].source_bytes for i in reads), default=0)
            reader = Reader(ckpt, [plan.tensors[i].source for i in reads], arena_bytes=_arena_bytes(big, dev),
                            pin=dev == "cuda", clock=clock)
            writer = BackgroundWriter(sink, max_bytes=max(big, 256 * 2**20), clock=clock)
            if shards is not None:
                for idx in order:
                    if idx in copies:
                        info = ckpt.tensors[plan.tensors[idx].source]
                        writer.submit_copy(plan.tensors[idx].name, info.file, info.start, info.end - info.start)
                        done += plan.tensors[idx].source_bytes
                        if on_progress is not None:
                            on_progress(done, total, plan.tensors[idx].source)
                        continue
                    parts, lease = process(idx)
                    writer.submit([(name, parts[suffix]) for name, suffix in slots_of[idx]], lease)
                    done += plan.tensors[idx].source_bytes
                    if on_progress is not None:
                        on_progress(done, total, plan.tensors[idx].source)
            else:
                cache: dict[int, dict] = {}  # quantized tensor index -> parts not yet written
                for out_name, idx, suffix in plan.slots:
                    if suffix == "":
                        parts, lease = process(idx)
                        writer.submit([(out_name, parts.pop(""))], lease)
                        if parts:
                            cache[idx] = parts
                        done += plan.tensors[idx].source_bytes
                    else:
                        writer.submit([(out_name, cache[idx].pop(suffix))])
                        if not cache[idx]:
                            del cache[idx]
                    if on_progress is not None:
                        on_progress(done, total, plan.tensors[idx].source)
            writer.drain()
            with clock("finish_shards"):
                result = sink.finish()
        except BaseException:
            for part in (writer, reader):
                if part is not None:
                    with contextlib.suppress(Exception):
                        part.close()
            sink.abort()
            raise
        writer.close()
        reader.close()
        with clock("config_and_small_files"):
            if len(result["files"]) > 1:
                write_index(tmp, result["weight_map"],
                            {"total_parameters": plan.total_parameters, "total_size": result["total_size"]})
            write_config(plan, tmp, trust_remote_code=trust_remote_code)
            _, skipped = copy_small_files(plan.source, tmp, plan)
        output_bytes = sum((tmp / f).stat().st_size for f in result["files"])
        seconds = time.monotonic() - start
        clock.add("run", seconds)
        res = QuantizeResult(
            destination=destination, files=result["files"], input_bytes=total, output_bytes=output_bytes,
            seconds=seconds, peak_rss_bytes=_peak_rss(),
            peak_gpu_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None, device=dev,
            quantized=sum(1 for t in plan.tensors if t.action == QUANTIZE),
            kept=sum(1 for t in plan.tensors if t.action == KEEP),
            stage_seconds=clock.rounded(), single_pass=shards is not None,
            warnings=[f"not copied: {name} ({why})" for name, why in skipped],
        )
        (tmp / "README.md").write_text(model_card(plan, res), encoding="utf-8")
    return res


def quantize(
    ref: str,
    settings: QuantSettings,
    *,
    destination: Path | None = None,
    revision: str | None = None,
    device: str = "auto",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int, str], None] | None = None,
    allow_nonfinite: bool = False,
) -> tuple[QuantizePlan, QuantizeResult]:
    """Library entry point: resolve, plan, check the destination, stream."""
    from qtool.checkpoint import Checkpoint
    from qtool.writer import check_destination

    source, name, rev = resolve_source(ref, revision=revision)
    dest = Path(destination) if destination is not None else default_destination(name)
    check_destination(dest, force=force, source=source)
    with Checkpoint.open(source, allow_pickle=allow_pickle) as ckpt:
        plan = plan_quantization(source, settings, source_name=name, revision=rev, allow_pickle=allow_pickle,
                                 trust_remote_code=trust_remote_code, ckpt=ckpt)
        result = run_quantization(plan, dest, device=device, max_shard_size=max_shard_size, force=force,
                                  trust_remote_code=trust_remote_code, on_progress=on_progress, ckpt=ckpt,
                                  allow_nonfinite=allow_nonfinite)
    return plan, result
