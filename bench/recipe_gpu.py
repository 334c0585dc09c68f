"""GPU evidence for the recipes: per-phase peaks of qtool's loop, transformers' Trainer and trl's SFTTrainer
(and generate / the loop's prefill for inference) on the same loaded model.

One worker process per architecture (peaks never mix between models): it loads the model once with random
weights (qtool.verify.load_model, as `qtool verify` does), runs inference cases, wraps it for QLoRA
(qtool.verify.wrap_for_training) and then runs every (seq, recipe) case on that model, freeing grads,
optimizer and the allocator cache in between. The runners are qtool's own: verify._train (loop),
recipes.train_with_trainer (trainer, sft), verify._infer (loop inference), recipes.generate.

A case is ARCH[:LAYERS]: a preset from configs/models or a config in bench/configs, LAYERS truncates
num_hidden_layers (full width), 'full' keeps the depth. Rows are appended to $OUT/rows.jsonl after every
case, so a run cut off by its time limit still returns data; the summary table is printed last.

  OUT=out python bench/recipe_gpu.py --cases llama-3-8b:full,mistral-7b:4 --seqs 512,2048,8192
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "bench" / "configs"


def base_config(arch: str) -> dict:
    for d in (CONFIGS, ROOT / "configs" / "models"):
        if (d / f"{arch}.json").is_file():
            return json.loads((d / f"{arch}.json").read_text())
    raise SystemExit(f"no config for {arch}")


def case_config(arch: str, layers: int | None) -> dict:
    """The architecture's config, depth-truncated to `layers` (None: full depth)."""
    cfg = base_config(arch)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        if isinstance(cfg.get("layer_types"), list):
            cfg["layer_types"] = cfg["layer_types"][:layers]
        if cfg.get("max_window_layers") is not None:
            cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    return cfg


def parse_case(text: str) -> tuple[str, int | None]:
    arch, _, depth = text.partition(":")
    return arch, None if depth in ("", "full") else int(depth)


def args_for(mode: str, seq: int, recipe: str, optimizer: str, batch: int = 1, precision: str = "bf16") -> list[str]:
    """The row's settings as `qtool verify`/`qtool estimate` options (bench/compare_estimate.py reads them)."""
    out = ["--mode", mode, "--seq-len", str(seq), "--batch-size", str(batch), "--recipe", recipe]
    if mode == "inference":
        return out
    return out + ["--optimizer", optimizer] + (["--precision", precision] if precision != "bf16" else [])


def parse_variants(text: str, optimizer: str) -> list[tuple[str, str]]:
    """--variants "fp16:adamw8bit,bf16:adamw_torch" -> [(precision, optimizer)]; empty: bf16 with --optimizer."""
    out = []
    for v in (x for x in text.split(",") if x):
        precision, _, opt = v.partition(":")
        out.append((precision or "bf16", opt or optimizer))
    return out or [("bf16", optimizer)]


