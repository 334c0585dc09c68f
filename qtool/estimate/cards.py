"""Per-card peaks of a run spread over several GPUs (`--gpus N --parallel pipeline|fsdp|ddp`).

`estimate_cards(spec, settings)` starts from the same basis as the one-GPU report (qtool.estimate.report) and
splits or shards its terms card by card:

  pipeline  device_map="auto": the placement transformers/accelerate compute (qtool.estimate.placement), then
            each card's weights, adapters, checkpoints and transients of its own layers; the first card the
            embeddings, the last the head, logits and loss (qtool.estimate.pipeline)
  fsdp      FSDP-QLoRA: every rank holds 1/N of the flat parameters, all-gathers a layer at a time and runs its
            own batch (qtool.estimate.fsdp)
  ddp       a full copy per card plus DDP's gradient buckets

With one card every strategy is the one-GPU report's breakdown, term for term. Pure arithmetic for presets and
sizes: nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qtool.core import presets
from qtool.core.errors import BadInput
from qtool.core.sizes import parse_size
from qtool.estimate import memory


@dataclass(frozen=True)
class CardPeak:
    """One card at its peak."""

    index: int
    gpu: str | None  # catalogue key of the card, None when only a size (or nothing) was given
    budget_bytes: int | None  # what the card may use, None: no budget
    peak_bytes: int  # allocated peak: what torch.cuda.max_memory_allocated() should show on this card
    terms: Mapping[str, int]  # component -> bytes at the peak, CUDA context included (outside the allocator)
    fits: bool | None  # required_bytes <= budget_bytes; None without a budget
    # what the card must have room for when that is less than device_bytes: an allocation that sizes itself by
    # the card (transformers' allocator warmup) is the allocated peak but never what decides the fit
    need_bytes: int | None = None

    @property
    def device_bytes(self) -> int:
        """All the card must hold at the peak: the allocator's peak plus what lives outside it."""
        return memory.peak_bytes(self.terms)

    @property
    def required_bytes(self) -> int:
        """What decides whether the card fits."""
        return self.device_bytes if self.need_bytes is None else self.need_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "gpu": self.gpu, "budget_bytes": self.budget_bytes,
                "peak_bytes": self.peak_bytes, "device_bytes": self.device_bytes, "fits": self.fits,
                "required_bytes": self.required_bytes,
                "headroom_bytes": None if self.budget_bytes is None else self.budget_bytes - self.required_bytes,
                "terms": dict(self.terms)}


@dataclass(frozen=True)
class CardsEstimate:
    """The run on every card: one CardPeak each, the host memory the strategy needs, and the verdict."""

    parallel: str
    cards: tuple[CardPeak, ...]
    host_ram_bytes: int  # host RAM the model takes on top of the processes themselves (0: nothing notable)
    fits: bool | None  # every card fits; None without a budget
    detail: Mapping[str, Any] = field(default_factory=dict)  # pipeline: the device map; fsdp: the sharding

    @property
    def worst(self) -> CardPeak:
        """The card closest to (or furthest over) its budget; without budgets, the fullest one."""
        if all(c.budget_bytes is not None for c in self.cards):
            return max(self.cards, key=lambda c: c.required_bytes - c.budget_bytes)
        return max(self.cards, key=lambda c: c.required_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"parallel": self.parallel, "gpus": len(self.cards), "fits": self.fits,
                "host_ram_bytes": self.host_ram_bytes, "cards": [c.to_dict() for c in self.cards],
                "detail": dict(self.detail)}


def card_budgets(run) -> list[tuple[str | None, int | None]]:
    """(catalogue key, budget) per card. `gpus` as a count repeats --vram/--gpu; as catalogue names, each card's
    memory is its budget (capped by --vram when that is given as a size too)."""
    if isinstance(run.gpus, int):
        return [(run.gpu, run.budget_bytes)] * run.gpus
    out = []
    for key in run.gpus:
        size = parse_size(presets.find_gpu(key)["vram"])
        out.append((key, size if run.budget_bytes is None or run.gpu is not None else min(size, run.budget_bytes)))
    return out


