"""Run a model for real and measure it: does it fit, and does it still compute?

One run = load (4-bit on the device, or 16-bit for --mode lora/full), then either QLoRA training steps
(the standard peft recipe: prepare_model_for_kbit_training, LoraConfig, get_peft_model, the configured
optimizer) or inference (prefill with a KV cache, then a few decode steps). Memory is read from torch's
caching allocator per phase; on --device cpu the process's resident set size stands in.

Where the weights come from:
  * a bnb-4bit checkpoint (config.json has quantization_config): loaded as it is;
  * a 16-bit checkpoint: quantized while loading with the resolved settings (settings.quant.bnb_config());
  * a preset, size shorthand or bare config.json (no weights): random weights. They go through the same
    `from_pretrained(quantization_config=...)` call, fed a state dict of CPU tensors instead of files, so
    the device sees exactly what loading a checkpoint from disk gives: each tensor copied over and
    quantized there. The tensors are views into one shared random pool, so building an 8B model costs
    about 1 GB of host memory and a second, and nothing is written to disk. Memory does not depend on values.

The library never prints or exits: `run_verify` returns a report (dict); `outcome` turns its checks into
the error the CLI raises (DoesNotFit -> 3, NotFinite -> 4). Bad input raises BadInput subclasses (2).
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any

from qtool.core.config import Settings
from qtool.core.errors import BadInput, DeviceError, WeightsError
from qtool.core.models import ModelSpec
from qtool.verify.inputs import (
    QUALITY_TOKENS, Source, VerifyOptions, _has_bitsandbytes, _resolve_reference, check_device, check_inputs,
    check_same_architecture, check_size, check_tokenizer_code, fit_positions, make_batch, resolve_source,
)
from qtool.verify.load import (
    _is_causal_lm, _quiet_transformers, apply_cap, load_model, pipeline_memory, portable_cpu_kernels, random_state_dict,
)
from qtool.verify.meter import Meter, _device_info, _max_rss_bytes, versions
from qtool.verify.report import VerifyReport
from qtool.verify.quality import _quality_outputs, _reference_quality, compare_outputs
from qtool.verify.runs import _infer, _train, wrap_for_training
from qtool.verify.verdict import _estimate, _first_line, _numerical, checks, compare_estimate, compile_failure, outcome

__all__ = ["Stage", "VerifyOptions", "VerifyReport", "check_inputs", "checks", "compare_outputs", "outcome", "portable_cpu_kernels",
           "preflight", "random_state_dict", "run_verify"]


class Stage(str, Enum):
    """Where a run is; an error is classified by it (a load error is bad input, a NaN in training a verdict)."""

    LOAD = "load"
    TOKENIZER = "tokenizer"
    QUALITY = "quality"
    INFERENCE = "inference"
    PEFT_WRAP = "peft wrap"
    TRAINING = "training"
    REFERENCE = "reference"


def preflight(spec: ModelSpec, settings: Settings, options: VerifyOptions):
    """Everything that can be refused before a model is loaded. -> (settings to run, source, reference or
    None, note or None). Local input is checked before torch is imported; a hub download waits for the
    device check."""
    run = settings.run
    if options.steps < 0:
        raise BadInput(f"invalid --steps {options.steps}: must be 0 or more")
    if settings.quant.blocksize != 64 and run.mode in ("qlora", "inference"):
        raise BadInput(f"--blocksize {settings.quant.blocksize}: transformers' loader quantizes with "
                       "bitsandbytes' default block size 64 only")
    if run.recipe == "sft" and run.mode != "inference":
        from qtool.verify.recipes import require_trl

        require_trl()
    if run.recipe == "unsloth":  # Unsloth loads, trains and generates with its own classes: every mode needs it
        from qtool.verify.recipes import import_unsloth, require_unsloth

        require_unsloth(options.device)
        if run.mode in ("lora", "full"):
            raise BadInput(f"--recipe unsloth runs QLoRA (load_in_4bit) and inference; not --mode {run.mode}")
        import_unsloth(run.unsloth_block_compile)  # before transformers and trl are used: it patches them on import
    check_inputs(options)
    settings, seq_note = fit_positions(spec, settings)
    source = resolve_source(spec, options) if spec.kind != "hub" else None
    check_device(options)
    if run.mode in ("qlora", "inference") and not _has_bitsandbytes():
        raise DeviceError("bitsandbytes is not installed: 4-bit loading needs it (pip install bitsandbytes)")
    check_size(spec, settings, options)
    source = source or resolve_source(spec, options)
    if source.kind == "checkpoint-4bit" and run.mode in ("lora", "full"):
        raise BadInput(f"--mode {run.mode} trains 16-bit weights; this checkpoint is already 4-bit", path=source.path)
    reference = _resolve_reference(options) if options.reference else None
    if reference is not None:
        check_same_architecture(spec, reference[0])
    if options.data is not None:
        check_tokenizer_code(source.tokenizer_dir, options.trust_remote_code)
    return settings, source, reference, seq_note


def run_verify(spec: ModelSpec, settings: Settings, options: VerifyOptions,
               progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Load, run, measure. Returns the report; raises BadInput (exit 2) for unusable input or device.

    Conditions found while running (out of memory, NaN loss, over budget) are recorded in the report's
    checks, not raised: `outcome(report)` gives the error to exit with. Several cards (--gpus, --parallel,
    --device-map auto): qtool/verify/multi.py.
    """
    from qtool.verify import multi

    say = progress or (lambda _m: None)
    several = multi.is_multi(settings, options)
    notes: list[str] = []
    if several:
        settings, options, notes = multi.adjust(settings, options)
        multi.check_cards(settings, options.device)
    settings, source, reference, seq_note = preflight(spec, settings, options)
    notes += [seq_note] if seq_note else []
    if multi.launched(settings):
        report = multi.run_ranks(spec, settings, options, notes, say)
    else:
        cards = None
        if several:
            settings, options, cards = multi.pipeline_options(settings, options)
        run = _Run(spec, settings, options, source, reference, say, cards=cards,
                   budgets=multi.card_budgets(settings) if cards else None)
        run.report.notes.extend(notes)
        run.execute()
        run.measure()
        run.compare_with_estimate()
        run.reference_quality()
        report = run.report
        if several:
            multi.pipeline_cards(report, run.budgets, run.caps)
    if several:
        multi.compare_cards(report, spec, settings, options.tolerance)
    report.checks = checks(report, settings)
    err = outcome(report)
    report.exit_code = 0 if err is None else err.exit_code
    return report


