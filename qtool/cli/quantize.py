"""`qtool quantize`: stream an FP16/BF16/FP32 safetensors checkpoint into a bitsandbytes 4-bit one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qtool.cli.options import JsonOpt, RevisionOpt, Settings, TrustRemoteCodeOpt, escape, with_settings
from qtool.cli.output import Output
from qtool.core.config import flag_name
from qtool.cli.progress import ProgressLine

HELP = """Quantize a checkpoint to bitsandbytes 4-bit (NF4 by default), one tensor at a time.

The output folder loads with `AutoModelForCausalLM.from_pretrained(folder)` and no extra arguments,
tensor for tensor what transformers itself would save. Peak host memory stays near a few times the
largest tensor, whatever the model size. Nothing is written at the destination unless everything
succeeds.

Examples:

  qtool quantize meta-llama/Meta-Llama-3-8B      # -> ./Meta-Llama-3-8B-bnb-4bit
  qtool quantize ./my-model -o ./my-nf4 --dry-run  # the plan, nothing written
  qtool quantize ./my-model --quant-type fp4 --no-double-quant
  qtool quantize ./my-model --skip-modules lm_head --max-shard-size 5GB
  qtool quantize ./my-model --device cpu --json > report.json
  qtool quantize meta-llama/Meta-Llama-3-70B --keep-source