def worker(a) -> None:
    import torch

    from qtool.verify import recipes
    from qtool.core.config import resolve_settings
    from qtool.core.models import resolve_model
    from qtool.verify import (
        Meter, Source, VerifyOptions, VerifyReport, _infer, _train, load_model, make_batch, wrap_for_training,
    )

    arch, layers = parse_case(a.one)
    out = Path(a.out)
    tmp = Path(tempfile.mkdtemp(prefix="recipe-"))
    (tmp / "config.json").write_text(json.dumps(case_config(arch, layers)))
    spec = resolve_model(str(tmp / "config.json"))
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)

    def settings(mode, seq, recipe, batch=1, precision="bf16", optimizer=a.optimizer):
        flags = {"mode": mode, "seq_len": seq, "batch_size": batch, "recipe": recipe, "optimizer": optimizer,
                 "precision": precision}
        return resolve_settings(flags, env={}, cwd=tmp)

    options = VerifyOptions(device="cuda", steps=a.steps, decode_tokens=a.decode_tokens)
    t0 = time.perf_counter()
    model, _ = load_model(spec, Source("random", None, "random"), settings("qlora", 512, "loop"), options,
                          {"": "cuda:0"}, quantize=True)
    gc.collect()
    after_load = torch.cuda.memory_allocated(dev)
    load_s = time.perf_counter() - t0
    vocab = model.get_input_embeddings().weight.shape[0]
    base = {"arch": arch, "layers": layers, "full_depth": layers is None,
            "num_hidden_layers": model.config.num_hidden_layers, "after_load": after_load,
            "card": torch.cuda.get_device_name(dev), "versions": _versions(), "env": _env()}

    def case(mode, seq, recipe, fn, precision="bf16", optimizer=a.optimizer):
        ids = make_batch(vocab, 1, seq, seed=0, data=None, tokenizer_dir=None).to(dev)
        meter = Meter([dev])
        phases: dict = {}
        report = VerifyReport(model={}, settings={}, device={}, versions={})
        gc.collect()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(dev)
        meter.reset_peak()
        meter.phase_peak()
        t = time.perf_counter()
        err = None
        try:
            fn(ids, meter, phases, report, settings(mode, seq, recipe, precision=precision, optimizer=optimizer))
        except torch.cuda.OutOfMemoryError as exc:
            err = "out of memory: " + str(exc).splitlines()[0]
        except Exception as exc:  # a recipe that cannot run here: record it and go on with the next case
            _keep_traceback(out, f"{arch}:{layers} {mode} {seq} {recipe}")
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        meter.phase_peak()
        free, total = torch.cuda.mem_get_info(dev)
        row = {**base, "mode": mode, "seq": seq, "recipe": recipe, "runner": (report.trainer or {}).get("class"),
               "trainer": report.trainer, "args": args_for(mode, seq, recipe, optimizer, precision=precision),
               "start_allocated": start,
               "measured_peak_allocated": meter.peak_allocated, "peak_reserved": meter.peak_reserved,
               "outside_torch": max(0, total - free - torch.cuda.memory_reserved(dev)), "phases": phases,
               "loss": report.loss, "loss_finite": report.loss_finite,
               "tokens_per_second": report.tokens_per_second, "seconds": round(time.perf_counter() - t, 1),
               "error": err, "notes": report.notes}
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"  {arch}:{layers or 'full'} {mode} {seq} {recipe} {precision} {optimizer}: peak {row['measured_peak_allocated'] / 2**30:.3f} GiB"
              f" reserved {row['peak_reserved'] / 2**30:.2f} ({row['seconds']}s){'  ' + err if err else ''}", flush=True)
        del ids
        gc.collect()
        torch.cuda.empty_cache()

    print(f"{arch}:{layers or 'full'} loaded in {load_s:.1f}s, {after_load / 2**30:.3f} GiB", flush=True)
    for seq in a.infer:
        case("inference", seq, "loop",
             lambda ids, m, ph, r, s: _infer(model, ids, options, m, ph, r, True))
        case("inference", seq, "trainer",
             lambda ids, m, ph, r, s: recipes.generate(model, ids, options, m, ph, r))
    model = wrap_for_training(model, settings("qlora", 512, "loop"))
    # recipes outermost and sft last: SFTTrainer casts the LoRA weights to bf16 for good (trl's QLoRA rule),
    # which would change every later loop/trainer case on this model
    for recipe in sorted(a.recipes, key=lambda r: r == "sft"):
        for seq, (precision, optimizer) in ((q, v) for q in a.seqs for v in parse_variants(a.variants, a.optimizer)):
            if (arch, layers, seq, recipe) in SKIP:
                continue
            case("qlora", seq, recipe, lambda ids, m, ph, r, s, recipe=recipe: (
                _train(model, ids, s, options, m, ph, r) if recipe == "loop"
                else recipes.train_with_trainer(model, ids, s, options, m, ph, r)), precision, optimizer)
            for p in model.parameters():
                p.grad = None


