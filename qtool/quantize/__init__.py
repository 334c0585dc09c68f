"""`qtool quantize` as a library, one module per step:

  source    where the weights come from: a local folder, or a hub id downloaded (qtool.core.hub) or streamed
  fetch     --stream: the plan from remote headers, the shards fetched one ahead and deleted once read
  spill     where a tensor that reaches the sink before its offset is known waits (memory, then disk)
  plan      every output tensor decided from the headers and the meta-device model, before a byte is written
  stream    read, cast, check, quantize, hand to the sink, tensor by tensor; staging renamed on success
  sink      the safetensors shard writers (one Sink protocol)
  finalize  config.json, tokenizer and other files, module folders; card writes README.md

What "exactly as transformers" means here was read from transformers 5 (core_model_loading.py,
integrations/bitsandbytes.py, modeling_utils.save_pretrained) and is checked tensor for tensor by
tests/quantize/test_quantize.py against `from_pretrained(quantization_config=...)` + `save_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from qtool.core.config import QuantSettings
from qtool.quantize.plan import DEFAULT_MAX_SHARD_SIZE, QuantizePlan, plan_quantization
from qtool.quantize.source import default_destination, resolve_source
from qtool.quantize.stream import QuantizeResult, pick_device, run_quantization

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "QuantizeJob", "QuantizePlan", "QuantizeResult", "default_destination",
           "pick_device", "plan_quantization", "quantize", "resolve_source", "run_quantization"]


class QuantizeJob:
    """One quantization, planned: the source resolved, the destination checked, every tensor decided. `run()`
    streams it. What the CLI uses too (it adds parsing, progress display and rendering, nothing else)."""

    def __init__(self, ref: str, settings: QuantSettings, *, destination: Path | None = None,
                 revision: str | None = None, device: str = "auto", max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 force: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
                 allow_nonfinite: bool = False, dry_run: bool = False, download_progress: bool = False,
                 stream: bool | None = None, keep_source: bool = False):
        from qtool.core.checkpoint import Checkpoint
        from qtool.core.errors import BadInput
        from qtool.quantize.staging import check_destination

        if max_shard_size <= 0:
            raise BadInput(f"invalid --max-shard-size {max_shard_size}: must be positive")
        self._ckpt = self._helper = None
        if not dry_run and _cuda_likely(device):  # transformers' import on another core, beside ours
            from qtool.quantize.sidecar import Sidecar

            self._helper = Sidecar()
        try:
            self.device = pick_device(device)
            source, name, rev, self.remote = resolve_source(ref, revision=revision, progress=download_progress,
                                                            stream=stream, keep_source=keep_source)
            self.destination = Path(destination) if destination is not None else default_destination(name)
            if not dry_run:
                check_destination(self.destination, force=force, source=source)
            self._options = dict(max_shard_size=max_shard_size, force=force, trust_remote_code=trust_remote_code,
                                 allow_nonfinite=allow_nonfinite)
            if self.remote is not None:  # a hub stream: the plan comes from the shards' headers, read remotely
                from qtool.quantize.fetch import open_checkpoint

                self._ckpt = open_checkpoint(self.remote)
            else:
                self._ckpt = Checkpoint.open(source, allow_pickle=allow_pickle)
            self.plan = plan_quantization(source, settings, source_name=name, revision=rev,
                                          allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                          ckpt=self._ckpt)
        except BaseException:
            self.close()
            raise
        if self._helper is not None and self.plan.known_architecture and self.device == "cuda":
            self._helper.send(self.plan, trust_remote_code=trust_remote_code)
        elif self._helper is not None:  # transformers is imported here already, or no CUDA after all
            self._helper.close()
            self._helper = None

    def run(self, on_progress: Callable[[int, int, str], None] | None = None) -> QuantizeResult:
        return run_quantization(self.plan, self.destination, device=self.device, on_progress=on_progress,
                                ckpt=self._ckpt, remote=self.remote, helper=self._helper, **self._options)

    def close(self) -> None:
        if self._helper is not None:
            self._helper.close()
        if self._ckpt is not None:
            self._ckpt.close()

    def __enter__(self) -> "QuantizeJob":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cuda_likely(device: str) -> bool:
    """Whether the run will be on CUDA, guessed before torch is imported (it only decides whether to start
    the sidecar early; a wrong guess costs an idle process or the few seconds it would have saved)."""
    return device == "cuda" or (device == "auto" and os.path.exists("/dev/nvidiactl"))


def quantize(ref: str, settings: QuantSettings, *, on_progress: Callable[[int, int, str], None] | None = None,
             **options) -> tuple[QuantizePlan, QuantizeResult]:
    """Library entry point: resolve, plan, check the destination, stream. `options` are QuantizeJob's."""
    with QuantizeJob(ref, settings, **options) as job:
        return job.plan, job.run(on_progress)
