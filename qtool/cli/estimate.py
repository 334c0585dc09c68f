"""`qtool estimate`: weights per format, then the memory of the chosen run mode and whether it fits."""

from __future__ import annotations

from qtool.cli.options import (
    BatchOpt, BlocksizeOpt, ComputeDtypeOpt, ConfigOpt, DoubleQuantOpt, DtypeOpt, GpuOpt, GradCkptOpt, JsonOpt,
    LoraAlphaOpt, LoraRankOpt, LoraTargetsOpt, ModeOpt, ModelArg, OptimizerOpt, PrecisionOpt, PresetOpt,
    QuantStorageOpt, QuantTypeOpt, RecipeOpt, RevisionOpt, SeqLenOpt, SkipModulesOpt, TrustRemoteCodeOpt, VramOpt,
)

HELP = """Plan GPU memory from exact parameter counts: FP32/FP16/INT8/FP4/NF4 weights, then the peak of
inference, QLoRA, LoRA or full fine-tuning, term by term. Presets and sizes never import torch.

Exit status: 0 fits (or no budget given), 3 does not fit the budget, 2 bad input.

Examples:

  qtool estimate 70b                              # Llama-3-70B: weights per format, QLoRA peak

  qtool estimate 8b --vram 24GB                   # fits in 24 GB? (exit 3 if not)

  qtool estimate llama-3-8b --gpu rtx-4090 --seq-len 4096 --batch-size 2

  qtool estimate 70b --mode inference --seq-len 8192 --json

  qtool estimate ./my-model/config.json --optimizer paged_adamw8bit --lora-rank 64

  qtool estimate mistralai/Mistral-7B-v0.1 --mode lora --no-gradient-checkpointing
"""

_BAR = 30


def estimate(
    model: ModelArg,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    quant_type: QuantTypeOpt = None,
    double_quant: DoubleQuantOpt = None,
    compute_dtype: ComputeDtypeOpt = None,
    blocksize: BlocksizeOpt = None,
    quant_storage: QuantStorageOpt = None,
    skip_modules: SkipModulesOpt = None,
    dtype: DtypeOpt = None,
    mode: ModeOpt = None,
    seq_len: SeqLenOpt = None,
    batch_size: BatchOpt = None,
    lora_rank: LoraRankOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_targets: LoraTargetsOpt = None,
    optimizer: OptimizerOpt = None,
    recipe: RecipeOpt = None,
    precision: PrecisionOpt = None,
    gradient_checkpointing: GradCkptOpt = None,
    vram: VramOpt = None,
    gpu: GpuOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    from qtool.cli.common import settings_from_flags
    from qtool.cli.output import Output
    from qtool.errors import DoesNotFit
    from qtool.estimate import estimate_report
    from qtool.models import resolve_model
    from qtool.sizes import format_bytes

    settings = settings_from_flags(
        config, preset=preset, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
        blocksize=blocksize, quant_storage=quant_storage, skip_modules=skip_modules, dtype=dtype, mode=mode,
        seq_len=seq_len, batch_size=batch_size, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=lora_targets, optimizer=optimizer, recipe=recipe, precision=precision,
            gradient_checkpointing=gradient_checkpointing,
        vram=vram, gpu=gpu,
    )
    out = Output(as_json=as_json)
    spec = resolve_model(model, revision=revision)
    report = estimate_report(spec, settings, trust_remote_code=trust_remote_code)
    for line in report["warnings"]:
        out.warn(line)
    out.result(report, lambda console: render(console, report))
    if report["fits"] is False:
        raise DoesNotFit(
            f"{spec.name} needs {format_bytes(report['peak_bytes'])} at peak ({report['mode']}), "
            f"over the {format_bytes(report['budget_bytes'])} budget by {format_bytes(-report['headroom_bytes'])}"
        )


def render(console, r: dict) -> None:
    """The human report: formats table first, then the peak term by term, then the fit."""
    from rich.table import Table

    from qtool.formats import FORMATS, TABLE_FORMATS
    from qtool.sizes import format_bytes

    p = r["params"]
    title = f"{r['model']['name']}: {p['total']:,} parameters"
    if r["approximation"]:
        title += " (approximation)"
    t = Table(title=title, title_justify="left")
    t.add_column("format")
    t.add_column("weights", justify="right")
    t.add_column("bits/param", justify="right")
    t.add_column("vs FP16", justify="right")
    for key in TABLE_FORMATS + ((r["format"],) if r["format"] not in TABLE_FORMATS else ()):
        w = r["weights"][key]
        label = FORMATS[key].label + ("  <- chosen" if key == r["format"] else "")
        t.add_row(label, format_bytes(w["checkpoint"]), f"{w['bits_per_param']:.2f}",
                  "-" if key == "fp16" else f"{-100 * w['reduction_vs_fp16']:+.1f}%")
    console.print(t)
    kept = r["kept"]
    nf4 = r["weights"][r["format"]]
    console.print(
        f"Why not exactly 75% less: {kept['params']:,} params ({100 * kept['params'] / max(p['total'], 1):.1f}%: "
        f"embeddings, lm_head, norms, biases) stay {kept['dtype']} = {format_bytes(kept['bytes'])}, and each "
        f"quantized weight carries its block scales ({format_bytes(nf4['quantized'] - p['quantized'] // 2)} "
        f"for {p['quantized']:,} quantized params)."
    )

    s = r["settings"]
    run = f"{r['mode']}, batch {s['batch_size']} x seq {s['seq_len']}, {r['format']} ({s['compute_dtype']} compute)"
    if r["mode"] in ("qlora", "lora"):
        run += f", LoRA r={s['lora_rank']} on {','.join(s['lora_targets'])} ({p['lora']:,} params)"
    if r["mode"] != "inference":
        run += f", {s['optimizer']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
    b = Table(title=f"Peak memory: {run}", title_justify="left")
    b.add_column("component")
    b.add_column("bytes", justify="right")
    b.add_column("", no_wrap=True)
    peak = max(r["peak_bytes"], 1)
    for name, n in r["breakdown"].items():
        bar = "#" * max(1 if n else 0, round(_BAR * n / peak))
        b.add_row(name.replace("_", " "), format_bytes(n), bar)
    b.add_row("[bold]peak[/bold]", f"[bold]{format_bytes(r['peak_bytes'])}[/bold]", "")
    console.print(b)

    if r["budget_bytes"] is not None:
        where = f" ({r['gpu']})" if r["gpu"] else ""
        if r["fits"]:
            console.print(f"[green]Fits[/green] in {format_bytes(r['budget_bytes'])}{where}: "
                          f"{format_bytes(r['headroom_bytes'])} headroom.")
        else:
            console.print(f"[red]Does not fit[/red] in {format_bytes(r['budget_bytes'])}{where}: "
                          f"{format_bytes(-r['headroom_bytes'])} short.")
    elif r["fits_on"]:
        console.print(f"Fits on: {', '.join(r['fits_on'])}")
    else:
        console.print("Fits on no single GPU in configs/gpus.toml.")
