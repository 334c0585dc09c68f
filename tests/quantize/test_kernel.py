"""qtool.quantize.kernel: bitsandbytes' CUDA 4-bit quantizer reproduced on the CPU.

The oracle for exactness is CUDA itself, which CI does not have: bench/kernel_vs_cuda.py ran
transformers + bitsandbytes on an H200 and stored digests of every output tensor in
tests/data/cuda_reference.json; here the same sources are rebuilt on the CPU and quantized by qtool.
Where bitsandbytes' own CPU kernel agrees with its CUDA kernel (NF4 without double quant) it is a
second oracle for property tests; it rounds FP4 and the double-quant statistics differently, so
those are not compared with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference_models as rm  # noqa: E402
from qtool.quantize import kernel  # noqa: E402
from qtool.core.config import QuantSettings  # noqa: E402
from qtool.quantize import plan_quantization, run_quantization  # noqa: E402
from qtool.quantize.stream import quantize_tensor  # noqa: E402

REFERENCE = Path(__file__).parents[1] / "data" / "cuda_reference.json"
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("refsrc")
    made: dict = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in made:
            made[(arch, dtype)] = rm.make_source(arch, dtype, root / f"{arch}-{dtype}")
        return made[(arch, dtype)]

    return get


@pytest.mark.parametrize("arch", list(rm.ARCHS))
def test_cpu_checkpoints_equal_the_cuda_reference(reference, sources, tmp_path, arch):
    """Every tensor of every reference setting (quant type x double quant x blocksize x source dtype).

    The sources come from torch.randn, whose scalar CPU kernel (no AVX2) draws other values than the
    vectorized one the reference host used: there, and only there, the sources are not the reference's and
    the comparison cannot be made (the kernel's ISA independence is checked by the tests below)."""
    runs = rm.settings_for(arch)
    assert set(reference[arch]) == {rm.setting_key(*s) for s in runs}
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        qt, dq, bs, dt = runs[0]
        kept = {k: v for k, v in reference[arch][rm.setting_key(qt, dq, bs, dt)].items() if "embed" in k or "wte" in k}
        mine = rm.checkpoint_digests(sources(arch, dt))
        if any(mine.get(k) != v for k, v in kept.items()):
            pytest.skip(f"torch.randn on this CPU ({torch.backends.cpu.get_cpu_capability()}) does not draw the "
                        "reference host's sources")
    for qt, dq, bs, dt in runs:
        s = QuantSettings(quant_type=qt, double_quant=dq, blocksize=bs, dtype=dt)
        out = tmp_path / rm.setting_key(qt, dq, bs, dt)
        run_quantization(plan_quantization(sources(arch, dt), s), out, device="cpu")
        assert rm.checkpoint_digests(out) == reference[arch][rm.setting_key(qt, dq, bs, dt)], (arch, qt, dq, bs, dt)


def test_rcp_table_is_the_hardware_instruction_not_ieee():
    """The stored MUFU.RCP offsets are small, and some are nonzero (else the table would be pointless)."""
    delta = kernel._rcp_delta()
    assert delta.numel() == 1 << 23
    assert int(delta.abs().max()) <= 2
    assert int((delta != 0).sum()) > 100_000  # 1.1 M of the 8.4 M mantissas are one ulp off IEEE
    # special values: exact powers of two, zero, beyond 2^126
    x = torch.tensor([1.0, 2.0, 0.5, 0.0, 2.0**126, 2.0**126 * 1.5, 3.0e38])
    assert kernel.rcp_approx(x).tolist() == [1.0, 0.5, 2.0, float("inf"), 2.0**-126, 0.0, 0.0]


def _nested_map_digest(reference: dict) -> str:
    """The nested_quant_map the CUDA reference runs wrote (one table, in every double-quantized checkpoint)."""
    digests = {d for arch, runs in reference.items() if arch != "_about" for tensors in runs.values()
               for name, d in tensors.items() if name.endswith(".nested_quant_map")}
    assert len(digests) == 1, digests
    return digests.pop()


def _digest(t) -> str:
    import hashlib

    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)} " \
           f"{hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]}"


def test_code_tables_equal_bitsandbytes(reference):
    """quant_map and nested_quant_map are written into every checkpoint: bitsandbytes' own tables. The dynamic
    map is the one the CUDA reference hosts wrote; bitsandbytes builds that one with torch's vectorized CPU
    kernels (AVX2/AVX512) and one 1-2 ulps off it in 42 places with the scalar ones."""
    F = pytest.importorskip("bitsandbytes.functional")
    assert _digest(kernel.dynamic_map()) == _nested_map_digest(reference)
    theirs = F.create_dynamic_map()
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert torch.equal(kernel.dynamic_map(), theirs)
    else:
        assert int((kernel.dynamic_map().view(torch.int32) - theirs.view(torch.int32)).abs().max()) <= 2
    for qt in ("nf4", "fp4"):
        assert torch.equal(kernel.quant_map(qt), F.get_4bit_type(qt, device="cpu"))