"""

OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", metavar="DIR", show_default=False, help=escape("Destination folder  [default: ./NAME-bnb-4bit]"))]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="DEV", help="Where to quantize: auto | cpu | cuda (auto = cuda when available).")]
ShardOpt = Annotated[Optional[str], typer.Option(
    "--max-shard-size", metavar="SIZE", show_default=False,
    help=escape("Largest output file, e.g. 5GB  [default: 50GB, as save_pretrained]"))]
ForceOpt = Annotated[bool, typer.Option(
    "--force", metavar="", help="Replace an existing destination (only after success).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", metavar="", help="Print the plan and write nothing.")]
PickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", metavar="", help="Read .bin/.pt checkpoints (pickle can run code: only if you trust it).")]
ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False, help="Local checkpoint directory or hub id (org/name).")]


@with_settings("quantize")
def quantize(
    model: ModelArg,
    settings: Settings,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    max_shard_size: ShardOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    allow_pickle: PickleOpt = False,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from qtool.quantize import DEFAULT_MAX_SHARD_SIZE, QuantizeJob
    from qtool.core.sizes import parse_size

    shard = parse_size(max_shard_size, what="--max-shard-size") if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE
    output = Output(as_json=as_json, units=settings.values["units"])
    for line in settings.warnings:
        output.warn(line)
    if _is_local(model):
        for key in ("stream", "keep_source"):
            if settings.values[key] and settings.sources[key] != "default":
                output.warn(f"{flag_name(key)} applies to a hub id; {model} is a local folder ({key} ignored)")
    with QuantizeJob(model, settings.quant, destination=out, revision=revision, device=device, max_shard_size=shard,
                     force=force, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                     allow_nonfinite=settings.values["allow_nonfinite"], dry_run=dry_run,
                     download_progress=not as_json, stream=settings.values["stream"],
                     keep_source=settings.values["keep_source"]) as job:
        plan = job.plan
        for w in plan.warnings:
            output.warn(w)
        if dry_run:
            data = {"dry_run": True, "destination": str(job.destination), "device": job.device,
                    **plan.to_dict(job.device)}
            output.result(data, lambda console: render_plan(console, plan, data, output.size))
            return
        progress = ProgressLine(output.err.file, total=plan.input_bytes, size=output.size,
                                tty=output.err.is_terminal, width=output.err.width)
        try:  # the library streams; the line shows how far it got (a plain line every few seconds in a log)
            result = job.run(on_progress=progress)
        finally:
            progress.close()
    for w in result.warnings:
        output.warn(w)
    data = {"dry_run": False, **plan.to_dict(job.device), **result.to_dict(),
            "warnings": plan.warnings + result.warnings}
    output.result(data, lambda console: render_result(console, plan, result, output.size))


def render_plan(console, plan, data: dict, format_bytes) -> None:
    c = data["tensors"]
    s = plan.settings
    console.print(f"[bold]{plan.source_name}[/bold] ({plan.architecture}, {plan.total_parameters:,} parameters, "
                  f"loads as {plan.model_dtype})")
    dq = "double-quant" if s.double_quant else "no double-quant"
    console.print(f"plan: {s.quant_type.upper()}, {dq}, blocksize {s.blocksize}, compute {s.compute_dtype}, "
                  f"storage {s.quant_storage} on {data['device']}")
    console.print(f"  quantize {c['quantized']} tensors")
    for reason, r in sorted(c["kept_by_reason"].items(), key=lambda kv: -kv[1]["bytes"]):
        console.print(f"  keep     {r['tensors']} tensors ({format_bytes(r['bytes'])}): {reason}")
    for name, why in plan.dropped:
        console.print(f"  drop     {name}: {why}")
    inp, outb = data["input_bytes"], data["output_bytes_estimate"]
    console.print(f"size: {format_bytes(inp)} -> about {format_bytes(outb)} "
                  f"({100 * (1 - outb / inp):.1f}% smaller)" if inp else "size: empty checkpoint")
    console.print(f"peak host memory: about {format_bytes(data['peak_host_bytes_estimate'])} above the process baseline "
                  f"(~0.5 GiB for Python + torch); largest tensor {format_bytes(plan.largest_tensor_bytes)}")
    console.print(f"destination: {data['destination']} (dry run: nothing written)")


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def render_result(console, plan, result, format_bytes) -> None:
    r = result.to_dict()
    console.print(f"[green]wrote[/green] {result.destination} ({len(result.files)} shard"
                  f"{'s' if len(result.files) > 1 else ''})")
    console.print(f"  tensors: {result.quantized} quantized, {result.kept} kept")
    console.print(f"  size: {format_bytes(result.input_bytes)} -> {format_bytes(result.output_bytes)} "
                  f"({100 * r['reduction']:.1f}% smaller)")
    console.print(f"  time: {result.seconds:.1f} s ({format_bytes(r['throughput_bytes_per_s'])}/s) on {result.device}")
    st = result.stage_seconds or {}
    quantize = sum(st.get(k, 0.0) for k in ("cast", "h2d", "quantize", "d2h"))
    write = sum(st.get(k, 0.0) for k in ("write", "write_copy", "finish_shards"))
    line = (f"  stages: read {_secs(st.get('read', 0.0))} s (waited for {_secs(st.get('read_wait', 0.0))} s), "
            f"quantize {_secs(quantize)} s, write {_secs(write)} s")
    console.print(line + (", overlapped" if len(line) <= 68 else ""))  # 80 columns
    f = result.fetch
    if f:  # a hub stream (qtool.quantize.fetch): downloads ran beside the quantizing
        console.print(f"  fetch: {f['shards']} shards, {format_bytes(f['bytes'])} in {_secs(f['seconds'])} s, "
                      f"{_secs(f['overlap_seconds'])} s of it beside quantizing")
    what = "the output" if not f else "output + shards, kept in the HF cache" if f["kept_in_cache"] else \
        "output + shards, each deleted once read"
    console.print(f"  peak disk: {format_bytes(result.peak_disk_bytes)} ({what})")
    gpu = f", GPU peak {format_bytes(result.peak_gpu_bytes)}" if result.peak_gpu_bytes is not None else ""
    console.print(f"  peak host RSS: {format_bytes(result.peak_rss_bytes)}{gpu}")
    from qtool.quantize.card import auto_class

    console.print(f"  load it: {auto_class(plan.architecture)}.from_pretrained({str(result.destination)!r})")


def _is_local(model: str) -> bool:
    """What resolve_source reads as a local checkpoint (a name the filesystem refuses is not one: that error
    is resolve_source's to give)."""
    try:
        return Path(model).expanduser().exists()
    except (OSError, ValueError):
        return False
