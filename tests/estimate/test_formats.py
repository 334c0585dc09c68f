"""qtool.estimate.formats predicts, byte for byte, what transformers + bitsandbytes save for 4-bit models.

Tiny Llama, GPT-2 (Conv1D) and tied Qwen2 models are quantized with transformers' own path
(from_pretrained(quantization_config=BitsAndBytesConfig(...)) + save_pretrained) and every saved
tensor is compared with the prediction.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from qtool.estimate import formats  # noqa: E402
from qtool.estimate.formats import FORMATS, quant_state_blob, quantized_parts, weights_for_format  # noqa: E402

TINY = {
    "llama": dict(model_type="llama", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "qwen2": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for name, kw in TINY.items():
        kw = dict(kw)
        cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path
    return out


def _saved(path):
    """name -> (dtype, shape, nbytes, tensor) for every tensor of model.safetensors, and the file size."""
    from safetensors import safe_open

    file = path / "model.safetensors"
    tensors = {}
    with safe_open(file, "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            tensors[k] = t
    return tensors, os.path.getsize(file)


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("key", ["nf4", "nf4_dq", "fp4", "fp4_dq"])
def test_predicted_bytes_equal_saved(sources, tmp_path, arch, key):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qtool.core.meta import build_plan

    fmt = FORMATS[key]
    src = sources[arch]
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=fmt.quant_type, bnb_4bit_use_double_quant=fmt.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16))
    q.save_pretrained(tmp_path / "q")
    saved, file_size = _saved(tmp_path / "q")
    plan = build_plan(json.loads((src / "config.json").read_text()))

    # Every tensor qtool predicts exists with the predicted dtype/shape; nothing else was saved.
    blob_key = f"quant_state.bitsandbytes__{fmt.quant_type}"
    predicted = {}
    offsets = {}
    for t in plan.tensors:
        if t.action == "quantize":
            prefix = t.name[: -len(".weight")]
            blob = saved[f"{prefix}.weight.{blob_key}"]
            offsets[prefix] = json.loads(bytes(blob.tolist()).decode()).get("nested_offset")
            for p in formats.saved_parts(quantized_parts(t.shape, fmt, dtype="bfloat16", offset=offsets[prefix])):
                predicted[prefix + p.suffix] = p
        else:
            predicted[t.name] = formats.Part("", "bfloat16", t.shape)
    assert set(predicted) == set(saved)
    for name, part in predicted.items():
        t = saved[name]
        assert t.numel() * t.element_size() == part.nbytes, name
        assert str(t.dtype) == f"torch.{part.dtype}", name

    # The whole file, from the plan alone: tensor data exact except the double-quant offset's digits.
    w = weights_for_format(plan, key, dtype="bfloat16")
    data = sum(t.numel() * t.element_size() for t in saved.values())
    blobs = [k for k in saved if k.endswith(blob_key)]
    if fmt.double_quant:
        assert abs(w.data - data) <= 4 * len(blobs)
    else:
        assert w.data == data
        assert w.checkpoint == file_size  # header exact too
    assert abs(w.checkpoint - file_size) <= 8 * len(blobs) + 8


def test_quant_state_blob_matches_bitsandbytes():
    """Our JSON is QuantState.as_dict(packed=True)'s JSON, for several shapes, types and block sizes."""
    import bitsandbytes.functional as F

    for shape, qt, bs, dq in [((96, 64), "nf4", 64, True), ((64, 32), "fp4", 128, False), ((5, 7), "nf4", 32, False)]:
        torch.manual_seed(1)
        w = torch.randn(shape, dtype=torch.bfloat16)
        _, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type=qt)
        packed = state.as_dict(packed=True)
        blob = bytes(packed[f"quant_state.bitsandbytes__{qt}"].tolist()).decode()
        offset = json.loads(blob).get("nested_offset")
        assert quant_state_blob(shape, qt, blocksize=bs, dtype="bfloat16", double_quant=dq, offset=offset) == blob
        parts = {p.suffix.removeprefix(".weight").removeprefix("."): p for p in
                 quantized_parts(shape, FORMATS[qt + ("_dq" if dq else "")], blocksize=bs)}
        for k, v in packed.items():
            if k.startswith("quant_state."):
                continue
            assert v.numel() * v.element_size() == parts[k].nbytes, k
        q, _ = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type=qt)
        assert q.numel() * q.element_size() == parts[""].nbytes


def test_int8_parts_follow_linear8bitlt():
    """LLM.int8: int8 weight, one fp32 scale per output row, a 0-d uint8 weight_format."""
    parts = {p.suffix: p for p in quantized_parts((1024, 4096), FORMATS["int8"])}
    assert parts[".weight"].nbytes == 1024 * 4096
    assert parts[".SCB"].nbytes == 1024 * 4
    assert parts[".weight_format"].nbytes == 1


def test_safetensors_header_exact(tmp_path, safetensors_bytes):
    from safetensors.torch import save_file

    tensors = {"b.weight": torch.zeros(3, 5, dtype=torch.bfloat16), "a.absmax": torch.zeros(7, dtype=torch.float32),
               "a.x": torch.zeros(1000, 2, dtype=torch.uint8), "c": torch.zeros((), dtype=torch.uint8)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    n = safetensors_bytes.header_length(tmp_path / "m.safetensors")
    entries = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()]
    assert formats.safetensors_header_bytes(entries) == 8 + n


def test_gpu_bytes_round_to_allocator_blocks():
    parts = quantized_parts((4096, 4096), FORMATS["nf4_dq"])
    # packed 8 MiB, absmax 256 KiB, nested absmax 4 KiB, nested code 1 KiB, code 64 B -> 512, offset 4 B -> 512
    assert formats.gpu_bytes(parts) == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4096 + 1024 + 512 + 512


@pytest.mark.parametrize("seed", range(6))
def test_safetensors_header_exact_for_random_tensor_sets(seed, tmp_path, safetensors_bytes):
    """Names that json must escape, every dtype, 0-d and empty tensors, offsets crossing digit counts."""
    import random

    from safetensors.torch import save_file

    rng = random.Random(seed)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int8, torch.int32, torch.int64]
    alphabet = "abcxyz0129._-" + '"\\/é\t'
    tensors = {}
    for _ in range(rng.randint(1, 40)):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        shape = tuple(rng.choice([0, 1, 3, 64, 333]) for _ in range(rng.randint(0, 2)))  # <= 887 KB each
        tensors[name] = torch.zeros(shape, dtype=rng.choice(dtypes))
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    n = safetensors_bytes.header_length(tmp_path / "m.safetensors")
    entries = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()]
    assert formats.safetensors_header_bytes(entries) == 8 + n


def test_safetensors_header_of_groups_equals_their_tensors_one_by_one():
    """A plan's groups go in as (name, dtype, shape, count): the same bytes as count entries in a row, whose
    offsets cross digit counts (the sum over a group is an arithmetic series)."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        names = rng.sample(["a", "b.c", "x\"y", "é", "model.layers.0.q", "model.norm"], rng.randint(1, 6))
        groups = [(n, rng.choice(["bfloat16", "float32", "uint8", "int64"]),
                   tuple(rng.choice([0, 1, 7, 333, 99999]) for _ in range(rng.randint(0, 2))), rng.randint(1, 300))
                  for n in names]
        one_by_one = [g[:3] for g in groups for _ in range(g[3])]
        assert formats.safetensors_header_bytes(groups) == formats.safetensors_header_bytes(one_by_one)