def unsloth_worker(a) -> None:
    """Unsloth's recipe as `qtool verify --recipe unsloth` runs it: the depth-truncated config's random weights
    written as a 16-bit checkpoint (recipes.unsloth_checkpoint), FastLanguageModel.from_pretrained(load_in_4bit)
    from it; generate cases (for_inference) first, then get_peft_model(use_gradient_checkpointing="unsloth")
    and SFTTrainer cases on the same model."""
    from qtool.verify import recipes

    unsloth = recipes.import_unsloth()  # first: it patches transformers, peft and trl on import
    import torch

    from qtool.core.config import resolve_settings
    from qtool.core.models import resolve_model
    from qtool.verify import Meter, VerifyOptions, VerifyReport, make_batch
    from qtool.verify.inputs import resolve_source

    arch, layers = parse_case(a.unsloth_one)
    out = Path(a.out)
    tmp = Path(tempfile.mkdtemp(prefix="unsloth-"))
    (tmp / "config.json").write_text(json.dumps(case_config(arch, layers)))
    spec = resolve_model(str(tmp / "config.json"))
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    options = VerifyOptions(device="cuda", steps=a.steps, decode_tokens=a.decode_tokens)

    def settings(mode, seq):
        return resolve_settings({"mode": mode, "seq_len": seq, "recipe": "unsloth", "optimizer": a.optimizer},
                                env={}, cwd=tmp)

    t0 = time.perf_counter()
    with recipes.unsloth_checkpoint(spec, resolve_source(spec, options), options) as folder:
        written = time.perf_counter() - t0
        model, tok = recipes.load_unsloth(folder, settings("qlora", 512), max(a.seqs + a.infer))
    gc.collect()
    after_load = torch.cuda.memory_allocated(dev)
    print(f"unsloth {arch}:{layers or 'full'} written in {written:.0f}s, loaded in {time.perf_counter() - t0:.0f}s, "
          f"{after_load / 2**30:.3f} GiB", flush=True)
    vocab = model.get_input_embeddings().weight.shape[0]
    base = {"arch": arch, "layers": layers, "full_depth": layers is None, "num_hidden_layers": layers,
            "after_load": after_load, "card": torch.cuda.get_device_name(dev),
            "versions": {**_versions(), "unsloth": unsloth.__version__}, "env": _env()}

    def case(mode, seq, fn):
        ids = make_batch(vocab, 1, seq, seed=0, data=None, tokenizer_dir=None).to(dev)
        meter, phases, report = Meter([dev]), {}, VerifyReport(model={}, settings={}, device={}, versions={})
        gc.collect()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(dev)
        meter.reset_peak()
        meter.phase_peak()
        t, err = time.perf_counter(), None
        try:
            fn(ids, meter, phases, report, settings(mode, seq))
        except torch.cuda.OutOfMemoryError as exc:
            err = "out of memory: " + str(exc).splitlines()[0]
        except Exception as exc:  # record and go on
            _keep_traceback(out, f"unsloth {arch}:{layers} {mode} {seq}")
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        meter.phase_peak()
        runner = "unsloth.FastLanguageModel + " + ("model.generate" if mode == "inference" else "trl.SFTTrainer")
        row = {**base, "mode": mode, "seq": seq, "recipe": "unsloth", "runner": runner,
               "args": args_for(mode, seq, "unsloth", a.optimizer), "start_allocated": start,
               "measured_peak_allocated": meter.peak_allocated, "peak_reserved": meter.peak_reserved,
               "phases": phases, "loss": report.loss, "loss_finite": report.loss_finite,
               "trainable_params": report.trainable_params, "seconds": round(time.perf_counter() - t, 1),
               "error": err, "notes": report.notes}
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"  unsloth {arch}:{layers or 'full'} {mode} {seq}: peak {meter.peak_allocated / 2**30:.3f} GiB"
              f" ({row['seconds']}s) {err or ''}", flush=True)
        del ids
        gc.collect()
        torch.cuda.empty_cache()

    for seq in ([] if arch in a.skip_infer.split(",") else a.infer):
        case("inference", seq, lambda ids, m, ph, r, s: recipes.generate_unsloth(model, ids, options, m, ph, r))
    model = recipes.unsloth_peft(model, settings("qlora", 512), options)
    for seq in a.seqs:
        case("qlora", seq, lambda ids, m, ph, r, s: recipes.train_with_trainer(model, ids, s, options, m, ph, r,
                                                                                  tokenizer=tok))
        for p in model.parameters():
            p.grad = None


SKIP = {("llama-3-8b", None, 8192, "loop")}  # measured before: 44.60 GiB (docs/gpu_measurements.json)


