"""The I/O side of `qtool quantize`: parallel read-ahead into a reused arena, a background writer, a stage clock.

Reads: every tensor is pread in chunks by several threads (page-cache copies scale with cores; pread
releases the GIL) into a ring arena allocated once (pinned when the work goes to CUDA, so H2D copies
run at full speed and no page is faulted in twice). The arena is the read-ahead budget: tensors are
prefetched in processing order while they fit, so peak host memory is the arena plus the working
copies, independent of the number of layers. A block is released when its tensor has been copied to
the GPU, quantized, or written (a kept tensor is written straight from the arena).

Writes: one background thread takes finished tensors in order and hands them to the shard writer;
the main thread waits only when more than `max_bytes` are queued.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

from qtool.core.errors import WeightsError

ALIGN = 4096
CHUNK_BYTES = 32 * 2**20


def read_threads() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class StageClock:
    """Seconds per stage, summed; thread-safe (the writer thread adds its own)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def rounded(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self.seconds.items()}


class Lease:
    """A tensor's block of the arena; `release()` once nothing reads it any more (idempotent)."""

    def __init__(self, arena: "Arena | None", block: list | None):
        self.arena, self.block = arena, block

    def release(self) -> None:
        if self.arena is not None and self.block is not None:
            self.arena.release(self.block)
        self.block = None


