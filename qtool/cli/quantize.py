"""`qtool quantize`: stream an FP16/BF16/FP32 safetensors checkpoint into a bitsandbytes 4-bit one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qtool.cli.options import (
    BlocksizeOpt, ComputeDtypeOpt, ConfigOpt, DoubleQuantOpt, DtypeOpt, JsonOpt, PresetOpt, QuantStorageOpt,
    QuantTypeOpt, RevisionOpt, SkipModulesOpt, TrustRemoteCodeOpt,
)

HELP = """Quantize a checkpoint to bitsandbytes 4-bit (NF4 by default), one tensor at a time.

The output folder loads with `AutoModelForCausalLM.from_pretrained(folder)` and no extra arguments,
tensor for tensor what transformers itself would save. Peak host memory stays near a few times the
largest tensor, whatever the model size. Nothing is written at the destination unless everything
succeeds.

Examples:

  qtool quantize meta-llama/Meta-Llama-3-8B            # -> ./Meta-Llama-3-8B-bnb-4bit

  qtool quantize ./my-model -o ./my-model-nf4 --dry-run  # the plan: what is kept and why, sizes

  qtool quantize ./my-model --quant-type fp4 --no-double-quant --compute-dtype float16

  qtool quantize ./my-model --skip-modules lm_head,mlp.gate --max-shard-size 5GB --force

  qtool quantize ./my-model --device cpu --json > report.json
"""

OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Destination folder  [default: ./<name>-bnb-4bit]", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where to quantize: auto | cpu | cuda (auto = cuda when available).")]
ShardOpt = Annotated[Optional[str], typer.Option("--max-shard-size", help="Largest output file, e.g. 5GB  [default: 50GB, as save_pretrained]", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing destination (only after success).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Read .bin/.pt checkpoints (pickle can run code: only if you trust it).")]


def quantize(
    model: Annotated[str, typer.Argument(help="Local checkpoint directory or hub id (org/name).", show_default=False)],
    out: OutOpt = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    quant_type: QuantTypeOpt = None,
    double_quant: DoubleQuantOpt = None,
    compute_dtype: ComputeDtypeOpt = None,
    blocksize: BlocksizeOpt = None,
    quant_storage: QuantStorageOpt = None,
    skip_modules: SkipModulesOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    max_shard_size: ShardOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    allow_pickle: PickleOpt = False,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from qtool.cli.common import settings_from_flags
    from qtool.cli.output import Output
    from qtool.checkpoint import Checkpoint
    from qtool.quantize import (
        DEFAULT_MAX_SHARD_SIZE, default_destination, pick_device, plan_quantization, resolve_source,
    )
    from qtool.sizes import parse_size
    from qtool.writer import check_destination

    settings = settings_from_flags(
        config, preset=preset, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
        blocksize=blocksize, quant_storage=quant_storage, skip_modules=skip_modules, dtype=dtype,
    )
    shard = parse_size(max_shard_size, what="--max-shard-size") if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE
    if shard <= 0:
        from qtool.errors import BadInput

        raise BadInput("invalid --max-shard-size 0: must be positive")
    output = Output(as_json=as_json)
    dev = pick_device(device)
    source, name, rev = resolve_source(model, revision=revision, progress=not as_json)
    dest = out if out is not None else default_destination(name)
    if not dry_run:
        check_destination(dest, force=force, source=source)
    with Checkpoint.open(source, allow_pickle=allow_pickle) as ckpt:
        plan = plan_quantization(source, settings.quant, source_name=name, revision=rev, allow_pickle=allow_pickle,
                                 trust_remote_code=trust_remote_code, ckpt=ckpt)
        for w in plan.warnings:
            output.warn(w)
        if dry_run:
            data = {"dry_run": True, "destination": str(dest), "device": dev, **plan.to_dict(dev)}
            output.result(data, lambda console: render_plan(console, plan, data))
            return
        result = _run_with_progress(output, plan, ckpt, dest, dev, shard, force, trust_remote_code)
    data = {"dry_run": False, **plan.to_dict(dev), **result.to_dict()}
    output.result(data, lambda console: render_result(console, plan, result))


def _run_with_progress(output, plan, ckpt, dest, dev, shard, force, trust_remote_code):
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    from qtool.quantize import run_quantization

    progress = Progress(
        TextColumn("[bold]quantize[/bold]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[tensor]}", style="dim"),
        console=output.err, transient=True, disable=output.quiet,
    )
    with progress:
        task = progress.add_task("quantize", total=plan.input_bytes, tensor="")

        def on_progress(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, tensor=name[-48:])

        return run_quantization(plan, dest, device=dev, max_shard_size=shard, force=force,
                                trust_remote_code=trust_remote_code, on_progress=on_progress, ckpt=ckpt)


def render_plan(console, plan, data: dict) -> None:
    from qtool.sizes import format_bytes

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
                  f"(~0.5 GB for Python + torch); largest tensor {format_bytes(plan.largest_tensor_bytes)}")
    console.print(f"destination: {data['destination']} (dry run: nothing written)")


def render_result(console, plan, result) -> None:
    from qtool.sizes import format_bytes

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
    console.print(f"  stages: read {st.get('read', 0.0):.1f} s (waited for {st.get('read_wait', 0.0):.1f} s), "
                  f"quantize {quantize:.1f} s, write {write:.1f} s (reads and writes run beside the quantizing)")
    gpu = f", GPU peak {format_bytes(result.peak_gpu_bytes)}" if result.peak_gpu_bytes is not None else ""
    console.print(f"  peak host RSS: {format_bytes(result.peak_rss_bytes)}{gpu}")
    from qtool.modelcard import auto_class

    console.print(f"  load it: {auto_class(plan.architecture)}.from_pretrained({str(result.destination)!r})")
