"""What the hub-streaming tests share (tests/quantize/test_stream*.py): a 6-shard tiny Llama served over HTTP on
127.0.0.1, qtool in a real process (forked: tests/quantize/conftest.py), and an independent disk poller.
Their fixtures are in tests/quantize/conftest.py."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from hubserver import HubServer

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/sharded"
SHARDS = 6


def shards_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def allocated(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # deleted between listing and stat
                pass
    return total


class DiskPoller:
    """The most bytes seen under `folder` at once, polled from this process."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self.samples = folder, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, allocated(self.folder))
            self.samples += 1
            self._stop.wait(0.002)

    def __enter__(self) -> "DiskPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def weight_files(folder: Path) -> dict[str, str]:
    """Every file of an output but its README (which names the source), by content hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != "README.md"}


def shard_gets(server: HubServer, ranged: bool) -> list[str]:
    """Shard names requested with GET, whole (ranged=False) or by Range (the header reads)."""
    return [r.path.rsplit("/", 1)[1] for r in server.requests if r.method == "GET" and "/resolve/" in r.path
            and r.path.endswith(".safetensors") and (r.range is not None) == ranged]


def cached_shards(env: dict) -> list[Path]:
    return sorted(Path(env["HF_HOME"]).rglob("*.safetensors"))


def leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir())


def assert_nothing_left(work: Path, env: dict) -> None:
    assert leftovers(work) == [], "destination, staging or fetched shards left behind"
    assert cached_shards(env) == []
