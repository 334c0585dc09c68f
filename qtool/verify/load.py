"""Loading the model the way a user would: one from_pretrained, random weights fed as a state dict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qtool.core.config import Settings
from qtool.core.models import ModelSpec
from qtool.verify.inputs import Source, VerifyOptions


def _torch_dtype(name: str):
    from qtool.core.dtypes import code, torch_dtype

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


def apply_cap(index: int, budget: int) -> int:
    """Hold this process to `budget` bytes of card `index`, as if the card were that small
    (torch.cuda.set_per_process_memory_fraction): the caching allocator gets the budget less what the CUDA
    context already holds outside it. Returns the allocator's cap in bytes."""
    import torch

    from qtool.core.errors import DeviceError
    from qtool.core.sizes import format_bytes

    torch.zeros(1, device=f"cuda:{index}")  # the context exists from here on
    free, total = torch.cuda.mem_get_info(index)
    outside = total - free - torch.cuda.memory_reserved(index)
    cap = budget - outside
    if cap <= 0 or budget > total:
        raise DeviceError(f"--cap-memory: a budget of {format_bytes(budget)} cannot be simulated on cuda:{index} "
                          f"({format_bytes(total)}, of which the CUDA context holds {format_bytes(outside)})")
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    _simulate_card(index, budget)
    return cap


_SIMULATED: dict[int, int] = {}  # card index -> the budget it stands for under --cap-memory


def _simulate_card(index: int, budget: int) -> None:
    """From here on torch.cuda.mem_get_info(index) answers as the smaller card would: total = the budget, free =
    the budget less what is in use. What sizes itself by the card sees the card being simulated: transformers'
    caching_allocator_warmup asks for the whole model up to the card's total less 1.2 GiB, which on the real
    card fits and on a big card under the cap would fail where the real card does not."""
    import torch

    _SIMULATED[index] = budget
    if getattr(torch.cuda.mem_get_info, "_qtool_simulated", False):
        return
    real = torch.cuda.mem_get_info

    def mem_get_info(device=None):
        free, total = real(device)
        idx = torch.cuda._utils._get_device_index(device, optional=True)
        budget = _SIMULATED.get(idx)
        if budget is None:
            return free, total
        return max(0, budget - (total - free)), budget

    mem_get_info._qtool_simulated = True
    torch.cuda.mem_get_info = mem_get_info


def pipeline_memory(devices: list, caps: list) -> dict:
    """device_map="auto"'s max_memory: the cards in use only, each at its cap or its free memory (accelerate's
    own default for a card), so layers are placed as they would be on the smaller cards."""
    import torch

    return {d.index: cap if cap else torch.cuda.mem_get_info(d.index)[0] for d, cap in zip(devices, caps)}


def _is_causal_lm(cls) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return cls.__name__ in names


def load_model(spec: ModelSpec, source: Source, settings: Settings, options: VerifyOptions, device_map, *,
               quantize: bool, path: Path | None = None, max_memory: dict | None = None):
    """from_pretrained, once, the way a user would call it. `quantize=False` loads 16-bit. A rank of FSDP with
    ram-efficient loading parks each quantized weight in host memory (see parked_on_cpu)."""
    run = settings.run
    if quantize and run.parallel == "fsdp" and run.fsdp_ram_efficient and device_map != {"": "cpu"}:
        with parked_on_cpu():
            return _load_model(spec, source, settings, options, device_map, quantize=quantize, path=path,
                               max_memory=max_memory)
    return _load_model(spec, source, settings, options, device_map, quantize=quantize, path=path,
                       max_memory=max_memory)


class parked_on_cpu:
    """FSDP-QLoRA's low-memory load: each weight is quantized on the card, then moved to host memory with its
    quantization state, so the card never holds the whole 4-bit model; FSDP then moves one wrapped layer at a
    time to the card and keeps its shard (Params4bit.to moves the quant_state along). transformers 4 did this
    for rank 0 under fsdp_cpu_ram_efficient_loading; transformers 5 quantizes the whole model onto every
    rank's card. Done by wrapping bitsandbytes' Params4bit._quantize for the duration of the load."""

    def __enter__(self):
        from bitsandbytes.nn import Params4bit

        self._original = original = Params4bit._quantize

        def quantize_then_park(param, device):
            out = original(param, device)
            if out.data.device.type != "cpu":
                out.data = out.data.to("cpu")
                if out.quant_state is not None:
                    out.quant_state.to("cpu")
            return out

        Params4bit._quantize = quantize_then_park
        return self

    def __exit__(self, *exc):
        from bitsandbytes.nn import Params4bit

        Params4bit._quantize = self._original
        return False


def _load_model(spec: ModelSpec, source: Source, settings: Settings, options: VerifyOptions, device_map, *,
                quantize: bool, path: Path | None = None, max_memory: dict | None = None):
    from qtool.core.meta import hf_config, model_class

    cfg = hf_config(spec.config, source=spec.config_path or spec.ref, trust_remote_code=options.trust_remote_code)
    cls = model_class(cfg)
    kwargs: dict[str, Any] = {"device_map": device_map, "trust_remote_code": options.trust_remote_code,
                              "dtype": _kept_dtype(spec, settings)}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
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
