"""Tiny source checkpoints made the same way on any machine, and digests of quantized checkpoints.

bench/kernel_vs_cuda.py runs transformers' own path (from_pretrained(quantization_config=...) +
save_pretrained) on CUDA over these sources and stores the digests in tests/data/cuda_reference.json;
tests/quantize/test_kernel.py rebuilds the same sources on the CPU, quantizes them with qtool and compares.
Every value comes from a CPU torch.Generator seeded per tensor name, so the sources do not depend on
transformers' init code, the device or the number of threads.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
ARCHS = {
    "llama": dict(model_type="llama", **SMALL),
    # odd sizes: 75 x 203 weights hold an odd number of values, not a multiple of any blocksize
    "llama-odd": dict(model_type="llama", hidden_size=75, intermediate_size=203, num_hidden_layers=1,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=16, vocab_size=256,
                      max_position_embeddings=128),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0,
                 eos_token_id=0),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **SMALL),
    # 1024 x 8192 MLP weights: 131072 absmax values at blocksize 64, where torch's CUDA mean spreads the
    # double-quant offset over several CTAs
    "llama-wide": dict(model_type="llama", hidden_size=1024, intermediate_size=8192, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=8, vocab_size=256, max_position_embeddings=128),
}
DTYPES = ("float16", "bfloat16", "float32")


def setting_key(qt: str, dq: bool, bs: int, dtype: str) -> str:
    return f"{qt}-{'dq' if dq else 'nodq'}-bs{bs}-{dtype}"


def settings_for(arch: str) -> list[tuple[str, bool, int, str]]:
    """(quant_type, double_quant, blocksize, source dtype) for each reference run of `arch`. Blocksize is
    always 64: transformers' BitsAndBytesConfig has no blocksize (Params4bit's default 64 is what it
    writes); other blocksizes are checked at the kernel level by bench/kernel_vs_cuda.py."""
    dtypes = DTYPES if arch == "llama" else ("bfloat16", "float16") if arch in ("llama-odd", "llama-wide") \
        else ("bfloat16", "float32")
    dqs = (True,) if arch == "llama-wide" else (True, False)
    return [(qt, dq, 64, dt) for qt in ("nf4", "fp4") for dq in dqs for dt in dtypes]


def make_source(arch: str, dtype: str, path: Path) -> Path:
    """config.json + model.safetensors for `arch` with deterministic random weights in `dtype`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(ARCHS[arch])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    cfg.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tensors = {}
    for name, p in model.state_dict().items():
        if "lm_head" in name and getattr(cfg, "tie_word_embeddings", False):
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(tuple(p.shape), generator=g, dtype=torch.float32)
        t = 1 + 0.1 * t if ("norm" in name or "ln_" in name) else 0.02 * t
        tensors[name] = t.to(getattr(torch, dtype)).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def checkpoint_digests(path: Path) -> dict[str, str]:
    """{tensor name: 'dtype shape sha256(bytes)[:16]'} over every *.safetensors file of a checkpoint."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k).contiguous()
                digest = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                out[k] = f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)} {digest[:16]}"
    return out


def load_reference(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def use_cuda_arithmetic_in_bitsandbytes(monkeypatch) -> None:
    """Make transformers' CPU path round like bitsandbytes on CUDA, so it can stand for the CUDA oracle.

    bitsandbytes' CPU kernel rounds FP4 values and the double-quant statistics differently from its
    CUDA kernel (the reference: what published *-bnb-4bit checkpoints hold). Tests that compare qtool
    with transformers' own from_pretrained + save_pretrained on the CPU check what transformers decides
    (which tensors, names, order, dtypes, config, file layout); for the bytes to be comparable the
    oracle's Params4bit must quantize with CUDA's arithmetic, which on a CPU is qtool.quantize.kernel. That
    arithmetic is checked against real CUDA output in test_kernel.py (tests/data/cuda_reference.json).
    """
    import bitsandbytes.functional as F
    import torch

    from qtool.quantize import kernel

    def quantize_4bit(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_type="fp4",
                      quant_storage=torch.uint8):
        if A.device.type != "cpu":
            raise AssertionError("only the CPU path is replaced")
        p = kernel.quantize_4bit(A, blocksize=blocksize or 64, quant_type=quant_type,
                                 double_quant=compress_statistics, quant_storage=quant_storage)
        state2 = None
        offset = None
        if compress_statistics:
            blob = json.loads(bytes(p[f".quant_state.bitsandbytes__{quant_type}"].tolist()))
            offset = torch.tensor(blob["nested_offset"], dtype=torch.float32)
            state2 = F.QuantState(absmax=p[".nested_absmax"], code=p[".nested_quant_map"],
                                  blocksize=kernel.NESTED_BLOCKSIZE, dtype=torch.float32)
        state = F.QuantState(absmax=p[".absmax"], shape=A.shape, dtype=A.dtype, blocksize=blocksize or 64,
                             code=p[".quant_map"], quant_type=quant_type, offset=offset, state2=state2)
        return p[""], state

    monkeypatch.setattr(F, "quantize_4bit", quantize_4bit)
