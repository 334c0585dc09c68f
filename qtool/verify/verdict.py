"""The verdict: the estimate for the same settings and its error, the checks, the exit they lead to."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qtool.core.config import Settings
from qtool.core.errors import DoesNotFit, NotFinite, QtoolError, one_line
from qtool.core.models import ModelSpec
from qtool.verify.inputs import VerifyOptions
from qtool.verify.report import VerifyReport


def _estimate(spec: ModelSpec, settings: Settings, options: VerifyOptions) -> dict:
    """qtool estimate's numbers for the same settings, reduced to what a measurement can check:
    allocated_peak_bytes (the peak less what lives outside torch's allocator), peak_bytes (everything,
    CUDA context included) and the GPU bytes of the loaded weights."""
    from qtool.estimate import estimate_report

    try:
        rep = estimate_report(spec, settings, trust_remote_code=options.trust_remote_code)
    except QtoolError as exc:
        return {"error": f"estimate failed: {exc}"}
    weights = rep.get("weights") or {}
    fmt = rep.get("format") if settings.run.mode in ("qlora", "inference") else (
        "fp32" if (rep.get("kept") or {}).get("dtype") == "float32" else "fp16")
    return {"allocated_peak_bytes": rep.get("allocated_peak_bytes"), "peak_bytes": rep.get("peak_bytes"),
            "weights_gpu_bytes": (weights.get(fmt) or {}).get("gpu"), "format": fmt,
            "breakdown": rep.get("breakdown"), "params": rep.get("params")}


def compare_estimate(estimate: dict, measured: int | None, *, what: str, key: str, tolerance: float) -> dict:
    """relative_error = (estimate - measured) / measured; positive = estimate too high."""
    out = {"compared": f"estimate {key} vs measured {what}", "tolerance": tolerance,
           "estimate_bytes": estimate.get(key), "measured_bytes": measured, "relative_error": None,
           "within_tolerance": None}
    if estimate.get(key) and measured:
        err = (estimate[key] - measured) / measured
        out["relative_error"] = err
        out["within_tolerance"] = abs(err) <= tolerance
    return out


_NAN_INF = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}" if str(exc).strip() else type(exc).__name__


def compile_failure(exc: BaseException, stage: str, recipe: str, block_compile: bool):
    """A torch.compile failure inside the steps (Dynamo/Inductor: TorchDynamoException) -> RecipeFailed naming the
    recipe, the stage and the compiler's one line; with Unsloth, the switch that runs its layers uncompiled.
    None for anything else."""
    from torch._dynamo.exc import TorchDynamoException

    from qtool.core.errors import RecipeFailed, one_line

    if not isinstance(exc, TorchDynamoException):
        return None
    # BackendCompilerFailed/InductorError keep the pass's own error; __cause__ next (not __context__: that can be
    # any exception being handled when the compile began)
    cause = getattr(exc, "inner_exception", None) or exc.__cause__
    inner = one_line(exc, 160)
    if cause is not None:  # Inductor wraps the pass's own error: that one says what failed
        inner = type(cause).__name__ + (f": {one_line(cause, 160)}" if str(cause).strip() else "")
    hint = None
    if recipe == "unsloth":
        hint = ("Unsloth's per-layer compile is on: --no-unsloth-block-compile or UNSLOTH_BLOCK_COMPILE=0 runs "
                "without it" if block_compile else "Unsloth still compiles some kernels with the block compile off")
    return RecipeFailed(f"the {recipe} recipe failed in {stage}: torch.compile raised {type(exc).__name__} ({inner})",
                        hint=hint)


def _numerical(exc: BaseException) -> bool:
    """Errors a broken (NaN/inf) model can raise inside kernels, e.g. sampling or argmax on NaN.
    Whole words only: "information" or "inference" in a message says nothing about NaN."""
    return _NAN_INF.search(str(exc)) is not None


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not applicable / informational and skipped
    message: str
    informational: bool = False


def checks(report: VerifyReport, settings: Settings) -> dict[str, dict]:
    """The verdicts, in a fixed order. The estimate check is informational: it never fails the run."""
    from qtool.core.sizes import format_bytes

    err = report.error or {}
    oom = err.get("kind") == "out_of_memory"
    out: dict[str, Check] = {}
    if not report.loaded:
        out["loads"] = Check("loads", False, f"out of memory while loading: {err.get('message', '')}"
                             if oom else f"did not load: {err.get('message', '')}")
    else:
        out["loads"] = Check("loads", True, f"loaded in {(report.load_seconds or 0):.1f}s ({report.model['description']})")

    inference = settings.run.mode == "inference"
    numerical = bool(err) and not oom  # a kernel refused NaN/inf (only such errors are recorded, others raise)
    if report.loss_finite is False:
        out["finite_loss"] = Check("finite_loss", False, "outputs are not finite" if inference
                                   else f"loss is {report.loss}")
    elif numerical:
        out["finite_loss"] = Check("finite_loss", False, f"{err.get('kind')} during {err.get('stage')}: "
                                   f"{err.get('message', '')}")
    elif report.loss_finite:
        out["finite_loss"] = Check("finite_loss", True, "outputs finite" if inference else f"loss {report.loss:.4f}")
    elif oom and err.get("stage") != "reference":
        out["finite_loss"] = Check("finite_loss", None, "out of memory before a step finished")
    elif not report.steps_requested:
        out["finite_loss"] = Check("finite_loss", None, "no steps run (--steps 0)")
    else:
        out["finite_loss"] = Check("finite_loss", None, "no step finished")
    if inference:
        out["finite_grads"] = Check("finite_grads", None, "not applicable to inference")
    elif report.grads_finite is None and numerical:
        out["finite_grads"] = Check("finite_grads", None, "the run stopped on a NaN/inf error before gradients were checked")
    elif report.grads_finite is None:
        out["finite_grads"] = Check("finite_grads", None, "no backward pass ran")
    else:
        out["finite_grads"] = Check("finite_grads", bool(report.grads_finite),
                                    "all gradients finite" if report.grads_finite else "non-finite gradients")

    budget = settings.run.budget_bytes
    need = report.memory.get("peak_needed_bytes")
    what = "peak RSS" if report.memory.get("metric") == "process_rss" else "peak reserved + outside torch"
    if oom:
        where = f"rank {err['rank']} ({report.device['name']})" if "rank" in err else report.device["name"]
        out["fits_budget"] = Check("fits_budget", False, f"out of memory during {err.get('stage')} on {where}")
    elif report.cards and any(c.get("budget_bytes") for c in report.cards):
        out["fits_budget"] = _cards_fit(report.cards)
    elif budget is None:
        out["fits_budget"] = Check("fits_budget", None, f"no budget given ({what} {format_bytes(need or 0)})")
    else:
        per_gpu = [d["peak_reserved_bytes"] + d["outside_torch_bytes"] for d in report.memory.get("per_device", [])]
        worst = max(per_gpu) if per_gpu else need
        ok = worst is not None and worst <= budget
        out["fits_budget"] = Check("fits_budget", ok, f"{what} {format_bytes(worst or 0)} "
                                   f"{'<=' if ok else '>'} budget {format_bytes(budget)}")

    est = report.estimate or {}
    if report.cards is not None:
        out["estimate_within_tolerance"] = _cards_estimate(report.cards, est)
    elif est.get("relative_error") is None:
        why = est.get("error") or est.get("note") or "no measurement to compare"
        out["estimate_within_tolerance"] = Check("estimate_within_tolerance", None, why, informational=True)
    else:
        ok = bool(est["within_tolerance"])
        out["estimate_within_tolerance"] = Check(
            "estimate_within_tolerance", ok,
            f"{est['compared']}: {format_bytes(est['estimate_bytes'])} vs {format_bytes(est['measured_bytes'])} "
            f"({est['relative_error']:+.1%}, tolerance {est['tolerance']:.0%})", informational=True)
    return {k: {"passed": c.passed, "message": c.message, "informational": c.informational} for k, c in out.items()}


def _cards_fit(cards: list[dict]) -> Check:
    """Every card against its own budget; the message names the fullest one."""
    from qtool.core.sizes import format_bytes

    rated = [c for c in cards if c.get("budget_bytes") and c.get("needed_bytes") is not None]
    if not rated:
        return Check("fits_budget", None, "no card measured")
    worst = max(rated, key=lambda c: c["needed_bytes"] - c["budget_bytes"])
    ok = all(c["needed_bytes"] <= c["budget_bytes"] for c in rated)
    return Check("fits_budget", ok, f"card {worst['index']}: peak reserved + outside torch "
                 f"{format_bytes(worst['needed_bytes'])} {'<=' if ok else '>'} budget "
                 f"{format_bytes(worst['budget_bytes'])} ({len(rated)} card(s))")


def _cards_estimate(cards: list[dict], est: dict) -> Check:
    """Each card's allocated peak against qtool estimate's figure for that card (informational)."""
    errors = [(c["index"], c["estimate_relative_error"]) for c in cards if c.get("estimate_relative_error") is not None]
    name = "estimate_within_tolerance"
    if not errors:
        return Check(name, None, "no card to compare (" + (est.get("error") or "no per-card estimate or "
                                                              "measurement") + ")", informational=True)
    tol = est.get("tolerance", 0.05)
    ok = all(abs(e) <= tol for _, e in errors)
    return Check(name, ok, "per card, estimate vs measured allocated peak: "
                 + ", ".join(f"{i}: {e:+.1%}" for i, e in errors) + f" (tolerance {tol:.0%})", informational=True)


def outcome(report: VerifyReport) -> QtoolError | None:
    """The error to exit with: NotFinite (4) before DoesNotFit (3); informational checks never fail."""
    c = report.checks
    if c["finite_loss"]["passed"] is False or c["finite_grads"]["passed"] is False:
        bad = c["finite_loss"] if c["finite_loss"]["passed"] is False else c["finite_grads"]
        return NotFinite(f"{report.model['name']}: {bad['message']}")
    if c["fits_budget"]["passed"] is False or c["loads"]["passed"] is False:
        bad = c["fits_budget"] if c["fits_budget"]["passed"] is False else c["loads"]
        return DoesNotFit(f"{report.model['name']}: {bad['message']}")
    return None
