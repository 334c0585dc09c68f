"""Property tests: sizes, config precedence, and fuzzing the checkpoint reader with hostile bytes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from qtool.core.checkpoint import INDEX_NAME, Checkpoint, read_safetensors_header
from qtool.core.dtypes import BY_CODE

DTYPE_SIZES = {code: d.itemsize for code, d in BY_CODE.items()}
from qtool.core.config import KEY_BY_NAME, env_name, flag_name, resolve_settings
from qtool.core.errors import ConfigError, WeightsError
from qtool.core.presets import load_settings_preset, settings_presets
from qtool.core.sizes import format_bytes, parse_size
import safetensors_bytes  # noqa: E402  (a module: hypothesis tests take no function-scoped fixtures)

FAST = settings(max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])

DECIMAL = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
BINARY = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


# --- sizes ---------------------------------------------------------------------------------------

@FAST
@given(n=st.integers(0, 10**6), unit=st.sampled_from(sorted(DECIMAL | BINARY)),
       space=st.sampled_from(["", " ", "  "]), case=st.sampled_from([str.upper, str.lower, lambda s: s]))
def test_parse_size_integer_and_unit(n, unit, space, case):
    assert parse_size(f"{n}{space}{case(unit)}") == n * (DECIMAL | BINARY)[unit]


@FAST
@given(n=st.integers(0, 2**62))
def test_parse_size_bare_numbers_and_ints_are_bytes(n):
    assert parse_size(str(n)) == n
    assert parse_size(n) == n


@FAST
@given(n=st.integers(0, 10**15), binary=st.booleans())
def test_format_then_parse_round_trips_within_display_precision(n, binary):
    text = format_bytes(n, binary=binary)
    back = parse_size(text)
    base = 1024 if binary else 1000
    unit = 1
    while unit * base <= n and unit < base**4:
        unit *= base
    # one decimal is shown: the error is at most half of a tenth of the unit (plus float slack)
    assert abs(back - n) <= unit * 0.05 + 1, (n, text, back)


@FAST
@given(text=st.text(max_size=30))
def test_parse_size_never_raises_anything_but_config_error(text):
    try:
        value = parse_size(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(value, int) and value >= 0


@FAST
@given(digits=st.text("0123456789", min_size=60, max_size=6000), dot=st.booleans())
def test_parse_size_long_digit_strings_are_config_errors_or_exact(digits, dot):
    text = ("0." + digits if dot else digits) + "GB"
    try:
        value = parse_size(text)
    except ConfigError:
        return
    assert isinstance(value, int) and 0 <= value <= 2**62


@FAST
@given(n=st.integers(1, 10**6), bad=st.sampled_from(["XB", "gigs", "G B", "GBB", "e9", "%", "GB2"]))
def test_parse_size_rejects_garbage_units(n, bad):
    for text in (f"{n}{bad}", f"-{n}GB", f"{n}GB{n}", ""):
        try:
            parse_size(text)
        except ConfigError:
            continue
        raise AssertionError(f"{text!r} was accepted")


# --- config precedence -------------------------------------------------------------------------------

PRESETS = sorted(settings_presets())
# (key, strategy of valid raw values); all parse to themselves
KEYS = {
    "lora_rank": st.integers(1, 4096),
    "seq_len": st.integers(1, 100_000),
    "batch_size": st.integers(1, 64),
    "mode": st.sampled_from(["inference", "qlora", "lora", "full"]),
    "compute_dtype": st.sampled_from(["bfloat16", "float16", "float32"]),
    "quant_type": st.sampled_from(["nf4", "fp4"]),
}
LAYERS = ("flag", "env", "file")


@st.composite
def assignments(draw):
    """For every key and layer: a value or nothing; plus a preset named at some layer (or none)."""
    values = {layer: {} for layer in LAYERS}
    for key, strat in KEYS.items():
        for layer in LAYERS:
            if draw(st.booleans()):
                values[layer][key] = draw(strat)
    for layer in LAYERS:
        if draw(st.integers(0, 3)) == 0:
            values[layer]["preset"] = draw(st.sampled_from(PRESETS))
    return values


@settings(max_examples=40, deadline=None)
@given(layers=assignments())
def test_precedence_flag_env_file_preset_default(layers):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        lines = [f"{k} = {json.dumps(v)}" for k, v in layers["file"].items()]
        (cwd / "qtool.toml").write_text("\n".join(lines) + "\n")
        env = {env_name(k): str(v) for k, v in layers["env"].items()}
        s = resolve_settings(dict(layers["flag"]), env=env, cwd=cwd)

    preset = next((layers[layer]["preset"] for layer in LAYERS if "preset" in layers[layer]), None)
    preset_values = load_settings_preset(preset) if preset else {}
    for key in KEYS:
        # the expectation, written independently of resolve_settings' own loop
        if key in layers["flag"]:
            want, source = layers["flag"][key], f"flag {flag_name(key)}"
        elif key in layers["env"]:
            want, source = layers["env"][key], f"env {env_name(key)}"
        elif key in layers["file"]:
            want, source = layers["file"][key], "file "
        elif key in preset_values:
            want, source = preset_values[key], f"preset {preset}"
        else:
            want, source = KEY_BY_NAME[key].default, "default"
        assert s.values[key] == want, (key, layers)
        assert s.sources[key].startswith(source), (key, s.sources[key], source)
        if source == "file ":
            assert s.sources[key].endswith("qtool.toml")
    assert s.run.lora_rank == s.values["lora_rank"] and s.quant.quant_type == s.values["quant_type"]


# --- fuzzing the checkpoint reader -----------------------------------------------------------------

def _only_our_errors(fn):
    try:
        return fn()
    except (WeightsError, ConfigError) as exc:
        msg = str(exc)
        assert msg and "\n" not in msg
        return None


@FAST
@given(header=st.binary(max_size=200), data=st.binary(max_size=64),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_bytes_as_header(header, data, length):
    with tempfile.TemporaryDirectory() as tmp:
        f = safetensors_bytes.write(Path(tmp) / "m.safetensors", header, data, length=length)
        _only_our_errors(lambda: read_safetensors_header(f))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=True),
                         st.text(max_size=8))
DTYPES = st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.text(max_size=5), json_scalars)


@st.composite
def plausible_headers(draw):
    """Headers like safetensors' own (contiguous, exact sizes), with one field now and then subtly wrong."""
    header = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        offsets = [offset, offset + numel * DTYPE_SIZES[dtype]]
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 3)) == 0:  # break one field
            field_name = draw(st.sampled_from(sorted(entry)))
            bad = {"dtype": st.one_of(DTYPES, st.sampled_from(["F4", "f32", "FP16"])),
                   "shape": st.one_of(json_scalars, st.lists(st.integers(-2, 5), max_size=3),
                                      st.lists(json_scalars, max_size=2)),
                   "data_offsets": st.one_of(json_scalars, st.lists(st.integers(-4, 80), max_size=3))}[field_name]
            if draw(st.booleans()):
                entry[field_name] = draw(bad)
            else:
                entry.pop(field_name)
        header[draw(st.text(max_size=6)) + str(i)] = entry
        offset = offsets[1]
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
                                                json_scalars))
    slack = draw(st.one_of(st.just(0), st.integers(-3, 3)))
    return header, max(offset + slack, 0)


