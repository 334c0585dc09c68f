"""`qtool estimate`: weights per format, then the memory of the chosen run mode and whether it fits.

`run` is the command; `typer_command` declares its options for Typer. Nothing here imports Typer at module
level: the fast lane (qtool.cli.fast) calls `run` directly. (No `from __future__ import annotations`: the
Typer signature is declared inside a function and must hold objects.)"""

HELP = """Plan GPU memory from exact parameter counts: FP32/FP16/INT8/FP4/NF4 weights, then the peak of
inference, QLoRA, LoRA or full fine-tuning, term by term. Presets and sizes never import torch.

Exit status: 0 fits (or no budget given), 3 does not fit the budget, 2 bad input.

Examples:

  qtool estimate 70b                        # weights per format, QLoRA peak
  qtool estimate 8b --vram 24GB             # fits in 24 GB? exit 3 if not
  qtool estimate llama-3-8b --gpu rtx-4090 --seq-len 4096 -b 2
  qtool estimate 70b --mode inference --seq-len 8192 --json
  qtool estimate ./my-model --optimizer paged_adamw8bit -r 64
  qtool estimate mistralai/Mistral-7B-v0.1 --no-gradient-checkpointing
  qtool estimate 70b --gpu rtx-4090 --gpus 2 --parallel fsdp
  qtool estimate llama-3-8b --gpus rtx-4090,rtx-3090   # mixed cards
"""

_BAR = 30


def typer_command():
    """The `estimate` command as Typer sees it: its own options plus the settings table's (with_settings)."""
    from qtool.cli.options import JsonOpt, ModelArg, RevisionOpt, TrustRemoteCodeOpt, with_settings

    @with_settings("estimate")
    def estimate(
        model: ModelArg,
        settings: object,
        revision: RevisionOpt = None,
        trust_remote_code: TrustRemoteCodeOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        run(model, settings, revision=revision, trust_remote_code=trust_remote_code, as_json=as_json)

    return estimate


def run(model: str, settings, *, revision=None, trust_remote_code: bool = False, as_json: bool = False) -> None:
    """Resolve the model, estimate (qtool.estimate), render or print JSON; exit 3 when it does not fit."""
    from qtool.cli.output import Output
    from qtool.core.errors import DoesNotFit
    from qtool.estimate import estimate_report
    from qtool.core.models import resolve_model

    out = Output(as_json=as_json, units=settings.values["units"])
    for line in settings.warnings:
        out.warn(line)
    spec = resolve_model(model, revision=revision)
    report = estimate_report(spec, settings, trust_remote_code=trust_remote_code)
    if settings.run.gpus != 1:
        return _run_cards(out, spec, settings, report, trust_remote_code)
    for line in report["warnings"]:
        out.warn(line)
    out.result(report, lambda console: render(console, report, out.size))
    if report["fits"] is False:
        size = out.size
        raise DoesNotFit(
            f"{report['model']['name']} needs {size(report['peak_bytes'])} at peak ({report['mode']}), "
            f"over the {size(report['budget_bytes'])} budget by {size(-report['headroom_bytes'])}"
        )


def _run_cards(out, spec, settings, report: dict, trust_remote_code: bool) -> None:
    """Several GPUs: the formats, then one row per card and the verdict; exit 3 when a card does not fit."""
    from qtool.cli.estimate_cards import render_cards, shortfall
    from qtool.estimate.cards import cards_report, estimate_cards

    est = estimate_cards(spec, settings, trust_remote_code=trust_remote_code)
    report = cards_report(report, est)
    for line in report["warnings"]:
        out.warn(line)
    out.result(report, lambda console: (render_formats(console, report, out.size),
                                        render_cards(console, report, est, out.size)))
    if est.fits is False:
        from qtool.core.errors import DoesNotFit

        raise DoesNotFit(f"{report['model']['name']}: {shortfall(est, out.size)}")


def kept_summary(by_reason: dict[str, int]) -> str:
    """What stays 16-bit, largest first, in words: 'fused MoE expert tensors 99.4%, embeddings and norms ...'."""
    from qtool.core import plan

    words = {plan.REASON_NOT_LINEAR: "embeddings and norms", plan.REASON_SKIPPED: "output head",
             plan.REASON_BIAS: "biases", plan.REASON_FUSED: "fused MoE expert tensors",
             plan.REASON_USER_SKIP: "--skip-modules", plan.REASON_FP32: "fp32 modules"}
    total = max(sum(by_reason.values()), 1)
    parts = sorted(by_reason.items(), key=lambda kv: -kv[1])
    if len(parts) == 1 or parts[0][1] < 0.9 * total:
        return ", ".join(words.get(reason, reason) for reason, _ in parts)
    return f"mostly {words.get(parts[0][0], parts[0][0])}, then " + ", ".join(
        words.get(reason, reason) for reason, _ in parts[1:])


def render(console, r: dict, format_bytes) -> None:
    """The human report: formats table first, then the peak term by term, then the fit."""
    render_formats(console, r, format_bytes)
    render_peak(console, r, format_bytes)


def render_formats(console, r: dict, format_bytes) -> None:
    """The weights per format and why 4-bit is not exactly 75% less."""
    from rich.table import Table

    from qtool.estimate.formats import FORMATS, TABLE_FORMATS

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
        f"{kept_summary(kept['by_reason'])}) stay {kept['dtype']} = {format_bytes(kept['bytes'])}, and each "
        f"quantized weight carries its block scales ({format_bytes(nf4['quantized'] - p['quantized'] // 2)} "
        f"for {p['quantized']:,} quantized params)."
    )


def run_line(r: dict) -> str:
    """mode, batch x seq, format, LoRA, optimizer: what the peak is of."""
    p, s = r["params"], r["settings"]
    run = f"{r['mode']}, batch {s['batch_size']} x seq {s['seq_len']}, {r['format']} ({s['compute_dtype']} compute)"
    if r["mode"] in ("qlora", "lora"):
        run += f", LoRA r={s['lora_rank']} on {','.join(s['lora_targets'])} ({p['lora']:,} params)"
    if r["mode"] != "inference":
        run += f", {s['optimizer']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
    return run


def render_peak(console, r: dict, format_bytes) -> None:
    """The one-GPU peak term by term, then the fit."""
    from rich.table import Table

    b = Table(title=f"Peak memory: {run_line(r)}", title_justify="left")
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
