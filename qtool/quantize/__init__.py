"""`qtool quantize` as a library, one module per step:

  source    where the weights come from: a local folder, or a hub id downloaded (qtool.hub)
  plan      every output tensor decided from the headers and the meta-device model, before a byte is written
  stream    read, cast, check, quantize, hand to the sink, tensor by tensor; staging renamed on success
  sink      the safetensors shard writers (one Sink protocol)
  finalize  config.json, tokenizer and other files, module folders; card writes README.md

What "exactly as transformers" means here was read from transformers 5 (core_model_loading.py,
integrations/bitsandbytes.py, modeling_utils.save_pretrained) and is checked tensor for tensor by
tests/test_quantize.py against `from_pretrained(quantization_config=...)` + `save_pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtool.config import QuantSettings
from qtool.quantize.plan import DEFAULT_MAX_SHARD_SIZE, QuantizePlan, plan_quantization
from qtool.quantize.source import default_destination, resolve_source
from qtool.quantize.stream import QuantizeResult, pick_device, run_quantization

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "QuantizePlan", "QuantizeResult", "default_destination", "pick_device",
           "plan_quantization", "quantize", "resolve_source", "run_quantization"]


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
    from qtool.quantize.staging import check_destination

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
