"""One report for a run over several cards: the `cards` section (one row per card: its peaks, its budget, its
cap, the estimate for that card), whether the cards ran as ranks of `accelerate launch` (fsdp, ddp: gathered
from the ranks' JSON) or as one process with device_map="auto" (pipeline: read from the meter per device).

A card row: index, device, name, total_bytes, budget_bytes, cap_bytes, peak_allocated_bytes (the whole run,
load included: torch.cuda.max_memory_allocated), peak_reserved_bytes, load_peak_allocated_bytes,
steps_peak_allocated_bytes, outside_torch_bytes, needed_bytes (reserved + outside torch: what the card must
hold), fits (needed <= budget), out_of_memory, and estimate_peak_bytes / estimate_relative_error
((estimate - measured allocated peak) / measured) from qtool.estimate.cards when that is available.
"""

from __future__ import annotations

from qtool.core.config import Settings
from qtool.core.errors import QtoolError
from qtool.core.models import ModelSpec
from qtool.verify.report import VerifyReport


class RankFailed(QtoolError):
    """A rank crashed (not out of memory): one line naming the rank and the cause (exit 1)."""


def card_row(index: int, dev: dict, *, budget: int | None, cap: int | None, load_peak: int | None,
             steps_peak: int | None, oom: bool = False, rank: int | None = None) -> dict:
    """A card's row from a meter's per_device entry (qtool.verify.meter.Meter.per_device)."""
    needed = dev["peak_reserved_bytes"] + dev["outside_torch_bytes"]
    return {"index": index, "rank": rank, "device": dev["device"], "name": dev["name"],
            "total_bytes": dev["total_bytes"], "budget_bytes": budget, "cap_bytes": cap,
            "peak_allocated_bytes": dev["peak_allocated_bytes"], "peak_reserved_bytes": dev["peak_reserved_bytes"],
            "load_peak_allocated_bytes": load_peak, "steps_peak_allocated_bytes": steps_peak,
            "outside_torch_bytes": dev["outside_torch_bytes"], "needed_bytes": needed,
            "fits": None if budget is None else (not oom and needed <= budget), "out_of_memory": oom}


def gather(launched, budgets: list) -> VerifyReport:
    """The ranks' results -> one report. A crashed rank raises RankFailed; out of memory on any rank is the
    run's error (exit 3), as on one card."""
    n = len(launched.results)
    results = launched.results
    crashed = [(r, res) for r, res in results.items() if res and res.get("crash") and not res.get("out_of_memory")]
    if crashed:
        r, res = crashed[0]
        raise RankFailed(f"rank {r} of {n} failed: {res['crash']}" + _debug_tail(launched))
    missing = [r for r, res in results.items() if not res]
    oom = [r for r, res in results.items() if res and res.get("out_of_memory")]
    if missing and not oom:
        why = next((line for line in reversed(launched.log_tail) if "Error" in line or "error" in line),
                   launched.log_tail[-1] if launched.log_tail else "no output")
        raise RankFailed(f"rank {missing[0]} of {n} ended without a result (launcher exit {launched.exit_code}): "
                         f"{why.strip()[:300]}" + _debug_tail(launched))
    base = next(res["report"] for r, res in sorted(results.items()) if res and res.get("report"))
    report = VerifyReport.from_dict(base)
    cards = []
    for r in range(n):
        res = results[r] or {}
        rep = res.get("report") or {}
        mem = rep.get("memory") or {}
        devs = mem.get("per_device") or []
        if not devs:  # a crash before the meter read anything, or a CPU rank
            cards.append({"index": r, "rank": r, "device": None, "out_of_memory": r in oom, "missing": not res,
                          "budget_bytes": budgets[r], "cap_bytes": res.get("cap_bytes"),
                          "fits": False if r in oom else None, "peak_rss_bytes": mem.get("peak_rss_bytes")})
            continue
        cards.append(card_row(r, devs[0], budget=budgets[r], cap=res.get("cap_bytes"),
                              load_peak=mem.get("load_peak_allocated_bytes"),
                              steps_peak=mem.get("peak_allocated_bytes"), oom=r in oom, rank=r))
        cards[-1]["wall_seconds"] = res.get("wall_seconds")
        cards[-1]["phase_peaks_allocated_bytes"] = devs[0].get("phase_peaks_allocated_bytes")
    report.cards = cards
    _merge_memory(report, results)
    if oom:
        err = (results[oom[0]].get("report") or {}).get("error") or {}
        report.error = {"stage": err.get("stage", "load"), "kind": "out_of_memory", "rank": oom[0],
                        "message": f"rank {oom[0]}: {err.get('message') or results[oom[0]].get('crash', '')}"}
        report.loaded = all((res or {}).get("report", {}).get("loaded") for res in results.values())
    if missing:
        report.notes.append(f"rank(s) {', '.join(map(str, missing))} were stopped after rank {oom[0]} ran out "
                            "of memory (they wrote no result)")
    return report


