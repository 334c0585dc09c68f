"""Step 3: the stream. Tensors go in the order the sink takes them; each is pread in parallel chunks into
a reused read-ahead arena (quantize.streamio), cast to the load dtype, Conv1D weights transposed,
checked for NaN/inf, quantized exactly as `Params4bit._quantize` does on CUDA (by its bit-exact twin
quantize.kernel, on the CPU or on the GPU), and its packed weight +
`QuantState.as_dict(packed=True)` handed to a background writer (quantize.sink). Kept tensors whose bytes
do not change are copied file to file. All of it inside a staging directory (quantize.staging) that is
renamed into place on success. Seconds per stage are returned as `stage_seconds`.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qtool.core.config import QuantSettings
from qtool.core.errors import BadInput, DeviceError, WeightsError
from qtool.core.plan import KEEP, QUANTIZE
from qtool.quantize.plan import DEFAULT_MAX_SHARD_SIZE, QuantizePlan, entry_specs

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
    stage_seconds: dict = field(default_factory=dict)  # where the time went (see qtool.quantize.streamio)
    single_pass: bool = True  # False: a shard boundary depended on blob lengths, written twice
    warnings: list[str] = field(default_factory=list)  # files of the source that were not copied, and why
    peak_disk_bytes: int = 0  # the most disk this run added at once: staged output (+ fetched source shards)
    fetch: dict | None = None  # a hub stream's shards: bytes, seconds, overlap (qtool.quantize.fetch)

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


def quantize_tensor(t, *, settings: QuantSettings, known_finite: bool = False):
    """Params4bit._quantize on one tensor -> {suffix: tensor} as Linear4bit saves it, with the bytes
    bitsandbytes' CUDA kernel gives: qtool.quantize.kernel (its exact twin) on the tensor's device, CPU or
    CUDA, so bitsandbytes is never imported for finite weights."""
    import torch

    storage = getattr(torch, settings.quant_storage)
    # NaN/inf reach here only with --allow-nonfinite (the stream refuses them otherwise): qtool's kernel
    # refuses them, so bitsandbytes' own kernel quantizes such a tensor, garbage in, garbage out.
    if known_finite or bool(torch.isfinite(t).all()):
        from qtool.quantize.kernel import NonFiniteError
        from qtool.quantize.kernel import quantize_4bit as exact_quantize_4bit

        try:
            return exact_quantize_4bit(t, blocksize=settings.blocksize, quant_type=settings.quant_type,
                                       double_quant=settings.double_quant, quant_storage=storage)
        except NonFiniteError:
            raise  # the caller names the tensor and counts (check_finite)
        except ValueError as exc:
            raise WeightsError(str(exc)) from exc
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(t.contiguous(), blocksize=settings.blocksize,
                                  compress_statistics=settings.double_quant, quant_type=settings.quant_type,
                                  quant_storage=storage)
    parts = {"": packed}
    parts.update({"." + k: v for k, v in state.as_dict(packed=True).items()})
    return parts


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB



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
    remote=None,
    helper=None,
) -> QuantizeResult:
    """Stream the planned tensors into `destination`. Nothing is left behind on failure or Ctrl-C.
    A NaN/inf in a tensor that passes through memory is refused unless `allow_nonfinite`. `remote`: a
    qtool.quantize.fetch.HubSource whose shards are fetched as the stream goes (`ckpt` from its headers).
    `helper`: a qtool.quantize.sidecar.Sidecar making config.json and generation_config.json meanwhile."""
    import torch

    from qtool.core.checkpoint import Checkpoint
    from qtool.quantize.staging import check_destination, output_error

    destination = Path(destination)
    check_destination(destination, force=force, source=plan.source)
    dev = pick_device(device)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ckpt = ckpt or Checkpoint.open(plan.source)
    try:
        return _stream(plan, destination, ckpt, dev, max_shard_size, force, trust_remote_code, on_progress,
                       allow_nonfinite=allow_nonfinite, remote=remote, helper=helper)
    except OSError as exc:
        err = output_error(exc, destination)
        if err is None:
            raise
        raise err from exc



def _schedule(plan: QuantizePlan, *, single_pass: bool) -> list[tuple[int, list[tuple[str, str]]]]:
    """(tensor index, [(output name, part suffix)]) in the order the sink takes them: by name with all the
    parts of a tensor together (LayoutWriter fills each file front to back), or in state-dict order one
    part at a time (ShardWriter, when a shard boundary depends on blob lengths)."""
    if not single_pass:
        return [(idx, [(name, suffix)]) for name, idx, suffix in plan.slots]
    slots_of: dict[int, list[tuple[str, str]]] = {}
    for name, idx, suffix in plan.slots:
        slots_of.setdefault(idx, []).append((name, suffix))
    return [(i, slots_of[i]) for i in sorted(slots_of, key=lambda i: plan.tensors[i].name)]


def _arena_bytes(big: int, dev: str) -> int:
    """Read-ahead budget for tensors of at most `big` bytes: on CUDA two (one being used, the next
    arriving); on CPU, where quantizing is the slow part, one plus a little for the small ones around it."""
    return 2 * big if dev == "cuda" else big + min(big, 64 * 2**20)


def _copyable(plan: QuantizePlan, ckpt, sink, idx: int) -> bool:
    """A kept tensor whose bytes do not change goes file to file (copy_file_range), never through memory."""
    from qtool.core.dtypes import BY_NAME

    t = plan.tensors[idx]
    info = ckpt.tensors.get(t.source)
    return (t.action == KEEP and getattr(ckpt, "format", "safetensors") == "safetensors" and info is not None
            and info.start >= 0 and t.dtype in BY_NAME and BY_NAME[t.dtype].code == info.dtype
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


class _Feed:
    """One run's tensors: read -> cast -> check -> quantize -> sink, one at a time, in the schedule's order."""

    def __init__(self, plan: QuantizePlan, ckpt, dev: str, clock, *, allow_nonfinite: bool, gate=None):
        import torch

        self.plan, self.ckpt, self.dev, self.clock, self.gate = plan, ckpt, dev, clock, gate
        self.allow_nonfinite = allow_nonfinite
        self.sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        self.reader = None

    def _quantize(self, t, w) -> dict:
        """qtool's kernel sees NaN/inf in its block maxima, so a finite tensor pays no extra pass; only a
        refused tensor is scanned again, to name what it holds."""
        from qtool.quantize.kernel import NonFiniteError

        try:
            return quantize_tensor(w, settings=self.plan.settings, known_finite=not self.allow_nonfinite)
        except NonFiniteError:
            check_finite(t, w, self.ckpt)
            raise

    def process(self, idx: int):
        """Read, cast, quantize one tensor -> ({suffix: CPU tensor}, lease of the arena block still in use)."""
        import torch

        t, clock = self.plan.tensors[idx], self.clock
        with clock("read_wait"):
            src, lease = self.reader.take(t.source)
        dtype = getattr(torch, t.dtype)
        if t.action == KEEP:
            with clock("cast"):
                value = src.to(dtype)
            if not self.allow_nonfinite:
                check_finite(t, value, self.ckpt)
            if value is not src:
                lease.release()
                lease = None
            return {"": value}, lease
        with clock("h2d" if self.dev == "cuda" else "cast"):
            w = src.to(self.dev, dtype)
            self.sync()
        if self.dev == "cuda":
            lease.release()
        if t.transpose:
            w = w.T
        with clock("quantize"):
            parts = self._quantize(t, w)
            self.sync()
        del w
        lease.release()
        with clock("d2h"):
            parts = {k: v.cpu() for k, v in parts.items()}
        return parts, None

    def into(self, sink, schedule, on_progress) -> dict:
        """Every scheduled part into `sink`; -> sink.finish(). Reader and writer threads end either way."""
        from qtool.quantize.streamio import BackgroundWriter, Reader

        plan, ckpt, clock = self.plan, self.ckpt, self.clock
        writer = None
        try:
            copies = {i for i, _ in schedule if _copyable(plan, ckpt, sink, i)}
            reads = list(dict.fromkeys(i for i, _ in schedule if i not in copies))
            big = max((plan.tensors[i].source_bytes for i in reads), default=0)
            self.reader = Reader(ckpt, [plan.tensors[i].source for i in reads], arena_bytes=_arena_bytes(big, self.dev),
                                 pin=self.dev == "cuda", clock=clock, gate=self.gate)
            writer = BackgroundWriter(sink, max_bytes=max(big, 256 * 2**20), clock=clock)
            done, pending = 0, {}  # parts of a tensor the sink takes later (state-dict order)
            for idx, slots in schedule:
                t = plan.tensors[idx]
                if idx in copies:  # file to file, never through memory
                    info = ckpt.tensors[t.source]
                    if self.gate is not None:
                        self.gate.wait(info.file)
                    writer.submit_copy(t.name, info.file, info.start, info.end - info.start,
                                       done=self.gate and functools.partial(self.gate.used, info.file))
                    done += t.source_bytes
                else:
                    if idx in pending:
                        parts, lease = pending.pop(idx), None
                    else:
                        parts, lease = self.process(idx)
                        done += t.source_bytes
                    writer.submit([(name, parts.pop(suffix)) for name, suffix in slots], lease)
                    if parts:
                        pending[idx] = parts
                if on_progress is not None:
                    on_progress(done, plan.input_bytes, t.source)
            writer.drain()
            with clock("finish_shards"):
                return sink.finish()
        except BaseException:
            sink.abort()
            raise
        finally:
            for part in (writer, self.reader):
                if part is not None:
                    with contextlib.suppress(Exception):
                        part.close()


def _source(remote, ckpt, plan: QuantizePlan, schedule, staging: Path, destination: Path, clock):
    """A hub stream's ShardFetcher for this run (its schedule goes shard by shard), else None."""
    if remote is None:
        return contextlib.nullcontext()
    from qtool.quantize.fetch import shards

    sources = [plan.tensors[i].source for i in dict.fromkeys(i for i, _ in schedule)]
    return shards(remote, ckpt, sources, staging, destination, clock)


