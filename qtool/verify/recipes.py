"""The runs users launch, measured phase by phase: transformers' Trainer (or trl's SFTTrainer when trl is
installed), `generate` for inference, and Unsloth when it is installed.

`qtool verify` loads and wraps the model the same way for every recipe (qtool/verify/); what differs is
what runs the steps:

  loop     qtool's own loop (verify._train / verify._infer): no autocast, model(...).loss.backward()
  trainer  a real transformers.Trainer, TrainingArguments(bf16/fp16 per --precision, optim=the optimizer's
           TrainingArguments name, max_steps=--steps, gradient_checkpointing non-reentrant).
           Inference (every recipe but loop): model.generate.
  sft      trl's SFTTrainer (the `qtool[trl]` extra) with the same arguments on the same pre-tokenized ids.
           A recipe of its own because its loss is not the Trainer's: trl 1.x computes log-probabilities
           through a fused, chunked LM head (a Triton kernel), never holding the full logits.
  unsloth  Unsloth's own recipe (needs `unsloth` importable and CUDA): FastLanguageModel.from_pretrained(
           load_in_4bit=True) from a checkpoint folder -- a local one as it is, for a preset or config a random
           16-bit checkpoint written to a temp folder first (unsloth_checkpoint) --, then
           get_peft_model(use_gradient_checkpointing="unsloth") under trl's SFTTrainer, as its notebooks do;
           inference: FastLanguageModel.for_inference + generate.

Per-phase peaks come from a TrainerCallback (step begin, pre-optimizer step, optimizer step) plus one
override of compute_loss that only reads the meter after the forward pass: the Trainer has no callback
between forward and backward. Nothing else of the Trainer is replaced.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qtool.core.config import Settings
from qtool.verify.report import VerifyReport
from qtool.core.errors import DeviceError

RUNNERS = {"trainer": "transformers.Trainer", "sft": "trl.SFTTrainer", "unsloth": "unsloth.FastLanguageModel + trl.SFTTrainer",
           "loop": "qtool's loop"}
# qtool's optimizer names -> TrainingArguments.optim
TRAINER_OPTIM = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit",
                 "paged_adamw32bit": "paged_adamw_32bit", "adafactor": "adafactor", "sgd": "sgd"}


def require_trl() -> None:
    """SFTTrainer's fused LM head is a Triton kernel: trl without triton fails inside the first step."""
    missing = [m for m in ("trl", "datasets", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        raise DeviceError(f"--recipe sft: {', '.join(missing)} not installed (pip install 'qtool[trl]'; "
                          "trl's SFTTrainer computes its loss with a Triton kernel, so it needs triton too)")


def require_unsloth(device: str = "cuda") -> None:
    """`qtool verify --recipe unsloth` needs unsloth importable and a CUDA device (its kernels are Triton)."""
    if importlib.util.find_spec("unsloth") is None:
        raise DeviceError("--recipe unsloth: unsloth is not installed (pip install 'qtool[unsloth]'); "
                          "qtool estimate --recipe unsloth still works")
    if device == "cpu":
        raise DeviceError("--recipe unsloth: Unsloth runs on CUDA GPUs only (its kernels are Triton); "
                          "use --device cuda, or another --recipe on the CPU")


def import_unsloth(block_compile: bool | None = None):
    """Unsloth patches transformers, peft and trl on import: it has to come before their first use.
    block_compile: the unsloth_block_compile setting, handed to Unsloth as UNSLOTH_BLOCK_COMPILE (None: as is)."""
    import os

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network calls from the GPU machine
    if block_compile is not None:
        os.environ["UNSLOTH_BLOCK_COMPILE"] = "1" if block_compile else "0"
    import unsloth

    return unsloth


def _precision_flags(precision: str, cuda: bool, notes: list[str]) -> dict:
    """TrainingArguments' bf16/fp16 flags. fp16 autocast needs a GPU: on CPU it runs fp32 (noted)."""
    if precision == "bf16":
        return {"bf16": True}
    if precision == "fp16":
        if cuda:
            return {"fp16": True}
        notes.append("--precision fp16 needs CUDA (the Trainer's fp16 AMP); on CPU the steps run in fp32")
    return {}


def _tiny_tokenizer():
    """SFTTrainer wants a processing class even for pre-tokenized ids; random-weight models have none.
    A two-token tokenizer supplies pad/eos ids (every sequence has the same length, so nothing is padded)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _phase_trainer(base, meter, phases: dict, record: dict):
    """A subclass of Trainer/SFTTrainer whose compute_loss reads the forward peak, nothing more."""

    class Measured(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            phases["forward_peak"] = max(phases.get("forward_peak", 0), meter.phase_peak())
            loss = out[0] if return_outputs else out
            record["loss"] = float(loss.detach().float().item())
            meter.reset_peak()
            return out

    return Measured


def _callback(meter, phases: dict, params: list, steps: list, record: dict):
    import torch
    from transformers import TrainerCallback

    class PhaseCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter.sync()
            record.clear()
            record["t0"] = time.perf_counter()
            meter.reset_peak()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            # backward and the Trainer's gradient clipping
            phases["backward_peak"] = max(phases.get("backward_peak", 0), meter.phase_peak())
            # the model the Trainer steps: under FSDP its flat (sharded) parameters hold the gradients, not
            # the parameters the peft model had before it was wrapped
            model = kw.get("model")
            trained = [p for p in model.parameters() if p.requires_grad] if model is not None else params
            grads = [p.grad for p in trained if p.grad is not None]
            record["grads_finite"] = bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
            meter.reset_peak()

        def on_optimizer_step(self, args, state, control, **kw):
            phases["optimizer_step_peak"] = max(phases.get("optimizer_step_peak", 0), meter.phase_peak())

        def on_step_end(self, args, state, control, **kw):
            meter.sync()
            phases["after_step"] = meter.allocated()
            value = record.get("loss", float("nan"))
            finite = math.isfinite(value) and record.get("grads_finite", False)
            steps.append({"step": state.global_step, "loss": value if math.isfinite(value) else str(value),
                          "loss_finite": math.isfinite(value), "grads_finite": record.get("grads_finite", False),
                          "seconds": time.perf_counter() - record["t0"]})
            if not finite:  # the Trainer has no hook to skip the step itself: stop after it, the checks report it
                control.should_training_stop = True
            return control

    return PhaseCallback()


def train_with_trainer(model, ids, settings: Settings, options, meter, phases: dict, report: VerifyReport, *,
                       tokenizer=None) -> None:
    """`max_steps=options.steps` optimizer steps of a real Trainer (recipe trainer) or SFTTrainer (recipes sft
    and unsloth) on `ids` (batch x seq, labels = ids). Fills phases and report as verify._train does."""
    from transformers import Trainer, TrainingArguments

    run = settings.run
    cuda = meter.cuda
    sft = run.recipe in ("sft", "unsloth")
    notes = report.notes
    params = [p for p in model.parameters() if p.requires_grad]
    report.trainable_params = sum(p.numel() for p in params)
    model.config.use_cache = False  # as QLoRA recipes set it: no KV cache while training
    rows = [{"input_ids": ids[i].cpu(), "labels": ids[i].cpu()} for i in range(ids.shape[0])] * options.steps
    common = dict(max_steps=options.steps, per_device_train_batch_size=ids.shape[0], gradient_accumulation_steps=1,
                  learning_rate=options.lr, lr_scheduler_type="constant", optim=TRAINER_OPTIM[run.optimizer],
                  # Unsloth checkpoints on its own (use_gradient_checkpointing="unsloth"); its notebooks leave this off
                  gradient_checkpointing=run.gradient_checkpointing and run.recipe != "unsloth",
                  gradient_checkpointing_kwargs={"use_reentrant": False}, logging_strategy="no",
                  save_strategy="no", report_to="none", disable_tqdm=True, seed=options.seed,
                  dataloader_num_workers=0, use_cpu=not cuda,
                  # DDP of a PeftModel: the Trainer would look for unused parameters, which non-reentrant
                  # checkpointing refuses; every LoRA parameter is used
                  ddp_find_unused_parameters=False if run.parallel == "ddp" else None,
                  **_precision_flags(run.precision, cuda, notes))
    steps: list = report.steps
    record: dict = {}
    callback = _callback(meter, phases, params, steps, record)
    with tempfile.TemporaryDirectory(prefix="qtool-trainer-") as out_dir:
        if sft:
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in rows])
            args = SFTConfig(output_dir=out_dir, max_length=ids.shape[1], packing=False, **common)
            cls = _phase_trainer(SFTTrainer, meter, phases, record)
            trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer or _tiny_tokenizer(),
                          callbacks=[callback])
        else:
            args = TrainingArguments(output_dir=out_dir, remove_unused_columns=False, **common)
            cls = _phase_trainer(Trainer, meter, phases, record)
            trainer = cls(model=model, args=args, train_dataset=rows, callbacks=[callback])
        report.trainer = {"class": "trl.SFTTrainer" if sft else "transformers.Trainer",
                             "optim": args.optim if isinstance(args.optim, str) else args.optim.value,
                             "bf16": bool(args.bf16), "fp16": bool(args.fp16),
                             "gradient_checkpointing": bool(args.gradient_checkpointing)}
        if trainer.accelerator.num_processes > 1:  # a rank of --parallel fsdp|ddp: what accelerate made of it
            report.trainer["distributed_type"] = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
            report.trainer["world_size"] = trainer.accelerator.num_processes
        try:
            trainer.train()
        finally:
            release(trainer, model)
    _summarise(report, ids, steps)


@contextlib.contextmanager
def unsloth_checkpoint(spec, source, options) -> Iterator[Path]:
    """The folder Unsloth loads from. A checkpoint folder is used as it is; random weights (a preset or a
    config.json) are written first as a 16-bit checkpoint (transformers' own init and save_pretrained, so
    fused or tied weights are laid out as a real checkpoint is) with a two-token tokenizer, in a temp folder
    that is removed on leaving, also on errors. Memory does not depend on the values."""
    if source.kind != "random":
        yield Path(source.path)
        return
    import shutil

    import torch

    from qtool.core.meta import hf_config, model_class

    tmp = Path(tempfile.mkdtemp(prefix="qtool-unsloth-"))
    try:
        cfg = hf_config(spec.config, source=spec.config_path or spec.ref, trust_remote_code=options.trust_remote_code)
        dtype = getattr(torch, str(spec.config.get("dtype") or spec.config.get("torch_dtype") or "bfloat16"),
                        torch.bfloat16)
        dtype = dtype if dtype.is_floating_point else torch.bfloat16
        torch.manual_seed(options.seed)
        cls = model_class(cfg)
        with torch.device(_init_device(cls, cfg, options, dtype.itemsize)):  # init: minutes on a CPU, seconds on a GPU
            model = cls._from_config(cfg, dtype=dtype)
        model.save_pretrained(tmp)
        del model
        if options.device != "cpu":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the write's own peak is not the run's
        _tiny_tokenizer().save_pretrained(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _init_device(cls, cfg, options, itemsize: int) -> str:
    """Where the random 16-bit model is built before it is written: the GPU when it fits in half of its free
    memory, else the CPU."""
    if options.device == "cpu":
        return "cpu"
    import torch

    device = options.device if options.device != "cuda" else "cuda:0"
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    with torch.device("meta"):
        numel = sum(p.numel() for p in cls._from_config(cfg).parameters())
    return device if numel * itemsize < free / 2 else "cpu"


def load_unsloth(path, settings: Settings, max_seq: int):
    """FastLanguageModel.from_pretrained(load_in_4bit=True) from a checkpoint folder. -> (model, tokenizer).
    Unsloth quantizes with its own bitsandbytes config (NF4, double quant, compute in `dtype`)."""
    import torch

    import_unsloth(settings.run.unsloth_block_compile)
    from unsloth import FastLanguageModel

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.run.precision, torch.float32)
    return FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=max_seq, dtype=dtype,
                                             load_in_4bit=True, local_files_only=True)


def unsloth_peft(model, settings: Settings, options):
    """get_peft_model(use_gradient_checkpointing="unsloth"), LoRA on qtool's targets, then training mode."""
    from unsloth import FastLanguageModel

    run = settings.run
    # "all-linear" as peft reads it (the other recipes' targets): on Llama-like models the seven projections of
    # Unsloth's notebooks, and also fused ones (Phi-3's qkv_proj, gate_up_proj) and MoE experts
    targets = "all-linear" if "all-linear" in run.lora_targets else list(run.lora_targets)
    model = FastLanguageModel.get_peft_model(
        model, r=run.lora_rank, lora_alpha=run.lora_alpha, lora_dropout=0, target_modules=targets, bias="none",
        use_gradient_checkpointing="unsloth" if run.gradient_checkpointing else False, random_state=options.seed)
    FastLanguageModel.for_training(model)
    return model


def generate_unsloth(model, ids, options, meter, phases: dict, report: VerifyReport) -> None:
    """Unsloth's inference: FastLanguageModel.for_inference, then model.generate (its patched one)."""
    from unsloth import FastLanguageModel

    FastLanguageModel.for_inference(model)
    generate(model, ids, options, meter, phases, report)


def release(trainer, model) -> None:
    """Drop what the Trainer attached to the model (accelerate's autocast forward wrapper, grads), so the
    model can be measured again in the same process (bench/recipe_gpu.py does)."""
    # accelerate marks a prepared model and never prepares it again: a second Trainer on the same model
    # would then run without autocast
    model.__dict__.pop("_is_accelerate_prepared", None)
    if model.__dict__.pop("_original_forward", None) is not None:
        model.__dict__.pop("forward", None)  # back to the class's forward
    trainer.optimizer = trainer.lr_scheduler = None
    for p in model.parameters():
        p.grad = None


def _summarise(report: VerifyReport, ids, steps: list) -> None:
    last = steps[-1] if steps else {}
    report.loss = last.get("loss")
    report.loss_finite = all(s["loss_finite"] for s in steps) if steps else None
    report.grads_finite = all(s["grads_finite"] for s in steps) if steps else None
    if "seconds" in last:
        report.step_seconds = last["seconds"]
        report.tokens_per_second = ids.numel() / last["seconds"]


def generate(model, ids, options, meter, phases: dict, report: VerifyReport) -> None:
    """Inference the way users run it: model.generate (greedy) of 1 + --decode-tokens new tokens, repeated
    --steps times. A logits processor -- called once the prefill's forward is done -- splits the peak into
    prefill_peak and decode_peak, as qtool's loop reports them; the new tokens' logits are checked finite."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class PrefillDone(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if "t1" not in mark:
                phases["prefill_peak"] = max(phases.get("prefill_peak", 0), meter.phase_peak())
                mark["t1"] = time.perf_counter()
                meter.reset_peak()
            return scores

    model.eval()
    finite = True
    new = 1 + options.decode_tokens
    mask = torch.ones_like(ids)
    for step in range(1, options.steps + 1):
        mark: dict = {}
        meter.sync()
        t0 = time.perf_counter()
        meter.reset_peak()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                                 logits_processor=LogitsProcessorList([PrefillDone()]))
            finite &= all(bool(torch.isfinite(x).all()) for x in out.logits)
        meter.sync()
        t2 = time.perf_counter()
        if options.decode_tokens:
            phases["decode_peak"] = max(phases.get("decode_peak", 0), meter.phase_peak())
        t1 = mark.get("t1", t2)
        report.steps.append({"step": step, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                                "outputs_finite": finite})
        del out
    last = report.steps[-1]
    report.loss_finite = finite  # no loss in inference: finite outputs stand in
    report.grads_finite = None
    report.step_seconds = last["prefill_seconds"] + last["decode_seconds"]
    report.tokens_per_second = ids.numel() / max(last["prefill_seconds"], 1e-9)
    if options.decode_tokens:
        report.decode_tokens_per_second = ids.shape[0] * options.decode_tokens / max(last["decode_seconds"], 1e-9)


def describe(settings: Settings) -> dict[str, Any]:
    """The recipe as a report names it."""
    run = settings.run
    out: dict[str, Any] = {"recipe": run.recipe, "precision": run.precision}
    if run.recipe != "loop":
        out["runner"] = RUNNERS[run.recipe] if run.mode != "inference" else (
            "unsloth.FastLanguageModel.for_inference + generate" if run.recipe == "unsloth" else "model.generate")
        out["optim"] = TRAINER_OPTIM[run.optimizer]
    return out
