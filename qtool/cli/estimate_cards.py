"""`qtool estimate --gpus N`: one row per card and the verdict (the formats table is estimate's own)."""

from __future__ import annotations


def cards_label(est) -> str:
    """'2 x rtx-4090', 'rtx-4090 + rtx-3090', '2 GPUs'."""
    keys = [c.gpu for c in est.cards]
    if all(k is not None for k in keys) and len(set(keys)) > 1:
        return " + ".join(keys)
    return f"{len(keys)} x {keys[0]}" if keys[0] else f"{len(keys)} GPUs"


def shortfall(est, size) -> str:
    """Why it does not fit, in one line: the card furthest over its budget (or what was offloaded)."""
    offloaded = est.detail.get("offloaded") or []
    if offloaded:
        return (f"does not fit on {cards_label(est)} with {est.parallel}: device_map=\"auto\" would put "
                f"{', '.join(offloaded[:3])} on the CPU, which bitsandbytes refuses")
    worst = est.worst
    loading = est.detail.get("phase") in ("load", "wrap")
    why = " while loading: every rank loads the whole 4-bit model first" if loading else ""
    return (f"does not fit on {cards_label(est)} with {est.parallel}: card {worst.index} needs "
            f"{size(worst.required_bytes)} of {size(worst.budget_bytes)}{why}")


def render_cards(console, r: dict, est, size) -> None:
    from rich.table import Table

    from qtool.cli.estimate import run_line

    how = est.parallel + (f" ({est.detail['sharding']})" if est.parallel == "fsdp" else "")
    t = Table(title=f"Per card, {how}: {run_line(r)}", title_justify="left")
    for col in ("card", "budget", "peak", "allocated", "fits"):
        t.add_column(col, justify="left" if col == "card" else "right")
    layers = est.detail.get("layers_per_card")
    for c in est.cards:
        name = f"{c.index}" + (f" {c.gpu}" if c.gpu else "") + (f" ({layers[c.index]} layers)" if layers else "")
        fits = "-" if c.fits is None else ("[green]yes[/green]" if c.fits else "[red]no[/red]")
        t.add_row(name, "-" if c.budget_bytes is None else size(c.budget_bytes), size(c.device_bytes),
                  size(c.peak_bytes), fits)
    console.print(t)
    if est.host_ram_bytes:
        s = r["settings"]
        what = "rank 0 reads the 16-bit checkpoint" if s["fsdp_ram_efficient"] else "every rank reads the checkpoint"
        console.print(f"Host RAM: {size(est.host_ram_bytes)} ({what}"
                      f"{'; the shards, grads and optimizer live there' if s['fsdp_offload_params'] else ''}).")
    phases = est.detail.get("phases")
    phase = est.detail.get("phase")
    if phases and phase == "warmup":
        console.print(f"The allocated peak is transformers' allocator warmup in from_pretrained: one block the "
                      f"size of the 4-bit model (at most the card less 1.2 GiB), freed at once; the training step "
                      f"alone: {size(phases['step'])} a card.")
    elif phases and phase != "step":
        when = {"load": "loading", "wrap": "FSDP's wrapping"}[phase]
        console.print(f"The peak is {when}: transformers 5 loads a quantized model whole on every rank's card "
                      f"before FSDP shards it; the training step alone: {size(phases['step'])} a card.")
    if est.fits:
        console.print(f"[green]Fits[/green] on {cards_label(est)} with {est.parallel}: "
                      f"{size(est.worst.budget_bytes - est.worst.required_bytes)} headroom on the fullest card.")
    elif est.fits is False:
        console.print(f"[red]Does not fit[/red]: {shortfall(est, size).split(': ', 1)[1]}.")
    console.print("peak: all the card holds (CUDA context too); allocated: max_memory_allocated()")