def _stream(plan, destination, ckpt, dev, max_shard_size, force, trust_remote_code, on_progress, *,
            allow_nonfinite: bool = False, remote=None, helper=None) -> QuantizeResult:
    import torch

    from qtool.quantize.card import model_card
    from qtool.quantize.fetch import allocated
    from qtool.quantize.finalize import finalize
    from qtool.quantize.sink import LayoutWriter, ShardWriter, split_shards
    from qtool.quantize.staging import staging_dir
    from qtool.quantize.streamio import StageClock

    clock = StageClock()
    for k, v in plan.timings.items():
        clock.add(k, v)
    start = time.monotonic()
    if dev == "cuda":  # qtool's own kernel quantizes on the device too: bitsandbytes is not imported
        with clock("cuda_init"):
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
    specs = entry_specs(plan)
    shards = split_shards(specs, max_shard_size)
    schedule = _schedule(plan, single_pass=shards is not None)
    if remote is not None and shards is not None:  # shard by shard (stable: by name within one)
        rank = {f: i for i, f in enumerate(ckpt.files)}
        schedule.sort(key=lambda item: rank[ckpt.tensors[plan.tensors[item[0]].source].file])
    with staging_dir(destination, force=force) as tmp, \
            _source(remote, ckpt, plan, schedule, tmp, destination, clock) as fetcher:
        sink = (LayoutWriter(tmp, specs, shards) if shards is not None
                else ShardWriter(tmp, max_shard_size=max_shard_size))
        feed = _Feed(plan, ckpt, dev, clock, allow_nonfinite=allow_nonfinite, gate=fetcher)
        result = feed.into(sink, schedule, on_progress)
        with clock("config_and_small_files"):
            skipped = finalize(plan, tmp, result, trust_remote_code=trust_remote_code, helper=helper)
        seconds = time.monotonic() - start
        clock.add("run", seconds)
        res = QuantizeResult(
            destination=destination, files=result["files"], input_bytes=plan.input_bytes,
            output_bytes=sum((tmp / f).stat().st_size for f in result["files"]), seconds=seconds,
            peak_rss_bytes=_peak_rss(), peak_gpu_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None,
            device=dev, quantized=sum(1 for t in plan.tensors if t.action == QUANTIZE),
            kept=sum(1 for t in plan.tensors if t.action == KEEP), stage_seconds=clock.rounded(),
            single_pass=shards is not None, warnings=[f"not copied: {name} ({why})" for name, why in skipped],
            peak_disk_bytes=max(fetcher.sample(), fetcher.peak) if fetcher is not None else allocated(tmp),
            fetch=fetcher.report(clock.rounded()) if fetcher is not None else None,
        )
        (tmp / "README.md").write_text(model_card(plan, res), encoding="utf-8")
    return res