def estimate_cards(spec, settings, *, trust_remote_code: bool = False, basis=None,
                   transformers_version: str | None = None) -> CardsEstimate:
    """Per-card peaks for settings.run.gpus cards with settings.run.parallel. `basis`: an estimate_basis already
    computed for the same spec and settings (the CLI shares it with the one-GPU report). `transformers_version`:
    the pipeline placement of that transformers (None: the installed one)."""
    from qtool.estimate.report import estimate_basis

    run = settings.run
    if basis is None:
        basis = estimate_basis(spec, settings, trust_remote_code=trust_remote_code)
    budgets = card_budgets(run)
    n = len(budgets)
    if n > 1:
        check_strategy(run)
    detail: dict[str, Any] = {}
    host = 0
    if n == 1:
        per_card = [memory.memory_breakdown(basis.inputs)]
    elif run.parallel == "ddp":
        per_card = [ddp_terms(basis.inputs)] * n
    elif run.parallel == "fsdp":
        from qtool.estimate import fsdp

        per_card, host, detail = fsdp.rank_terms(basis, settings, n, spec=spec, trust_remote_code=trust_remote_code,
                                                 transformers_version=transformers_version)
    else:
        from qtool.estimate import pipeline

        per_card, detail = pipeline.card_terms(basis, settings, [b for _, b in budgets], spec=spec,
                                               trust_remote_code=trust_remote_code,
                                               transformers_version=transformers_version)
    need = detail.pop("need_bytes", None)
    cards = tuple(
        CardPeak(i, gpu, budget, memory.allocated_peak_bytes(terms), dict(terms),
                 None if budget is None else (memory.peak_bytes(terms) if need is None else need) <= budget, need)
        for i, ((gpu, budget), terms) in enumerate(zip(budgets, per_card))
    )
    fits = None if any(c.fits is None for c in cards) else all(c.fits for c in cards)
    if detail.get("offloaded"):  # bitsandbytes refuses a 4-bit model dispatched partly to the CPU or disk
        fits = False
    return CardsEstimate(run.parallel, cards, host, fits, detail)


def check_strategy(run) -> None:
    """What the several-GPU estimate does not model is refused in one line, not answered with another run's
    figures: Unsloth on several cards, and FSDP other than FSDP-QLoRA training."""
    if run.recipe == "unsloth":
        raise BadInput("--recipe unsloth is modelled on one GPU (Unsloth over several cards was not measured): "
                       "leave --gpus out, or use --recipe trainer/sft")
    if run.parallel == "fsdp" and run.mode == "inference":
        raise BadInput("--parallel fsdp shards training; for inference over several cards use --parallel pipeline")
    if run.parallel == "fsdp" and run.mode != "qlora":
        raise BadInput(f"--parallel fsdp --mode {run.mode} is not modelled: qtool's FSDP estimate is FSDP-QLoRA "
                       "(--mode qlora); use --parallel ddp or pipeline")


def cards_report(report: dict, est: CardsEstimate) -> dict:
    """The one-GPU report with the cards in: `cards` (one entry per card, `peak_bytes` its allocated peak),
    `host_ram_bytes`, `parallel`, fits/headroom_bytes now about the cards (the fullest one), and the strategy's
    caveat among the warnings."""
    worst = est.worst
    caveat = est.detail.get("caveat")
    return {**report, "warnings": [*report["warnings"], *([caveat] if caveat else [])], "parallel": est.parallel,
            "gpus": len(est.cards), "cards": [c.to_dict() for c in est.cards], "host_ram_bytes": est.host_ram_bytes,
            "placement": dict(est.detail), "fits": est.fits,
            "headroom_bytes": None if worst.budget_bytes is None else worst.budget_bytes - worst.required_bytes}


# DDP's Reducer copies each gradient into a bucket (gradient_as_bucket_view=False, the default): the buckets of
# bucket_cap_mb (25 MB; the first one 1 MB) together hold one more copy of every trainable gradient.
DDP_BUCKET_BYTES = 25 * 1024 * 1024


def ddp_terms(inputs: memory.MemoryInputs) -> dict[str, int]:
    """One card of DDP: the whole one-GPU run (its own batch) plus the gradient buckets."""
    terms = memory.memory_breakdown(inputs)
    grads = terms.get("lora_grads", 0) + terms.get("grads", 0)
    out = {k: v for k, v in terms.items() if k != "cuda_context"}
    if grads:
        out["ddp_buckets"] = grads
    out["cuda_context"] = terms["cuda_context"]
    out["nccl_buffers"] = memory.NCCL_BYTES  # measured on FSDP ranks; DDP's process group is NCCL's too
    return out
