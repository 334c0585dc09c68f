"""`qtool verify`: run the model for real, measure peak memory, check the loss, compare with the estimate."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qtool.cli import options as o
from qtool.cli.common import settings_from_flags
from qtool.cli.output import Output

HELP = """Load a model on the GPU, train a few QLoRA steps (or run inference), and report what it really took.

Exit codes: 0 all checks pass, 3 peak memory over --max-vram (or out of memory), 4 loss or gradients not
finite, 2 bad input or no usable device. The estimate comparison is informational and never fails the run.

A preset or size (llama-3-8b, 8b) or a bare config.json runs with random weights built on the device;
a 16-bit checkpoint is quantized while loading; a bnb-4bit checkpoint is loaded as it is.

Examples:

  qtool verify ./Meta-Llama-3-8B-bnb-4bit --max-vram 24GB --junit verify.xml

  qtool verify llama-3-8b --seq-len 4096 --max-vram rtx-4090      # random weights, same memory

  qtool verify ./Mistral-7B --mode inference --seq-len 8192 --json

  qtool verify ./my-bnb-4bit --reference ./my-16bit --seq-len 512   # KL divergence, top-1 agreement

  qtool verify ./tiny-model --device cpu --steps 1                  # the same steps on the CPU (peak RSS)
"""

D = "Device and run"

MaxVramOpt = Annotated[Optional[str], typer.Option(
    "--max-vram", "--vram", help="Budget: a size (24GB, 24 GiB) or a GPU from the catalogue (rtx-4090). Exit 3 if the peak exceeds it. Give it or --gpu, not both (the same GPU name is fine).",
    rich_help_panel=o.R, show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="cuda, cuda:N, or cpu (same steps; peak RSS instead of GPU memory).", rich_help_panel=D)]
DeviceMapOpt = Annotated[Optional[str], typer.Option("--device-map", help="auto: spread over all GPUs with accelerate; per-GPU peaks are reported.", rich_help_panel=D, show_default=False)]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps (or prefill+decode rounds); 0 = load only.", rich_help_panel=D, min=0)]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Text file tokenized with the model's tokenizer instead of random token ids.", rich_help_panel=D, show_default=False)]
ReferenceOpt = Annotated[Optional[str], typer.Option("--reference", help="16-bit model (dir or hub id) to compare outputs with: KL and top-1 agreement (cosine for encoders).", rich_help_panel=D, show_default=False)]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML (one testcase per check) to FILE.", rich_help_panel=D, show_default=False)]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", help="Relative error allowed between estimate and measurement (informational).", rich_help_panel=D, min=0.0)]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Read .bin/.pt checkpoints (pickle can run code: only if you trust it).", rich_help_panel=D)]
DecodeOpt = Annotated[int, typer.Option("--decode-tokens", help="Decode steps after the prefill in --mode inference.", rich_help_panel=D, min=0)]


def verify(
    model: o.ModelArg,
    config: o.ConfigOpt = None,
    preset: o.PresetOpt = None,
    quant_type: o.QuantTypeOpt = None,
    double_quant: o.DoubleQuantOpt = None,
    compute_dtype: o.ComputeDtypeOpt = None,
    blocksize: o.BlocksizeOpt = None,
    quant_storage: o.QuantStorageOpt = None,
    skip_modules: o.SkipModulesOpt = None,
    dtype: o.DtypeOpt = None,
    mode: o.ModeOpt = None,
    seq_len: o.SeqLenOpt = None,
    batch_size: o.BatchOpt = None,
    lora_rank: o.LoraRankOpt = None,
    lora_alpha: o.LoraAlphaOpt = None,
    lora_targets: o.LoraTargetsOpt = None,
    optimizer: o.OptimizerOpt = None,
    recipe: o.RecipeOpt = None,
    precision: o.PrecisionOpt = None,
    gradient_checkpointing: o.GradCkptOpt = None,
    max_vram: MaxVramOpt = None,
    gpu: o.GpuOpt = None,
    device: DeviceOpt = "cuda",
    device_map: DeviceMapOpt = None,
    steps: StepsOpt = 2,
    decode_tokens: DecodeOpt = 4,
    data: DataOpt = None,
    reference: ReferenceOpt = None,
    tolerance: ToleranceOpt = 0.05,
    revision: o.RevisionOpt = None,
    trust_remote_code: o.TrustRemoteCodeOpt = False,
    allow_pickle: PickleOpt = False,
    junit: JunitOpt = None,
    as_json: o.JsonOpt = False,
) -> None:
    from qtool.errors import QtoolError
    from qtool.models import resolve_model

    out = Output(as_json=as_json)
    if junit is not None:
        from qtool.junit import check_junit_path

        check_junit_path(junit)  # before anything is loaded: a run must not end unable to write its verdict
    try:
        vram, gpu = _budget_flags(max_vram, gpu)
        settings = settings_from_flags(
            config, preset=preset, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
            blocksize=blocksize, quant_storage=quant_storage, skip_modules=skip_modules, dtype=dtype, mode=mode,
            seq_len=seq_len, batch_size=batch_size, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_targets=lora_targets, optimizer=optimizer, recipe=recipe, precision=precision,
            gradient_checkpointing=gradient_checkpointing,
            vram=vram, gpu=gpu)
        from qtool.verify import VerifyOptions, check_inputs, run_verify

        opts = VerifyOptions(device=device, device_map=device_map, steps=steps, decode_tokens=decode_tokens,
                             data=data, reference=reference, revision=revision, trust_remote_code=trust_remote_code,
                             tolerance=tolerance, allow_pickle=allow_pickle)
        check_inputs(opts)  # --data, --reference: before the model is resolved or downloaded
        spec = resolve_model(model, revision=revision)
        # Libraries sometimes print; with --json nothing but the report may reach stdout.
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            report = run_verify(spec, settings, opts, progress=out.info)
    except QtoolError as exc:
        if junit is not None:
            _junit_for_error(junit, model, exc)
        raise
    if junit is not None:
        from qtool.junit import write_junit

        write_junit(report, junit)
    out.result(report, lambda console: _render(console, report))
    from qtool.verify import outcome

    err = outcome(report)
    if err is not None:
        raise err


def _budget_flags(max_vram: str | None, gpu: str | None) -> tuple[str | None, str | None]:
    """--max-vram is a size or a catalogue GPU name: a size goes to the config layer as `vram` (which refuses it
    beside --gpu, as for --vram), a name as `gpu`; a name that disagrees with --gpu is an error."""
    from qtool import presets
    from qtool.errors import ConfigError

    if max_vram is None:
        return None, gpu
    text = max_vram.strip()
    if text[:1].isdigit() or text[:1] == ".":
        return text, gpu
    named = presets.find_gpu(text)
    if named is None:
        known = ", ".join(sorted({g["key"] for g in presets.gpus().values()}))
        raise ConfigError(f"invalid --max-vram {max_vram!r}: neither a size (24GB) nor a GPU from the catalogue "
                          f"(known: {known})")
    other = presets.find_gpu(gpu) if gpu is not None else None
    if other is not None and other["key"] != named["key"]:
        raise ConfigError(f"--max-vram {max_vram} and --gpu {gpu} name different GPUs: give one of them")
    return None, text


def _junit_for_error(path: Path, model: str, exc) -> None:
    """Input that could not even be loaded still leaves a JUnit file saying so."""
    from qtool.errors import QtoolError
    from qtool.junit import write_junit

    checks = {"loads": {"passed": False, "message": str(exc), "informational": False}}
    try:
        write_junit({"model": {"name": model}, "settings": {}, "checks": checks}, path)
    except QtoolError:
        pass  # the original error is the one to report


def _render(console, r: dict) -> None:
    from rich.table import Table

    from qtool.sizes import format_bytes

    def b(n):
        return "-" if n is None else format_bytes(n, binary=True)

    s, m, dev = r["settings"], r["memory"], r["device"]
    console.print(f"[bold]{r['model']['name']}[/bold]  {r['model']['description']}")
    console.print(f"{s['mode']}, batch {s['batch_size']} x {s['seq_len']} tokens"
                  + (f", LoRA r={s['lora_rank']} {','.join(s['lora_targets'])}, {s['optimizer']}" if s["mode"] != "inference" else "")
                  + f"  on {dev['name']}" + (f" x{dev['count']}" if dev.get("count", 1) > 1 else ""))
    v = r["versions"]
    console.print(" ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "bitsandbytes", "peft") if v.get(k)))

    t = Table(title="memory", show_header=True, header_style="bold")
    t.add_column("phase")
    t.add_column("bytes", justify="right")
    for name, value in r["phases"].items():
        t.add_row(name.replace("_", " "), b(value))
    if m.get("metric") == "cuda_allocator":
        t.add_row("[bold]peak allocated[/bold]", b(m.get("peak_allocated_bytes")))
        t.add_row("peak reserved", b(m.get("peak_reserved_bytes")))
        t.add_row("outside torch (CUDA context)", b(m.get("outside_torch_bytes")))
        for d in m.get("per_device", []) if len(m.get("per_device", [])) > 1 else []:
            t.add_row(f"  {d['device']} peak allocated", b(d["peak_allocated_bytes"]))
    else:
        t.add_row("[bold]peak RSS (process lifetime)[/bold]", b(m.get("peak_rss_bytes")))
    e = r.get("estimate") or {}
    if e.get("estimate_bytes") is not None:
        t.add_row("estimate", b(e["estimate_bytes"]))
    console.print(t)
    if r.get("tokens_per_second"):
        console.print(f"step {r['step_seconds']:.2f}s, {r['tokens_per_second']:,.0f} tokens/s"
                      + (f", loss {r['loss']:.4f}" if isinstance(r.get("loss"), float) else ""))
    q = r.get("quality")
    if q:
        if q["metric"] == "kl_top1":
            console.print(f"vs reference: mean KL {q['mean_kl']:.4f}, top-1 agreement {q['top1_agreement']:.1%} "
                          f"over {q['positions']} positions")
        else:
            console.print(f"vs reference: mean cosine {q['mean_cosine']:.4f} over {q['positions']} positions")
    marks = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]skip[/dim]"}
    from qtool.junit import TITLES

    for key, c in r["checks"].items():
        mark = marks[c["passed"]] if not (c.get("informational") and c["passed"] is False) else "[yellow]info[/yellow]"
        console.print(f"  {mark}  {TITLES.get(key, key)}: {c['message']}")
