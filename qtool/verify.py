"""Run a model for real and measure it: does it fit, and does it still compute?

One run = load (4-bit on the device, or 16-bit for --mode lora/full), then either QLoRA training steps
(the standard peft recipe: prepare_model_for_kbit_training, LoraConfig, get_peft_model, the configured
optimizer) or inference (prefill with a KV cache, then a few decode steps). Memory is read from torch's
caching allocator per phase; on --device cpu the process's resident set size stands in.

Where the weights come from:
  * a bnb-4bit checkpoint (config.json has quantization_config): loaded as it is;
  * a 16-bit checkpoint: quantized while loading with the resolved settings (settings.quant.bnb_config());
  * a preset, size shorthand or bare config.json (no weights): random weights. They go through the same
    `from_pretrained(quantization_config=...)` call, fed a state dict of CPU tensors instead of files, so
    the device sees exactly what loading a checkpoint from disk gives: each tensor copied over and
    quantized there. The tensors are views into one shared random pool, so building an 8B model costs
    about 1 GB of host memory and a second, and nothing is written to disk. Memory does not depend on values.

The library never prints or exits: `run_verify` returns a report (dict); `outcome` turns its checks into
the error the CLI raises (DoesNotFit -> 3, NotFinite -> 4). Bad input raises BadInput subclasses (2).
"""

from __future__ import annotations

import gc
import json
import math
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.config import Settings
from qtool.errors import BadInput, DeviceError, DoesNotFit, NotFinite, QtoolError, WeightsError, one_line
from qtool.models import ModelSpec

QUALITY_TOKENS = 256  # tokens of the first sequence compared against --reference


@dataclass(frozen=True)
class VerifyOptions:
    device: str = "cuda"  # "cuda", "cuda:N" or "cpu"
    device_map: str | None = None  # None: one device; "auto": spread over all GPUs with accelerate
    steps: int = 2  # training steps, or prefill+decode rounds; 0 = load only
    decode_tokens: int = 4
    data: Path | None = None  # text file tokenized with the model's tokenizer instead of random ids
    reference: str | None = None  # 16-bit model to compare outputs with
    revision: str | None = None
    trust_remote_code: bool = False
    tolerance: float = 0.05  # |estimate - measured| / measured, informational (measured: within 2.4%)
    seed: int = 0
    lr: float = 1e-4
    allow_pickle: bool = False  # read .bin/.pt checkpoints (pickle can run code)


@dataclass
class Source:
    """Where the weights come from."""

    kind: str  # "random" | "checkpoint-4bit" | "checkpoint-16bit"
    path: Path | None
    description: str
    quantization_config: dict | None = None
    tokenizer_dir: Path | None = None


# ----------------------------------------------------------------------------------------------- input


def resolve_source(spec: ModelSpec, options: VerifyOptions) -> Source:
    """Presets, shorthands and bare config files give random weights; directories and hub ids give weights."""
    if spec.kind in ("preset", "shorthand", "approximation"):
        return Source("random", None, f"random weights from the {spec.name} config (no checkpoint)")
    if spec.kind == "local" and spec.config_path is not None and Path(spec.ref).expanduser().is_file():
        return Source("random", None, f"random weights from {spec.config_path} (no checkpoint)")
    if spec.kind == "hub":
        from qtool import hub

        root, sha = hub.download_checkpoint(spec.name, revision=options.revision)
        where = f"{spec.name}@{sha[:12]}" if sha else spec.name
    else:
        root, where = Path(spec.path), str(spec.path)
    return _checkpoint_source(root, where, allow_pickle=options.allow_pickle)


