"""Quantizing from the hub with bounded disk (`--stream`): the source shards arrive one ahead of the stream.

The plan needs no weights: config.json, the index and every shard's safetensors header (read by HTTP range
requests, qtool.core.hub.read_remote_header, and validated like a local header) are enough. `ShardFetcher`
then downloads the shards with huggingface_hub's own download (HF_ENDPOINT, HF_TOKEN, the pinned commit) in the
order the stream first needs them, one ahead of the shard being read, and deletes each once its last tensor has
been read. The stream takes tensors shard by shard (qtool.quantize.stream), so about two shards are on disk at
once; the output file's layout is unchanged (the sink places every tensor at its planned offset).

Where the shards go. Without --keep-source: a hidden folder beside the output (`.NAME.qtool-src-XXXX`), not the HF
cache. The disk that must hold the output is the one the bound is about (the cache is often a small home disk),
one folder is removed on any failure or signal (qtool.core.signals' cleanup registry, as the staging folder),
and no half-kept model lingers in the cache. With --keep-source they go to the HF cache, where later runs find
them. Shards the cache already holds are read from it, never fetched and never deleted.

Peak disk: the bytes qtool adds (its shards on disk + the staged output), sampled after each download, before
each deletion and at the end; between deletions the sum only grows, so the samples hold its maximum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qtool.core import hub, signals
from qtool.core.errors import WeightsError

WINDOW = 2  # source shards on disk at once: the one being read and the next


@dataclass(frozen=True)
class HubSource:
    """A hub checkpoint to stream: its small files are in the cache (`folder`), some of its shards are not."""

    repo_id: str
    sha: str
    folder: Path  # the cache snapshot holding config.json, the index, the tokenizer ...
    shards: tuple[str, ...]  # weight files, by name
    cached: frozenset[str]  # those the HF cache already holds
    keep_source: bool


def hub_stream(repo_id: str, *, revision: str | None, keep_source: bool) -> HubSource | None:
    """A HubSource when streaming can help: the hub answers and its cache lacks some shard; else None (then the
    download path reads the cache, or says why it cannot)."""
    # no huggingface_hub bars here: the small files take a moment, and the stream's own progress line shows
    # the shards arriving (a bar per shard would interleave with it)
    folder, sha, shards = hub.checkpoint_files(repo_id, revision=revision, progress=False)
    if shards is None:
        return None
    for name in shards:
        if Path(name).name != name or name in (".", ".."):
            raise WeightsError(f"refusing shard name {name!r}: shard files must be plain file names",
                               path=f"{repo_id} model.safetensors.index.json")
    cached = frozenset(n for n in shards if hub.cached_file(repo_id, sha, n) is not None)
    if len(cached) == len(shards):
        return None
    return HubSource(repo_id, sha, folder, tuple(shards), cached, keep_source)


def open_checkpoint(remote: HubSource):
    """The checkpoint from headers only: cached shards read locally, the others by HTTP range (in parallel).
    Tensor paths are `folder/<shard>`, where the files will be (run time moves the fetched ones, see `shards`)."""
    from qtool.core.checkpoint import Checkpoint, parse_safetensors_header, read_safetensors_header

    def header(name: str):
        path = remote.folder / name
        if name in remote.cached:
            return read_safetensors_header(path)
        return parse_safetensors_header(path, *hub.read_remote_header(remote.repo_id, remote.sha, name))

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="qtool-header") as pool:
        headers = dict(zip(remote.shards, pool.map(header, remote.shards)))
    return Checkpoint.open(remote.folder, headers=headers)


def allocated(folder: Path | None) -> int:
    """Bytes on disk under `folder` (allocated blocks: a file written at offsets is counted as it fills)."""
    total = 0
    for root, _, files in os.walk(folder) if folder is not None else ():
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class ShardFetcher:
    """Downloads shards in first-use order, at most one ahead; `wait`/`ready`/`used` are what the readers call."""

    def __init__(self, remote: HubSource, order: list[Path], uses: Counter, workdir: Path | None, staging: Path,
                 clock):
        self.remote, self.order, self.uses, self.workdir, self.staging = remote, order, uses, workdir, staging
        self.clock = clock
        self.ready_paths: set[Path] = set(uses) - set(order)  # cached shards are ready from the start
        self.present: dict[Path, int] = {}  # fetched, not yet consumed -> bytes
        self.kept_bytes = 0  # consumed shards left in the cache (--keep-source)
        self.fetched_bytes = 0
        self.fetch_seconds = 0.0
        self.peak = 0
        self.wanted: Path | None = None
        self.error: BaseException | None = None
        self.stop = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="qtool-fetch", daemon=True)

    def _run(self) -> None:
        try:
            for path in self.order:
                with self.cond:
                    while not self.stop and len(self.present) >= WINDOW and self.wanted in (None, *self.ready_paths):
                        self.cond.wait()
                    if self.stop:
                        return
                t0 = time.perf_counter()
                hub.fetch_file(self.remote.repo_id, self.remote.sha, path.name, self.workdir)
                with self.cond:
                    self.fetch_seconds += time.perf_counter() - t0
                    self.present[path] = path.stat().st_size
                    self.fetched_bytes += self.present[path]
                    self.ready_paths.add(path)
                    self.cond.notify_all()
                self.sample()
        except BaseException as exc:  # noqa: BLE001 - handed to the stream's thread by wait()
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def ready(self, path: Path) -> bool:
        return path in self.ready_paths

    def wait(self, path: Path) -> None:
        """Block until `path` is on disk (fetched out of turn if it must); a failed download is raised here."""
        if path in self.ready_paths:
            return
        with self.clock("fetch_wait"), self.cond:
            self.wanted = path
            self.cond.notify_all()
            while path not in self.ready_paths:
                if self.error is not None:
                    raise self.error
                if not self.thread.is_alive():
                    raise RuntimeError(f"{path.name} was never fetched")
                self.cond.wait(0.1)

    def used(self, path: Path) -> None:
        """One planned read or copy of `path` is done; after the last one the shard goes (or stays, kept)."""
        with self.cond:
            self.uses[path] -= 1
            if self.uses[path] > 0 or path not in self.present:
                return
        self.sample()  # the peak is just before a shard goes
        with self.cond:
            size = self.present.pop(path)
            if self.workdir is not None:
                path.unlink(missing_ok=True)
            else:
                self.kept_bytes += size
            self.cond.notify_all()

    def sample(self) -> int:
        """The disk qtool adds now: its shards and the staged output."""
        shards = allocated(self.workdir) if self.workdir is not None else sum(self.present.values()) + self.kept_bytes
        now = shards + allocated(self.staging)
        with self.cond:
            self.peak = max(self.peak, now)
        return now

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if self.thread.is_alive() and self.thread.ident is not None:
            from huggingface_hub import close_session

            close_session()  # ends a download in flight (a failed run must not wait for a whole shard)
            self.thread.join(timeout=10)

    def report(self, clock_seconds: dict) -> dict:
        wait = clock_seconds.get("fetch_wait", 0.0)
        return {"shards": len(self.order), "cached_shards": len(self.remote.cached), "bytes": self.fetched_bytes,
                "seconds": round(self.fetch_seconds, 3), "waited_seconds": round(wait, 3),
                "overlap_seconds": round(max(0.0, self.fetch_seconds - wait), 3),
                "kept_in_cache": self.remote.keep_source, "peak_disk_bytes": self.peak}


@contextlib.contextmanager
def shards(remote: HubSource, ckpt, sources: list[str], staging: Path, destination: Path, clock
           ) -> Iterator[ShardFetcher]:
    """The fetcher of one run. `sources`: checkpoint tensors in the order the stream reads or copies them.
    The checkpoint's paths are moved to where the shards will land; the work folder goes on any exit."""
    workdir: Path | None = None

    def undo() -> None:  # also what qtool.core.signals' watchdog runs if it must end the process
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    fetcher = None
    try:
        with signals.cleanup(undo):
            if not remote.keep_source:
                with signals.held():  # the folder exists only once `workdir` names it for undo()
                    workdir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.qtool-src-", dir=staging.parent))
                _move(ckpt, {remote.folder / n: workdir / n for n in remote.shards if n not in remote.cached})
            files = [ckpt.tensors[name].file for name in sources]
            order = [f for f in dict.fromkeys(files) if f.name not in remote.cached]
            fetcher = ShardFetcher(remote, order, Counter(files), workdir, staging, clock)
            fetcher.thread.start()
            yield fetcher
    finally:
        if fetcher is not None:
            fetcher.close()
        undo()


def _move(ckpt, moves: dict[Path, Path]) -> None:
    ckpt.files = [moves.get(f, f) for f in ckpt.files]
    ckpt.tensors = {n: dataclasses.replace(t, file=moves.get(t.file, t.file)) for n, t in ckpt.tensors.items()}