def test_dynamic_map_is_the_same_on_any_cpu(reference, tmp_path):
    """torch's scalar CPU kernels (ATEN_CPU_CAPABILITY=default: a CPU without AVX2, or one told so) round
    torch.linspace differently; qtool's map, written into every double-quantized checkpoint, stays the
    reference hosts' one (it was 42 values off there: the checkpoints differed from the CUDA oracle's)."""
    import subprocess
    import sys

    code = ("import hashlib, torch\n"
            "from qtool.quantize.kernel import dynamic_map\n"
            "m = dynamic_map()\n"
            "print(torch.backends.cpu.get_cpu_capability(),"
            " hashlib.sha256(m.view(torch.uint8).numpy().tobytes()).hexdigest()[:16])\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    capability, digest = proc.stdout.split()
    assert capability == "DEFAULT"
    assert f"float32 [256] {digest}" == _nested_map_digest(reference)


def _bnb_cpu(t, bs, qt, dq=False):
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(t, blocksize=bs, quant_type=qt, compress_statistics=dq)
    return packed, state


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), bs=st.sampled_from([64, 128, 256]),
       dtype=st.sampled_from(["float16", "bfloat16", "float32"]), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**31 - 1))
def test_nf4_without_double_quant_equals_bitsandbytes_cpu(rows, cols, bs, dtype, scale, seed):
    """Where bitsandbytes' CPU kernel is known to agree with CUDA: the packed codes and absmax."""
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(rows, cols, generator=g) * scale).to(DT[dtype])
    ours = kernel.quantize_4bit(t, blocksize=bs, quant_type="nf4")
    packed, state = _bnb_cpu(t, bs, "nf4")
    assert torch.equal(ours[""], packed)
    assert torch.equal(ours[".absmax"], state.absmax)
    assert torch.equal(ours[".quant_map"], state.code)