def _checkpoint_source(root: Path, where: str, *, allow_pickle: bool = False) -> Source:
    from qtool.checkpoint import Checkpoint

    with Checkpoint.open(root, allow_pickle=allow_pickle) as ckpt:
        method = ckpt.prequantized_method()
        config = ckpt.config or {}
    tok = root if any((root / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")) else None
    if method is None:
        return Source("checkpoint-16bit", root, f"16-bit checkpoint {where}, quantized while loading", tokenizer_dir=tok)
    qc = config.get("quantization_config") or {}
    if method != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit", True)) or qc.get("load_in_8bit"):
        raise WeightsError(f"quantized with {method} {'8-bit' if qc.get('load_in_8bit') else ''}".strip()
                           + ": verify runs bnb-4bit or 16-bit checkpoints", path=root)
    return Source("checkpoint-4bit", root, f"bnb-4bit checkpoint {where}", quantization_config=qc, tokenizer_dir=tok)


def check_inputs(options: VerifyOptions) -> None:
    """Exit-2 conditions about --data and --reference, checked before anything is loaded or downloaded.
    A hub --reference is only resolved here (its config.json); its weights come after the model's."""
    if options.data is not None:
        data = Path(options.data).expanduser()
        if not data.exists():
            raise BadInput("--data: no such file", path=data)
        if not data.is_file():
            raise BadInput("--data: not a file (expected a text file)", path=data)
    if options.reference:
        _reference_spec(options)


def check_device(options: VerifyOptions) -> None:
    """Exit-2 conditions about the device, checked before anything is loaded."""
    import torch

    dev = options.device
    if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise DeviceError(f"invalid device {dev!r}: expected cuda, cuda:N or cpu")
    if dev == "cpu":
        if options.device_map not in (None, "cpu"):
            raise DeviceError("--device-map auto spreads over GPUs; it cannot be combined with --device cpu")
        return
    if not torch.cuda.is_available():
        built = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise DeviceError(f"CUDA is not available (torch {torch.__version__} is {built}); "
                          "pass --device cpu to run the same steps on the CPU")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"no device {dev}: {torch.cuda.device_count()} GPU(s) visible")
    if options.device_map not in (None, "auto"):
        raise DeviceError(f"invalid --device-map {options.device_map!r}: only 'auto' is supported")


def fit_positions(spec: ModelSpec, settings: Settings) -> tuple[Settings, str | None]:
    """A sequence longer than the model's positions is refused when asked for (learned position embeddings
    index out of range; rotary ones run, but measure a model used out of its range); the default 2048 is
    cut to the model's positions, with a note. -> (settings to run, note or None)."""
    import dataclasses

    from qtool.memory import _first

    cfg = spec.config.get("text_config") if isinstance(spec.config.get("text_config"), dict) else spec.config
    limit = _first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length")
    seq = settings.run.seq_len
    if not isinstance(limit, int) or seq <= limit:
        return settings, None
    if settings.sources.get("seq_len", "default") != "default":
        raise BadInput(f"--seq-len {seq:,} is beyond {spec.name}'s {limit:,} positions (max_position_embeddings)")
    run = dataclasses.replace(settings.run, seq_len=limit)
    return (dataclasses.replace(settings, run=run, values={**settings.values, "seq_len": limit}),
            f"seq_len {limit} (the model's max_position_embeddings) instead of the default {seq}")


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_size(spec: ModelSpec, settings: Settings, options: VerifyOptions) -> None:
    """Runs that cannot work are refused before loading: the estimate over the machine's available RAM
    (--device cpu, exit 2) or well over every GPU's memory (exit 3: it does not fit)."""
    from qtool.sizes import format_bytes

    est = _estimate(spec, settings, options).get("allocated_peak_bytes")
    if not est:
        return
    if options.device == "cpu":
        avail = _available_ram()
        if avail is not None and est > avail:
            raise BadInput(f"{spec.name} at batch {settings.run.batch_size} x {settings.run.seq_len:,} tokens needs about "
                           f"{format_bytes(est)} (qtool estimate); this machine has {format_bytes(avail)} available")
        return
    import torch

    ids = range(torch.cuda.device_count()) if options.device_map == "auto" else [
        int(options.device[5:]) if options.device.startswith("cuda:") else 0]
    total = sum(torch.cuda.get_device_properties(i).total_memory for i in ids)
    if est > 1.5 * total:  # the model's own estimate is within a few % measured: 1.5x is no borderline case
        raise DoesNotFit(f"{spec.name} needs about {format_bytes(est)} (qtool estimate), "
                         f"{est / total:.1f}x the {format_bytes(total)} of {len(ids)} GPU(s): not run")


def check_same_architecture(spec: ModelSpec, reference: Path) -> None:
    """--reference must be the same model in 16-bit: same model_type and architecture."""
    from qtool.models import read_config_json

    ref = read_config_json(Path(reference) / "config.json")
    mine = (spec.config.get("model_type"), (spec.config.get("architectures") or [None])[0])
    theirs = (ref.get("model_type"), (ref.get("architectures") or [None])[0])
    if mine[0] != theirs[0] or (mine[1] and theirs[1] and mine[1] != theirs[1]):
        raise BadInput(f"--reference is a {theirs[0]} model ({theirs[1]}), {spec.name} a {mine[0]} "
                       f"({mine[1]}): not the same model", path=reference)


# --------------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


class Meter:
    """Allocated/peak memory over the devices in use. On CPU: RSS now, and the process-lifetime max RSS."""

    def __init__(self, devices: list):
        self.devices = devices  # torch.device list; [cpu] on CPU
        self.cuda = devices[0].type == "cuda"
        self.peak_allocated = 0
        self.peak_reserved = 0
        # per device, max over phases (each phase resets torch's counters)
        self.device_peak_allocated = [0] * len(devices)
        self.device_peak_reserved = [0] * len(devices)

    def sync(self) -> None:
        if self.cuda:
            import torch

            for d in self.devices:
                torch.cuda.synchronize(d)

    def allocated(self) -> int:
        import torch

        if not self.cuda:
            return _rss_bytes() or 0
        return sum(torch.cuda.memory_allocated(d) for d in self.devices)

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            for d in self.devices:
                torch.cuda.reset_peak_memory_stats(d)

    def phase_peak(self) -> int:
        """Peak since the last reset_peak; also folded into the run's overall peaks."""
        import torch

        if not self.cuda:
            peak = _max_rss_bytes()
            self.peak_allocated = max(self.peak_allocated, peak)
            return peak
        self.sync()
        allocated = [torch.cuda.max_memory_allocated(d) for d in self.devices]
        reserved = [torch.cuda.max_memory_reserved(d) for d in self.devices]
        for i, (a, r) in enumerate(zip(allocated, reserved)):
            self.device_peak_allocated[i] = max(self.device_peak_allocated[i], a)
            self.device_peak_reserved[i] = max(self.device_peak_reserved[i], r)
        peak = sum(allocated)
        self.peak_allocated = max(self.peak_allocated, peak)
        self.peak_reserved = max(self.peak_reserved, sum(reserved))
        return peak

    def per_device(self) -> list[dict]:
        import torch

        if not self.cuda:
            return []
        out = []
        for i, d in enumerate(self.devices):
            free, total = torch.cuda.mem_get_info(d)
            reserved = torch.cuda.memory_reserved(d)
            out.append({
                "device": str(d), "name": torch.cuda.get_device_name(d), "total_bytes": total,
                # max over the run's phases (the load's transient peak is reported separately)
                "peak_allocated_bytes": max(self.device_peak_allocated[i], torch.cuda.max_memory_allocated(d)),
                "peak_reserved_bytes": max(self.device_peak_reserved[i], torch.cuda.max_memory_reserved(d)),
                # what the CUDA context, cuBLAS workspaces and other processes hold outside torch's allocator
                "outside_torch_bytes": max(0, total - free - reserved),
            })
        return out


# -------------------------------------------------------------------------------------------- loading


def _torch_dtype(name: str):
    from qtool.dtypes import code, torch_dtype

    return torch_dtype(code(name))


def _kept_dtype(spec: ModelSpec, settings: Settings):
    """dtype of tensors that are not quantized: qtool estimate's rule (qtool.estimate.kept_dtype), so the
    estimate and the measurement describe the same model. The loads pass it explicitly: transformers'
    dtype="auto" would take the weights' dtype when config.json names none, where the estimate assumes float32."""
    from qtool.estimate import kept_dtype

    return _torch_dtype(kept_dtype(spec, settings))


def random_state_dict(model_cls, cfg, dtype, *, seed: int = 0) -> dict:
    """Random parameters for `cfg`, as CPU tensors: matrices are views into one shared N(0, init_range) pool
    (different offsets, so layers differ), 1-D weights are ones and biases zeros (a sane norm). Tied
    parameters appear once; buffers are left to transformers' own initialisation."""
    import torch

    with torch.device("meta"):
        meta = model_cls._from_config(cfg, dtype=dtype)
    shapes: list[tuple[str, tuple[int, ...], Any]] = []
    for name, p in meta.named_parameters():  # deduplicates tied parameters
        shapes.append((name, tuple(p.shape), p.dtype))
    del meta
    big = [math.prod(s) for _, s, _ in shapes if len(s) >= 2]
    slack = 1 << 16
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(cfg, "initializer_range", 0.02) or 0.02)
    pool = torch.randn((max(big, default=0) + slack,), generator=gen, dtype=dtype).mul_(std)
    out = {}
    for i, (name, shape, pdtype) in enumerate(shapes):
        if len(shape) >= 2:
            off = (i * 4099) % slack
            out[name] = pool[off: off + math.prod(shape)].view(shape).to(pdtype)
        elif name.endswith("bias"):
            out[name] = torch.zeros(shape, dtype=pdtype)
        else:
            out[name] = torch.ones(shape, dtype=pdtype)
    return out


