"""qtool quantize against transformers' own path, tensor for tensor (CPU).

Oracle: AutoModel*.from_pretrained(src, quantization_config=BitsAndBytesConfig(...), device_map="cpu")
followed by save_pretrained, with bitsandbytes' 4-bit arithmetic made CUDA's (bitsandbytes' CPU kernel
rounds FP4 and double-quant statistics differently from CUDA, whose bytes are the reference: see
reference_models.use_cuda_arithmetic_in_bitsandbytes and test_kernel.py, which checks that arithmetic
against digests of real CUDA output). qtool's output must hold the same tensor names, dtypes, shapes and bytes,
the same config.json, and load with a stock from_pretrained into a model giving the oracle's logits.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
torch.set_num_threads(1)

from qtool.core.config import QuantSettings  # noqa: E402
from qtool.core.errors import BadInput, WeightsError  # noqa: E402
from qtool.quantize import plan_quantization, run_quantization  # noqa: E402
import safetensors_bytes  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
CONFIGS = {
    "llama": dict(model_type="llama", **SMALL),
    "mistral": dict(model_type="mistral", **SMALL),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **SMALL),
    "gemma2": dict(model_type="gemma2", head_dim=16, **SMALL),
    "phi3": dict(model_type="phi3", pad_token_id=0, **SMALL),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **SMALL),
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=256, max_position_embeddings=128),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(autouse=True)
def _cuda_arithmetic(monkeypatch):
    from reference_models import use_cuda_arithmetic_in_bitsandbytes

    use_cuda_arithmetic_in_bitsandbytes(monkeypatch)


def _model_cls(arch):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if arch == "bert" else AutoModelForCausalLM


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random checkpoints, built on demand and cached: (arch, dtype) -> dir."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("src")
    cache: dict = {}

    def get(arch: str, dtype: str) -> Path:
        if (arch, dtype) not in cache:
            torch.manual_seed(0)
            kw = dict(CONFIGS[arch])
            cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
            model = _model_cls(arch).from_config(cfg).to(DTYPES[dtype])
            path = root / f"{arch}-{dtype}"
            model.save_pretrained(path)
            cache[(arch, dtype)] = path
        return cache[(arch, dtype)]

    return get


def _settings(qt="nf4", dq=True, compute="bfloat16", **kw) -> QuantSettings:
    return QuantSettings(quant_type=qt, double_quant=dq, compute_dtype=compute, **kw)


def _oracle_model(src: Path, arch: str, s: QuantSettings):
    return _model_cls(arch).from_pretrained(src, quantization_config=s.bnb_config(), device_map="cpu")


def _tensors(d: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _assert_same_checkpoint(ours: Path, oracle: Path) -> None:
    a, b = _tensors(ours), _tensors(oracle)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert torch.equal(a[k], b[k]), k
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((oracle / "config.json").read_text())
    assert ca["quantization_config"] == cb["quantization_config"]
    assert ca == cb
    assert sorted(p.name for p in oracle.glob("*.safetensors")) == sorted(p.name for p in ours.glob("*.safetensors"))


def _quantize(src: Path, dest: Path, s: QuantSettings, **kw):
    plan = plan_quantization(src, s)
    return plan, run_quantization(plan, dest, device="cpu", **kw)


LLAMA_MATRIX = [(d, qt, dq) for d in ("fp16", "bf16", "fp32") for qt, dq in (("nf4", True), ("fp4", False))]
LLAMA_MATRIX += [("bf16", "nf4", False), ("bf16", "fp4", True)]


@pytest.mark.parametrize("dtype,qt,dq", LLAMA_MATRIX)
def test_llama_matches_transformers(sources, tmp_path, dtype, qt, dq):
    src = sources("llama", dtype)
    s = _settings(qt, dq, compute="float16" if dtype == "fp16" else "bfloat16")
    _quantize(src, tmp_path / "ours", s)
    _oracle_model(src, "llama", s).save_pretrained(tmp_path / "oracle")
    _assert_same_checkpoint(tmp_path / "ours", tmp_path / "oracle")
    _assert_same_file_but_header_spaces(tmp_path / "ours/model.safetensors", tmp_path / "oracle/model.safetensors")


def _assert_same_file_but_header_spaces(ours: Path, oracle: Path) -> None:
    """Ours is written in place with room reserved for the header: the same JSON (padded with more spaces,
    still a multiple of 8) and the very same data bytes as safetensors' own serialization."""
    na, ha, da = safetensors_bytes.split(ours)
    nb, hb, db = safetensors_bytes.split(oracle)
    assert na % 8 == 0 and na >= nb
    assert ha == hb
    assert list(ha) == list(hb)  # same key order too
    assert da == db
    assert ours.read_bytes()[8:8 + na].rstrip(b" ") == oracle.read_bytes()[8:8 + nb].rstrip(b" ")


