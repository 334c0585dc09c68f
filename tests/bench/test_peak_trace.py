"""tools/peak_trace.py: the replay of torch's allocator history that finds what is alive at the peak."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("peak_trace", ROOT / "tools" / "peak_trace.py")
peak_trace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peak_trace)


def _frames(*where: tuple[str, int, str]) -> list[dict]:
    return [{"filename": f, "line": line, "name": name} for f, line, name in where]


LM_HEAD = _frames(("/x/torch/nn/functional.py", 10, "linear"),
                  ("/v/lib/python3.12/site-packages/transformers/models/llama/modeling_llama.py", 500, "forward"))
SHARD = _frames(("/x/torch/_tensor.py", 1, "to"),
                ("/v/lib/python3.12/site-packages/torch/distributed/fsdp/_flat_param.py", 1337, "flat_param_to"))


def _events() -> list[dict]:
    """allocated: 100, 150, 50 (the first freed), 130, 30: the peak is 150, right after the second alloc."""
    return [{"action": "alloc", "addr": 1, "size": 100, "frames": LM_HEAD},
            {"action": "alloc", "addr": 2, "size": 50, "frames": SHARD},
            {"action": "free_requested", "addr": 1, "size": 100},
            {"action": "free_completed", "addr": 1, "size": 100},  # does not move max_memory_allocated
            {"action": "segment_alloc", "addr": 9, "size": 4096},
            {"action": "alloc", "addr": 3, "size": 80, "frames": LM_HEAD},
            {"action": "free_requested", "addr": 3, "size": 80},
            {"action": "free_requested", "addr": 2, "size": 50},
            {"action": "alloc", "addr": 4, "size": 30, "frames": SHARD}]


def test_replay_counts_as_max_memory_allocated():
    peak, at, live = peak_trace.replay(_events())
    assert (peak, at) == (150, 1)
    assert sorted(live) == [1, 2]


def test_alive_at_the_peak_grouped_by_the_owning_library(tmp_path):
    """The group is named by the innermost frame in a library that asked for the memory (not torch's wrapper),
    largest first; the script reads the pickle torch writes and prints and saves the summary."""
    s = peak_trace.summarize(_events(), top=5)
    assert [g["sizes"] for g in s["groups"]] == [[[100, 1]], [[50, 1]]]
    assert [(g["owner"], g["bytes"], g["count"]) for g in s["groups"]] == [
        ("transformers/models/llama/modeling_llama.py:500 forward", 100, 1),
        ("torch/distributed/fsdp/_flat_param.py:1337 flat_param_to", 50, 1)]
    path = tmp_path / "run.123.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[], _events()]}))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "peak_trace.py"), str(path), "--json",
                           str(tmp_path / "s.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "run.123.pickle cuda:1: peak 0.000 GiB at event 1 of 9, 2 allocations alive" in proc.stdout
    assert json.loads((tmp_path / "s.json").read_text())["run.123.pickle cuda:1"]["peak_bytes"] == 150


def test_after_looks_for_the_steps_peak_not_the_loads():
    """--after NAME: the peak from the first allocation under NAME on (130 at event 5, the 150 of the load before
    it does not count), with what is alive then counted from the start (the load's 50 among it)."""
    events = _events()
    events[5] = {**events[5], "frames": _frames(("/v/site-packages/transformers/trainer.py", 7, "training_step"))}
    s = peak_trace.summarize(events, top=5, after="training_step")
    assert (s["peak_bytes"], s["event"], s["alive"]) == (130, 5, 2)
    assert {g["owner"]: g["bytes"] for g in s["groups"]} == {
        "transformers/trainer.py:7 training_step": 80, "torch/distributed/fsdp/_flat_param.py:1337 flat_param_to": 50}
    assert peak_trace.summarize(events, top=5, after="no_such_function")["note"] == "no allocation under no_such_function"
