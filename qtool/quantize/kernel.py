"""bitsandbytes' CUDA 4-bit quantizer, reproduced bit for bit in vectorized torch (CPU or CUDA tensors).

The reference is what `bitsandbytes.functional.quantize_4bit` writes on an NVIDIA GPU (bitsandbytes
0.50, torch 2.11, H100/H200); published `*-bnb-4bit` checkpoints hold exactly that. Read from
csrc/kernels.cu (kQuantizeBlockwise, kQuantizeBlockwiseSmall, dQuantizeNF4/FP4, dQuantize) and the
SASS of the shipped libbitsandbytes_cuda130.so (sm_90), which is built with --use_fast_math:

- absmax per block: FMNMX.FTZ of |x| in fp32, so fp32 denormals count as zero (`_ftz`).
- its inverse is MUFU.RCP (rcp.approx.ftz.f32), not an IEEE division: 1 ulp off the correctly
  rounded 1/x for 13% of mantissas. The hardware's answers for all 2^23 mantissas were read on an
  H200 and are stored as ulp offsets from IEEE in qtool/quantize/data/mufu_rcp.bin (`rcp_approx`).
- x * inverse is FMUL.FTZ (IEEE product, subnormal results flushed), then the NF4/FP4 decision
  trees compare with FSETP.GT.FTZ against their fp32 constants as compiled; a block whose absmax is
  0 gives 0 * inf = NaN, and NaN falls to code 0 in both trees. Two codes per byte, first in the
  high nibble; an odd tail is padded with 0 quantized by the block's inverse.
- double quant: offset = absmax.mean() as torch's CUDA reduction computes it (`cuda_mean`: four
  accumulators per thread over float4 loads, a tree over up to 512 lanes, across CTAs for large
  inputs, then times fl(1/n)), then (absmax - offset) quantized 8-bit in blocks of 256 against the
  dynamic map by kQuantizeBlockwise's binary search with its midpoint rounding.

bitsandbytes' own CPU kernel differs from this in the double-quant and FP4 roundings. On a CUDA tensor
the same definition runs on the device (`_pack_device`), so a CUDA run needs no bitsandbytes import
(2-3 s); bench/kernel_vs_cuda.py --device cuda checks it against bitsandbytes' kernel. Non-finite input
is refused.
"""

from __future__ import annotations

import json
import threading
import zlib
from functools import lru_cache
from pathlib import Path

import torch

FLT_MIN = 2.0**-126
_RCP_TABLE = Path(__file__).parent / "data" / "mufu_rcp.bin"

# dQuantizeNF4's decision tree is a binary search over these 15 thresholds (code = how many lie strictly
# below x); dQuantizeFP4's over these 7 for |x|, mapped to the FP4 code, plus the sign bit. The values
# are the fp32 constants in the compiled kernel's SASS: nvcc rounded four of the source's decimal
# literals (-0.8480964004993439f, ...) to the other neighbour than Python's float32 rounding does.
NF4_THRESHOLDS = (-0.84809643030166625977, -0.61063289642333984375, -0.459995269775390625, -0.33967941999435424805,
                  -0.23460739850997924805, -0.13791173696517944336, -0.045525018125772476196,
                  0.039790149778127670288, 0.12025525420904159546, 0.20352125167846679688, 0.29201376438140869141,
                  0.38931253552436828613, 0.50166338682174682617, 0.64278692007064819336, 0.86147838830947875977)
FP4_THRESHOLDS = (0.0026041700039058923721, 0.0859375, 0.20833332836627960205, 0.2916666567325592041,
                  0.4166666865348815918, 0.58333301544189453125, 0.8333333134651184082)