def _dquantize_literal(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """kernels.cu dQuantize<0> transcribed step by step (pivot 127, seven halvings, midpoints)."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_p, upper_p = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        gt = x > val
        lower_p, lower = torch.where(gt, pivot, lower_p), torch.where(gt, val, lower)
        upper_p, upper = torch.where(gt, upper_p, pivot), torch.where(gt, upper, val)
        pivot = pivot + torch.where(gt, i, -i)
        val = code[pivot]
        i //= 2
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    up = torch.where(x > (upper + val) * 0.5, upper_p, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_p, pivot)
    return torch.where(x > val, up, down).to(torch.uint8)


def test_8bit_search_is_the_kernels_binary_search():
    """The closed form in quantize_blockwise_8bit against a literal transcription of dQuantize, at
    every dynamic-map value and midpoint and their float neighbours (block absmax 1: x is the value)."""
    code = kernel.dynamic_map()
    mids = (code[1:] + code[:-1]) * 0.5
    vals = [code, mids, torch.rand(20000) * 2 - 1]
    for direction in (2.0, -2.0):
        a, b = code, mids
        for _ in range(2):
            a, b = torch.nextafter(a, torch.full_like(a, direction)), torch.nextafter(b, torch.full_like(b, direction))
            vals += [a, b]
    v = torch.cat(vals).clamp(-1, 1)
    v = torch.cat([torch.ones(1), v])  # every 256-block needs absmax exactly 1
    v = torch.cat([torch.cat([torch.ones(1), v[i:i + 255]]) for i in range(0, v.numel(), 255)])
    q, absmax = kernel.quantize_blockwise_8bit(v)
    assert torch.equal(absmax, torch.ones_like(absmax))
    assert torch.equal(q, _dquantize_literal(v, code))


@pytest.mark.parametrize("n", [1, 5, 64, 127, 128, 131, 4096, 100_000, 131_072, 1_000_003])
def test_cuda_mean_is_a_sum_of_fp32_additions(n):
    """Not the CPU's answer bit for bit, but within rounding of the exact mean; the CUDA bits are what
    tests/data/cuda_reference.json checks (llama-wide covers the several-CTA case)."""
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g)
    got = kernel.cuda_mean(x)
    exact = x.double().mean()
    assert got.dtype == torch.float32
    assert abs(float(got) - float(exact)) <= 1e-6 * float(exact)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_input_is_refused(bad):
    t = torch.randn(1000)
    t[777] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        kernel.quantize_4bit(t)


def test_quantize_tensor_on_cpu_uses_the_kernel_and_never_imports_bitsandbytes(qtool_forks, hermetic_env):
    """In a process of its own that has imported torch and transformers, never bitsandbytes (conftest's
    qtool_forks): CPU quantization needs no bitsandbytes (its import costs seconds)."""
    code = ("import sys, torch\nfrom qtool.core.config import QuantSettings\nfrom qtool.quantize.stream import quantize_tensor\n"
            "p = quantize_tensor(torch.randn(64, 64), settings=QuantSettings())\n"
            "print(sorted(p), 'bitsandbytes' in sys.modules)")
    child = qtool_forks.python(code, cwd=Path(__file__).parents[2], env=hermetic_env)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip().endswith("False")
    assert "'.nested_absmax'" in out


def test_quantize_tensor_matches_kernel_parts():
    t = torch.randn(33, 70)
    parts = quantize_tensor(t, settings=QuantSettings(quant_type="fp4", double_quant=True, blocksize=128))
    direct = kernel.quantize_4bit(t, blocksize=128, quant_type="fp4", double_quant=True)
    assert list(parts) == list(direct)
    assert all(torch.equal(parts[k], direct[k]) for k in parts)


def test_fp4_sign_follows_the_gpus_flush_of_tiny_products():
    """Products near -2^-126: the GPU's own FMUL.FTZ results (recorded on an H200) decide FP4's sign bit.
    These are cases IEEE rounds to -2^-126 and the GPU keeps; a flush before rounding would drop them."""
    data = json.loads((Path(__file__).parents[1] / "data" / "ftz_edges.json").read_text())["cases"]
    x = torch.tensor([float.fromhex(c["x"]) for c in data], dtype=torch.float32)
    inv = torch.tensor([float.fromhex(c["inv"]) for c in data], dtype=torch.float32)
    gpu = torch.tensor([float.fromhex(c["gpu_mul_ftz"]) for c in data], dtype=torch.float32)
    y = x * inv
    assert int((y == -kernel.FLT_MIN).sum()) >= 10  # the edge is really exercised
    assert bool(((x.double() * inv.double()).abs() < kernel.FLT_MIN)[y == -kernel.FLT_MIN].all())
    codes = kernel._codes(y, x, "fp4", inv)
    assert torch.equal((codes >> 3).bool(), gpu < 0)


def _hard_values(dtype, seed: int) -> torch.Tensor:
    """Random weights, then blocks of values at every NF4/FP4 threshold (times the block's own inverse) and
    their neighbours, zero blocks, dtype subnormals, fp32-subnormal scales, an odd tail."""
    g = torch.Generator().manual_seed(seed)
    thresholds = torch.tensor(kernel.NF4_THRESHOLDS + kernel.FP4_THRESHOLDS
                              + tuple(-t for t in kernel.FP4_THRESHOLDS), dtype=torch.float32)
    parts = [torch.randn(64 * 40, generator=g) * 0.02]
    for a in (1.0, 3.0, 0.37, 2.0**-20):
        inv = kernel.rcp_approx(torch.tensor([a]))[0]
        base = (thresholds / inv).to(dtype).float()
        near = [base, torch.nextafter(base, torch.full_like(base, 9.0)), torch.nextafter(base, torch.full_like(base, -9.0))]
        for v in near:
            blk = torch.zeros(64)
            blk[0] = a
            blk[1:1 + v.numel()] = v.clamp(-a, a)
            parts.append(blk)
    parts.append(torch.zeros(256 * 3))  # every part so far is a multiple of 256 long: whole blocks at any size
    parts.append(torch.randn(64 * 4, generator=g) * torch.finfo(dtype).tiny)
    parts.append(torch.randn(64 * 4, generator=g) * 2.0**-127)  # fp32 subnormals (zero in fp16/bf16)
    parts.append(torch.randn(37, generator=g))
    return torch.cat(parts).to(dtype)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [64, 128, 256])
@pytest.mark.parametrize("dtype", list(DT))
def test_device_path_equals_the_table_path(qt, bs, dtype):
    """What a CUDA tensor takes (_pack_device: the elementwise definition, chunked) gives the same bytes as the
    CPU's table path on the same values; here both run on the CPU, and bench/kernel_vs_cuda.py --device cuda
    compares the device path on the GPU with bitsandbytes' own CUDA kernel."""
    flat = _hard_values(DT[dtype], seed=bs)
    nb = -(-flat.numel() // bs)
    packed_cpu, absmax_cpu = kernel._pack_cpu(flat, nb, bs, qt, 1 << 12)
    packed_dev, absmax_dev = kernel._pack_device(flat, nb, bs, qt, 1 << 10)
    assert torch.equal(absmax_cpu, absmax_dev)
    assert torch.equal(packed_cpu, packed_dev)
    assert int((absmax_cpu == 0).sum()) >= 3  # the zero blocks are there


def test_device_path_refuses_non_finite():
    t = torch.randn(4096)
    t[1000] = float("nan")
    with pytest.raises(kernel.NonFiniteError):
        kernel._pack_device(t, 64, 64, "nf4", 1 << 10)
