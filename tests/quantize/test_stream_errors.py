"""qtool quantize --stream when the network, the hub or the disk fails, or the user presses Ctrl-C: one line,
nothing left behind."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from streamhub import REPO, shards_of, shard_gets, assert_nothing_left
from tinymodels import one_error_line


def test_shard_404_mid_stream_is_one_line_and_leaves_nothing(qtool, server, env, repo, tmp_path):
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


def test_connection_lost_mid_stream_is_one_line_and_leaves_nothing(qtool, server, env, repo, tmp_path):
    cut = shards_of(repo)[2].name
    work = tmp_path / "work"
    work.mkdir()
    server.rate = 4 * 2**20
    proc = qtool.start([REPO, "--out", str(work / "out")], env)
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


def test_disk_full_while_fetching_is_one_line_and_leaves_nothing(qtool, server, env, repo, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    limit = min(p.stat().st_size for p in shards_of(repo)) // 2  # no shard fits
    # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG instead
    proc = qtool([REPO, "--out", str(work / "out")], env, rlimits={"RLIMIT_FSIZE": limit})
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    print(f"\nfile-size limit while fetching: {line}")
    assert "file too large" in line.lower() and ".safetensors" in line
    assert_nothing_left(work, env)


def test_ctrl_c_mid_stream_leaves_nothing(qtool, server, env, repo, tmp_path):
    import signal

    work = tmp_path / "work"
    work.mkdir()
    server.rate = 2**19  # ~1.5 s a shard: the signal lands while shards are on disk
    proc = qtool.start([REPO, "--out", str(work / "out")], env)
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
