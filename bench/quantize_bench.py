"""qtool quantize vs transformers' own path (from_pretrained(quantization_config=...) + save_pretrained).

Llama-3-8B-shaped models (hidden 4096, intermediate 14336, vocab 128256, 32 heads / 8 KV heads) with
N layers and random bf16 weights, written straight to safetensors (streamed, never held twice).
Each side runs in its own subprocess; its peak RSS comes from os.wait4's rusage for that child.

  python bench/quantize_bench.py                      # 2 and 6 layers on CPU
  python bench/quantize_bench.py --layers 32          # the full 8B (16 GB bf16, ~22 GB free disk in --workdir)
  python bench/quantize_bench.py --device cuda --io-floor   # on a GPU machine, with the I/O floor

Goals: qtool's peak RSS at most half of transformers', growing < 10% from 2 to 6 layers; wall time no
worse than transformers'. On CUDA: qtool's wall within 1.2x of the I/O floor (whole process, and without
the interpreter/import/CUDA-init overhead that the report's stage_seconds measures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": 128001, "dtype": "bfloat16",
}


def make_checkpoint(path: Path, layers: int) -> int:
    """Write config.json + model.safetensors with random bf16 tensors; returns the file size."""
    import torch

    from qtool.core.meta import meta_model
    from qtool.quantize.sink import safetensors_header

    cfg = dict(CONFIG, num_hidden_layers=layers)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    entries = [(k, "BF16", s, 2 * _numel(s)) for k, s in shapes.items()]
    header, ordered = safetensors_header(entries, {"format": "pt"})
    gen = torch.Generator().manual_seed(0)
    with open(path / "model.safetensors", "wb") as f:
        f.write(header)
        for name, _, shape, _ in ordered:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.uint8).numpy().data)
            del t
    return (path / "model.safetensors").stat().st_size


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


TRANSFORMERS_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
src, out, device = sys.argv[1], sys.argv[2], sys.argv[3]
bc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(src, quantization_config=bc, device_map=device)
m.save_pretrained(out)
"""


CORES: int | None = None  # --cores: children pinned to the first N cores, N intra-op threads
OTHER_QTOOL: Path | None = None  # --other-qtool: another checkout's qtool, timed the same way after this one