class _Run:
    """One verify run: the model, the meter and the report they fill, phase by phase."""

    def __init__(self, spec: ModelSpec, settings: Settings, options: VerifyOptions, source: Source, reference,
                 say: Callable[[str], None], *, cards: int | None = None, budgets: list | None = None):
        import torch

        from qtool.core.meta import hf_config, model_class

        self.spec, self.settings, self.options, self.source, self.reference, self.say = (
            spec, settings, options, source, reference, say)
        run = settings.run
        self.cls = model_class(hf_config(spec.config, source=spec.config_path or spec.ref,
                                         trust_remote_code=options.trust_remote_code))
        self.causal = _is_causal_lm(self.cls)
        if run.mode != "inference" and not self.causal:
            raise BadInput(f"--mode {run.mode} trains a causal language model; {spec.name} is a {self.cls.__name__} "
                           "(no LM head): use --mode inference")
        self.cuda = options.device != "cpu"
        if not self.cuda:
            self.device_map: Any = {"": "cpu"}
        elif options.device_map == "auto":
            self.device_map = "auto"
        else:
            self.device_map = {"": options.device if options.device != "cuda" else "cuda:0"}
        self.devices = ([torch.device(f"cuda:{i}") for i in range(cards or torch.cuda.device_count())]
                        if self.device_map == "auto" else [torch.device(self.device_map[""])])
        # --cap-memory: each card held to its budget, as if it were that card
        self.budgets = [*(budgets or []), *[settings.run.budget_bytes] * len(self.devices)][:len(self.devices)]
        self.caps = [apply_cap(d.index, b) if self.cuda and settings.values.get("cap_memory") and b else None
                     for d, b in zip(self.devices, self.budgets)]
        self.max_memory = pipeline_memory(self.devices, self.caps) if self.device_map == "auto" and (
            cards or any(self.caps)) else None
        self.meter = Meter(self.devices)
        torch.manual_seed(options.seed)
        self.model = self.quant_out = self.quality_ids = self.tokenizer = None
        self.stage = Stage.LOAD
        self.report = self._new_report()

    def _new_report(self) -> VerifyReport:
        from qtool.verify import recipes

        s, source, run = self.settings, self.source, self.settings.run
        report = VerifyReport(
            model={"ref": self.spec.ref, "name": self.spec.name, "kind": self.spec.kind, "source": source.kind,
                   "description": source.description, "path": str(source.path) if source.path else None,
                   "architecture": self.cls.__name__, "quantization_config": source.quantization_config},
            settings={**s.run.to_dict(), "quant": s.quant.to_dict()}, recipe=recipes.describe(s),
            device=_device_info(self.devices, self.cuda), versions=versions(), steps_requested=self.options.steps,
        )
        if not self.cuda and run.optimizer == "paged_adamw8bit" and run.mode != "inference":
            report.notes.append("paged_adamw8bit on CPU: bitsandbytes keeps the 8-bit state in ordinary "
                                "(unpaged) tensors; paging needs CUDA unified memory")
        return report

    def execute(self) -> None:
        """Load, make the batch, run the steps. Out of memory and NaN/inf errors become the report's error."""
        import torch

        if self.cuda and len(self.devices) == 1:
            torch.cuda.set_device(self.devices[0])  # bitsandbytes kernels launch on the current device
        with warnings.catch_warnings():  # transformers' deprecation notices are not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            try:
                self._load()
                ids = self._batch()
                self.meter.reset_peak()
                self.meter.phase_peak()  # start the run's peak at what the loaded model holds
                if self.options.steps:
                    self._steps(ids)
            except torch.cuda.OutOfMemoryError as exc:
                self.report.error = {"stage": self.stage.value, "kind": "out_of_memory",
                                        "message": str(exc).splitlines()[0]}
                self.meter.phase_peak()
            except (RuntimeError, ValueError, OSError) as exc:
                self._classify(exc)
            finally:
                self.report.loaded = self.model is not None

    def _classify(self, exc: BaseException) -> None:
        """A load or tokenizer failure is the input's fault (exit 2); NaN/inf is a verdict, so is running out of
        memory inside torch.compile (autotuning); another compile failure is the recipe's; anything else a bug."""
        import torch

        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if isinstance(inner, torch.cuda.OutOfMemoryError):
            self.report.error = {"stage": self.stage.value, "kind": "out_of_memory",
                                 "message": f"inside torch.compile: {str(inner).splitlines()[0] if str(inner) else ''}"}
            self.meter.phase_peak()
            return
        run = self.settings.run
        failed = compile_failure(exc, self.stage.value, run.recipe, run.unsloth_block_compile)
        if failed is not None:
            raise failed from exc
        if self.stage in (Stage.LOAD, Stage.TOKENIZER):
            tok = self.stage == Stage.TOKENIZER
            raise WeightsError(f"{'cannot load the tokenizer' if tok else 'cannot load'}: {_first_line(exc)}",
                               path=self.source.tokenizer_dir if tok else self.source.path or self.spec.ref) from exc
        if isinstance(exc, OSError) or not _numerical(exc):
            raise exc  # a bug or an unsupported model, not a verdict: exit 1 with the message
        self.report.error = {"stage": self.stage.value, "kind": type(exc).__name__, "numerical": True,
                                "message": str(exc).splitlines()[0] if str(exc) else ""}

    def _load(self) -> None:
        spec, source, settings, report, meter = self.spec, self.source, self.settings, self.report, self.meter
        quantize = settings.run.mode in ("qlora", "inference")
        bits = "4-bit" if quantize or source.kind == "checkpoint-4bit" else "16-bit"
        self.say(f"loading {source.description} ({bits}) on "
                 f"{self.options.device if self.device_map != 'auto' else 'all GPUs'}")
        t0 = time.perf_counter()
        with _quiet_transformers():
            if settings.run.recipe == "unsloth":
                self.model, self.tokenizer = self._load_unsloth()
            else:
                self.model, _ = load_model(spec, source, settings, self.options, self.device_map, quantize=quantize,
                                           max_memory=self.max_memory)
        if not self.cuda:
            portable_cpu_kernels(self.model)
        report.load_seconds = time.perf_counter() - t0
        if self.device_map == "auto":  # where from_pretrained really put each module (it changes across versions)
            report.model["device_map"] = {k: v if isinstance(v, (int, str)) else str(v)
                                          for k, v in (getattr(self.model, "hf_device_map", None) or {}).items()}
        report.model["kept_dtype"] = str(self.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        if settings.quant.dtype == "auto" and not (spec.config.get("dtype") or spec.config.get("torch_dtype")):
            report.notes.append(f"config.json names no dtype: unquantized tensors loaded in "
                                   f"{report.model['kept_dtype']}, as qtool estimate assumes (--dtype to change)")
        gc.collect()
        # the load's own peak includes 16-bit staging copies of tensors being quantized; the cache is not
        # emptied afterwards, as a training script would not empty it either
        report.memory["load_peak_allocated_bytes"] = meter.phase_peak()
        meter.start_steps()
        report.phases["after_load"] = meter.allocated()

    def _load_unsloth(self):
        """Unsloth loads from a folder: random weights are written to a temp checkpoint first (removed after)."""
        from qtool.verify import recipes

        with recipes.unsloth_checkpoint(self.spec, self.source, self.options) as folder:
            if self.source.kind == "random":
                self.report.notes.append("--recipe unsloth: the random weights were written as a 16-bit checkpoint "
                                         "to a temp folder for FastLanguageModel.from_pretrained (removed after)")
            return recipes.load_unsloth(folder, self.settings, self.settings.run.seq_len)

    def _batch(self):
        """The token ids of the run (and the first sequence's head, kept for --reference)."""
        import torch

        run, options = self.settings.run, self.options
        emb = self.model.get_input_embeddings().weight
        self.stage = Stage.TOKENIZER
        ids = make_batch(emb.shape[0], run.batch_size, run.seq_len, seed=options.seed, data=options.data,
                         tokenizer_dir=self.source.tokenizer_dir,
                         trust_remote_code=options.trust_remote_code).to(emb.device)
        self.quality_ids = ids[:1, :QUALITY_TOKENS]
        self.report.inputs = {"source": f"text file {options.data}" if options.data else "random token ids",
                                 "shape": list(ids.shape), "first_ids": ids[0, :8].tolist()}
        if self.reference is not None:
            self.stage = Stage.QUALITY
            self.quant_out = _quality_outputs(self.model, self.quality_ids, self.causal)
            if self.cuda:
                torch.cuda.empty_cache()
        return ids

    def _steps(self, ids) -> None:
        from qtool.verify import recipes

        run, options, meter, phases = self.settings.run, self.options, self.meter, self.report.phases
        if run.mode == "inference":
            self.stage = Stage.INFERENCE
            self.say(f"inference: prefill {run.batch_size}x{run.seq_len} tokens + {options.decode_tokens} decode steps")
            if run.recipe == "unsloth":
                recipes.generate_unsloth(self.model, ids, options, meter, phases, self.report)
            elif run.recipe != "loop" and self.causal:
                recipes.generate(self.model, ids, options, meter, phases, self.report)
            else:
                _infer(self.model, ids, options, meter, phases, self.report, self.causal)
            return
        self.stage = Stage.PEFT_WRAP
        if run.recipe == "unsloth":
            self.model = recipes.unsloth_peft(self.model, self.settings, options)
        else:
            self.model = wrap_for_training(self.model, self.settings)
        phases["peft_wrap_peak"] = meter.phase_peak()  # fp32 casts of kept params happen here
        phases["after_peft_wrap"] = meter.allocated()
        meter.reset_peak()
        self.stage = Stage.TRAINING
        self.say(f"{run.mode}: {options.steps} step(s) of {run.batch_size}x{run.seq_len} tokens, {run.optimizer}")
        if run.recipe == "loop":
            _train(self.model, ids, self.settings, options, meter, phases, self.report)
        else:
            recipes.train_with_trainer(self.model, ids, self.settings, options, meter, phases, self.report,
                                       tokenizer=self.tokenizer)

    def measure(self) -> None:
        """The memory section: allocator peaks per device on CUDA, the process's peak RSS on CPU."""
        mem, meter = self.report.memory, self.meter
        mem["metric"] = "cuda_allocator" if self.cuda else "process_rss"
        mem["after_load_bytes"] = self.report.phases.get("after_load")
        if self.cuda:
            mem["peak_allocated_bytes"] = meter.peak_allocated
            mem["peak_reserved_bytes"] = meter.peak_reserved
            mem["per_device"] = meter.per_device()
            mem["outside_torch_bytes"] = sum(d["outside_torch_bytes"] for d in mem["per_device"])
            # what the process took from the card(s): the allocator's reservations plus the CUDA context
            mem["peak_needed_bytes"] = meter.peak_reserved + mem["outside_torch_bytes"]
        else:
            mem["peak_rss_bytes"] = _max_rss_bytes()
            mem["note"] = "on CPU the peak is the process's max resident set size (ru_maxrss), over its whole lifetime"
            mem["peak_needed_bytes"] = mem["peak_rss_bytes"]

    def compare_with_estimate(self) -> None:
        report, options, mem = self.report, self.options, self.report.memory
        est = _estimate(self.spec, self.settings, options)
        ran = self.cuda and report.loaded and not report.error
        if ran and options.steps:
            cmp_ = compare_estimate(est, mem["peak_allocated_bytes"], what="peak allocated",
                                    key="allocated_peak_bytes", tolerance=options.tolerance)
            if est.get("peak_bytes") and mem["peak_needed_bytes"]:
                # the whole card: the estimate with its CUDA context vs reserved + outside torch
                cmp_["needed_relative_error"] = ((est["peak_bytes"] - mem["peak_needed_bytes"])
                                                 / mem["peak_needed_bytes"])
        elif ran:
            cmp_ = compare_estimate(est, mem["after_load_bytes"], what="allocated after load",
                                    key="weights_gpu_bytes", tolerance=options.tolerance)
        else:
            why = ("the CPU peak is the process's RSS" if not self.cuda else
                   "the run did not finish" if report.error else "the model did not load")
            cmp_ = {"compared": None,
                    "estimate_bytes": est.get("allocated_peak_bytes" if options.steps else "weights_gpu_bytes"),
                    "measured_bytes": None, "relative_error": None, "within_tolerance": None,
                    "tolerance": options.tolerance, "note": "not comparable: " + why}
        report.estimate = {**est, **cmp_}

    def reference_quality(self) -> None:
        """--reference: free the model, load the 16-bit one, compare outputs on the first sequence."""
        import torch

        if self.reference is None or self.quant_out is None:
            return
        self.model = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        ref_path, ref_desc = self.reference
        self.say(f"loading the reference {ref_desc} in {self.settings.quant.compute_dtype}")
        report = self.report
        try:
            report.quality = _reference_quality(self.reference, self.settings, self.options, self.device_map,
                                                   self.quality_ids, self.quant_out, self.causal)
        except torch.cuda.OutOfMemoryError as exc:
            # the 16-bit reference did not fit: a budget verdict (exit 3), the run's own results stand
            report.quality = {"reference": str(ref_path), "error": f"out of memory: {_first_line(exc)}"}
            report.error = report.error or {"stage": Stage.REFERENCE.value, "kind": "out_of_memory",
                                                  "message": f"loading --reference {ref_path}: {_first_line(exc)}"}