@pytest.mark.parametrize("arch,dtype,qt,dq", [
    ("mistral", "bf16", "nf4", True),
    ("qwen2", "fp16", "nf4", True),  # tied embeddings: lm_head saved once
    ("gemma2", "fp32", "nf4", True),
    ("phi3", "bf16", "fp4", False),  # fused qkv_proj / gate_up_proj Linear layers
    ("gpt2", "fp16", "nf4", True),  # Conv1D: transposed before quantizing
    ("mixtral", "bf16", "nf4", True),  # per-expert tensors kept (fused 3-D in transformers)
    ("bert", "fp32", "nf4", False),  # encoder, AutoModel
])
def test_architectures_match_transformers(sources, tmp_path, arch, dtype, qt, dq):
    src = sources(arch, dtype)
    s = _settings(qt, dq)
    plan, _ = _quantize(src, tmp_path / "ours", s)
    _oracle_model(src, arch, s).save_pretrained(tmp_path / "oracle")
    _assert_same_checkpoint(tmp_path / "ours", tmp_path / "oracle")
    if arch == "mixtral":
        assert any("MoE expert tensors" in w for w in plan.warnings)
        assert all(t.action == "keep" for t in plan.tensors if ".experts." in t.name)
    if arch == "qwen2":
        assert "lm_head.weight" not in _tensors(tmp_path / "ours")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_loads_and_gives_oracle_logits(sources, tmp_path, arch):
    src = sources(arch, "bf16")
    s = _settings()
    _quantize(src, tmp_path / "ours", s)
    cls = _model_cls(arch)
    ours = cls.from_pretrained(tmp_path / "ours", device_map="cpu")  # no quantization_config passed
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in ours.modules())
    oracle = _oracle_model(src, arch, s)
    ids = torch.tensor([[1, 5, 9, 42, 7, 100]])
    with torch.no_grad():
        a = ours(ids).logits
        b = oracle(ids).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _ambiguous_shard_size(plan) -> int:
    """A max_shard_size where a shard boundary depends on the quant-state blob lengths."""
    from qtool.quantize.plan import entry_specs
    from qtool.quantize.sink import split_shards

    specs = entry_specs(plan)
    return next(m for m in range(40_000, 80_000, 7) if split_shards(specs, m) is None)


@pytest.mark.parametrize("single_pass", [True, False])
def test_sharding_matches_save_pretrained(sources, tmp_path, single_pass):
    src = sources("llama", "bf16")
    s = _settings()
    size = 60_000 if single_pass else _ambiguous_shard_size(plan_quantization(src, s))
    _, res = _quantize(src, tmp_path / "ours", s, max_shard_size=size)
    assert res.single_pass is single_pass
    _oracle_model(src, "llama", s).save_pretrained(tmp_path / "oracle", max_shard_size=size)
    _assert_same_checkpoint(tmp_path / "ours", tmp_path / "oracle")
    assert len(list((tmp_path / "ours").glob("*.safetensors"))) > 2
    ia = json.loads((tmp_path / "ours/model.safetensors.index.json").read_text())
    ib = json.loads((tmp_path / "oracle/model.safetensors.index.json").read_text())
    assert ia == ib
    for f in (tmp_path / "oracle").glob("*.safetensors"):
        if single_pass:
            _assert_same_file_but_header_spaces(tmp_path / "ours" / f.name, f)
        else:  # assembled at the end: safetensors' own bytes
            assert (tmp_path / "ours" / f.name).read_bytes() == f.read_bytes()


