"""`qtool verify --gpus N`: what changes when the run spreads over several cards.

  pipeline  one process, device_map="auto" over the first N visible cards (today's `--device-map auto`,
            which is the same over all of them); each card's peak is read from the meter.
  fsdp/ddp  `accelerate launch`, one process per rank (qtool/verify/launch.py, worker.py); each rank
            measures its own card and the parent gathers them (qtool/verify/cards.py).

Both end in one VerifyReport with a `cards` section; the budget is per card, `--cap-memory` holds each card
to it, and each card is compared with qtool estimate's figure for that card.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from qtool.core.config import Settings, resolve_settings
from qtool.core.errors import BadInput
from qtool.core.models import ModelSpec
from qtool.verify.inputs import VerifyOptions
from qtool.verify.cards import compare_cards, pipeline_cards  # noqa: F401 - run_verify's steps, in one place
from qtool.verify.launch import card_budgets, card_count, check_cards


def is_multi(settings: Settings, options: VerifyOptions) -> bool:
    """Runs that go through this module: several cards, a launcher, or --device-map auto."""
    return card_count(settings) > 1 or settings.run.parallel != "pipeline" or options.device_map == "auto"


def launched(settings: Settings) -> bool:
    return settings.run.parallel in ("fsdp", "ddp")


def adjust(settings: Settings, options: VerifyOptions) -> tuple[Settings, VerifyOptions, list[str]]:
    """Refusals and the settings FSDP-QLoRA needs. -> (settings, options, notes for the report)."""
    run, notes = settings.run, []
    if settings.values.get("cap_memory") and not any(card_budgets(settings)):
        raise BadInput("--cap-memory holds each card to its budget: give one (--gpu rtx-4090, --vram 24GB, "
                       "or --gpus rtx-4090,rtx-4090)")
    if options.device_map == "auto" and (launched(settings) or card_count(settings) > 1):
        raise BadInput("--device-map auto is --parallel pipeline over all GPUs: give either it or --gpus/--parallel")
    if run.recipe == "unsloth":
        raise BadInput("--recipe unsloth runs on one GPU (FastLanguageModel places the model itself): leave "
                       "--gpus/--parallel/--device-map out, or use --recipe trainer/sft")
    if not launched(settings):
        return settings, options, notes
    if options.device_map is not None:
        raise BadInput(f"--parallel {run.parallel} places each rank on its own card: --device-map does not apply")
    if run.recipe not in ("trainer", "sft"):
        raise BadInput(f"--parallel {run.parallel} runs transformers' Trainer under accelerate: --recipe "
                       f"{run.recipe} is not supported there (use trainer or sft)")
    if run.parallel == "fsdp" and options.device == "cpu":
        raise BadInput("--parallel fsdp needs CUDA: accelerate's FSDP plugin has no CPU device (--parallel ddp "
                       "runs on CPU ranks)")
    if run.parallel == "fsdp" and run.mode == "inference":
        raise BadInput("--parallel fsdp shards training; for inference over several cards use --parallel pipeline")
    if options.reference or options.data:
        raise BadInput(f"--parallel {run.parallel}: --reference and --data are not supported over several ranks")
    changes = {}
    if run.parallel == "fsdp" and run.mode == "qlora":
        # FSDP shards only floating-point tensors of one dtype: the 4-bit values packed in bfloat16, and the
        # kept weights in bfloat16 too (peft's FSDP-QLoRA recipe: torch_dtype=bnb_4bit_quant_storage)
        if settings.quant.quant_storage != "bfloat16":
            changes["quant_storage"] = "bfloat16"
            notes.append(f"fsdp: bnb_4bit_quant_storage=bfloat16 (not {settings.quant.quant_storage}): FSDP "
                         "shards the 4-bit weights only when they are packed in the kept dtype")
        if settings.quant.dtype in ("auto", "float32"):
            changes["dtype"] = "bfloat16"
    if changes:
        settings = with_values(settings, changes)
    return settings, options, notes


def with_values(settings: Settings, changes: dict) -> Settings:
    """The same settings with some values replaced (re-validated by the config layer)."""
    values = {k: v for k, v in settings.values.items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="qtool-settings-") as empty:  # no settings file is read
        return resolve_settings({**values, **changes}, env={}, cwd=Path(empty), command=settings.command)


def pipeline_options(settings: Settings, options: VerifyOptions) -> tuple[Settings, VerifyOptions, int]:
    """--parallel pipeline: device_map="auto" over the first N cards; --device-map auto: over all of them
    (the settings then say how many, so the per-card estimate is for the same cards)."""
    if options.device_map == "auto" and options.device != "cpu":
        import torch

        settings = with_values(settings, {"gpus": max(1, torch.cuda.device_count())})
    check_cards(settings, options.device)
    return settings, dataclasses.replace(options, device_map="auto"), card_count(settings)


def run_ranks(spec: ModelSpec, settings: Settings, options: VerifyOptions, notes: list[str], say):
    """Launch the ranks, wait, gather. -> VerifyReport (cards filled, checks not yet made)."""
    from qtool.verify.cards import gather
    from qtool.verify.launch import launch

    check_cards(settings, options.device)
    budgets = card_budgets(settings)
    job = {"model": spec.ref if spec.kind != "preset" else spec.name, "values": dict(settings.values),
           "options": {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                       if f.name not in ("device", "device_map")},
           "budgets": budgets, "notes": notes}
    with tempfile.TemporaryDirectory(prefix="qtool-ranks-") as tmp:
        result = launch(job, settings, Path(tmp), cpu=options.device == "cpu", say=say)
        report = gather(result, budgets)
    report.notes.append(f"{card_count(settings)} ranks launched with accelerate ({settings.run.parallel}, "
                        "transformers.Trainer on each); each card's peak is that rank's own")
    return report