class Arena:
    """One buffer used as a FIFO ring: blocks are allocated in order and freed in (about) that order."""

    def __init__(self, nbytes: int, *, pin: bool = False):
        import torch

        self.size = -(-max(nbytes, ALIGN) // ALIGN) * ALIGN
        self.pinned = False
        if pin:
            try:
                self.buf = torch.empty(self.size, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except RuntimeError:  # no pinnable memory: pageable still works
                pass
        if not self.pinned:
            self.buf = torch.empty(self.size, dtype=torch.uint8)
        self.blocks: deque[list] = deque()  # [start, end, released] in allocation order
        self.cond = threading.Condition()

    def alloc(self, nbytes: int) -> list | None:
        n = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self.cond:
            if n > self.size:
                return None
            if not self.blocks:
                start = 0
            else:
                tail, head = self.blocks[0][0], self.blocks[-1][1]
                if self.blocks[-1][0] >= tail:  # live region [tail, head) does not wrap
                    start = head if head + n <= self.size else (0 if n <= tail else None)
                else:
                    start = head if head + n <= tail else None
            if start is None:
                return None
            block = [start, start + n, False]
            self.blocks.append(block)
            return block

    def release(self, block: list) -> None:
        with self.cond:
            block[2] = True
            while self.blocks and self.blocks[0][2]:
                self.blocks.popleft()
            self.cond.notify_all()

    def wait_release(self, timeout: float = 0.05) -> None:
        with self.cond:
            self.cond.wait(timeout)


def _pread_into(fd: int, view: memoryview, offset: int, path, name: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise WeightsError(f"unexpected end of file reading tensor {name!r}", path=path)
        done += n


class Reader:
    """Reads tensors in a given order, ahead of the consumer, as far as the arena allows."""

    def __init__(self, ckpt, names: list[str], *, arena_bytes: int, pin: bool = False, threads: int | None = None,
                 chunk_bytes: int = CHUNK_BYTES, clock: StageClock | None = None, gate=None):
        self.ckpt, self.names = ckpt, names
        self.gate = gate  # a hub stream's ShardFetcher (qtool.quantize.fetch): files arrive as the run goes
        self.left = Counter(ckpt.tensors[n].file for n in names)  # reads still to come, per file
        self.clock = clock or StageClock()
        self.chunk = chunk_bytes
        self.direct = getattr(ckpt, "format", "safetensors") == "safetensors"
        with self.clock("arena_alloc"):
            self.arena = Arena(arena_bytes, pin=pin) if self.direct else None
        self.pool = ThreadPoolExecutor(max_workers=threads or read_threads(), thread_name_prefix="qtool-read")
        self.fds: dict = {}
        self.queue: deque = deque()  # (name, tensor, lease, futures)
        self.pos = 0

    def _fd(self, path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def _fill(self) -> None:
        import torch

        from qtool.core.dtypes import torch_dtype

        while self.direct and self.pos < len(self.names):
            name = self.names[self.pos]
            info = self.ckpt.tensors[name]
            if info.start < 0 or (self.gate is not None and not self.gate.ready(info.file)):
                return  # not a safetensors file, or its shard has not arrived yet
            nbytes = info.end - info.start
            block = self.arena.alloc(nbytes)
            if block is None:
                return
            raw = self.arena.buf[block[0]: block[0] + nbytes]
            view = memoryview(raw.numpy()).cast("B")
            fd = self._fd(info.file)
            futures = [self.pool.submit(_pread_into, fd, view[a: a + self.chunk], info.start + a, info.file, name)
                       for a in range(0, nbytes, self.chunk)]
            t = raw.view(torch_dtype(info.dtype)).reshape(info.shape) if nbytes else \
                torch.empty(info.shape, dtype=torch_dtype(info.dtype))
            self.queue.append((name, t, Lease(self.arena, block), futures))
            self.pos += 1

    def take(self, name: str):
        """-> (tensor, lease). The tensor may live in the arena: release the lease when done with it."""
        if not self.direct or self.ckpt.tensors[name].start < 0:
            if self.pos < len(self.names) and self.names[self.pos] == name:
                self.pos += 1
            with self.clock("read"):
                return self.ckpt.read(name), Lease(None, None)
        while not self.queue:
            self._fill()
            if not self.queue:
                if self.pos >= len(self.names) or self.names[self.pos] != name:
                    raise RuntimeError(f"read order broken at {name}")
                if self.gate is not None and not self.gate.ready(self.ckpt.tensors[name].file):
                    self.gate.wait(self.ckpt.tensors[name].file)
                else:
                    self.arena.wait_release()
        qname, t, lease, futures = self.queue.popleft()
        if qname != name:
            raise RuntimeError(f"read order broken: expected {qname}, asked for {name}")
        try:
            for f in futures:
                f.result()
        except BaseException:
            lease.release()
            raise
        self._done(self.ckpt.tensors[name].file)
        self._fill()
        return t, lease

    def _done(self, path) -> None:
        """One read of `path` finished: after its last, its descriptor closes (a deleted shard frees its space)."""
        self.left[path] -= 1
        if self.left[path] == 0 and path in self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop(path))
        if self.gate is not None:
            self.gate.used(path)

    def close(self) -> None:
        for _, _, lease, futures in self.queue:
            for f in futures:
                f.cancel()
        self.pool.shutdown(wait=True)
        self.queue.clear()
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class BackgroundWriter:
    """Runs `sink.add(name, tensor)` on one thread, in submission order; bounded by queued bytes."""

    def __init__(self, sink, *, max_bytes: int, clock: StageClock):
        self.sink, self.max_bytes, self.clock = sink, max_bytes, clock
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtool-write")
        self.jobs: deque = deque()  # (future, nbytes)
        self.queued = 0

    def _run(self, items, lease: Lease | None) -> None:
        t0 = time.perf_counter()
        try:
            for name, t in items:
                self.sink.add(name, t)
        finally:
            if lease is not None:
                lease.release()
            self.clock.add("write", time.perf_counter() - t0)

    def _reap(self, block: bool) -> None:
        while self.jobs and (self.jobs[0][0].done() or block):
            fut, n = self.jobs.popleft()
            fut.result()
            self.queued -= n
            block = False

    def submit(self, items: list, lease: Lease | None = None) -> None:
        nbytes = sum(t.numel() * t.element_size() for _, t in items)
        self._reap(block=False)
        with self.clock("write_wait"):
            while self.jobs and self.queued + nbytes > self.max_bytes:
                self._reap(block=True)
        self.jobs.append((self.pool.submit(self._run, items, lease), nbytes))
        self.queued += nbytes

    def submit_copy(self, name: str, src_path, src_offset: int, nbytes: int, done=None) -> None:
        """A kept tensor straight from the source file into its place (no host memory); then `done()`."""
        self._reap(block=False)

        def job():
            t0 = time.perf_counter()
            try:
                self.sink.copy(name, src_path, src_offset, nbytes)
            finally:
                self.clock.add("write_copy", time.perf_counter() - t0)
            if done is not None:
                done()

        self.jobs.append((self.pool.submit(job), 0))

    def drain(self) -> None:
        with self.clock("write_wait"):
            while self.jobs:
                self._reap(block=True)

    def close(self) -> None:
        for fut, _ in self.jobs:
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.jobs.clear()