def measure(cmd: list[str], root: Path = ROOT) -> dict:
    """Run one child; wall time and its own peak RSS (ru_maxrss of exactly this child). `root`: whose qtool."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, TQDM_DISABLE="1")
    if CORES:
        env.update(OMP_NUM_THREADS=str(CORES), MKL_NUM_THREADS=str(CORES))
        cmd = ["taskset", "-c", f"0-{CORES - 1}", *cmd]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"child failed ({code}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": out.decode()}


def _read_single(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 * 2**20)
        while f.readinto(buf):
            pass


def _read_parallel(path: Path) -> int:
    """The read qtool does: chunked pread on qtool.quantize.streamio.read_threads() threads into one reused buffer."""
    from concurrent.futures import ThreadPoolExecutor

    from qtool.quantize.streamio import CHUNK_BYTES, read_threads

    size = path.stat().st_size
    threads = read_threads()
    window = CHUNK_BYTES * threads * 4
    buf = bytearray(window)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for base in range(0, size, window):
                jobs = [pool.submit(os.preadv, fd, [view[a: a + CHUNK_BYTES]], base + a)
                        for a in range(0, min(window, size - base), CHUNK_BYTES)]
                for j in jobs:
                    j.result()
    finally:
        os.close(fd)
    return threads


def io_floor(src: Path, out_bytes: int, workdir: Path) -> dict:
    """What no quantizer can beat: read the input (single-threaded, and with qtool's parallel pread) and
    write an output-sized file with fsync. Files are read twice first so both reads see the page cache."""
    f = src / "model.safetensors"
    _read_single(f)
    start = time.monotonic()
    _read_single(f)
    read_single_s = time.monotonic() - start
    start = time.monotonic()
    threads = _read_parallel(f)
    read_parallel_s = time.monotonic() - start
    target = workdir / "io-floor.bin"
    block = b"\0" * (64 * 2**20)
    start = time.monotonic()
    with open(target, "wb") as out:
        left = out_bytes
        while left > 0:
            out.write(block[: min(left, len(block))])
            left -= len(block)
        out.flush()
        write_nosync_s = time.monotonic() - start
        os.fsync(out.fileno())
    write_s = time.monotonic() - start
    target.unlink()
    best = min(read_single_s, read_parallel_s)
    return {"read_single_s": round(read_single_s, 2), "read_parallel_s": round(read_parallel_s, 2),
            "read_threads": threads, "write_s": round(write_s, 2), "write_no_fsync_s": round(write_nosync_s, 2),
            "total_s": round(best + write_s, 2), "total_single_s": round(read_single_s + write_s, 2)}


# stages before the streaming starts that are not quantization work: interpreter, CLI, imports, CUDA context
_OVERHEAD = ("startup", "imports", "import_bitsandbytes", "cuda_init")


def _in_child(what: str, *args) -> dict:
    """Run make_checkpoint / io_floor in a child: Linux children inherit the parent's peak RSS at fork
    (ru_maxrss), so the bench process itself must never grow, or every later measurement is inflated."""
    out = measure([sys.executable, str(Path(__file__).resolve()), "--child", what, *map(str, args)])
    return json.loads(out["stdout"])


def _import_torch_s(tries: int = 3) -> float:
    """The last part of issue 12's floor: a whole `python -c "import torch"` process, best of a few."""
    best = float("inf")
    for _ in range(tries):
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        best = min(best, time.monotonic() - start)
    return round(best, 2)


def run(layers: int, device: str, workdir: Path, with_io_floor: bool, skip_transformers: bool = False) -> dict:
    src = workdir / f"llama3-8b-shaped-{layers}l"
    if not (src / "model.safetensors").is_file():
        _in_child("make", src, layers)
    in_bytes = (src / "model.safetensors").stat().st_size
    q_out, t_out = workdir / f"q-{layers}", workdir / f"t-{layers}"
    for d in (q_out, t_out):
        shutil.rmtree(d, ignore_errors=True)
    q = measure([sys.executable, "-m", "qtool", "quantize", str(src), "-o", str(q_out), "--device", device, "--json"])
    report = json.loads(q.pop("stdout"))
    other = None
    if OTHER_QTOOL is not None:  # e.g. the commit before a change, on the same card and page cache
        o_out = workdir / f"o-{layers}"
        shutil.rmtree(o_out, ignore_errors=True)
        other = measure([sys.executable, "-m", "qtool", "quantize", str(src), "-o", str(o_out), "--device", device,
                         "--json"], root=OTHER_QTOOL)
        other["stage_seconds"] = json.loads(other.pop("stdout")).get("stage_seconds", {})
        other["same_bytes"] = _same_files(q_out, o_out)
        shutil.rmtree(o_out, ignore_errors=True)
    t = None
    if not skip_transformers:
        t = measure([sys.executable, "-c", TRANSFORMERS_CHILD, str(src), str(t_out), device])
        t.pop("stdout")
    out_bytes = sum(p.stat().st_size for p in q_out.glob("*.safetensors"))
    t_bytes = sum(p.stat().st_size for p in t_out.glob("*.safetensors")) if t else None
    stages = report.get("stage_seconds", {})
    q["stage_seconds"] = stages
    q["overhead_s"] = round(sum(stages.get(k, 0.0) for k in _OVERHEAD), 2)
    q["wall_excl_overhead_s"] = round(q["wall_s"] - q["overhead_s"], 2)
    q["single_pass"] = report.get("single_pass")
    row = {"layers": layers, "device": device, "input_bytes": in_bytes, "output_bytes": out_bytes, "other_qtool": other,
           "transformers_output_bytes": t_bytes, "qtool": q, "transformers": t,
           "qtool_reported_peak_rss": report.get("peak_rss_bytes"), "qtool_peak_gpu": report.get("peak_gpu_bytes")}
    if with_io_floor:
        row["io_floor"] = _in_child("floor", src, out_bytes, workdir)
        row["io_floor"]["import_torch_s"] = _import_torch_s()
    for d in (q_out, t_out):
        shutil.rmtree(d, ignore_errors=True)
    return row


def _same_files(a: Path, b: Path) -> list[str] | bool:
    """True when both folders hold the same files with the same bytes (README.md aside: it names the
    source and sizes only, but say so if it differs too); else the names that differ."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differ = [n for n in names if not ((a / n).is_file() and (b / n).is_file()
                                       and (a / n).read_bytes() == (b / n).read_bytes())]
    return differ or True


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        what, *a = sys.argv[2:]
        if what == "make":
            print(json.dumps({"bytes": make_checkpoint(Path(a[0]), int(a[1]))}))
        else:
            print(json.dumps(io_floor(Path(a[0]), int(a[1]), Path(a[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="*", default=[2, 6])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated source checkpoints")
    ap.add_argument("--io-floor", action="store_true", help="also time reading the input and writing the output size")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    ap.add_argument("--skip-transformers", action="store_true", help="time qtool (and the floor) only")
    ap.add_argument("--cores", type=int, nargs="*", default=[None],
                    help="pin each run to the first N cores (taskset) with N threads; several values: one row each")
    ap.add_argument("--other-qtool", type=Path, default=None,
                    help="a checkout of another qtool version: time it too, right after this one, same bytes?")
    ap.add_argument("--transformers-cores", type=int, nargs="*", default=None,
                    help="run transformers only at these --cores values (default: at each)")
    args = ap.parse_args()
    global CORES, OTHER_QTOOL
    OTHER_QTOOL = args.other_qtool.resolve() if args.other_qtool else None
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="qtool-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.layers:
            for cores in args.cores:
                CORES = cores
                skip = args.skip_transformers or (args.transformers_cores is not None
                                                  and cores not in args.transformers_cores)
                row = run(n, args.device, workdir, args.io_floor, skip)
                row["cores"] = cores
                rows.append(row)
                print(f"[cores: {cores or 'all'}]", end=" ")
                print_row(row)
        if len(rows) >= 2:
            a, b = rows[0]["qtool"]["peak_rss_bytes"], rows[-1]["qtool"]["peak_rss_bytes"]
            print(f"qtool RSS growth {rows[0]['layers']} -> {rows[-1]['layers']} layers: {100 * (b / a - 1):+.1f}%")
        for r in rows:
            if r["transformers"]:
                print(f"{r['layers']} layers: qtool/transformers RSS = "
                      f"{r['qtool']['peak_rss_bytes'] / r['transformers']['peak_rss_bytes']:.2f}, "
                      f"wall = {r['qtool']['wall_s'] / r['transformers']['wall_s']:.2f}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def print_row(row: dict) -> None:
    gb = 1e9
    q, t, n = row["qtool"], row["transformers"], row["layers"]
    print(f"{n:>2} layers  in {row['input_bytes'] / gb:6.2f} GB -> out {row['output_bytes'] / gb:5.2f} GB | "
          f"qtool {q['wall_s']:7.1f} s ({q['wall_excl_overhead_s']:.1f} s without {q['overhead_s']:.1f} s "
          f"startup/imports/CUDA init)  {q['peak_rss_bytes'] / gb:5.2f} GB RSS"
          + (f" | transformers {t['wall_s']:7.1f} s  {t['peak_rss_bytes'] / gb:5.2f} GB RSS" if t else ""), flush=True)
    if "io_floor" in row:
        f = row["io_floor"]
        print(f"   I/O floor {f['total_s']} s = best read {min(f['read_single_s'], f['read_parallel_s'])} s "
              f"(1 thread {f['read_single_s']} s, {f['read_threads']} threads {f['read_parallel_s']} s) + write+fsync "
              f"{f['write_s']} s (no fsync {f['write_no_fsync_s']} s); qtool/floor = {q['wall_s'] / f['total_s']:.2f} "
              f"({q['wall_excl_overhead_s'] / f['total_s']:.2f} without overhead); single-thread floor "
              f"{f['total_single_s']} s")
        full = f["total_s"] + f["import_torch_s"]
        print(f"   floor with `import torch` ({f['import_torch_s']} s, whole process) {full:.2f} s; "
              f"qtool/floor = {q['wall_s'] / full:.2f}")
    print("   qtool stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in q["stage_seconds"].items()), flush=True)
    o = row.get("other_qtool")
    if o:
        print(f"   other qtool ({OTHER_QTOOL}): {o['wall_s']} s, {o['peak_rss_bytes'] / gb:.2f} GB RSS, same output "
              f"bytes: {o['same_bytes']}; stages: " + ", ".join(f"{k} {v:.2f}" for k, v in o["stage_seconds"].items()))
        if "io_floor" in row:
            print(f"   other qtool / floor = {o['wall_s'] / (row['io_floor']['total_s'] + row['io_floor']['import_torch_s']):.2f}")


if __name__ == "__main__":
    main()
