"""qtool.quantize.sidecar: config.json and generation_config.json made in a helper process are the bytes
finalize makes in this one, and a helper that fails changes nothing (finalize makes them itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtool.core.config import QuantSettings
from qtool.quantize import plan_quantization, run_quantization
from qtool.quantize.finalize import write_config, write_generation_config
from qtool.quantize.sidecar import Sidecar


@pytest.fixture
def plan(tiny_model):
    return plan_quantization(tiny_model(), QuantSettings(quant_type="fp4", skip_modules=("o_proj",)))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_helper_writes_what_finalize_writes(plan, tmp_path):
    helper = Sidecar()
    try:
        helper.send(plan)
        (tmp_path / "helper").mkdir()
        assert helper.write(tmp_path / "helper", "config.json") is True
        assert helper.write(tmp_path / "helper", "generation_config.json") is True
    finally:
        helper.close()
    (tmp_path / "here").mkdir()
    write_config(plan, tmp_path / "here")
    assert write_generation_config(plan, tmp_path / "here")
    assert _files(tmp_path / "helper") == _files(tmp_path / "here")
    assert b'"bnb_4bit_quant_type": "fp4"' in _files(tmp_path / "here")["config.json"]


@pytest.mark.parametrize("helper_state", ["live", "dead", "unsent"])
def test_output_is_the_same_whatever_the_helper_does(plan, tmp_path, helper_state):
    """A live helper's files, or finalize's own when the helper died or never got the job: the same bytes."""
    run_quantization(plan, tmp_path / "plain", device="cpu")
    helper = Sidecar()
    try:
        if helper_state == "dead":
            helper.proc.kill()
            helper.proc.wait()
        if helper_state != "unsent":
            helper.send(plan)
        run_quantization(plan, tmp_path / "helped", device="cpu", helper=helper)
    finally:
        helper.close()
    assert helper.proc is None
    assert _files(tmp_path / "helped") == _files(tmp_path / "plain")


def test_closing_ends_the_helper_without_a_job():
    helper = Sidecar()
    proc = helper.proc
    helper.close()
    assert proc.poll() is not None
    assert helper.write(Path("unused"), "config.json") is None
