"""Memory and machine facts: torch's caching allocator per device and phase (RSS on CPU), versions."""

from __future__ import annotations

import resource
import sys


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


HISTORY_ENV = "QTOOL_MEMORY_HISTORY"  # PREFIX: each CUDA process writes PREFIX.<pid>.pickle (tools/peak_trace.py)
_HISTORY_ENTRIES = 2_000_000
_recording = False


def record_history() -> None:
    """A diagnostic for the estimate: with QTOOL_MEMORY_HISTORY=PREFIX, record torch's allocator history from
    here on (Python stacks only) and write it when the process exits, for tools/peak_trace.py to replay."""
    import os

    global _recording
    prefix = os.environ.get(HISTORY_ENV)
    if not prefix or _recording:
        return
    import atexit
    import contextlib

    import torch

    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=_HISTORY_ENTRIES)
    _recording = True

    def dump() -> None:
        with contextlib.suppress(Exception):  # a diagnostic: never the reason a run fails
            torch.cuda.memory._dump_snapshot(f"{prefix}.{os.getpid()}.pickle")

    atexit.register(dump)


class Meter:
    """Allocated/peak memory over the devices in use. On CPU: RSS now, and the process-lifetime max RSS."""

    def __init__(self, devices: list):
        self.devices = devices  # torch.device list; [cpu] on CPU
        self.cuda = devices[0].type == "cuda"
        if self.cuda:
            record_history()
        self.peak_allocated = 0
        self.peak_reserved = 0
        # per device, max over phases (each phase resets torch's counters)
        self.device_peak_allocated = [0] * len(devices)
        self.device_peak_reserved = [0] * len(devices)
        self.device_load_peak: list[int | None] = [None] * len(devices)  # the load's own peak, per device
        self.device_steps_peak = [0] * len(devices)  # after the load: what the steps add on top
        self.phase_log: list[list[int]] = []  # each phase_peak call's per-device peaks, in order (CUDA)

    def sync(self) -> None:
        if self.cuda:
            import torch

            for d in self.devices:
                torch.cuda.synchronize(d)

    def allocated(self) -> int:
        import torch

        if not self.cuda:
            return _rss_bytes() or 0
        return sum(torch.cuda.memory_allocated(d) for d in self.devices)

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            for d in self.devices:
                torch.cuda.reset_peak_memory_stats(d)

    def phase_peak(self) -> int:
        """Peak since the last reset_peak; also folded into the run's overall peaks."""
        import torch

        if not self.cuda:
            peak = _max_rss_bytes()
            self.peak_allocated = max(self.peak_allocated, peak)
            return peak
        self.sync()
        allocated = [torch.cuda.max_memory_allocated(d) for d in self.devices]
        reserved = [torch.cuda.max_memory_reserved(d) for d in self.devices]
        self.phase_log.append(allocated)
        for i, (a, r) in enumerate(zip(allocated, reserved)):
            self.device_peak_allocated[i] = max(self.device_peak_allocated[i], a)
            self.device_peak_reserved[i] = max(self.device_peak_reserved[i], r)
            self.device_steps_peak[i] = max(self.device_steps_peak[i], a)
        peak = sum(allocated)
        self.peak_allocated = max(self.peak_allocated, peak)
        self.peak_reserved = max(self.peak_reserved, sum(reserved))
        return peak

    def start_steps(self) -> None:
        """The load is over: its peaks are kept apart, the run's own peaks start from zero."""
        self.device_load_peak = list(self.device_peak_allocated)
        self.device_steps_peak = [0] * len(self.devices)
        self.peak_allocated = self.peak_reserved = 0

    def per_device(self) -> list[dict]:
        import torch

        if not self.cuda:
            return []
        out = []
        for i, d in enumerate(self.devices):
            free, total = torch.cuda.mem_get_info(d)
            reserved = torch.cuda.memory_reserved(d)
            out.append({
                "device": str(d), "name": torch.cuda.get_device_name(d), "total_bytes": total,
                # max over the run's phases (the load's transient peak is reported separately)
                "peak_allocated_bytes": max(self.device_peak_allocated[i], torch.cuda.max_memory_allocated(d)),
                "peak_reserved_bytes": max(self.device_peak_reserved[i], torch.cuda.max_memory_reserved(d)),
                # what the CUDA context, cuBLAS workspaces and other processes hold outside torch's allocator
                "outside_torch_bytes": max(0, total - free - reserved),
                "load_peak_allocated_bytes": self.device_load_peak[i],
                "steps_peak_allocated_bytes": self.device_steps_peak[i],
                # this device's peak in each measured phase, in the order they ran (load, then per step:
                # forward, backward, optimizer step)
                "phase_peaks_allocated_bytes": [log[i] for log in self.phase_log],
            })
        return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": sys.version.split()[0]}
    for pkg in ("qtool", "torch", "transformers", "bitsandbytes", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    for pkg in ("trl", "unsloth"):  # the optional recipes' runners: named only where installed
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda
    return out


def _device_info(devices: list, cuda: bool) -> dict:
    import platform

    import torch

    if not cuda:
        return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": 1,
                "threads": torch.get_num_threads()}
    names = [torch.cuda.get_device_name(d) for d in devices]
    return {"type": "cuda", "name": names[0], "names": names, "count": len(devices),
            "total_bytes": [torch.cuda.get_device_properties(d).total_memory for d in devices],
            "capability": ".".join(map(str, torch.cuda.get_device_capability(devices[0])))}