def _debug_tail(launched) -> str:
    """--debug (QTOOL_DEBUG=1) shows the launcher's output, where the ranks' tracebacks are."""
    import os

    if os.environ.get("QTOOL_DEBUG", "") in ("", "0"):
        return ""
    return "\n--- accelerate launch, last lines ---\n" + "\n".join(launched.log_tail)


def _merge_memory(report: VerifyReport, results: dict) -> None:
    """The memory section over all cards: each figure is the worst card's (the run fits when every card does)."""
    per_device = []
    for r, res in sorted(results.items()):
        for d in ((res or {}).get("report") or {}).get("memory", {}).get("per_device") or []:
            per_device.append({**d, "rank": r})
    mem = report.memory
    if not per_device:
        return
    mem["per_device"] = per_device
    mem["aggregate"] = "max over cards"
    steps = [((res or {}).get("report") or {}).get("memory", {}).get("peak_allocated_bytes") for res in results.values()]
    mem["peak_allocated_bytes"] = max((s for s in steps if s is not None), default=None)
    mem["peak_reserved_bytes"] = max(d["peak_reserved_bytes"] for d in per_device)
    mem["outside_torch_bytes"] = max(d["outside_torch_bytes"] for d in per_device)
    mem["peak_needed_bytes"] = max(d["peak_reserved_bytes"] + d["outside_torch_bytes"] for d in per_device)
    names = [d["name"] for d in per_device]
    report.device = {**report.device, "name": names[0], "names": names, "count": len(per_device),
                     "total_bytes": [d["total_bytes"] for d in per_device]}


def pipeline_cards(report: VerifyReport, budgets: list, caps: list) -> None:
    """--parallel pipeline: one process, the meter's per-device figures are the cards."""
    devs = report.memory.get("per_device") or []
    report.cards = [card_row(i, d, budget=budgets[i] if i < len(budgets) else None,
                             cap=caps[i] if i < len(caps) else None, load_peak=d.get("load_peak_allocated_bytes"),
                             steps_peak=d.get("steps_peak_allocated_bytes"))
                    for i, d in enumerate(devs)]
    for card, d in zip(report.cards, devs):
        card["phase_peaks_allocated_bytes"] = d.get("phase_peaks_allocated_bytes")
        card["modules"] = sorted(k for k, v in (report.model.get("device_map") or {}).items() if v == card["index"])


def compare_cards(report: VerifyReport, spec: ModelSpec, settings: Settings, tolerance: float) -> None:
    """Each card's measured allocated peak (load included) against qtool estimate's figure for that card."""
    try:
        from qtool.estimate.cards import estimate_cards
    except ImportError:
        report.notes.append("per-card estimate: not available in this qtool (qtool.estimate.cards)")
        return
    try:
        est = estimate_cards(spec, settings)
    except QtoolError as exc:
        report.notes.append(f"per-card estimate failed: {exc}")
        return
    by_index = {c.index: c for c in est.cards}
    for card in report.cards or []:
        c = by_index.get(card["index"])
        if c is None:
            continue
        card["estimate_peak_bytes"] = c.peak_bytes
        card["estimate_device_bytes"] = c.device_bytes
        card["estimate_fits"] = c.fits
        measured = card.get("peak_allocated_bytes")
        if measured and not card.get("out_of_memory"):
            err = (c.peak_bytes - measured) / measured
            card["estimate_relative_error"] = err
            card["estimate_within_tolerance"] = abs(err) <= tolerance
    report.estimate = {**(report.estimate or {}), "cards": est.to_dict(), "tolerance": tolerance}