_FP4_CODE = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
_NF4 = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32)
_FP4 = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32)
_FP4_LOOKUP = torch.tensor(_FP4_CODE, dtype=torch.uint8)
NF4_MAP = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0)
FP4_MAP = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
NESTED_BLOCKSIZE = 256
# bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 127 positive values (as float32
# bits; the map is them, their negatives, 0 and 1.0, sorted). bitsandbytes computes them with torch.linspace on
# the CPU, whose vectorized kernel (AVX2/AVX512, every reference CUDA host) rounds differently from its scalar one
# (ATEN_CPU_CAPABILITY=default, a CPU without them): 42 of the 256 values 1-2 ulps apart. The map is written into every
# double-quantized checkpoint, so qtool keeps the reference hosts' values whatever CPU it runs on.
DYNAMIC_MAP_POSITIVE_BITS = (
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b, 0x398ce705,
    0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d, 0x3af1a9fc, 0x3b1db22d,
    0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a,
    0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a,
    0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1,
    0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b,
    0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85,
    0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000, 0x3eb13333,
    0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a, 0x3eeacccc, 0x3ef20000,
    0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334, 0x3f15cccd, 0x3f196666,
    0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd,
    0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333,
    0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a,
    0x3f7e3333,
)
_SEGMENT = 8  # elements decided together when a table lookup is undecided (one int64 word of codes)
_TOP_BITS = -0x7F7F7F7F7F7F7F80  # 0x8080808080808080 as an int64
_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
# Blocks with a smaller absmax (all-zero ones, subnormals that could reach a nonzero code) take the
# exact path; above it a subnormal x gives |y| < 2^-126 * 2^26 = 2^-100, which the tables set apart.
_SMALL_ABSMAX = 2.0**-26
# torch's CUDA reduction sizes its grid from the device; the reference cards (H100, H200) have these.
H100_SMS, H100_THREADS_PER_SM = 132, 2048
# Values a GPU chunk takes at once (_pack_device): ~0.5 GB of fp32/fp64 temporaries on the device at most.
DEVICE_CHUNK_ELEMENTS = 1 << 24


def quant_map(quant_type: str) -> torch.Tensor:
    """get_4bit_type(quant_type): the 16 code values, FP4's divided by its absmax as bitsandbytes does."""
    data = torch.tensor(NF4_MAP if quant_type == "nf4" else FP4_MAP)
    return data.div_(data.abs().max())


@lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) as the reference hosts build it (see
    DYNAMIC_MAP_POSITIVE_BITS): the same 256 values on any CPU."""
    positive = torch.tensor(DYNAMIC_MAP_POSITIVE_BITS, dtype=torch.int32).view(torch.float32)
    return torch.cat([-positive.flip(0), torch.zeros(1), positive, torch.ones(1)])


@lru_cache(maxsize=1)
def _rcp_delta() -> torch.Tensor:
    """MUFU.RCP minus IEEE 1/x, in ulps, for x = 1 + m * 2^-23 (m < 2^23); scaling x by 2^k scales both."""
    if not _RCP_TABLE.exists():
        raise FileNotFoundError(f"{_RCP_TABLE} is missing: qtool's install is incomplete")
    raw = zlib.decompress(_RCP_TABLE.read_bytes())
    return torch.frombuffer(bytearray(raw), dtype=torch.int8).to(torch.int32)


_ON_DEVICE: dict[tuple[str, str], torch.Tensor] = {}


def _on(name: str, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`table` where the data is (the constants live on the CPU; a CUDA run copies each once)."""
    if device.type == "cpu":
        return table
    key = (name, str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = table.to(device)
    return _ON_DEVICE[key]


def _ftz(x: torch.Tensor) -> torch.Tensor:
    """Subnormals to sign-preserving zero, as every .ftz instruction of the kernel does."""
    return torch.where(x.abs() < FLT_MIN, x * 0, x)


def rcp_approx(a: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of non-negative fp32 `a` (already flushed): 0 -> inf, above 2^126 -> 0."""
    inv = torch.reciprocal(a)
    normal = (a >= FLT_MIN) & (a <= 2.0**126)
    if bool(normal.any()):
        m = (a.view(torch.int32) & 0x7FFFFF).long()
        bits = inv.view(torch.int32) + torch.where(normal, _on("rcp", _rcp_delta(), a.device)[m], 0)
        inv = bits.view(torch.float32)
    return torch.where(a > 2.0**126, torch.zeros_like(inv), inv)


def _tree(v: torch.Tensor, upward: bool) -> torch.Tensor:
    """block_x_reduce over the last dim (a power of two): shared-memory halving down to a warp, then
    the shuffle tree (torch 2.11 halves, checked on an H200; older torch paired neighbours)."""
    while v.shape[-1] > 32:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    while v.shape[-1] > 1:
        if upward:
            v = v[..., 0::2] + v[..., 1::2]
        else:
            half = v.shape[-1] // 2
            v = v[..., :half] + v[..., half:]
    return v[..., 0]


def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def cuda_mean(x: torch.Tensor, *, sms: int = H100_SMS, threads_per_sm: int = H100_THREADS_PER_SM,
              upward_shuffle: bool = False) -> torch.Tensor:
    """`x.mean()` of a 1-D contiguous, 16-byte aligned fp32 CUDA tensor, in torch's order (Reduce.cuh
    setReduceConfig / input_vectorized_thread_reduce_impl / block_x_reduce / global_reduce, MeanOps):
    every step an fp32 addition, so the same bits on any machine."""
    x = x.reshape(-1).float()
    n = x.numel()
    vec = 4 if n >= 128 else 1
    width = min(_last_pow2(n // vec), 512)  # lanes of one CTA (block height is 1 for one output)
    values_per_thread = -(-n // width)  # as setReduceConfig counts them (values, not float4s)
    ctas = 1
    if values_per_thread >= 256:  # split across CTAs: min 16, max 256 values a thread, fill the card
        target = sms * (threads_per_sm // width)
        ctas = max(min(target, -(-values_per_thread // 16)), -(-values_per_thread // 256))
    stride = width * ctas  # threads; thread (cta c, lane l) starts at l + c * width
    if vec == 4:
        nvec = n // 4
        rows = -(-nvec // stride)
        v = torch.zeros(rows * stride, 4, dtype=torch.float32)
        v[:nvec] = x[: nvec * 4].view(nvec, 4)
        acc = torch.zeros(stride, 4, dtype=torch.float32)
        for r in range(rows):  # each thread's 4 accumulators, one per position in the float4
            acc += v[r * stride:(r + 1) * stride]
        tail = x[nvec * 4:]
        acc[: tail.numel(), 0] += tail  # lanes of CTA 0 take the tail
        per_thread = ((acc[:, 0] + acc[:, 1]) + acc[:, 2]) + acc[:, 3]
    else:  # n < 128: one CTA, unvectorized, accumulator i takes the i-th stride step (at most two)
        acc = torch.zeros(4, stride, dtype=torch.float32)
        for i in range(-(-n // stride)):
            part = x[i * stride:(i + 1) * stride]
            acc[i % 4, : part.numel()] += part
        per_thread = ((acc[0] + acc[1]) + acc[2]) + acc[3]
    per_cta = _tree(per_thread.view(ctas, width), upward_shuffle)
    if ctas > 1:  # the last CTA: lane l sums staging[l], staging[l + width], ... then the same tree
        lanes = torch.zeros(width, dtype=torch.float32)
        for start in range(0, ctas, width):
            part = per_cta[start:start + width]
            lanes[: part.numel()] += part
        total = _tree(lanes, upward_shuffle)
    else:
        total = per_cta[0]
    factor = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(n), dtype=torch.float32)
    return total * factor


def _dquantize(x: torch.Tensor) -> torch.Tensor:
    """dQuantize<0> against the dynamic map, in closed form: the seven halvings compare x with the odd
    entries 127, 63|191, ... and stop on an even pivot p with code[p-1] < x <= code[p+1]; then x goes
    to the nearer neighbour by fp32 midpoints. (tests/quantize/test_kernel.py holds the literal transcription.)"""
    code = _on("dynamic_map", dynamic_map(), x.device)
    pivot = 2 * torch.bucketize(x, code[1:254:2].contiguous(), out_int32=True).long()
    pivot[torch.isnan(x)] = 0  # a zero block (0 * inf): every comparison false
    val = code[pivot]
    upper = code[(pivot + 1).clamp(max=255)]
    lower = code[(pivot - 1).clamp(min=0)]
    up = torch.where(x > (upper + val) * 0.5, pivot + 1, pivot)
    down = torch.where(x < (lower + val) * 0.5, (pivot - 1).clamp(min=0), pivot)
    return torch.where(x > val, up, down).to(torch.int16)


@lru_cache(maxsize=1)
def _dquantize_table() -> torch.Tensor:
    """_dquantize by the top 20 bits of x, -1 where the bucket holds two codes (or is not finite)."""
    keys = torch.arange(1 << 20, dtype=torch.int32) << 12
    lo, hi = keys.view(torch.float32), (keys | 0xFFF).view(torch.float32)
    c_lo, c_hi = _dquantize(lo), _dquantize(hi)
    table = torch.where(c_lo == c_hi, c_lo, -1)
    table[~torch.isfinite(lo) | ~torch.isfinite(hi)] = -1
    return table


def quantize_blockwise_8bit(a: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """kQuantizeBlockwise<float, 256, 2, 0, General8bit>: (uint8 codes, fp32 absmax) of 1-D fp32 `a`, on
    its device."""
    n = a.numel()
    nb = -(-n // blocksize)
    v = torch.zeros(nb * blocksize, dtype=torch.float32, device=a.device)
    v[:n] = _ftz(a.reshape(-1).float())
    v = v.view(nb, blocksize)
    absmax = v.abs().amax(dim=1)
    x = _ftz(v * rcp_approx(absmax)[:, None]).reshape(-1)[:n]
    key = (x.view(torch.int32) >> 12) & 0xFFFFF
    codes = torch.index_select(_on("dquantize_table", _dquantize_table(), a.device), 0, key)
    undecided = (codes < 0).nonzero().squeeze(1)
    if undecided.numel():
        codes[undecided] = _dquantize(x[undecided])
    return codes.to(torch.uint8), absmax


def _codes(y: torch.Tensor, x: torch.Tensor, quant_type: str, inv: torch.Tensor | None = None) -> torch.Tensor:
    """NF4/FP4 codes (uint8) of y = x * inv. FP4's sign is y < 0 after FMUL.FTZ, which never sees a
    subnormal x and flushes a product that is tiny after rounding to 24 bits with an unbounded exponent:
    |x * inv| < 2^-126 - 2^-151, some of which IEEE rounds up to -2^-126 (H200: 24 of 24 such cases
    recorded by bench/kernel_vs_cuda.py --diagnose; tests/data/ftz_edges.json). NF4 codes do not change."""
    if quant_type == "nf4":
        return torch.bucketize(y, _on("nf4", _NF4, y.device), out_int32=True).to(torch.uint8)
    mag = torch.bucketize(y.abs(), _on("fp4", _FP4, y.device), out_int32=True)
    codes = _on("fp4_code", _FP4_LOOKUP, y.device)[mag]
    negative = (y <= -FLT_MIN) & (x <= -FLT_MIN)
    edge = y == -FLT_MIN
    if inv is not None and bool(edge.any()):  # the exact product (fp64 holds it) decides
        negative &= ~edge | (x.double() * inv.double() <= -(FLT_MIN - 2.0**-151))
    return codes | (negative.to(torch.uint8) << 3)


def _quantize_blocks_exact(blocks: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of (blocks, blocksize) elementwise as the kernel does, subnormals flushed."""
    xf = _ftz(blocks.float())
    absmax = xf.abs().amax(dim=1)
    inv = rcp_approx(absmax)[:, None].expand_as(xf)
    codes = _codes(xf * inv, xf, quant_type, inv)
    codes[absmax == 0] = 0  # 0 * inf = NaN: both decision trees answer code 0
    return codes.view(-1), absmax


@lru_cache(maxsize=2)
def _code_table(quant_type: str) -> torch.Tensor:
    """Code of y by the top 20 bits of its fp32 pattern (sign, exponent, 11 mantissa bits); 255 where
    the 4096 floats sharing them do not all get one code: a threshold inside, or for FP4 a negative y
    so small (|y| < 2^-100) that it may come from a subnormal x, which the GPU flushes to +0."""
    keys = torch.arange(1 << 20, dtype=torch.int32) << 12
    lo, hi = keys.view(torch.float32), (keys | 0xFFF).view(torch.float32)
    c_lo, c_hi = _codes(lo, lo, quant_type), _codes(hi, hi, quant_type)
    table = torch.where(c_lo == c_hi, c_lo, 255)
    table[~torch.isfinite(lo) | ~torch.isfinite(hi)] = 255
    if quant_type == "fp4":
        table[(hi <= -FLT_MIN) & (lo > -(2.0**-100))] = 255
    return table


class _Scratch:
    """Buffers reused from chunk to chunk, so a tensor of any size costs a few MB of temporaries."""

    def __init__(self, elements: int):
        self.y = torch.empty(elements, dtype=torch.float32)
        self.key = torch.empty(elements, dtype=torch.int32)
        self.codes = torch.empty(elements, dtype=torch.uint8)


class NonFiniteError(ValueError):
    """The tensor holds inf or NaN (found from the block maxima, so finite tensors pay no extra pass)."""


def _quantize_chunk(blocks: torch.Tensor, quant_type: str, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of (blocks, blocksize): fp32 product, then a table lookup on its bit pattern."""
    # |x| orders like its bit pattern without the sign bit: one integer max per block (NaN stays NaN)
    ints = _INT_OF[blocks.dtype]
    absmax = (blocks.view(ints) & torch.iinfo(ints).max).amax(dim=1).view(blocks.dtype).float()
    if not bool(torch.isfinite(absmax).all()):
        raise NonFiniteError("cannot quantize a tensor holding inf or NaN")
    if bool((absmax < _SMALL_ABSMAX).any()):  # zero blocks, subnormals that count: the exact path
        return _quantize_blocks_exact(blocks, quant_type)
    n = blocks.numel()
    y = scratch.y[:n].view(blocks.shape)
    y.copy_(blocks)
    inv = rcp_approx(absmax)
    y.mul_(inv[:, None])
    key = scratch.key[:n]
    torch.bitwise_right_shift(y.view(torch.int32).view(-1), 12, out=key)
    key.bitwise_and_(0xFFFFF)
    codes = scratch.codes[:n]
    torch.index_select(_code_table(quant_type), 0, key, out=codes)
    # only 255 has the top bit: 8 codes per int64 word, a word with one of them is decided exactly
    undecided = (codes.view(torch.int64) & _TOP_BITS).nonzero().squeeze(1)
    if undecided.numel():
        rows = codes.view(-1, _SEGMENT)
        inv_rows = inv[undecided * _SEGMENT // blocks.shape[1]][:, None].expand(-1, _SEGMENT)
        rows[undecided] = _codes(y.view(-1, _SEGMENT)[undecided], blocks.reshape(-1, _SEGMENT)[undecided].float(),
                                 quant_type, inv_rows)
    return codes, absmax


def _parallel(fn, jobs: list, workers: int) -> None:
    """fn(job) for every job on `workers` Python threads taking jobs in turn (torch releases the GIL),
    each thread with one intra-op thread."""
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(fn, jobs))
    finally:
        torch.set_num_threads(threads)


def _pack_cpu(flat: torch.Tensor, nb: int, blocksize: int, quant_type: str,
              chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, fp32 absmax) of a CPU tensor: table lookups, chunks in parallel threads."""
    n = flat.numel()
    absmax = torch.empty(nb, dtype=torch.float32)
    packed = torch.empty(nb * blocksize // 2, dtype=torch.uint8)
    chunk_blocks = max(1, chunk_elements // blocksize)
    starts = list(range(0, nb, chunk_blocks))

    local = threading.local()

    def run(b0: int) -> None:
        if not hasattr(local, "scratch"):  # bounded temporaries, reused by this thread
            local.scratch = _Scratch(min(nb, chunk_blocks) * blocksize)
        b1 = min(nb, b0 + chunk_blocks)
        part = flat[b0 * blocksize:min(n, b1 * blocksize)]
        if part.numel() < (b1 - b0) * blocksize:  # last block: padded with zeros the kernel also quantizes
            part = torch.cat([part, part.new_zeros((b1 - b0) * blocksize - part.numel())])
        codes, absmax[b0:b1] = _quantize_chunk(part.view(-1, blocksize), quant_type, local.scratch)
        pairs = codes.view(torch.int16)  # little-endian: first code in the low byte
        packed[b0 * blocksize // 2:b1 * blocksize // 2] = ((pairs & 0x0F) << 4) | (pairs >> 8)

    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:  # chunks in parallel, one torch thread each: most ops here are too short to split
        _code_table(quant_type), _rcp_delta()
        _parallel(run, starts, workers)
    else:
        for b0 in starts:
            run(b0)
    return packed, absmax


def _pack_device(flat: torch.Tensor, nb: int, blocksize: int, quant_type: str,
                 chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same on a CUDA tensor, on the device: the elementwise definition (_quantize_blocks_exact), whose
    every step is an IEEE fp32 operation torch gives the same bits for on any device, chunk by chunk to
    bound the temporaries. bench/kernel_vs_cuda.py --device cuda checks it against bitsandbytes there."""
    n = flat.numel()
    absmax = torch.empty(nb, dtype=torch.float32, device=flat.device)
    packed = torch.empty(nb * blocksize // 2, dtype=torch.uint8, device=flat.device)
    chunk_blocks = max(1, chunk_elements // blocksize)
    for b0 in range(0, nb, chunk_blocks):
        b1 = min(nb, b0 + chunk_blocks)
        part = flat[b0 * blocksize:min(n, b1 * blocksize)]
        if part.numel() < (b1 - b0) * blocksize:  # last block: padded with zeros the kernel also quantizes
            part = torch.cat([part, part.new_zeros((b1 - b0) * blocksize - part.numel())])
        codes, amax = _quantize_blocks_exact(part.view(-1, blocksize), quant_type)
        if not bool(torch.isfinite(amax).all()):
            raise NonFiniteError("cannot quantize a tensor holding inf or NaN")
        absmax[b0:b1] = amax
        pairs = codes.view(torch.int16)  # little-endian: first code in the low byte
        packed[b0 * blocksize // 2:b1 * blocksize // 2] = ((pairs & 0x0F) << 4) | (pairs >> 8)
    return packed, absmax


def quantize_4bit(t: torch.Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False,
                  quant_storage: torch.dtype = torch.uint8, chunk_elements: int = 1 << 20) -> dict[str, torch.Tensor]:
    """What `quantize_4bit` + `QuantState.as_dict(packed=True)` give on CUDA, for a CPU or CUDA tensor (the
    parts on its device):
    {"": packed weight, ".absmax", ".quant_map", [".nested_absmax", ".nested_quant_map"],
    ".quant_state.bitsandbytes__<type>"} — the parts Linear4bit saves."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"4-bit quantization takes float16, bfloat16 or float32, not {t.dtype}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be nf4 or fp4, not {quant_type!r}")
    if blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize {blocksize} is not one bitsandbytes' CUDA kernel has")
    flat = t.detach().reshape(-1)
    nb = -(-flat.numel() // blocksize)
    if flat.device.type == "cpu":
        packed, absmax = _pack_cpu(flat, nb, blocksize, quant_type, chunk_elements)
    else:
        packed, absmax = _pack_device(flat, nb, blocksize, quant_type, DEVICE_CHUNK_ELEMENTS)
    n = flat.numel()
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    rows = (n + 1) // (itemsize * 2)
    weight = packed[: rows * itemsize].view(quant_storage).view(rows, 1)
    state = {"quant_type": quant_type, "blocksize": blocksize,
             "dtype": str(t.dtype).strip("torch."), "shape": list(t.shape)}
    parts = {"": weight}
    device = flat.device
    if double_quant:  # on CUDA torch's own mean is the reference's (bitsandbytes calls absmax.mean() there)
        offset = cuda_mean(absmax) if device.type == "cpu" else absmax.mean()
        qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset)
        parts.update({".absmax": qabsmax, ".quant_map": quant_map(quant_type).to(device), ".nested_absmax": absmax2,
                      ".nested_quant_map": dynamic_map().clone().to(device)})
        state.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                      "nested_offset": offset.item()})
    else:
        parts.update({".absmax": absmax, ".quant_map": quant_map(quant_type).to(device)})
    blob = json.dumps(state).encode("utf-8")
    parts[f".quant_state.bitsandbytes__{quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    return parts
