"""qtool.core.checkpoint: real safetensors files written by safetensors itself, then corrupted byte by byte."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from qtool.core.checkpoint import (
    INDEX_NAME, Checkpoint, TensorInfo, read_safetensors_header,
)
from qtool.core.errors import ConfigError, WeightsError

torch.set_num_threads(1)
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def tensors_a():
    g = torch.Generator().manual_seed(0)
    return {"model.embed.weight": torch.randn(6, 4, generator=g),
            "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
            "model.pos": torch.arange(3, dtype=torch.int64)}


def tensors_b():
    g = torch.Generator().manual_seed(1)
    return {"lm_head.weight": torch.randn(6, 4, generator=g).to(torch.float16)}


def make_dir(tmp_path, *, config=CONFIG, sharded=False, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if sharded:
        a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        save_file(tensors_a(), d / a)
        save_file(tensors_b(), d / b)
        wm = {k: a for k in tensors_a()} | {k: b for k in tensors_b()}
        (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    else:
        save_file(tensors_a() | tensors_b(), d / "model.safetensors", metadata={"format": "pt"})
    return d


def assert_names(exc_info, path):
    msg = str(exc_info.value)
    assert str(path) in msg, msg
    assert "\n" not in msg


# --- the happy path ---------------------------------------------------------------------------------

def test_single_file_tensors_offsets_and_read(tmp_path):
    d = make_dir(tmp_path)
    ck = Checkpoint.open(d)
    expected = tensors_a() | tensors_b()
    assert set(ck.tensors) == set(expected)
    assert ck.files == [d / "model.safetensors"]
    assert ck.config == CONFIG and ck.index is None
    raw = (d / "model.safetensors").read_bytes()
    for name, t in expected.items():
        info = ck.tensors[name]
        assert isinstance(info, TensorInfo)
        assert info.shape == tuple(t.shape)
        assert info.nbytes == t.numel() * t.element_size() == info.end - info.start
        # The offsets are absolute: the bytes there are the tensor's own bytes.
        assert raw[info.start : info.end] == t.contiguous().view(torch.uint8).numpy().tobytes()
        got = ck.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert ck.tensors["model.norm.weight"].dtype == "BF16"
    assert ck.tensors["lm_head.weight"].dtype == "F16"
    assert ck.tensors["model.pos"].dtype == "I64"
    assert ck.total_bytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert not ck.is_prequantized()


def test_sharded_with_index_keeps_file_order(tmp_path):
    d = make_dir(tmp_path, sharded=True)
    ck = Checkpoint.open(d)
    assert [f.name for f in ck.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert ck.index["weight_map"]["lm_head.weight"] == "model-00002-of-00002.safetensors"
    # insertion order: every tensor of shard 1 before any of shard 2
    files = [info.file.name for info in ck.tensors.values()]
    assert files == sorted(files)
    assert list(ck.tensors)[-1] == "lm_head.weight"
    assert torch.equal(ck.read("lm_head.weight"), tensors_b()["lm_head.weight"])
    assert torch.equal(ck.read("model.embed.weight"), tensors_a()["model.embed.weight"])


def test_handle_cache_stays_small(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    for i in range(7):
        save_file({f"t{i}": torch.full((2,), float(i))}, d / f"part{i}.safetensors")
    ck = Checkpoint.open(d)
    for i in range(7):
        assert ck.read(f"t{i}").tolist() == [float(i)] * 2
    assert len(ck._handles) <= Checkpoint.MAX_OPEN_HANDLES
    ck.close()
    assert ck.read("t0").tolist() == [0.0, 0.0]  # reopens after close


def test_read_unknown_tensor(tmp_path):
    ck = Checkpoint.open(make_dir(tmp_path))
    with pytest.raises(WeightsError, match="no tensor named 'nope'"):
        ck.read("nope")


def test_dtype_helpers():
    from qtool.core.dtypes import is_float_dtype, is_quantizable_dtype

    assert all(is_float_dtype(d) for d in ("F16", "BF16", "F32", "F64", "F8_E4M3"))
    assert not any(is_float_dtype(d) for d in ("U8", "I8", "I32", "I64", "BOOL", "nonsense"))
    assert is_quantizable_dtype("BF16") and not is_quantizable_dtype("F8_E4M3") and not is_quantizable_dtype("I64")


def test_prequantized_detection(tmp_path):
    d = make_dir(tmp_path, config=CONFIG | {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    ck = Checkpoint.open(d)
    assert ck.is_prequantized() and ck.prequantized_method() == "bitsandbytes"

    d2 = tmp_path / "bnbkeys"
    d2.mkdir()
    (d2 / "config.json").write_text(json.dumps(CONFIG))
    save_file({"l.weight": torch.zeros(8, 1, dtype=torch.uint8), "l.weight.absmax": torch.ones(1),
               "l.weight.quant_map": torch.ones(16)}, d2 / "model.safetensors")
    assert Checkpoint.open(d2).prequantized_method() == "bitsandbytes"


def test_check_shapes(tmp_path):
    ck = Checkpoint.open(make_dir(tmp_path))
    ck.check_shapes({"model.embed.weight": (6, 4), "lm_head.weight": (6, 4)})
    with pytest.raises(WeightsError, match=r"has shape \[6, 4\] but config.json implies \[8, 4\]") as e:
        ck.check_shapes({"lm_head.weight": (8, 4)})
    assert_names(e, ck.files[0])
    with pytest.raises(WeightsError, match="missing from the checkpoint"):
        ck.check_shapes({"model.layers.0.mlp.up_proj.weight": (4, 4)})


# --- the directory -----------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="no such file or directory") as e:
        Checkpoint.open(tmp_path / "absent")
    assert_names(e, tmp_path / "absent")


def test_file_instead_of_directory(tmp_path):
    d = make_dir(tmp_path)
    with pytest.raises(WeightsError, match="not a directory"):
        Checkpoint.open(d / "model.safetensors")


def test_no_config_json(tmp_path):
    d = make_dir(tmp_path, config=None)
    with pytest.raises(ConfigError, match="no config.json") as e:
        Checkpoint.open(d)
    assert_names(e, d)
    assert Checkpoint.open(d, require_config=False).config is None


def test_invalid_config_json(tmp_path):
    d = make_dir(tmp_path)
    (d / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="invalid JSON") as e:
        Checkpoint.open(d)
    assert_names(e, d / "config.json")


def test_no_weight_files(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(WeightsError, match="no weight files") as e:
        Checkpoint.open(d)
    assert_names(e, d)


# --- corrupt safetensors files -------------------------------------------------------------------------

def test_file_shorter_than_length_prefix(tmp_path):
    d = make_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(WeightsError, match="too short for a header") as e:
        Checkpoint.open(d)
    assert_names(e, f)


def test_header_length_beyond_file(tmp_path, safetensors_bytes):
    d = make_dir(tmp_path)
    f = d / "model.safetensors"
    safetensors_bytes.set_header_length(f, f.stat().st_size)  # one more than the header could be
    with pytest.raises(WeightsError, match="header length .* exceeds the file") as e:
        Checkpoint.open(d)
    assert_names(e, f)


def test_header_length_over_100mb_limit(tmp_path, safetensors_bytes):
    f = tmp_path / "big.safetensors"
    safetensors_bytes.write(f, b"{}", length=200_000_000)
    with open(f, "r+b") as fh:  # sparse: the file is long enough, the header claims 200 MB
        fh.truncate(300_000_000)
    with pytest.raises(WeightsError, match="over the 100000000 byte limit"):
        read_safetensors_header(f)


def test_truncated_data_region(tmp_path):
    d = make_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(WeightsError, match="truncated safetensors file: tensor .* ends at byte") as e:
        Checkpoint.open(d)
    assert_names(e, f)


def test_flipped_byte_in_header(tmp_path):
    d = make_dir(tmp_path)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8] = ord("[")  # the header's opening brace
    f.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="invalid JSON") as e:
        Checkpoint.open(d)
    assert_names(e, f)


def test_header_not_utf8(tmp_path):
    d = make_dir(tmp_path)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[10] = 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="not valid UTF-8"):
        Checkpoint.open(d)


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h.__setitem__("t", {**h["t"], "dtype": "F17"}), "unknown dtype 'F17'"),
    (lambda h: h.__setitem__("t", {**h["t"], "dtype": 4}), "unknown dtype 4"),
    (lambda h: h.__setitem__("t", {**h["t"], "shape": [2, -3]}), "invalid shape"),
    (lambda h: h.__setitem__("t", {**h["t"], "shape": [2, 3.0]}), "invalid shape"),
    (lambda h: h.__setitem__("t", {**h["t"], "shape": [True, 6]}), "invalid shape"),
    (lambda h: h.__setitem__("t", {**h["t"], "shape": "6"}), "invalid shape"),
    (lambda h: h.__setitem__("t", {**h["t"], "shape": [4, 6]}), "needs 96 bytes but its data_offsets span 48"),
    (lambda h: h.__setitem__("t", {**h["t"], "data_offsets": [0]}), "invalid data_offsets"),
    (lambda h: h.__setitem__("t", {**h["t"], "data_offsets": [48, 0]}), "invalid data_offsets"),
    (lambda h: h.__setitem__("t", {**h["t"], "data_offsets": [-8, 40]}), "invalid data_offsets"),
    (lambda h: h.__setitem__("t", {**h["t"], "data_offsets": [0, 2**70]}), "needs 48 bytes"),
    (lambda h: h.__setitem__("t", {k: v for k, v in h["t"].items() if k != "dtype"}), "unknown dtype None"),
    (lambda h: h.__setitem__("t", [1, 2]), "is not an object"),
    (lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__ must map strings to strings"),
    (lambda h: h.__setitem__("u", {"dtype": "F32", "shape": [2], "data_offsets": [40, 48]}), "overlap"),
])
def test_corrupt_header_entries(tmp_path, mutate, message, safetensors_bytes):
    f = tmp_path / "model.safetensors"
    save_file({"t": torch.zeros(2, 6)}, f)
    _, header, data = safetensors_bytes.split(f)
    mutate(header)
    safetensors_bytes.write(f, header, data)
    with pytest.raises(WeightsError, match=message) as e:
        read_safetensors_header(f)
    assert_names(e, f)


def test_header_claims_more_data_than_the_file_has(tmp_path, safetensors_bytes):
    f = tmp_path / "model.safetensors"
    save_file({"t": torch.zeros(2, 6)}, f)
    _, header, data = safetensors_bytes.split(f)
    header["t"] = {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]}
    safetensors_bytes.write(f, header, data)
    with pytest.raises(WeightsError, match="truncated safetensors file: tensor 't' ends at byte"):
        read_safetensors_header(f)


def test_duplicate_keys_in_header(tmp_path, safetensors_bytes):
    f = safetensors_bytes.write(tmp_path / "dup.safetensors",
                 b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                 b"\0" * 4)
    with pytest.raises(WeightsError, match="duplicate key 't'"):
        read_safetensors_header(f)


def test_json_array_header_and_deep_nesting(tmp_path, safetensors_bytes):
    with pytest.raises(WeightsError, match="expected a JSON object"):
        read_safetensors_header(safetensors_bytes.write(tmp_path / "a.safetensors", b"[]"))
    with pytest.raises(WeightsError, match="invalid JSON"):
        read_safetensors_header(safetensors_bytes.write(tmp_path / "b.safetensors", b"[" * 100_000))


def test_valid_hand_written_file_with_padding_and_empty_tensor(tmp_path, safetensors_bytes):
    header = {"__metadata__": {"k": "v"}, "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]},
              "x": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    hb = json.dumps(header).encode() + b"     "  # safetensors pads headers with spaces
    f = safetensors_bytes.write(tmp_path / "m.safetensors", hb, b"\x01\x02\x03")
    h = read_safetensors_header(f)
    assert h.metadata == {"k": "v"}
    assert h.tensors["x"].start == 8 + len(hb) and h.tensors["x"].nbytes == 3
    assert h.tensors["e"].nbytes == 0


def test_tensor_in_two_files(tmp_path):
    d = make_dir(tmp_path)
    (d / "model.safetensors").rename(d / "part-a.safetensors")  # no model.safetensors: every file is read
    save_file({"lm_head.weight": torch.zeros(1)}, d / "part-b.safetensors")
    with pytest.raises(WeightsError, match="appears in both"):
        Checkpoint.open(d)


# --- index files ------------------------------------------------------------------------------------

def write_index(d, weight_map):
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_invalid_json(tmp_path):
    d = make_dir(tmp_path, sharded=True)
    (d / INDEX_NAME).write_text("{not json")
    with pytest.raises(WeightsError, match="invalid index file: invalid JSON") as e:
        Checkpoint.open(d)
    assert_names(e, d / INDEX_NAME)


@pytest.mark.parametrize("content", ['[]', '{"metadata": {}}', '{"weight_map": []}'])
def test_index_without_weight_map(tmp_path, content):
    d = make_dir(tmp_path, sharded=True)
    (d / INDEX_NAME).write_text(content)
    with pytest.raises(WeightsError, match="weight_map"):
        Checkpoint.open(d)


def test_index_names_missing_shard(tmp_path):
    d = make_dir(tmp_path, sharded=True)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="shard 'model-00002-of-00002.safetensors' named in the index is missing") as e:
        Checkpoint.open(d)
    assert_names(e, d / INDEX_NAME)


def test_tensor_in_index_absent_from_shard(tmp_path):
    d = make_dir(tmp_path, sharded=True)
    idx = json.loads((d / INDEX_NAME).read_text())
    idx["weight_map"]["model.layers.0.ghost"] = "model-00001-of-00002.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(WeightsError, match="'model.layers.0.ghost' is listed in the index but missing from shard"):
        Checkpoint.open(d)


def test_index_pointing_at_the_wrong_shard(tmp_path):
    d = make_dir(tmp_path, sharded=True)
    idx = json.loads((d / INDEX_NAME).read_text())
    idx["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(WeightsError, match="'lm_head.weight' is listed in the index but missing from shard 'model-00001"):
        Checkpoint.open(d)


class OpenRecorder:
    """Records every path Python opens (audit hook 'open'), to prove a file was never opened."""

    installed = False
    paths: list[str] = []
    active = False

    @classmethod
    def hook(cls, event, args):
        if cls.active and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.paths.append(os.fsdecode(args[0]))

    def __enter__(self):
        if not OpenRecorder.installed:
            sys.addaudithook(OpenRecorder.hook)
            OpenRecorder.installed = True
        OpenRecorder.paths = []
        OpenRecorder.active = True
        return OpenRecorder.paths

    def __exit__(self, *exc):
        OpenRecorder.active = False


@pytest.mark.parametrize("style", ["dotdot", "absolute", "subdir-escape", "backslash"])
def test_index_shard_names_escaping_root_are_refused_before_opening(tmp_path, style):
    d = make_dir(tmp_path, sharded=True)
    # A perfectly valid shard sits outside the checkpoint; a careless reader would happily load it.
    outside = tmp_path / "outside.safetensors"
    save_file(tensors_b(), outside)
    (d / "sub").mkdir()
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside),
            "subdir-escape": "sub/../../outside.safetensors", "backslash": "..\\outside.safetensors"}[style]
    wm = json.loads((d / INDEX_NAME).read_text())["weight_map"]
    # Put the escaping name first, after a good shard, so both orders are exercised.
    wm = {"model.embed.weight": "model-00001-of-00002.safetensors", "lm_head.weight": name}
    write_index(d, wm)
    with OpenRecorder() as opened:
        with pytest.raises(WeightsError, match="refusing shard name") as e:
            Checkpoint.open(d)
    assert_names(e, d / INDEX_NAME)
    assert any(p.endswith(INDEX_NAME) for p in opened), opened  # the recorder works
    assert not any(p.endswith("outside.safetensors") for p in opened), opened
    # Nor any shard at all: the names are all checked before anything is opened.
    assert not any(p.endswith(".safetensors") for p in opened), opened


def test_index_symlink_shard_outside_root_is_refused(tmp_path):
    d = make_dir(tmp_path, sharded=True)
    outside = tmp_path / "elsewhere.safetensors"
    (d / "model-00002-of-00002.safetensors").rename(outside)
    (d / "model-00002-of-00002.safetensors").symlink_to(outside)
    with OpenRecorder() as opened:
        with pytest.raises(WeightsError, match="symlink to .*outside the checkpoint directory"):
            Checkpoint.open(d)
    assert not any(p.endswith(".safetensors") for p in opened), opened


def test_unindexed_symlink_outside_root_is_refused(tmp_path):
    d = make_dir(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(outside)
    (d / "model.safetensors").symlink_to(outside)
    with pytest.raises(WeightsError, match="outside the checkpoint directory"):
        Checkpoint.open(d)


def test_symlink_inside_root_and_hf_cache_layout_are_fine(tmp_path):
    d = make_dir(tmp_path)
    (d / "real").mkdir()
    (d / "model.safetensors").rename(d / "real" / "w.safetensors")
    (d / "model.safetensors").symlink_to(d / "real" / "w.safetensors")
    assert "lm_head.weight" in Checkpoint.open(d).tensors

    # huggingface_hub's cache: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    save_file(tensors_b(), blobs / "deadbeef")
    (blobs / "cafe").write_text(json.dumps(CONFIG))
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    (snap / "config.json").symlink_to("../../blobs/cafe")
    ck = Checkpoint.open(snap)
    assert torch.equal(ck.read("lm_head.weight"), tensors_b()["lm_head.weight"])


# --- pickle ---------------------------------------------------------------------------------------

def make_pickle_dir(tmp_path, payload=None):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    torch.save(payload if payload is not None else tensors_a(), d / "pytorch_model.bin")
    return d


def test_pickle_refused_by_default(tmp_path):
    d = make_pickle_dir(tmp_path)
    with pytest.raises(WeightsError) as e:
        Checkpoint.open(d)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "arbitrary code" in msg and "--allow-pickle" in msg and "safetensors" in msg
    assert_names(e, d)


def test_pickle_allowed_loads_tensors(tmp_path):
    d = make_pickle_dir(tmp_path)
    ck = Checkpoint.open(d, allow_pickle=True)
    assert ck.format == "pickle"
    for name, t in tensors_a().items():
        assert ck.tensors[name].shape == tuple(t.shape)
        assert torch.equal(ck.read(name), t)
    assert ck.tensors["model.norm.weight"].dtype == "BF16"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_allow_pickle_still_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = make_pickle_dir(tmp_path, payload={"w": torch.zeros(2), "evil": _Evil()})
    with pytest.raises(WeightsError, match="cannot load with weights_only=True") as e:
        Checkpoint.open(d, allow_pickle=True)
    assert_names(e, d / "pytorch_model.bin")
    assert not (tmp_path / "PWNED").exists()


def test_safetensors_preferred_over_pickle(tmp_path):
    d = make_dir(tmp_path)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    ck = Checkpoint.open(d)  # no --allow-pickle needed: the .bin is never touched
    assert ck.format == "safetensors" and "x" not in ck.tensors


def test_gaps_and_trailing_bytes_are_refused_like_safetensors_does(tmp_path, safetensors_bytes):
    from safetensors import SafetensorError, safe_open

    u8 = lambda b, e: {"dtype": "U8", "shape": [e - b], "data_offsets": [b, e]}  # noqa: E731
    gap = safetensors_bytes.write(tmp_path / "gap.safetensors", {"a": u8(0, 2), "b": u8(4, 6)}, b"x" * 6)
    tail = safetensors_bytes.write(tmp_path / "tail.safetensors", {"a": u8(0, 2)}, b"x" * 5)
    late = safetensors_bytes.write(tmp_path / "late.safetensors", {"a": u8(2, 4)}, b"x" * 4)
    for f, message in [(gap, r"bytes 2\.\.4 of the data are not part of any tensor"),
                       (tail, "3 bytes after the last tensor"), (late, r"bytes 0\.\.2")]:
        with pytest.raises(WeightsError, match=message):
            read_safetensors_header(f)
        with pytest.raises(SafetensorError):  # the library we read with agrees they are broken
            safe_open(str(f), framework="pt")
    ok = safetensors_bytes.write(tmp_path / "ok.safetensors", {"b": u8(2, 4), "a": u8(0, 2)}, b"abcd")
    h = read_safetensors_header(ok)  # out-of-order entries that tile the data are fine
    assert (h.tensors["a"].start, h.tensors["b"].start) == (h.data_start, h.data_start + 2)
    assert h.data_start == ok.stat().st_size - 4


def test_model_safetensors_wins_over_other_files_as_in_transformers(tmp_path):
    d = make_dir(tmp_path)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, d / "consolidated.safetensors")
    ck = Checkpoint.open(d)
    assert ck.files == [d / "model.safetensors"] and "layers.0.attention.wq.weight" not in ck.tensors


def test_gptq_keys_are_prequantized(tmp_path):
    d = tmp_path / "gptq"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file({"l.qweight": torch.zeros(2, 2, dtype=torch.int32), "l.qzeros": torch.zeros(1, 2, dtype=torch.int32)},
              d / "model.safetensors")
    assert Checkpoint.open(d).prequantized_method() == "GPTQ/AWQ"


def test_file_replaced_after_open_is_detected(tmp_path):
    d = make_dir(tmp_path)
    ck = Checkpoint.open(d)
    save_file({"lm_head.weight": torch.zeros(3, 3)}, d / "model.safetensors")
    with pytest.raises(WeightsError):
        ck.read("lm_head.weight")
