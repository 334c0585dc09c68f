"""qtool quantize vs transformers' own path (from_pretrained(quantization_config=...) + save_pretrained).

Llama-3-8B-shaped models (hidden 4096, intermediate 14336, vocab 128256, 32 heads / 8 KV heads) with
N layers and random bf16 weights, written straight to safetensors (streamed, never held twice).
Each side runs in its own subprocess; its peak RSS comes from os.wait4's rusage for that child.

  python bench/quantize_bench.py                      # 2 and 6 layers on CPU
  python bench/quantize_bench.py --layers 32          # the full 8B (16 GB bf16, ~22 GB free disk in --workdir)
  python bench/quantize_bench.py --device cuda --io-floor   # on a GPU machine, with the I/O floor

Goals: qtool's peak RSS at most half of transformers', growing < 10% from 2 to 6 layers; wall time no
worse than transformers'.
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
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": 128001, "dtype": "bfloat16",
}


def make_checkpoint(path: Path, layers: int) -> int:
    """Write config.json + model.safetensors with random bf16 tensors; returns the file size."""
    import torch

    from qtool.meta import meta_model
    from qtool.writer import safetensors_header

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


def measure(cmd: list[str]) -> dict:
    """Run one child; wall time and its own peak RSS (ru_maxrss of exactly this child)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, TQDM_DISABLE="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"child failed ({code}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": out.decode()}


def io_floor(src: Path, out_bytes: int, workdir: Path) -> dict:
    """Time to read the input files and write an output-sized file (what no quantizer can beat)."""
    start = time.monotonic()
    with open(src / "model.safetensors", "rb") as f:
        while f.read(64 * 2**20):
            pass
    read_s = time.monotonic() - start
    target = workdir / "io-floor.bin"
    block = b"\0" * (64 * 2**20)
    start = time.monotonic()
    with open(target, "wb") as f:
        left = out_bytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.monotonic() - start
    target.unlink()
    return {"read_s": round(read_s, 2), "write_s": round(write_s, 2), "total_s": round(read_s + write_s, 2)}


def run(layers: int, device: str, workdir: Path, with_io_floor: bool) -> dict:
    src = workdir / f"llama3-8b-shaped-{layers}l"
    if not (src / "model.safetensors").is_file():
        make_checkpoint(src, layers)
    in_bytes = (src / "model.safetensors").stat().st_size
    q_out, t_out = workdir / f"q-{layers}", workdir / f"t-{layers}"
    for d in (q_out, t_out):
        shutil.rmtree(d, ignore_errors=True)
    q = measure([sys.executable, "-m", "qtool", "quantize", str(src), "-o", str(q_out), "--device", device, "--json"])
    report = json.loads(q.pop("stdout"))
    t = measure([sys.executable, "-c", TRANSFORMERS_CHILD, str(src), str(t_out), device])
    t.pop("stdout")
    out_bytes = sum(p.stat().st_size for p in q_out.glob("*.safetensors"))
    t_bytes = sum(p.stat().st_size for p in t_out.glob("*.safetensors"))
    row = {"layers": layers, "device": device, "input_bytes": in_bytes, "output_bytes": out_bytes,
           "transformers_output_bytes": t_bytes, "qtool": q, "transformers": t,
           "qtool_reported_peak_rss": report.get("peak_rss_bytes"), "qtool_peak_gpu": report.get("peak_gpu_bytes")}
    if with_io_floor:
        row["io_floor"] = io_floor(src, out_bytes, workdir)
    for d in (q_out, t_out):
        shutil.rmtree(d, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="*", default=[2, 6])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated source checkpoints")
    ap.add_argument("--io-floor", action="store_true", help="also time reading the input and writing the output size")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qtool-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.layers:
            row = run(n, args.device, workdir, args.io_floor)
            rows.append(row)
            gb = 1e9
            q, t = row["qtool"], row["transformers"]
            print(f"{n:>2} layers  in {row['input_bytes'] / gb:6.2f} GB -> out {row['output_bytes'] / gb:5.2f} GB | "
                  f"qtool {q['wall_s']:7.1f} s  {q['peak_rss_bytes'] / gb:5.2f} GB RSS | "
                  f"transformers {t['wall_s']:7.1f} s  {t['peak_rss_bytes'] / gb:5.2f} GB RSS"
                  + (f" | I/O floor {row['io_floor']['total_s']} s" if "io_floor" in row else ""), flush=True)
        if len(rows) >= 2:
            a, b = rows[0]["qtool"]["peak_rss_bytes"], rows[-1]["qtool"]["peak_rss_bytes"]
            print(f"qtool RSS growth {rows[0]['layers']} -> {rows[-1]['layers']} layers: {100 * (b / a - 1):+.1f}%")
        for r in rows:
            print(f"{r['layers']} layers: qtool/transformers RSS = "
                  f"{r['qtool']['peak_rss_bytes'] / r['transformers']['peak_rss_bytes']:.2f}, "
                  f"wall = {r['qtool']['wall_s'] / r['transformers']['wall_s']:.2f}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
