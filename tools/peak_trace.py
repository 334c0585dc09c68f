"""What is alive at a run's allocated peak, from torch's memory history (a GPU diagnostic for the estimate).

`QTOOL_MEMORY_HISTORY=PREFIX qtool verify ...` makes every CUDA process of the run (the verify process, each
FSDP/DDP rank) record torch's allocator history and write it at exit to PREFIX.<pid>.pickle
(`torch.cuda.memory._dump_snapshot`). This script replays each device's trace the way
`torch.cuda.max_memory_allocated()` counts (+size at `alloc`, -size at `free_requested`), finds the moment of
the peak and groups what is alive then by the first frame in the libraries that allocated it, largest first,
with a short stack each: the term the estimate is missing is usually one line of that list.

  python tools/peak_trace.py PREFIX.*.pickle [--top 15] [--after training_step] [--json OUT.json]

--after NAME looks for the peak only from the first allocation made under a function named NAME (the steps'
peak, not the load's: `training_step` for the Trainers); what is alive then still counts from the start.

Run it where the pickles are (they can be large); only its short summary needs to come back. No GPU needed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

# frames from these paths say who asked for the memory; torch's own wrappers below them do not
OWNERS = ("qtool/", "transformers/", "peft/", "trl/", "unsloth", "bitsandbytes/", "accelerate/",
          "torch/distributed/fsdp/", "torch/utils/checkpoint", "torch/optim/", "triton/", "torch/_inductor/")


def replay(events: list[dict], start: int = 0) -> tuple[int, int, dict[int, dict]]:
    """(peak bytes over the trace from event `start` on, index of the event that reached it, the allocations
    alive right after it)."""
    allocated = peak = 0
    at = -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            allocated += e["size"]
            if allocated > peak and i >= start:
                peak, at = allocated, i
        elif e["action"] == "free_requested":
            allocated -= e["size"]
    live: dict[int, dict] = {}
    for e in events[:at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    return peak, at, live


def owner(frames: list[dict]) -> str:
    """The innermost frame in a library that owns the allocation ('file:line name'), else the innermost one."""
    for f in frames:
        name = f.get("filename", "")
        if any(o in name for o in OWNERS):
            return f"{_short(name)}:{f.get('line')} {f.get('name')}"
    return f"{_short(frames[0].get('filename', '?'))}:{frames[0].get('line')} {frames[0].get('name')}" if frames else "?"


def _short(path: str) -> str:
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def first_under(events: list[dict], name: str) -> int | None:
    """Index of the first allocation with a frame of the function `name` on its stack."""
    for i, e in enumerate(events):
        if e["action"] == "alloc" and any(f.get("name") == name for f in e.get("frames") or []):
            return i
    return None


def summarize(events: list[dict], top: int, after: str | None = None) -> dict:
    start = first_under(events, after) if after else 0
    if start is None:
        return {"peak_bytes": 0, "event": -1, "events": len(events), "alive": 0, "groups": [],
                "note": f"no allocation under {after}"}
    peak, at, live = replay(events, start)
    groups: dict[str, dict] = {}
    for e in live.values():
        frames = e.get("frames") or []
        g = groups.setdefault(owner(frames), {"bytes": 0, "count": 0, "sizes": {}, "stack": [
            f"{_short(f.get('filename', '?'))}:{f.get('line')} {f.get('name')}" for f in frames[:8]]})
        g["bytes"] += e["size"]
        g["count"] += 1
        g["sizes"][e["size"]] = g["sizes"].get(e["size"], 0) + 1
    for g in groups.values():  # the group's allocation sizes, largest first: [[bytes, how many], ...]
        g["sizes"] = [list(kv) for kv in sorted(g["sizes"].items(), reverse=True)]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1]["bytes"])
    return {"peak_bytes": peak, "event": at, "events": len(events), "alive": len(live),
            "groups": [{"owner": k, **v} for k, v in ranked[:top]]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pickles", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--after", help="the peak from the first allocation under this function on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = {}
    for path in args.pickles:
        snapshot = pickle.loads(path.read_bytes())
        for device, events in enumerate(snapshot.get("device_traces") or []):
            if not events:
                continue
            s = summarize(events, args.top, args.after)
            out[f"{path.name} cuda:{device}"] = s
            if s.get("note"):
                print(f"{path.name} cuda:{device}: {s['note']}")
                continue
            print(f"{path.name} cuda:{device}: peak {s['peak_bytes'] / 2**30:.3f} GiB at event {s['event']} of "
                  f"{s['events']}, {s['alive']} allocations alive")
            for g in s["groups"]:
                print(f"  {g['bytes'] / 2**20:10.1f} MiB  x{g['count']:<5} {g['owner']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
