"""Peak disk and wall time of `qtool quantize <hub id>` streamed (--stream) vs download-first (--no-stream).

A multi-shard Llama-shaped model with random bf16 weights (a few hundred MB) is served by tests/hubserver.py on
127.0.0.1 and reached through HF_ENDPOINT, as a user's hub would be. Each run starts with an empty HF cache and
an empty output folder; a thread sums the allocated blocks of every file under both (the HF cache, and the
output's parent where the staging folder and the streamed shards live) every few milliseconds. The server can
be throttled (--rates, MB/s over all connections together) to stand for a real network link; 0 = as fast as
loopback goes.

  python bench/stream_bench.py                       # ~400 MB in 8 shards, loopback and 100 MB/s, 3 runs each
  python bench/stream_bench.py --layers 24 --rates 0 # bigger, loopback only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
REPO = "bench/sharded"


def make_repo(root: Path, layers: int, shard_mb: int) -> Path:
    """config.json + bf16 shards + index, split as save_pretrained splits (huggingface_hub's splitter)."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from tinymodels import llama_config, llama_weights

    config = llama_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, vocab_size=32000,
                          num_attention_heads=16, num_key_value_heads=4, torch_dtype="bfloat16")
    folder = root / REPO
    folder.mkdir(parents=True)
    save_torch_state_dict(llama_weights(config, dtype=torch.bfloat16), folder, max_shard_size=f"{shard_mb}MB")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def allocated(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        for base, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(base, name)).st_blocks * 512
                except OSError:
                    pass
    return total


def run(url: str, work: Path, stream: bool) -> dict:
    """One quantize in a subprocess, with its own empty HF cache; -> measured figures and qtool's report."""
    hf_home, out_parent = work / "hf_home", work / "out"
    for folder in (hf_home, out_parent):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QTOOL_"))}
    env.update(HF_ENDPOINT=url, HF_HOME=str(hf_home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], allocated([hf_home, out_parent]))
            stop.wait(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qtool", "quantize", REPO, "--out", str(out_parent / "q"), "--json",
                           "--device", "cpu", "--stream" if stream else "--no-stream"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    report = json.loads(proc.stdout)
    digest = hashlib.sha256()
    for f in sorted((out_parent / "q").glob("*.safetensors")):
        digest.update(f.read_bytes())
    return {"wall_s": wall, "peak_disk_measured": peak[0], "peak_disk_qtool": report["peak_disk_bytes"],
            "output_bytes": report["output_bytes"], "peak_rss": report["peak_rss_bytes"],
            "fetch": report["fetch"], "weights_sha256": digest.hexdigest()[:16],
            "left_in_cache": allocated([hf_home])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard-mb", type=int, default=50)
    parser.add_argument("--rates", default="0,100",
                        help="link rates in MB/s, shared by all connections, comma-separated (0: unthrottled)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode and rate (the median is shown)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from hubserver import HubServer

    work = Path(tempfile.mkdtemp(prefix="stream-bench-", dir=args.workdir))
    try:
        folder = make_repo(work / "repo", args.layers, args.shard_mb)
        shards = sorted(folder.glob("*.safetensors"))
        source = sum(p.stat().st_size for p in shards)
        print(f"model: {args.layers} layers, {source / 1e6:.0f} MB bf16 in {len(shards)} shards "
              f"(largest {max(p.stat().st_size for p in shards) / 1e6:.0f} MB)")
        server = HubServer()
        server.add_repo(REPO, folder)
        server.start()
        runs: dict[tuple[float, bool], list[dict]] = {}
        try:
            for rate in [float(r) for r in args.rates.split(",")]:
                server.rate = rate * 1e6 or None
                for i in range(args.repeat):  # alternate which mode goes first: a shared machine drifts
                    for stream in ((False, True) if i % 2 == 0 else (True, False)):
                        runs.setdefault((rate, stream), []).append(run(server.url, work / "run", stream))
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch, transformers, huggingface_hub  # noqa: E401 - versions for the record

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, huggingface_hub {huggingface_hub.__version__}")
    print(f"{'link':>10} {'mode':>14} {'wall s':>7} {'peak disk MB':>13} {'qtool says':>11} {'output MB':>10} "
          f"{'RSS MB':>7} {'fetch s':>8} {'overlap s':>10} {'cache MB':>9} weights")
    for (rate, stream), rs in runs.items():  # the median run by wall time; peak disk: the most seen in any
        r = sorted(rs, key=lambda x: x["wall_s"])[len(rs) // 2]
        r = {**r, "peak_disk_measured": max(x["peak_disk_measured"] for x in rs)}
        assert len({x["weights_sha256"] for x in rs}) == 1
        f = r["fetch"] or {}
        print(f"{(f'{rate:.0f} MB/s' if rate else 'loopback'):>10} {'stream' if stream else 'download-first':>14} "
              f"{r['wall_s']:7.1f} {r['peak_disk_measured'] / 1e6:13.0f} {r['peak_disk_qtool'] / 1e6:11.0f} "
              f"{r['output_bytes'] / 1e6:10.0f} {r['peak_rss'] / 1e6:7.0f} {f.get('seconds', 0):8.1f} "
              f"{f.get('overlap_seconds', 0):10.1f} {r['left_in_cache'] / 1e6:9.0f} {r['weights_sha256']}")


if __name__ == "__main__":
    main()
