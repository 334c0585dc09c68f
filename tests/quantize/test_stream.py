"""`qtool quantize <hub id> --stream` against a real HTTP server on 127.0.0.1 (tests/hubserver.py, HF_ENDPOINT).

A 6-shard tiny Llama is served; qtool runs in a subprocess (huggingface_hub reads HF_* at import, as in a
user's shell). The disk it uses is measured here, independently: a thread sums the allocated blocks of every
file under the destination's parent folder (where the staging folder and the fetched shards live) every
few milliseconds while the server sends at a limited rate, so the shards take long enough to be seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hubserver import HubServer
from tinymodels import llama_config, llama_weights, one_error_line, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
REPO = "org/sharded"
SHARDS = 6


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """org/sharded: 6 safetensors shards + index, as save_pretrained names them (huggingface_hub's splitter)."""
    from huggingface_hub import save_torch_state_dict

    root = tmp_path_factory.mktemp("streamhub") / "org" / "sharded"
    root.mkdir(parents=True)
    config = llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=6, vocab_size=1024,
                          num_attention_heads=4, num_key_value_heads=2)
    weights = llama_weights(config)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    save_torch_state_dict(weights, root, max_shard_size=total // (SHARDS - 1), safe_serialization=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# sharded\n")
    assert len(shards_of(root)) == SHARDS
    return root


def shards_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def odd_repo(tmp_path_factory) -> Path:
    """org/odd: no index, and its one weight file is not named model.safetensors."""
    root = write_checkpoint(tmp_path_factory.mktemp("oddhub") / "org" / "odd", llama_config())
    (root / "model.safetensors").rename(root / "weights.safetensors")
    return root


@pytest.fixture
def hub_server(repo, odd_repo):
    """Overrides conftest's: this module's server holds org/sharded and org/odd (conftest's hub_env uses it)."""
    hub = HubServer()
    hub.add_repo(REPO, repo)
    hub.add_repo("org/odd", odd_repo)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def server(hub_server) -> HubServer:
    return hub_server


@pytest.fixture
def env(hub_env) -> dict[str, str]:
    return hub_env


def qtool(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "qtool", "quantize", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kw)


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


# ---------------------------------------------------------------------------------------------------

def test_stream_is_byte_identical_and_disk_stays_near_output_plus_two_shards(server, env, repo, tmp_path):
    ref = tmp_path / "ref"
    split = ["--max-shard-size", "1500KB"]  # several output files and an index, as well
    proc = qtool([str(repo), "--out", str(ref), *split], env)  # the local copy, no hub
    assert proc.returncode == 0, proc.stderr

    work = tmp_path / "work"
    work.mkdir()
    sizes = [p.stat().st_size for p in shards_of(repo)]
    server.rate = 4 * 2**20  # ~0.3 s per shard: long enough for the poller to see every state
    with DiskPoller(work) as poll:
        proc = qtool([REPO, "--out", str(work / "out"), "--json", *split], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["files"]) > 1
    assert weight_files(work / "out") == weight_files(ref)  # same bytes, same files

    # it streamed: every shard fetched once, whole, after its header was read by Range; none kept
    assert sorted(shard_gets(server, ranged=False)) == [p.name for p in shards_of(repo)]
    assert sorted(set(shard_gets(server, ranged=True))) == [p.name for p in shards_of(repo)]
    assert report["fetch"]["shards"] == SHARDS and report["fetch"]["bytes"] == sum(sizes)
    assert cached_shards(env) == []
    assert leftovers(work) == ["out"]

    out = allocated(work / "out")
    small = allocated(repo) - sum(allocated_file(p) for p in shards_of(repo))  # config, README, index
    bound = out + 2 * max(allocated_file(p) for p in shards_of(repo)) + small + 64 * 1024
    everything = out + sum(allocated_file(p) for p in shards_of(repo))
    print(f"\nstream: output {out:,} B, shards {sizes}, measured peak {poll.peak:,} B "
          f"({poll.samples} samples), qtool's peak {report['peak_disk_bytes']:,} B, bound {bound:,} B, "
          f"download-first would hold {everything:,} B; fetch {report['fetch']}")
    assert poll.samples > 50
    assert poll.peak <= bound, "more than the output + two shards on disk at once"
    assert poll.peak < everything - max(sizes)  # far from holding the whole source
    # qtool's own number against this one: not understated (a sample here cannot exceed the true peak it
    # claims, beyond what the writer adds between its sample and a deletion) and not inflated
    assert poll.peak <= report["peak_disk_bytes"] * 1.05 + 64 * 1024
    assert report["peak_disk_bytes"] <= bound
    assert poll.peak >= 0.5 * report["peak_disk_bytes"]
    assert report["fetch"]["seconds"] > 0 and 0 <= report["fetch"]["overlap_seconds"] <= report["fetch"]["seconds"]


def test_stream_keeps_state_dict_order_when_the_output_split_needs_blob_lengths(server, env, repo, tmp_path):
    """An output shard limit that falls inside a quant-state blob's possible lengths: the two-pass ShardWriter
    takes tensors in state-dict order, and the fetcher follows that order instead of shard by shard."""
    from qtool.core.config import resolve_settings
    from qtool.quantize import plan_quantization
    from qtool.quantize.plan import entry_specs
    from qtool.quantize.sink import split_shards

    specs = entry_specs(plan_quantization(repo, resolve_settings().quant))
    total = 0
    for e in specs:
        if e.lo != e.hi and total > 2**20:  # a blob past the first MB: its length decides this boundary
            limit = total + e.lo
            break
        total += e.lo
    assert split_shards(specs, limit) is None
    ref, work = tmp_path / "ref", tmp_path / "work"
    work.mkdir()
    proc = qtool([str(repo), "--out", str(ref), "--max-shard-size", str(limit)], env)
    assert proc.returncode == 0, proc.stderr
    proc = qtool([REPO, "--out", str(work / "out"), "--max-shard-size", str(limit), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["single_pass"] is False and report["fetch"]["shards"] == SHARDS
    assert weight_files(work / "out") == weight_files(ref)
    assert leftovers(work) == ["out"] and cached_shards(env) == []


def allocated_file(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_summary_reports_fetch_and_peak_disk(server, env, tmp_path):
    proc = qtool([REPO, "--out", str(tmp_path / "out")], {**env, "COLUMNS": "200"})  # rich would wrap at 80
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    fetch = [line for line in lines if line.startswith("  fetch: ")]
    disk = [line for line in lines if line.startswith("  peak disk: ")]
    assert len(fetch) == 1 and f"{SHARDS} shards" in fetch[0] and "beside quantizing" in fetch[0]
    assert len(disk) == 1 and disk[0].endswith("(output + shards, each deleted once read)")
    assert [line for line in lines if line.startswith("  stages: read ")]
    assert all(len(line) <= 80 for line in lines if str(tmp_path) not in line), lines


def test_keep_source_puts_shards_in_the_cache_and_the_next_run_uses_it(server, env, repo, tmp_path):
    proc = qtool([REPO, "--out", str(tmp_path / "a"), "--keep-source", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fetch"]["kept_in_cache"] is True
    cached = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cached_shards(env)}
    assert cached == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards_of(repo)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    server.requests.clear()
    proc = qtool([REPO, "--out", str(tmp_path / "b"), "--json"], env)  # default: the cache has them all
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fetch"] is None
    assert shard_gets(server, ranged=False) == [] and shard_gets(server, ranged=True) == []
    assert weight_files(tmp_path / "a") == weight_files(tmp_path / "b")

    gone = cached_shards(env)[3]  # the cache loses one shard: only that one is fetched, the rest read there
    gone.resolve().unlink()
    gone.unlink()
    server.requests.clear()
    proc = qtool([REPO, "--out", str(tmp_path / "c"), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    fetch = json.loads(proc.stdout)["fetch"]
    assert (fetch["shards"], fetch["cached_shards"]) == (1, SHARDS - 1)
    assert shard_gets(server, ranged=False) == [gone.name]
    assert sorted(p.name for p in cached_shards(env)) == sorted(p.name for p in shards_of(repo) if p.name != gone.name)
    assert weight_files(tmp_path / "c") == weight_files(tmp_path / "a")


def test_no_stream_downloads_first_into_the_cache(server, env, repo, tmp_path):
    proc = qtool([REPO, "--out", str(tmp_path / "out"), "--no-stream", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fetch"] is None
    assert shard_gets(server, ranged=True) == []  # no header reads: the files were all there
    assert len(cached_shards(env)) == SHARDS


def test_dry_run_plans_from_headers_without_fetching_a_shard(server, env, tmp_path):
    proc = qtool([REPO, "--out", str(tmp_path / "out"), "--dry-run", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["tensors"]["quantized"] == 6 * 7 and plan["input_bytes"] > 0
    assert shard_gets(server, ranged=False) == []
    assert len(set(shard_gets(server, ranged=True))) == SHARDS
    assert not (tmp_path / "out").exists() and cached_shards(env) == []


def test_a_repo_without_index_or_model_safetensors_is_downloaded_first(server, env, tmp_path):
    proc = qtool(["org/odd", "--out", str(tmp_path / "out"), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fetch"] is None
    assert [p.name for p in cached_shards(env)] == ["weights.safetensors"]


def assert_nothing_left(work: Path, env: dict) -> None:
    assert leftovers(work) == [], "destination, staging or fetched shards left behind"
    assert cached_shards(env) == []


def test_shard_404_mid_stream_is_one_line_and_leaves_nothing(server, env, repo, tmp_path):
    missing = shards_of(repo)[3].name
    server.hide(missing)  # its header is readable (the plan succeeds), the file itself 404s
    work = tmp_path / "work"
    work.mkdir()
    proc = qtool([REPO, "--out", str(work / "out")], env)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    print(f"\n404 mid-stream: {line}")
    assert missing in line and "404" in line and REPO in line
    assert [p.name for p in shards_of(repo)[:3]] == shard_gets(server, ranged=False)[:3]  # it was mid-stream
    assert_nothing_left(work, env)


def test_connection_lost_mid_stream_is_one_line_and_leaves_nothing(server, env, repo, tmp_path):
    cut = shards_of(repo)[2].name
    work = tmp_path / "work"
    work.mkdir()
    server.rate = 4 * 2**20
    proc = subprocess.Popen([PY, "-m", "qtool", "quantize", REPO, "--out", str(work / "out")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not shard_gets(server, ranged=False) and proc.poll() is None:  # the plan is made, shards flow
        threading.Event().wait(0.01)
    server.drop(cut, after=1000, times=1000)  # from now on every attempt at this shard, resumed or not, dies
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err
    line = one_error_line(err)
    print(f"\nconnection lost mid-stream: {line}")
    assert "connection to" in line and "failed" in line
    assert cut in shard_gets(server, ranged=False)
    assert_nothing_left(work, env)


def _file_size_limit(limit: int):
    def apply() -> None:  # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_while_fetching_is_one_line_and_leaves_nothing(server, env, repo, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    limit = min(p.stat().st_size for p in shards_of(repo)) // 2  # no shard fits
    proc = qtool([REPO, "--out", str(work / "out")], env, preexec_fn=_file_size_limit(limit))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    print(f"\nfile-size limit while fetching: {line}")
    assert "file too large" in line.lower() and ".safetensors" in line
    assert_nothing_left(work, env)


def test_ctrl_c_mid_stream_leaves_nothing(server, env, repo, tmp_path):
    import signal

    work = tmp_path / "work"
    work.mkdir()
    server.rate = 2**20  # ~3 s a shard: the signal lands while shards are on disk
    proc = subprocess.Popen([PY, "-m", "qtool", "quantize", REPO, "--out", str(work / "out")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while len(shard_gets(server, ranged=False)) < 2 and proc.poll() is None:  # shard 1 is there, 2 arriving
        threading.Event().wait(0.01)
    assert any(".qtool-src-" in p.name for p in work.iterdir())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert one_error_line(err) == "qtool: error: interrupted"
    assert_nothing_left(work, env)


def test_layout_writer_spills_early_arrivals_to_disk_and_writes_the_same_bytes(tmp_path):
    """The stream's order (layer 2 before layer 10) makes tensors wait for the blobs before them in name order.
    With no memory budget every waiting tensor goes through the spill file; the files are the same bytes as
    writing in name order, and the spill file is gone at the end."""
    import torch

    from qtool.quantize.sink import EntrySpec, LayoutWriter, split_shards

    g = torch.Generator().manual_seed(0)
    tensors, specs = {}, []
    for i in range(12):
        w, blob = f"m.layers.{i}.w", f"m.layers.{i}.w.quant_state.bitsandbytes__nf4"
        tensors[w] = torch.randint(0, 255, (64, 1), dtype=torch.uint8, generator=g)
        tensors[blob] = torch.tensor(list(json.dumps({"offset": 1 / (i + 3)}).encode()), dtype=torch.uint8)
        specs += [EntrySpec(w, "U8", (64, 1), 64, 64), EntrySpec(blob, "U8", None, 10, 40)]
    tensors["m.norm"] = torch.rand(8, generator=g)
    specs.append(EntrySpec("m.norm", "F32", (8,), 32, 32))
    shards = split_shards(specs, 10**9)

    def write(folder: Path, order: list[str], budget: int) -> tuple[bytes, int]:
        folder.mkdir()
        sink = LayoutWriter(folder, specs, shards, spill_budget=budget)
        for name in order:
            sink.add(name, tensors[name])
        spilled = sink.spill.end
        sink.finish()
        assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
        return (folder / "model.safetensors").read_bytes(), spilled

    by_name, none = write(tmp_path / "a", sorted(tensors), 0)
    by_layer, spilled = write(tmp_path / "b", list(tensors), 0)  # numeric layer order, as a stream sends them
    in_memory, kept = write(tmp_path / "c", list(tensors), 1 << 20)
    assert none == 0 and kept == 0
    assert spilled == 64 * 8 + sum(len(tensors[f"m.layers.{i}.w.quant_state.bitsandbytes__nf4"]) for i in range(2, 10))
    assert by_layer == by_name == in_memory