def test_checkpoint_buffers_dropped_like_transformers(sources, tmp_path):
    """Old checkpoints carry rotary inv_freq buffers; transformers drops them on load."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(sources("llama", "bf16"), src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    s = _settings()
    plan, _ = _quantize(src, tmp_path / "ours", s)
    assert [n for n, _ in plan.dropped] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    _oracle_model(src, "llama", s).save_pretrained(tmp_path / "oracle")
    _assert_same_checkpoint(tmp_path / "ours", tmp_path / "oracle")


# ----------------------------------------------------------------------------------- plan errors


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2, 2)), "do not belong"),
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "missing from the checkpoint"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(65, dtype=torch.bfloat16)), "expects [64]"),
])
def test_plan_errors_before_anything_is_written(sources, tmp_path, edit, message):
    src = _edited_copy(sources("llama", "bf16"), tmp_path / "src", edit)
    with pytest.raises(WeightsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_quantization(src, _settings())
    from qtool.cli.app import main

    dest = tmp_path / "out"
    assert main(["quantize", str(src), "-o", str(dest)]) == 2
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_already_quantized_input_is_refused(sources, tmp_path):
    src = sources("llama", "bf16")
    _quantize(src, tmp_path / "q", _settings())
    with pytest.raises(WeightsError, match="already quantized"):
        plan_quantization(tmp_path / "q", _settings())


# ----------------------------------------------------------------------------------- safe writes


def test_existing_destination_refused_then_force_replaces(sources, tmp_path):
    src = sources("llama", "bf16")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    plan = plan_quantization(src, _settings())
    with pytest.raises(BadInput, match="already exists"):
        run_quantization(plan, dest, device="cpu")
    assert (dest / "old.txt").read_text() == "old"
    run_quantization(plan, dest, device="cpu", force=True)
    assert not (dest / "old.txt").exists() and (dest / "model.safetensors").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~mask  # as mkdir would make it, not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("force", [False, True])
def test_failure_midway_leaves_nothing(sources, tmp_path, exc, force):
    src = sources("llama", "bf16")
    dest = tmp_path / "out"
    if force:
        dest.mkdir()
        (dest / "keep.txt").write_text("previous run")
    plan = plan_quantization(src, _settings())
    seen = []

    def boom(done, total, name):
        seen.append(name)
        if len(seen) == 5:  # after a few tensors were quantized and written
            raise exc

    with pytest.raises(type(exc)):
        run_quantization(plan, dest, device="cpu", force=force, on_progress=boom)
    assert len(seen) == 5
    if force:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_destination_inside_source_refused(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources("llama", "bf16"), src)
    plan = plan_quantization(src, _settings())
    with pytest.raises(BadInput, match="inside the source"):
        run_quantization(plan, src / "q", device="cpu")
    assert not (src / "q").exists()


# ----------------------------------------------------------------------------------- CLI


def test_cli_dry_run_uses_the_same_plan_and_writes_nothing(sources, tmp_path, capsys):
    from qtool.cli.app import main

    src = sources("gpt2", "fp16")
    dest = tmp_path / "out"
    assert main(["quantize", str(src), "-o", str(dest), "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    assert dry["dry_run"] is True and dry["tensors"]["quantized"] == 8  # 2 layers x (c_attn, c_proj, c_fc, mlp.c_proj)
    assert main(["quantize", str(src), "-o", str(dest), "--json", "--skip-modules", "mlp.c_fc"]) == 0
    real = json.loads(capsys.readouterr().out)
    assert real["tensors"]["quantized"] == 6
    assert main(["quantize", str(src), "-o", str(tmp_path / "o2"), "--json"]) == 0
    real2 = json.loads(capsys.readouterr().out)
    assert real2["tensors"] == dry["tensors"]
    # the estimate is within the few bytes of the JSON blobs of the real size
    files = sum(p.stat().st_size for p in (tmp_path / "o2").glob("*.safetensors"))
    assert real2["output_bytes"] == files
    assert abs(dry["output_bytes_estimate"] - files) < 0.005 * files
    card = (tmp_path / "o2/README.md").read_text()
    assert "nf4" in card and "from_pretrained" in card and "hf_" not in card
    assert main(["quantize", str(src), "-o", str(dest)]) == 2  # exists now


def test_model_card_escapes_names_and_carries_the_source_licence(sources, tmp_path, capsys):
    """A folder name with HTML/markdown stays text in the card; the source's licence id is carried over."""
    import shutil

    from qtool.cli.app import main

    evil = "<img src=x onerror=alert(1)> [click](http:evil) # `x`"
    src = tmp_path / evil
    shutil.copytree(sources("llama", "bf16"), src)
    (src / "README.md").write_text("---\nlicense: llama3.1\nlanguage: en\n---\n# the source card\n")
    assert main(["quantize", str(src), "-o", str(tmp_path / "out"), "--json"]) == 0
    capsys.readouterr()
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: llama3.1" in front.splitlines()
    assert "<img" not in card and "](http:evil)" not in card and "&lt;img" in card
    assert "\\[click\\]" in card
    assert not any(line.startswith("# `x`") for line in card.splitlines())


def test_quantize_progress_in_a_pipe_is_plain_lines(sources, tmp_path, capsys):
    """stderr is no terminal here (as in CI): progress comes as plain lines with done/total, no bar codes."""
    from qtool.cli.app import main

    source = sources("llama", "bf16")  # made first: transformers' own save bar is not qtool's output
    capsys.readouterr()
    assert main(["quantize", str(source), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("quantize ")]
    assert lines and lines[-1].endswith("(100%)") or "(100%)," in lines[-1]
    assert "\r" not in err and "\x1b" not in err


def test_cli_summary_splits_read_quantize_write(sources, tmp_path, capsys):
    import re

    from qtool.cli.app import main

    assert main(["quantize", str(sources("llama", "bf16")), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"stages: read ([\d.]+) s \(waited for ([\d.]+) s\), quantize ([\d.]+) s, write ([\d.]+) s", out)
    assert m, out
    total = float(re.search(r"time: ([\d.]+) s", out).group(1))
    assert float(m.group(3)) <= total + 0.05  # the quantizing happens inside the run


def test_cli_is_the_library_plus_parsing_and_rendering(sources, tmp_path, capsys):
    """`qtool quantize --json` and the library's quantize() make the same plan and the same bytes."""
    import json as _json

    from qtool.cli.app import main
    from qtool.core.config import QuantSettings
    from qtool.quantize import quantize

    src = sources("llama", "bf16")
    assert main(["quantize", str(src), "-o", str(tmp_path / "cli"), "--device", "cpu", "--json"]) == 0
    cli = _json.loads(capsys.readouterr().out)
    plan, result = quantize(str(src), QuantSettings(), destination=tmp_path / "lib", device="cpu")
    lib = {**plan.to_dict("cpu"), **result.to_dict()}
    for key in ("tensors", "input_bytes", "output_bytes", "files", "quantized", "kept"):
        assert cli[key] == lib[key], key
    for name in result.files + ["config.json"]:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes(), name