@settings(max_examples=150, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
@given(case=plausible_headers())
def test_plausible_headers_ours_accepts_only_what_safetensors_can_read(case):
    header, data_len = case
    with tempfile.TemporaryDirectory() as tmp:
        f = safetensors_bytes.write(Path(tmp) / "m.safetensors", json.dumps(header).encode(), b"\x00" * data_len)
        parsed = _only_our_errors(lambda: read_safetensors_header(f))
        if parsed is None:
            # and what we refuse, safetensors refuses too (we are not stricter than the format)
            try:
                with safe_open(str(f), framework="pt") as st_file:
                    for name in st_file.keys():
                        st_file.get_tensor(name)
            except Exception:
                return
            raise AssertionError(f"refused a file safetensors reads: {header}")
        # Whatever we accept, the library we read tensors with must read too, tensor by tensor,
        # so `quantize` can never fail on a file half-way through writing its output.
        with safe_open(str(f), framework="pt") as st_file:
            assert set(st_file.keys()) == set(parsed.tensors)
            for name, info in parsed.tensors.items():
                t = st_file.get_tensor(name)
                assert tuple(t.shape) == info.shape
                assert t.numel() * t.element_size() == info.nbytes


INDEX_VALUES = st.recursive(
    st.one_of(json_scalars, st.sampled_from(["shard.safetensors", "../shard.safetensors", "/etc/passwd", "sub/x",
                                             "..", ".", "", "a\\b", "missing.safetensors"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


@FAST
@given(weight_map=st.one_of(st.dictionaries(st.sampled_from(["w", "x", "lm_head.weight"]), INDEX_VALUES, max_size=3),
                            INDEX_VALUES),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_random_index_files(weight_map, raw):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ckpt"
        root.mkdir()
        (root / "sub").mkdir()
        (root / "config.json").write_text('{"model_type": "llama"}')
        # a shard, not model.safetensors: beside model.safetensors the index is not read (as in transformers)
        save_file({"w": torch.zeros(2)}, root / "shard.safetensors")
        save_file({"w": torch.zeros(2)}, Path(tmp) / "shard.safetensors")  # the one '../' would reach
        content = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        (root / INDEX_NAME).write_bytes(content)
        ck = _only_our_errors(lambda: Checkpoint.open(root))
        if ck is not None:
            assert all(f.parent == root for f in ck.files)
            assert weight_map == {"w": "shard.safetensors"}