def _env() -> dict:
    """Environment switches that change what Unsloth or Inductor runs (UNSLOTH_BLOCK_COMPILE=0: no per-layer
    compile; TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN: cuBLAS for every compiled GEMM, no Triton templates
    to autotune)."""
    keys = ("UNSLOTH_BLOCK_COMPILE", "UNSLOTH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE",
            "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _keep_traceback(out: Path, case: str) -> None:
    """A row keeps the exception's first line; the whole traceback goes to tracebacks.txt beside the rows."""
    with open(Path(out) / "tracebacks.txt", "a") as f:
        f.write(f"== {case}\n{traceback.format_exc()}\n")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "trl", "unsloth"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="llama-3-8b:full")
    ap.add_argument("--seqs", default="512,2048,8192")
    ap.add_argument("--infer", default="2048")
    ap.add_argument("--recipes", default="loop,trainer,sft")
    ap.add_argument("--optimizer", default="adamw8bit")
    ap.add_argument("--variants", default="", help="PRECISION:OPTIMIZER,... for every qlora case of --cases "
                    "(TrainingArguments' precision and optim; default bf16 with --optimizer)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--budget", type=float, default=540, help="seconds for all cases; later ones are skipped")
    ap.add_argument("--jobs", type=int, default=1, help="workers at a time (each its own process; peaks are per process)")
    ap.add_argument("--job-timeout", type=float, default=600, help="seconds one worker may run")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--unsloth", default="", help="cases to run under Unsloth's recipe (needs unsloth importable)")
    ap.add_argument("--unsloth-one", help=argparse.SUPPRESS)
    ap.add_argument("--skip-infer", default="", help="architectures whose Unsloth inference rows are recorded already")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = ap.parse_args(argv)
    a.seqs = [int(s) for s in a.seqs.split(",") if s]
    a.infer = [int(s) for s in a.infer.split(",") if s]
    a.recipes = [r for r in a.recipes.split(",") if r]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.one:
        worker(a)
        return 0
    if a.unsloth_one:
        unsloth_worker(a)
        return 0
    t0 = time.perf_counter()
    jobs = [("--one", c) for c in a.cases.split(",") if c] + [("--unsloth-one", c) for c in a.unsloth.split(",") if c]
    running: list = []

    def reap(block: bool) -> None:
        for job in list(running):
            proc, c, started, log = job
            limit = min(a.job_timeout, a.budget) - (time.perf_counter() - started)
            if proc.poll() is None and (limit <= 0 or time.perf_counter() - t0 > a.budget):
                proc.kill()
                proc.wait()
                print(f"{c}: killed at its time limit, {time.perf_counter() - t0:.0f}s", flush=True)
            elif proc.poll() is None:
                continue
            else:
                print(f"{c}: exit {proc.returncode} after {time.perf_counter() - started:.0f}s "
                      f"(at {time.perf_counter() - t0:.0f}s)", flush=True)
            log.close()
            running.remove(job)
        if block:
            time.sleep(1)

    for flag, c in jobs:
        while len(running) >= a.jobs:
            reap(block=True)
        left = a.budget - (time.perf_counter() - t0)
        if left < 30:
            print(f"{c}: skipped, {left:.0f}s left", flush=True)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), flag, c, "--seqs", ",".join(map(str, a.seqs)),
               "--infer", ",".join(map(str, a.infer)), "--recipes", ",".join(a.recipes), "--optimizer", a.optimizer,
               "--variants", a.variants, "--steps", str(a.steps), "--decode-tokens", str(a.decode_tokens), "--out", str(Path(a.out).resolve()),
               "--skip-infer", a.skip_infer]
        log = open(Path(a.out) / "workers.log", "a")
        cwd = tempfile.mkdtemp(prefix="recipe-job-")
        running.append((subprocess.Popen(cmd, stdout=None, stderr=log, cwd=cwd), c, time.perf_counter(), log))
    while running:
        reap(block=True)
    rows = [json.loads(x) for x in (Path(a.out) / "rows.jsonl").read_text().splitlines()] \
        if (Path(a.out) / "rows.jsonl").exists() else []
    print("| arch | layers | mode | seq | recipe (options) | peak alloc GiB | reserved GiB | fwd | bwd | opt |")
    for r in rows:
        ph = r["phases"]
        g = lambda k: f"{ph[k] / 2**30:.2f}" if ph.get(k) else "-"  # noqa: E731
        print(f"| {r['arch']} | {r['layers'] or 'full'} | {r['mode']} | {r['seq']} | {' '.join(r['args'][7:])} | "
              f"{r['measured_peak_allocated'] / 2**30:.3f} | {r['peak_reserved'] / 2**30:.2f} | {g('forward_peak')} | "
              f"{g('backward_peak')} | {g('optimizer_step_peak')} |{' ' + r['error'] if r['error'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
