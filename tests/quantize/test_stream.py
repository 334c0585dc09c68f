"""`qtool quantize <hub id> --stream` against a real HTTP server on 127.0.0.1 (tests/hubserver.py, HF_ENDPOINT).

A 6-shard tiny Llama is served; qtool runs in a subprocess (huggingface_hub reads HF_* at import, as in a
user's shell). The disk it uses is measured here, independently: a thread sums the allocated blocks of every
file under the destination's parent folder (where the staging folder and the fetched shards live) every
few milliseconds while the server sends at a limited rate, so the shards take long enough to be seen.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from streamhub import (
    REPO, SHARDS, shards_of, allocated, DiskPoller, weight_files, shard_gets, cached_shards, leftovers)


def local_reference(repo: Path, out: Path, max_shard_size: int) -> None:
    """The same model quantized from its local folder, in this process (no hub involved: no HF_* to read)."""
    from qtool.core.config import resolve_settings
    from qtool.quantize import quantize

    quantize(str(repo), resolve_settings({}, env={}, cwd=out.parent).quant, destination=out, device="cpu",
             max_shard_size=max_shard_size)


def test_stream_is_byte_identical_and_disk_stays_near_output_plus_two_shards(qtool, server, env, repo, tmp_path):
    ref = tmp_path / "ref"
    split = ["--max-shard-size", "400KB"]  # several output files and an index, as well
    local_reference(repo, ref, 400_000)  # the local copy, no hub

    work = tmp_path / "work"
    work.mkdir()
    sizes = [p.stat().st_size for p in shards_of(repo)]
    server.rate = 4 * 2**20  # ~0.2 s per shard: long enough for the poller to see every state
    with DiskPoller(work) as poll:
        proc = qtool([REPO, "--out", str(work / "out"), "--json", *split], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["files"]) > 1 and report["single_pass"] is True  # shards read in turn, one ahead
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


def test_stream_keeps_state_dict_order_when_the_output_split_needs_blob_lengths(qtool, server, env, repo, tmp_path):
    """An output shard limit that falls inside a quant-state blob's possible lengths: the two-pass ShardWriter
    takes tensors in state-dict order, and the fetcher follows that order instead of shard by shard."""
    from qtool.core.config import resolve_settings
    from qtool.quantize import plan_quantization
    from qtool.quantize.plan import entry_specs
    from qtool.quantize.sink import split_shards

    specs = entry_specs(plan_quantization(repo, resolve_settings().quant))
    total = 0
    for e in specs:
        if e.lo != e.hi and total > 2**18:  # a blob past the first 256 KB: its length decides this boundary
            limit = total + e.lo
            break
        total += e.lo
    assert split_shards(specs, limit) is None
    ref, work = tmp_path / "ref", tmp_path / "work"
    work.mkdir()
    local_reference(repo, ref, limit)
    proc = qtool([REPO, "--out", str(work / "out"), "--max-shard-size", str(limit), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["single_pass"] is False and report["fetch"]["shards"] == SHARDS
    assert weight_files(work / "out") == weight_files(ref)
    assert leftovers(work) == ["out"] and cached_shards(env) == []


def allocated_file(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_summary_reports_fetch_and_peak_disk(qtool, server, env, tmp_path):
    proc = qtool([REPO, "--out", str(tmp_path / "out")], {**env, "COLUMNS": "200"})  # rich would wrap at 80
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    fetch = [line for line in lines if line.startswith("  fetch: ")]
    disk = [line for line in lines if line.startswith("  peak disk: ")]
    assert len(fetch) == 1 and f"{SHARDS} shards" in fetch[0] and "beside quantizing" in fetch[0]
    assert len(disk) == 1 and disk[0].endswith("(output + shards, each deleted once read)")
    assert [line for line in lines if line.startswith("  stages: read ")]
    assert all(len(line) <= 80 for line in lines if str(tmp_path) not in line), lines


def test_keep_source_puts_shards_in_the_cache_and_the_next_run_uses_it(qtool, server, env, repo, tmp_path):
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


def test_no_stream_downloads_first_into_the_cache(qtool, server, env, repo, tmp_path):
    proc = qtool([REPO, "--out", str(tmp_path / "out"), "--no-stream", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fetch"] is None
    assert shard_gets(server, ranged=True) == []  # no header reads: the files were all there
    assert len(cached_shards(env)) == SHARDS


def test_dry_run_plans_from_headers_without_fetching_a_shard(qtool, server, env, tmp_path):
    proc = qtool([REPO, "--out", str(tmp_path / "out"), "--dry-run", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["tensors"]["quantized"] == 6 * 7 and plan["input_bytes"] > 0
    assert shard_gets(server, ranged=False) == []
    assert len(set(shard_gets(server, ranged=True))) == SHARDS
    assert not (tmp_path / "out").exists() and cached_shards(env) == []


def test_a_repo_without_index_or_model_safetensors_is_downloaded_first(qtool, server, env, tmp_path):
    proc = qtool(["org/odd", "--out", str(tmp_path / "out"), "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fetch"] is None
    assert [p.name for p in cached_shards(env)] == ["weights.safetensors"]


def test_stream_flags_on_a_local_folder_are_named_as_ignored(repo, tmp_path, capsys):
    from qtool.cli.app import main

    code = main(["quantize", str(repo), "--out", str(tmp_path / "out"), "--stream", "--keep-source", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["fetch"] is None
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: --stream applies to a hub id; {repo} is a local folder (stream ignored)",
                      f"warning: --keep-source applies to a hub id; {repo} is a local folder (keep_source ignored)"]