def portable_cpu_kernels(model) -> int:
    """Keep bitsandbytes' 4-bit layers on its portable CPU path, whatever the CPU.

    On AVX512-BF16 CPUs, `Linear4bit.forward` in eval mode repacks the weight for a fused bf16 kernel
    (`_convert_weight_packed_for_cpu`), which needs out_features % 32 == 0 and in_features % blocksize == 0
    (an intermediate size of 96 dies with "shape '[64, 1]' is invalid"), rounds absmax to bf16 and rewrites
    the module's weight in place. The dequantize-and-matmul path works for every shape and computes the
    same thing on every CPU, so a CPU verify means the same on any machine. Returns the layers changed."""
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _is_causal_lm(cls) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return cls.__name__ in names


def load_model(spec: ModelSpec, source: Source, settings: Settings, options: VerifyOptions, device_map, *,
               quantize: bool, path: Path | None = None):
    """from_pretrained, once, the way a user would call it. `quantize=False` loads 16-bit."""
    from qtool.meta import hf_config, model_class

    cfg = hf_config(spec.config, source=spec.config_path or spec.ref, trust_remote_code=options.trust_remote_code)
    cls = model_class(cfg)
    kwargs: dict[str, Any] = {"device_map": device_map, "trust_remote_code": options.trust_remote_code,
                              "dtype": _kept_dtype(spec, settings)}
    if source.kind == "checkpoint-4bit":
        return cls.from_pretrained(source.path, **kwargs), cls
    if quantize:
        kwargs["quantization_config"] = settings.quant.bnb_config()
    if source.kind == "random":
        state = random_state_dict(cls, cfg, kwargs["dtype"], seed=options.seed)
        try:
            return cls.from_pretrained(None, config=cfg, state_dict=state, **kwargs), cls
        finally:
            del state
    return cls.from_pretrained(path or source.path, **kwargs), cls


# ---------------------------------------------------------------------------------------------- inputs


def check_tokenizer_code(tokenizer_dir: Path | None, trust_remote_code: bool) -> None:
    """A tokenizer whose tokenizer_config.json maps to the repository's own classes runs that code when
    loaded. Never without --trust-remote-code, and never by asking (transformers prompts in a terminal)."""
    if tokenizer_dir is None or trust_remote_code:
        return
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # unreadable: the tokenizer load reports it
    if isinstance(cfg, dict) and cfg.get("auto_map"):
        raise BadInput("the tokenizer needs code from the repository (auto_map in tokenizer_config.json)",
                       path=path, hint="pass --trust-remote-code if you trust it")


