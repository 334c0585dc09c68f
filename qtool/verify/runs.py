"""The runs themselves: the training recipe per mode (peft QLoRA/LoRA, full) and inference with a KV cache."""

from __future__ import annotations

import math
import time

from qtool.core.config import Settings
from qtool.core.errors import BadInput
from qtool.verify.inputs import VerifyOptions
from qtool.verify.report import VerifyReport
from qtool.verify.meter import Meter


def _make_optimizer(name: str, params: list, lr: float):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adafactor":  # as the Trainer builds it for optim="adafactor"
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "paged_adamw8bit":
        # Paged state lives in CUDA unified memory; on CPU bitsandbytes keeps it in ordinary tensors.
        return bnb.optim.PagedAdamW8bit(params, lr=lr)
    if name == "paged_adamw32bit":
        return bnb.optim.PagedAdamW32bit(params, lr=lr)
    raise BadInput(f"unknown optimizer {name!r}")


def wrap_for_training(model, settings: Settings):
    """The standard recipe for each mode. Returns the model to train."""
    run = settings.run
    if run.mode == "full":
        if run.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if run.mode == "qlora" and run.parallel == "fsdp":
        # FSDP-QLoRA (peft's recipe; trl skips it too for sharded QLoRA): prepare_model_for_kbit_training would
        # cast the kept weights to float32, and FSDP flattens only tensors of one dtype
        if run.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    elif run.mode == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=run.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = list(run.lora_targets)
    target_modules = "all-linear" if targets == ["all-linear"] else targets
    lora = LoraConfig(r=run.lora_rank, lora_alpha=run.lora_alpha, target_modules=target_modules,
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise BadInput(f"--lora-targets {','.join(targets)}: {exc}") from None


def _train(model, ids, settings: Settings, options: VerifyOptions, meter: Meter, phases: dict, report: VerifyReport) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    report.trainable_params = sum(p.numel() for p in params)
    opt = _make_optimizer(settings.run.optimizer, params, options.lr)
    model.train()
    steps = report.steps
    for step in range(1, options.steps + 1):
        meter.sync()
        t0 = time.perf_counter()
        meter.reset_peak()
        # use_cache=False as QLoRA recipes set it; the logits are dropped here, as Trainer drops them
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        phases["forward_peak"] = max(phases.get("forward_peak", 0), meter.phase_peak())
        value = float(loss.detach().float().item())
        meter.reset_peak()
        loss.backward()
        phases["backward_peak"] = max(phases.get("backward_peak", 0), meter.phase_peak())
        del loss
        grads = [p.grad for p in params if p.grad is not None]
        grads_finite = bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
        record = {"step": step, "loss": value if math.isfinite(value) else str(value),
                  "loss_finite": math.isfinite(value), "grads_finite": grads_finite}
        if not (math.isfinite(value) and grads_finite):
            steps.append(record)
            break  # no point stepping on NaN; the checks report it
        meter.reset_peak()
        opt.step()
        opt.zero_grad(set_to_none=True)
        phases["optimizer_step_peak"] = max(phases.get("optimizer_step_peak", 0), meter.phase_peak())
        meter.sync()
        record["seconds"] = time.perf_counter() - t0
        phases["after_step"] = meter.allocated()
        steps.append(record)
    last = steps[-1] if steps else {}
    report.loss = last.get("loss")
    report.loss_finite = all(s["loss_finite"] for s in steps) if steps else None
    report.grads_finite = all(s["grads_finite"] for s in steps) if steps else None
    if "seconds" in last:
        report.step_seconds = last["seconds"]  # the last step: steady state, optimizer state exists
        report.tokens_per_second = ids.numel() / last["seconds"]


def _infer(model, ids, options: VerifyOptions, meter: Meter, phases: dict, report: VerifyReport, causal: bool) -> None:
    import inspect

    import torch

    model.eval()
    extra = {"logits_to_keep": 1} if causal and "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    finite = True
    for step in range(1, options.steps + 1):
        with torch.inference_mode():
            meter.sync()
            t0 = time.perf_counter()
            meter.reset_peak()
            if causal:
                out = model(input_ids=ids, use_cache=True, **extra)
                logits = out.logits[:, -1]
            else:
                out = model(input_ids=ids)
                logits = out.last_hidden_state
            finite &= bool(torch.isfinite(logits).all())
            phases["prefill_peak"] = max(phases.get("prefill_peak", 0), meter.phase_peak())
            t1 = time.perf_counter()
            if causal:
                past = out.past_key_values
                meter.reset_peak()
                for _ in range(options.decode_tokens):
                    nxt = logits.argmax(-1, keepdim=True)
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, logits = out.past_key_values, out.logits[:, -1]
                    finite &= bool(torch.isfinite(logits).all())
                phases["decode_peak"] = max(phases.get("decode_peak", 0), meter.phase_peak())
                del past
            meter.sync()
            t2 = time.perf_counter()
            del out, logits
        report.steps.append({"step": step, "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1,
                                "outputs_finite": finite})
    last = report.steps[-1]
    report.loss_finite = finite  # no loss in inference: finite outputs stand in
    report.grads_finite = None
    report.step_seconds = last["prefill_seconds"] + last["decode_seconds"]
    report.tokens_per_second = ids.numel() / last["prefill_seconds"]
    if causal and options.decode_tokens:
        report.decode_tokens_per_second = ids.shape[0] * options.decode_tokens / max(last["decode_seconds"], 1e-9)
