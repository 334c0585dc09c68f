"""`qtool verify`: run the model for real, measure peak memory, check the loss, compare with the estimate."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from qtool.cli import options as o
from qtool.cli.output import Output

HELP = """Load a model on the GPU, train a few QLoRA steps (or run inference), and report what it really took.

Exit codes: 0 all checks pass, 3 peak memory over --max-vram (or out of memory), 4 loss or gradients not
finite, 2 bad input or no usable device. The estimate comparison is informational and never fails the run.

A preset or size (llama-3-8b, 8b) or a bare config.json runs with random weights built on the device;
a 16-bit checkpoint is quantized while loading; a bnb-4bit checkpoint is loaded as it is.

Examples:

  qtool verify ./Meta-Llama-3-8B-bnb-4bit --max-vram 24GB --junit v.xml
  qtool verify llama-3-8b --seq-len 4096 --max-vram rtx-4090  # random weights
  qtool verify ./Mistral-7B --mode inference --seq-len 8192 --json
  qtool verify ./my-bnb-4bit --reference ./my-16bit  # KL, top-1 agreement
  qtool verify ./tiny-model --device cpu --steps 1   # same steps on the CPU
  qtool verify 70b --gpus 2 --parallel fsdp --gpu rtx-4090 --cap-memory  # FSDP-QLoRA as on 2 x 24 GB
  qtool verify llama-3-8b --gpus 2 --parallel pipeline  # device_map="auto" over 2 cards
"""

D = "Device and run"


def _opt(*names: str, help: str, metavar: str = "", **kw):
    return typer.Option(*names, help=help, rich_help_panel=D, metavar=metavar, **kw)


DeviceOpt = Annotated[str, _opt("--device", metavar="DEV",
                                help="cuda, cuda:N, or cpu (same steps; peak RSS instead of GPU memory).")]
DeviceMapOpt = Annotated[Optional[str], _opt("--device-map", metavar="MAP", show_default=False,
                                             help="auto: spread over all GPUs with accelerate (= --parallel pipeline "
                                                  "--gpus <all>); per-GPU peaks.")]
StepsOpt = Annotated[int, _opt("--steps", metavar="N", min=0,
                               help="Optimizer steps (or prefill+decode rounds); 0 = load only.")]
DataOpt = Annotated[Optional[Path], _opt("--data", metavar="FILE", show_default=False,
                                         help="Text file tokenized with the model's tokenizer instead of random ids.")]
ReferenceOpt = Annotated[Optional[str], _opt("--reference", metavar="MODEL", show_default=False,
                                             help="16-bit model (dir or hub id) to compare outputs with: KL and top-1 "
                                                  "agreement (cosine for encoders).")]
JunitOpt = Annotated[Optional[Path], _opt("--junit", metavar="FILE", show_default=False,
                                          help="Write JUnit XML (one testcase per check) to FILE.")]
ToleranceOpt = Annotated[float, _opt("--tolerance", metavar="X", min=0.0,
                                     help="Relative error allowed between estimate and measurement (informational).")]
PickleOpt = Annotated[bool, _opt("--allow-pickle",
                                 help="Read .bin/.pt checkpoints (pickle can run code: only if you trust it).")]
DecodeOpt = Annotated[int, _opt("--decode-tokens", metavar="N", help="Decode steps after the prefill in --mode inference.")]


def _junit_on_bad_settings(exc, kwargs: dict) -> None:
    if kwargs.get("junit") is not None:
        _junit_for_error(kwargs["junit"], kwargs.get("model", ""), exc)


@o.with_settings("verify", on_error=_junit_on_bad_settings)
def verify(
    model: o.ModelArg,
    settings: o.Settings,
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
    from qtool.core.errors import QtoolError
    from qtool.core.models import resolve_model

    out = Output(as_json=as_json, units=settings.values["units"])
    for line in settings.warnings:
        out.warn(line)
    if junit is not None:
        from qtool.verify.junit import check_junit_path

        check_junit_path(junit)  # before anything is loaded: a run must not end unable to write its verdict
    try:
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
    data = report.to_dict()  # the JSON document: what --json prints, junit and the renderer read
    if junit is not None:
        from qtool.verify.junit import write_junit

        write_junit(data, junit)
    out.result(data, lambda console: _render(console, data, out.size))
    from qtool.verify import outcome

    err = outcome(report)
    if err is not None:
        raise err


def _junit_for_error(path: Path, model: str, exc) -> None:
    """Input that could not even be loaded still leaves a JUnit file saying so."""
    from qtool.core.errors import QtoolError
    from qtool.verify.junit import write_junit

    checks = {"loads": {"passed": False, "message": str(exc), "informational": False}}
    try:
        write_junit({"model": {"name": model}, "settings": {}, "checks": checks}, path)
    except QtoolError:
        pass  # the original error is the one to report


def _render(console, r: dict, b) -> None:
    from rich.table import Table

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
        for d in m.get("per_device", []) if len(m.get("per_device", [])) > 1 and not r.get("cards") else []:
            t.add_row(f"  {d['device']} peak allocated", b(d["peak_allocated_bytes"]))
    else:
        t.add_row("[bold]peak RSS (process lifetime)[/bold]", b(m.get("peak_rss_bytes")))
    e = r.get("estimate") or {}
    if e.get("estimate_bytes") is not None:
        t.add_row("estimate", b(e["estimate_bytes"]))
    console.print(t)
    if r.get("cards"):
        console.print(_cards_table(r["cards"], b))
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
    from qtool.verify.junit import TITLES

    for key, c in r["checks"].items():
        mark = marks[c["passed"]] if not (c.get("informational") and c["passed"] is False) else "[yellow]info[/yellow]"
        console.print(f"  {mark}  {TITLES.get(key, key)}: {c['message']}")


def _cards_table(cards: list[dict], b):
    """One row per card: the whole run's allocated peak (load included), the load's, what the card had to
    hold (reserved + outside torch), its budget and cap, the estimate for it."""
    from rich.table import Table

    t = Table(title="per card", show_header=True, header_style="bold")
    for col in ("card", "peak", "load", "needed", "budget", "cap", "estimate", "error", "fits"):
        t.add_column(col, justify="left" if col == "card" else "right")
    for c in cards:
        err = c.get("estimate_relative_error")
        fits = {True: "yes", False: "[red]no[/red]", None: "-"}[c.get("fits")]
        t.add_row(f"{c['index']} {c.get('device') or ''}" + (" [red]OOM[/red]" if c.get("out_of_memory") else ""),
                  b(c.get("peak_allocated_bytes")), b(c.get("load_peak_allocated_bytes")), b(c.get("needed_bytes")),
                  b(c.get("budget_bytes")), b(c.get("cap_bytes")), b(c.get("estimate_peak_bytes")),
                  "-" if err is None else f"{err:+.1%}", fits)
    return t