def make_batch(vocab_size: int, batch: int, seq_len: int, *, seed: int, data: Path | None,
               tokenizer_dir: Path | None, trust_remote_code: bool = False):
    """batch x seq_len token ids: random, or the text of `data` tokenized (repeated to fill)."""
    import torch

    if data is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    if tokenizer_dir is None:
        raise BadInput("--data needs the model's tokenizer, and this model has no tokenizer files", path=data)
    try:
        text = Path(data).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput("no such file", path=data) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read as UTF-8 text: {exc}", path=data) from None
    from transformers import AutoTokenizer

    check_tokenizer_code(tokenizer_dir, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)  # never a prompt
    ids = tok(text)["input_ids"]
    if not ids:
        raise BadInput("no tokens in file", path=data)
    need = batch * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids, dtype=torch.long).view(batch, seq_len).clamp_(max=vocab_size - 1)


# ------------------------------------------------------------------------------------------ the runs


def _make_optimizer(name: str, params: list, lr: float):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adafactor":  # as the Trainer builds it for optim="adafactor"
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "paged_adamw8bit":
        # Paged state lives in CUDA unified memory; on CPU bitsandbytes keeps it in ordinary tensors.
        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    if name == "paged_adamw32bit":
        return bnb.optim.PagedAdamW32bit(params, lr=lr)
    raise BadInput(f"unknown optimizer {name!r}")


def wrap_for_training(model, settings: Settings):
    """The standard recipe for each mode. Returns the model to train."""
    run = settings.run
    if run.mode == "full":
        if run.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if run.mode == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=run.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = list(run.lora_targets)
    target_modules = "all-linear" if targets == ["all-linear"] else targets
    lora = LoraConfig(r=run.lora_rank, lora_alpha=run.lora_alpha, target_modules=target_modules,
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise BadInput(f"--lora-targets {','.join(targets)}: {exc}") from None


def _train(model, ids, settings: Settings, options: VerifyOptions, meter: Meter, phases: dict, report: dict) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    report["trainable_params"] = sum(p.numel() for p in params)
    opt = _make_optimizer(settings.run.optimizer, params, options.lr)
    model.train()
    steps = report["steps"]
    for step in range(1, options.steps + 1):
        meter.sync()
        t0 = time.perf_counter()
        meter.reset_peak()
        # use_cache=False as QLoRA recipes set it; the logits are dropped here, as Trainer drops them
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        phases["forward_peak"] = max(phases.get("forward_peak", 0), meter.phase_peak())
        value = float(loss.detach().float().item())
        meter.reset_peak()
        loss.backward()
        phases["backward_peak"] = max(phases.get("backward_peak", 0), meter.phase_peak())
        del loss
        grads = [p.grad for p in params if p.grad is not None]
        grads_finite = bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
        record = {"step": step, "loss": value if math.isfinite(value) else str(value),
                  "loss_finite": math.isfinite(value), "grads_finite": grads_finite}
        if not (math.isfinite(value) and grads_finite):
            steps.append(record)
            break  # no point stepping on NaN; the checks report it
        meter.reset_peak()
        opt.step()
        opt.zero_grad(set_to_none=True)
        phases["optimizer_step_peak"] = max(phases.get("optimizer_step_peak", 0), meter.phase_peak())
        meter.sync()
        record["seconds"] = time.perf_counter() - t0
        phases["after_step"] = meter.allocated()
        steps.append(record)
    last = steps[-1] if steps else {}
    report["loss"] = last.get("loss")
    report["loss_finite"] = all(s["loss_finite"] for s in steps) if steps else None
    report["grads_finite"] = all(s["grads_finite"] for s in steps) if steps else None
    if "seconds" in last:
        report["step_seconds"] = last["seconds"]  # the last step: steady state, optimizer state exists
        report["tokens_per_second"] = ids.numel() / last["seconds"]


def _infer(model, ids, options: VerifyOptions, meter: Meter, phases: dict, report: dict, causal: bool) -> None:
    import inspect

    import torch

    model.eval()
    extra = {"logits_to_keep": 1} if causal and "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    finite = True
    for step in range(1, options.steps + 1):
        with torch.inference_mode():
            meter.sync()
            t0 = time.perf_counter()
            meter.reset_peak()
            if causal:
                out = model(input_ids=ids, use_cache=True, **extra)
                logits = out.logits[:, -1]
            else:
                out = model(input_ids=ids)
                logits = out.last_hidden_state
            finite &= bool(torch.isfinite(logits).all())
            phases["prefill_peak"] = max(phases.get("prefill_peak", 0), meter.phase_peak())
            t1 = time.perf_counter()
            if causal:
                past = out.past_key_values
                meter.reset_peak()
                for _ in range(options.decode_tokens):
                    nxt = logits.argmax(-1, keepdim=True)
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, logits = out.past_key_values, out.logits[:, -1]
                    finite &= bool(torch.isfinite(logits).all())
                phases["decode_peak"] = max(phases.get("decode_peak", 0), meter.phase_peak())
                del past
            meter.sync()
            t2 = time.perf_counter()
            del out, logits
        report["steps"].append({"step": step, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                                "outputs_finite": finite})
    last = report["steps"][-1]
    report["loss_finite"] = finite  # no loss in inference: finite outputs stand in
    report["grads_finite"] = None
    report["step_seconds"] = last["prefill_seconds"] + last["decode_seconds"]
    report["tokens_per_second"] = ids.numel() / last["prefill_seconds"]
    if causal and options.decode_tokens:
        report["decode_tokens_per_second"] = ids.shape[0] * options.decode_tokens / max(last["decode_seconds"], 1e-9)


# -------------------------------------------------------------------------------------------- quality


def _quality_outputs(model, ids, causal: bool):
    """Log-probabilities (causal LM) or hidden states (encoder) for the quality batch, on CPU in float32."""
    import torch

    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = model(input_ids=ids.to(device))
        if causal:
            return torch.log_softmax(out.logits.float(), dim=-1).cpu()
        return out.last_hidden_state.float().cpu()


def compare_outputs(quant, ref, causal: bool) -> dict:
    """KL(ref || quant) per next-token distribution and top-1 agreement; cosine similarity for encoders."""
    import torch

    if quant.shape != ref.shape:
        raise BadInput(f"--reference outputs have shape {tuple(ref.shape)}, the model's {tuple(quant.shape)}: "
                       "not the same architecture")
    if causal:
        kl = (ref.exp() * (ref - quant)).sum(-1)  # per position
        agree = (ref.argmax(-1) == quant.argmax(-1)).float()
        return {"metric": "kl_top1", "positions": int(kl.numel()),
                "mean_kl": max(0.0, float(kl.mean())), "max_kl": max(0.0, float(kl.max())),
                "top1_agreement": float(agree.mean())}
    cos = torch.nn.functional.cosine_similarity(ref, quant, dim=-1)
    return {"metric": "cosine", "positions": int(cos.numel()),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


# ----------------------------------------------------------------------------------------- estimate


def _estimate(spec: ModelSpec, settings: Settings, options: VerifyOptions) -> dict:
    """qtool estimate's numbers for the same settings, reduced to what a measurement can check:
    allocated_peak_bytes (the peak less what lives outside torch's allocator), peak_bytes (everything,
    CUDA context included) and the GPU bytes of the loaded weights."""
    from qtool.estimate import estimate_report

    try:
        rep = estimate_report(spec, settings, trust_remote_code=options.trust_remote_code)
    except QtoolError as exc:
        return {"error": f"estimate failed: {exc}"}
    weights = rep.get("weights") or {}
    fmt = rep.get("format") if settings.run.mode in ("qlora", "inference") else (
        "fp32" if (rep.get("kept") or {}).get("dtype") == "float32" else "fp16")
    return {"allocated_peak_bytes": rep.get("allocated_peak_bytes"), "peak_bytes": rep.get("peak_bytes"),
            "weights_gpu_bytes": (weights.get(fmt) or {}).get("gpu"), "format": fmt,
            "breakdown": rep.get("breakdown"), "params": rep.get("params")}


def compare_estimate(estimate: dict, measured: int | None, *, what: str, key: str, tolerance: float) -> dict:
    """relative_error = (estimate - measured) / measured; positive = estimate too high."""
    out = {"compared": f"estimate {key} vs measured {what}", "tolerance": tolerance,
           "estimate_bytes": estimate.get(key), "measured_bytes": measured, "relative_error": None,
           "within_tolerance": None}
    if estimate.get(key) and measured:
        err = (estimate[key] - measured) / measured
        out["relative_error"] = err
        out["within_tolerance"] = abs(err) <= tolerance
    return out


# --------------------------------------------------------------------------------------------- versions


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": sys.version.split()[0]}
    for pkg in ("qtool", "torch", "transformers", "bitsandbytes", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


# ------------------------------------------------------------------------------------------------ run


def run_verify(spec: ModelSpec, settings: Settings, options: VerifyOptions,
               progress: Callable[[str], None] | None = None) -> dict:
    """Load, run, measure. Returns the report; raises BadInput (exit 2) for unusable input or device.

    Conditions found while running (out of memory, NaN loss, over budget) are recorded in the report's
    checks, not raised: `outcome(report)` gives the error to exit with.
    """
    say = progress or (lambda _m: None)
    run = settings.run
    if options.steps < 0:
        raise BadInput(f"invalid --steps {options.steps}: must be 0 or more")
    if settings.quant.blocksize != 64 and run.mode in ("qlora", "inference"):
        raise BadInput(f"--blocksize {settings.quant.blocksize}: transformers' loader quantizes with "
                       "bitsandbytes' default block size 64 only")
    if run.recipe in ("sft", "unsloth") and run.mode != "inference":
        from qtool.recipes import require_trl, require_unsloth

        require_trl() if run.recipe == "sft" else require_unsloth()
    check_inputs(options)
    settings, seq_note = fit_positions(spec, settings)
    run = settings.run
    # Local input is checked before torch is imported (seconds); a hub download waits for the device check.
    source = resolve_source(spec, options) if spec.kind != "hub" else None
    check_device(options)
    if run.mode in ("qlora", "inference") and not _has_bitsandbytes():
        raise DeviceError("bitsandbytes is not installed: 4-bit loading needs it (pip install bitsandbytes)")
    check_size(spec, settings, options)
    source = source or resolve_source(spec, options)
    if source.kind == "checkpoint-4bit" and run.mode in ("lora", "full"):
        raise BadInput(f"--mode {run.mode} trains 16-bit weights; this checkpoint is already 4-bit", path=source.path)
    reference = _resolve_reference(options) if options.reference else None
    if reference is not None:
        check_same_architecture(spec, reference[0])
    if options.data is not None:
        check_tokenizer_code(source.tokenizer_dir, options.trust_remote_code)

    import torch

    from qtool import recipes
    from qtool.meta import hf_config, model_class

    cls = model_class(hf_config(spec.config, source=spec.config_path or spec.ref,
                                trust_remote_code=options.trust_remote_code))
    causal = _is_causal_lm(cls)
    if run.mode != "inference" and not causal:
        raise BadInput(f"--mode {run.mode} trains a causal language model; {spec.name} is a {cls.__name__} "
                       "(no LM head): use --mode inference")

    cuda = options.device != "cpu"
    if not cuda:
        device_map: Any = {"": "cpu"}
    elif options.device_map == "auto":
        device_map = "auto"
    else:
        device_map = {"": options.device if options.device != "cuda" else "cuda:0"}
    devices = ([torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] if device_map == "auto"
               else [torch.device(device_map[""])])
    meter = Meter(devices)
    torch.manual_seed(options.seed)

    report: dict[str, Any] = {
        "model": {"ref": spec.ref, "name": spec.name, "kind": spec.kind, "source": source.kind,
                  "description": source.description, "path": str(source.path) if source.path else None,
                  "architecture": cls.__name__, "quantization_config": source.quantization_config},
        "settings": {**settings.run.to_dict(), "quant": settings.quant.to_dict()},
        "recipe": recipes.describe(settings),
        "device": _device_info(devices, cuda),
        "versions": versions(),
        "steps": [], "phases": {}, "memory": {}, "loss": None, "loss_finite": None, "grads_finite": None,
        "step_seconds": None, "tokens_per_second": None, "quality": None, "error": None, "notes": [],
        "steps_requested": options.steps,
    }
    if seq_note:
        report["notes"].append(seq_note)
    if not cuda and run.optimizer == "paged_adamw8bit" and run.mode != "inference":
        report["notes"].append("paged_adamw8bit on CPU: bitsandbytes keeps the 8-bit state in ordinary (unpaged) "
                               "tensors; paging needs CUDA unified memory")
    phases = report["phases"]
    quantize = run.mode in ("qlora", "inference")
    model = None
    quant_out = quality_ids = None
    stage = "load"
    if cuda and len(devices) == 1:
        torch.cuda.set_device(devices[0])  # bitsandbytes kernels launch on the current device
    with warnings.catch_warnings():  # transformers' deprecation notices are not the user's business
        warnings.simplefilter("ignore", FutureWarning)
        try:
            say(f"loading {source.description} ({'4-bit' if quantize or source.kind == 'checkpoint-4bit' else '16-bit'}) "
                f"on {options.device if device_map != 'auto' else 'all GPUs'}")
            t0 = time.perf_counter()
            with _quiet_transformers():
                model, _ = load_model(spec, source, settings, options, device_map, quantize=quantize)
            if not cuda:
                portable_cpu_kernels(model)
            report["load_seconds"] = time.perf_counter() - t0
            report["model"]["kept_dtype"] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
            if settings.quant.dtype == "auto" and not (spec.config.get("dtype") or spec.config.get("torch_dtype")):
                report["notes"].append(f"config.json names no dtype: unquantized tensors loaded in "
                                       f"{report['model']['kept_dtype']}, as qtool estimate assumes (--dtype to change)")
            gc.collect()
            # the load's own peak includes 16-bit staging copies of tensors being quantized; the cache is not
            # emptied afterwards, as a training script would not empty it either
            report["memory"]["load_peak_allocated_bytes"] = meter.phase_peak()
            meter.peak_allocated = meter.peak_reserved = 0
            phases["after_load"] = meter.allocated()
            first = model.get_input_embeddings().weight.device
            vocab = model.get_input_embeddings().weight.shape[0]
            stage = "tokenizer"
            ids = make_batch(vocab, run.batch_size, run.seq_len, seed=options.seed, data=options.data,
                             tokenizer_dir=source.tokenizer_dir,
                             trust_remote_code=options.trust_remote_code).to(first)
            quality_ids = ids[:1, :QUALITY_TOKENS]
            report["inputs"] = {"source": f"text file {options.data}" if options.data else "random token ids",
                                "shape": list(ids.shape), "first_ids": ids[0, :8].tolist()}
            if reference is not None:
                stage = "quality"
                quant_out = _quality_outputs(model, quality_ids, causal)
                if cuda:
                    torch.cuda.empty_cache()
            meter.reset_peak()
            meter.phase_peak()  # start the run's peak at what the loaded model holds
            if options.steps:
                if run.mode == "inference":
                    stage = "inference"
                    say(f"inference: prefill {run.batch_size}x{run.seq_len} tokens + {options.decode_tokens} decode steps")
                    if run.recipe != "loop" and causal:
                        recipes.generate(model, ids, options, meter, phases, report)
                    else:
                        _infer(model, ids, options, meter, phases, report, causal)
                else:
                    stage = "peft wrap"
                    model = wrap_for_training(model, settings)
                    phases["peft_wrap_peak"] = meter.phase_peak()  # fp32 casts of kept params happen here
                    phases["after_peft_wrap"] = meter.allocated()
                    meter.reset_peak()
                    stage = "training"
                    say(f"{run.mode}: {options.steps} step(s) of {run.batch_size}x{run.seq_len} tokens, {run.optimizer}")
                    if run.recipe == "loop":
                        _train(model, ids, settings, options, meter, phases, report)
                    else:
                        recipes.train_with_trainer(model, ids, settings, options, meter, phases, report)
        except torch.cuda.OutOfMemoryError as exc:
            report["error"] = {"stage": stage, "kind": "out_of_memory", "message": str(exc).splitlines()[0]}
            meter.phase_peak()
        except (RuntimeError, ValueError, OSError) as exc:
            if stage in ("load", "tokenizer"):
                what = "cannot load the tokenizer" if stage == "tokenizer" else "cannot load"
                raise WeightsError(f"{what}: {_first_line(exc)}", path=source.tokenizer_dir if stage == "tokenizer"
                                   else source.path or spec.ref) from exc
            if isinstance(exc, OSError) or not _numerical(exc):
                raise  # a bug or an unsupported model, not a verdict: exit 1 with the message
            report["error"] = {"stage": stage, "kind": type(exc).__name__, "numerical": True,
                               "message": str(exc).splitlines()[0] if str(exc) else ""}
        finally:
            report["loaded"] = model is not None

    mem = report["memory"]
    mem["metric"] = "cuda_allocator" if cuda else "process_rss"
    mem["after_load_bytes"] = phases.get("after_load")
    if cuda:
        mem["peak_allocated_bytes"] = meter.peak_allocated
        mem["peak_reserved_bytes"] = meter.peak_reserved
        mem["per_device"] = meter.per_device()
        mem["outside_torch_bytes"] = sum(d["outside_torch_bytes"] for d in mem["per_device"])
        # what the process took from the card(s): the allocator's reservations plus the CUDA context
        mem["peak_needed_bytes"] = meter.peak_reserved + mem["outside_torch_bytes"]
    else:
        mem["peak_rss_bytes"] = _max_rss_bytes()
        mem["note"] = "on CPU the peak is the process's max resident set size (ru_maxrss), over its whole lifetime"
        mem["peak_needed_bytes"] = mem["peak_rss_bytes"]

    est = _estimate(spec, settings, options)
    if cuda and options.steps and report["loaded"] and not report["error"]:
        cmp_ = compare_estimate(est, mem["peak_allocated_bytes"], what="peak allocated",
                                key="allocated_peak_bytes", tolerance=options.tolerance)
        if est.get("peak_bytes") and mem["peak_needed_bytes"]:
            # the whole card: the estimate with its CUDA context vs reserved + outside torch
            cmp_["needed_relative_error"] = (est["peak_bytes"] - mem["peak_needed_bytes"]) / mem["peak_needed_bytes"]
    elif cuda and report["loaded"] and not report["error"]:
        cmp_ = compare_estimate(est, mem["after_load_bytes"], what="allocated after load", key="weights_gpu_bytes",
                                tolerance=options.tolerance)
    else:
        why = ("the CPU peak is the process's RSS" if not cuda else
               "the run did not finish" if report["error"] else "the model did not load")
        cmp_ = {"compared": None, "estimate_bytes": est.get("allocated_peak_bytes" if options.steps else "weights_gpu_bytes"),
                "measured_bytes": None, "relative_error": None, "within_tolerance": None,
                "tolerance": options.tolerance, "note": "not comparable: " + why}
    report["estimate"] = {**est, **cmp_}

    if reference is not None and quant_out is not None:
        del model
        model = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        say(f"loading the reference {reference[1]} in {settings.quant.compute_dtype}")
        try:
            report["quality"] = _reference_quality(reference, settings, options, device_map, quality_ids, quant_out,
                                                   causal)
        except torch.cuda.OutOfMemoryError as exc:
            # the 16-bit reference did not fit: a budget verdict (exit 3), the run's own results stand
            report["quality"] = {"reference": str(reference[0]), "error": f"out of memory: {_first_line(exc)}"}
            report["error"] = report["error"] or {"stage": "reference", "kind": "out_of_memory",
                                                  "message": f"loading --reference {reference[0]}: {_first_line(exc)}"}

    report["checks"] = checks(report, settings)
    err = outcome(report)
    report["exit_code"] = 0 if err is None else err.exit_code
    return report


_NAN_INF = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}" if str(exc).strip() else type(exc).__name__


def _numerical(exc: BaseException) -> bool:
    """Errors a broken (NaN/inf) model can raise inside kernels, e.g. sampling or argmax on NaN.
    Whole words only: "information" or "inference" in a message says nothing about NaN."""
    return _NAN_INF.search(str(exc)) is not None


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _device_info(devices: list, cuda: bool) -> dict:
    import platform

    import torch

    if not cuda:
        return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": 1,
                "threads": torch.get_num_threads()}
    names = [torch.cuda.get_device_name(d) for d in devices]
    return {"type": "cuda", "name": names[0], "names": names, "count": len(devices),
            "total_bytes": [torch.cuda.get_device_properties(d).total_memory for d in devices],
            "capability": ".".join(map(str, torch.cuda.get_device_capability(devices[0])))}


class _quiet_transformers:
    """transformers' loading progress bar and advice go to stderr; keep them out of the way."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()
        return False


def _reference_spec(options: VerifyOptions) -> ModelSpec:
    from qtool.models import resolve_model

    ref = resolve_model(options.reference, revision=options.revision)
    if ref.kind in ("preset", "shorthand", "approximation") or (ref.kind == "local" and Path(ref.ref).expanduser().is_file()):
        raise BadInput(f"--reference {options.reference}: needs a checkpoint with 16-bit weights, not a config")
    return ref


def _resolve_reference(options: VerifyOptions) -> tuple[Path, str]:
    src = resolve_source(_reference_spec(options), options)
    if src.kind != "checkpoint-16bit":
        raise BadInput("--reference must be a 16-bit checkpoint; this one is already quantized", path=src.path)
    return src.path, src.description


def _reference_quality(reference, settings: Settings, options: VerifyOptions, device_map, ids, quant_out,
                       causal: bool) -> dict:
    import torch

    from qtool.meta import hf_config, model_class
    from qtool.models import read_config_json

    root = reference[0]
    cfg = hf_config(read_config_json(root / "config.json"), source=root / "config.json",
                    trust_remote_code=options.trust_remote_code)
    cls = model_class(cfg)
    try:
        with _quiet_transformers():
            ref = cls.from_pretrained(root, dtype=_torch_dtype(settings.quant.compute_dtype), device_map=device_map,
                                      trust_remote_code=options.trust_remote_code)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, OSError) as exc:
        raise WeightsError(f"--reference cannot load: {_first_line(exc)}", path=root) from exc
    try:
        if ref.get_input_embeddings().weight.shape[0] <= int(ids.max()):
            raise BadInput("--reference has a smaller vocabulary than the model: not the same model", path=root)
        ref_out = _quality_outputs(ref, ids, causal)
    finally:
        del ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"reference": str(root), "tokens": int(ids.numel()), **compare_outputs(quant_out, ref_out, causal)}


# ------------------------------------------------------------------------------------------- verdict


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not applicable / informational and skipped
    message: str
    informational: bool = False


def checks(report: dict, settings: Settings) -> dict[str, dict]:
    """The verdicts, in a fixed order. The estimate check is informational: it never fails the run."""
    from qtool.sizes import format_bytes

    err = report.get("error") or {}
    oom = err.get("kind") == "out_of_memory"
    out: dict[str, Check] = {}
    if not report["loaded"]:
        out["loads"] = Check("loads", False, f"out of memory while loading: {err.get('message', '')}"
                             if oom else f"did not load: {err.get('message', '')}")
    else:
        out["loads"] = Check("loads", True, f"loaded in {report.get('load_seconds', 0):.1f}s ({report['model']['description']})")

    inference = settings.run.mode == "inference"
    numerical = bool(err) and not oom  # a kernel refused NaN/inf (only such errors are recorded, others raise)
    if report["loss_finite"] is False:
        out["finite_loss"] = Check("finite_loss", False, "outputs are not finite" if inference
                                   else f"loss is {report['loss']}")
    elif numerical:
        out["finite_loss"] = Check("finite_loss", False, f"{err.get('kind')} during {err.get('stage')}: "
                                   f"{err.get('message', '')}")
    elif report["loss_finite"]:
        out["finite_loss"] = Check("finite_loss", True, "outputs finite" if inference else f"loss {report['loss']:.4f}")
    elif oom and err.get("stage") != "reference":
        out["finite_loss"] = Check("finite_loss", None, "out of memory before a step finished")
    elif not report.get("steps_requested"):
        out["finite_loss"] = Check("finite_loss", None, "no steps run (--steps 0)")
    else:
        out["finite_loss"] = Check("finite_loss", None, "no step finished")
    if inference:
        out["finite_grads"] = Check("finite_grads", None, "not applicable to inference")
    elif report["grads_finite"] is None and numerical:
        out["finite_grads"] = Check("finite_grads", None, "the run stopped on a NaN/inf error before gradients were checked")
    elif report["grads_finite"] is None:
        out["finite_grads"] = Check("finite_grads", None, "no backward pass ran")
    else:
        out["finite_grads"] = Check("finite_grads", bool(report["grads_finite"]),
                                    "all gradients finite" if report["grads_finite"] else "non-finite gradients")

    budget = settings.run.budget_bytes
    need = report["memory"].get("peak_needed_bytes")
    what = "peak RSS" if report["memory"].get("metric") == "process_rss" else "peak reserved + outside torch"
    if oom:
        out["fits_budget"] = Check("fits_budget", False, f"out of memory during {err.get('stage')} on "
                                   f"{report['device']['name']}")
    elif budget is None:
        out["fits_budget"] = Check("fits_budget", None, f"no budget given ({what} {format_bytes(need or 0)})")
    else:
        per_gpu = [d["peak_reserved_bytes"] + d["outside_torch_bytes"] for d in report["memory"].get("per_device", [])]
        worst = max(per_gpu) if per_gpu else need
        ok = worst is not None and worst <= budget
        out["fits_budget"] = Check("fits_budget", ok, f"{what} {format_bytes(worst or 0)} "
                                   f"{'<=' if ok else '>'} budget {format_bytes(budget)}")

    est = report.get("estimate") or {}
    if est.get("relative_error") is None:
        why = est.get("error") or est.get("note") or "no measurement to compare"
        out["estimate_within_tolerance"] = Check("estimate_within_tolerance", None, why, informational=True)
    else:
        ok = bool(est["within_tolerance"])
        out["estimate_within_tolerance"] = Check(
            "estimate_within_tolerance", ok,
            f"{est['compared']}: {format_bytes(est['estimate_bytes'])} vs {format_bytes(est['measured_bytes'])} "
            f"({est['relative_error']:+.1%}, tolerance {est['tolerance']:.0%})", informational=True)
    return {k: {"passed": c.passed, "message": c.message, "informational": c.informational} for k, c in out.items()}


def outcome(report: dict) -> QtoolError | None:
    """The error to exit with: NotFinite (4) before DoesNotFit (3); informational checks never fail."""
    c = report["checks"]
    if c["finite_loss"]["passed"] is False or c["finite_grads"]["passed"] is False:
        bad = c["finite_loss"] if c["finite_loss"]["passed"] is False else c["finite_grads"]
        return NotFinite(f"{report['model']['name']}: {bad['message']}")
    if c["fits_budget"]["passed"] is False or c["loads"]["passed"] is False:
        bad = c["fits_budget"] if c["fits_budget"]["passed"] is False else c["loads"]
        return DoesNotFit(f"{report['model']['name']}: {bad['message']}")
    return None
