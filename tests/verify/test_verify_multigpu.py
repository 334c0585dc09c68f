"""`qtool verify --gpus N --parallel fsdp|ddp|pipeline` without a GPU: the accelerate config generated from the
settings (read back by accelerate itself), the refusals, a real 2-rank DDP run on CPU ranks (gloo) through
`accelerate launch`, and the launcher's error paths with a small rank program of the tests' own: a rank that
crashes, a rank out of memory while its peer waits in a collective, a signal to qtool during the run. No rank
process may outlive the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tinymodels import llama_config, one_error_line, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _settings(**flags):
    from qtool.core.config import resolve_settings

    return resolve_settings(flags, env={}, cwd=ROOT / "tests", command="verify")


def _qtool(qtool_forks, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m qtool ARGS`, forked after torch's import (conftest's qtool_forks)."""
    child = qtool_forks.qtool(*args, cwd=ROOT, env={**os.environ, **(env or {})})
    out, err = child.communicate(timeout=timeout)
    return subprocess.CompletedProcess(["qtool", *args], child.returncode, out, err)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- the config


def test_fsdp_config_follows_the_settings_and_accelerate_reads_it(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from qtool.verify.launch import accelerate_config

    s = _settings(gpus=4, parallel="fsdp", fsdp_sharding="shard_grad_op", fsdp_offload_params=True,
                  fsdp_ram_efficient=False)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(accelerate_config(s)))
    cfg = load_config_from_file(str(path))  # accelerate's own reader: the file is one it accepts
    assert str(cfg.distributed_type).endswith("FSDP") and cfg.num_processes == 4
    assert cfg.mixed_precision == "bf16"
    f = cfg.fsdp_config
    assert (f["fsdp_version"], f["fsdp_sharding_strategy"], f["fsdp_offload_params"]) == (1, "SHARD_GRAD_OP", True)
    assert f["fsdp_cpu_ram_efficient_loading"] is False and f["fsdp_sync_module_states"] is True
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and f["fsdp_use_orig_params"] is False
    defaults = accelerate_config(_settings(gpus=2, parallel="fsdp", precision="fp16"))
    assert defaults["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert defaults["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True and defaults["mixed_precision"] == "fp16"


def test_ddp_config_and_cards_from_names():
    from qtool.core import presets
    from qtool.core.sizes import parse_size
    from qtool.verify.launch import accelerate_config, card_budgets, card_count

    s = _settings(gpus="rtx-4090,rtx-3060", parallel="ddp")
    cfg = accelerate_config(s)
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["num_processes"] == 2 == card_count(s)
    assert card_budgets(s) == [parse_size(presets.find_gpu(g)["vram"]) for g in ("rtx-4090", "rtx-3060")]
    assert card_budgets(_settings(gpus=3, gpu="rtx-4090")) == [parse_size(presets.find_gpu("rtx-4090")["vram"])] * 3


def test_fsdp_qlora_packs_the_4bit_weights_in_bfloat16():
    from qtool.verify.inputs import VerifyOptions
    from qtool.verify.multi import adjust

    settings, _, notes = adjust(_settings(gpus=2, parallel="fsdp"), VerifyOptions())
    assert settings.quant.quant_storage == "bfloat16" and settings.quant.dtype == "bfloat16"
    assert any("bnb_4bit_quant_storage=bfloat16" in n for n in notes)
    kept, _, notes = adjust(_settings(gpus=2, parallel="ddp"), VerifyOptions())
    assert kept.quant.quant_storage == "uint8" and notes == []


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2", "--parallel", "fsdp", "--device", "cpu"], "--parallel fsdp needs CUDA"),
    (["--gpus", "2", "--parallel", "ddp", "--recipe", "loop", "--device", "cpu"], "--recipe loop is not supported"),
    (["--gpus", "2", "--parallel", "ddp", "--mode", "lora", "--device", "cpu", "--cap-memory"], "--cap-memory"),
    (["--gpus", "2", "--device-map", "auto"], "--device-map auto is --parallel pipeline"),
    (["--gpus", "3", "--parallel", "fsdp"], "--gpus 3: only 0 GPU(s) visible"),
    (["--gpus", "2"], "--gpus 2: only 0 GPU(s) visible"),
    (["--gpus", "2", "--device", "cpu"], "--gpus 2 --parallel pipeline spreads the layers over GPUs"),
    (["--gpus", "2", "--recipe", "unsloth"], "--recipe unsloth runs on one GPU"),
    (["--device-map", "auto", "--recipe", "unsloth"], "--recipe unsloth runs on one GPU"),
])
def test_refusals_are_one_line(qtool_forks, args, message):
    r = _qtool(qtool_forks, "verify", "8b", *args, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in one_error_line(r.stderr)


# ------------------------------------------------------------------------------------------- real ranks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "m", llama_config())


def test_ddp_on_two_cpu_ranks_gathers_one_report(qtool_forks, tiny, tmp_path):
    junit = tmp_path / "v.xml"
    r = _qtool(qtool_forks, "verify", str(tiny), "--device", "cpu", "--gpus", "2", "--parallel", "ddp", "--mode",
               "lora", "--seq-len", "32", "--steps", "2", "--precision", "fp32", "--json", "--junit", str(junit),
               env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    # the Trainer on each rank really ran distributed: accelerate says so
    assert report["trainer"]["distributed_type"] == "MULTI_CPU" and report["trainer"]["world_size"] == 2
    assert [c["index"] for c in report["cards"]] == [0, 1]
    assert all(c["peak_rss_bytes"] > 0 for c in report["cards"])
    assert report["checks"]["finite_loss"]["passed"] and report["checks"]["finite_grads"]["passed"]
    assert len(report["steps"]) == 2
    assert "testcase" in junit.read_text()
    assert not list(tmp_path.glob("qtool-ranks-*")), "the ranks' folder is removed"


RANK_PROGRAM = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    import torch.distributed as dist

    job = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    out = Path(job["out_dir"])
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    dist.init_process_group("gloo")
    role = job["roles"][rank]
    def write(data):
        (out / f"rank{rank}.tmp").write_text(json.dumps(data))
        os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.json")
    if role == "crash":
        write({"rank": rank, "failed": True, "out_of_memory": False, "crash": "RuntimeError: boom on purpose"})
        os._exit(1)
    if role == "oom":
        report = {"model": {"name": "m", "description": "d"}, "settings": {}, "device": {"name": "cpu"},
                  "versions": {}, "memory": {}, "loaded": True,
                  "error": {"stage": "training", "kind": "out_of_memory", "message": "CUDA out of memory"}}
        write({"rank": rank, "failed": True, "out_of_memory": True, "report": report})
        os._exit(3)
    dist.barrier()  # waits for a peer that never comes
''')


def _launch(tmp_path, monkeypatch, roles):
    from qtool.verify.launch import launch

    (tmp_path / "prog").mkdir()
    (tmp_path / "prog" / "rank_program.py").write_text(RANK_PROGRAM)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'prog'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    work = tmp_path / "work"
    work.mkdir()
    result = launch({"roles": roles}, _settings(gpus=len(roles), parallel="ddp"), work, cpu=True,
                    module="rank_program")
    pids = [int(p.read_text()) for p in work.glob("rank*.pid")]
    return result, pids


def test_a_crashed_rank_is_one_line_naming_it_and_leaves_no_process(tmp_path, monkeypatch):
    from qtool.verify.cards import RankFailed, gather

    result, pids = _launch(tmp_path, monkeypatch, ["wait", "crash"])
    assert len(pids) == 2 and not any(_alive(p) for p in pids)
    with pytest.raises(RankFailed) as info:
        gather(result, [None, None])
    assert str(info.value) == "rank 1 of 2 failed: RuntimeError: boom on purpose"
    assert info.value.exit_code == 1


def test_out_of_memory_on_one_rank_is_the_runs_verdict(tmp_path, monkeypatch):
    from qtool.verify.cards import gather
    from qtool.verify.verdict import checks, outcome

    result, pids = _launch(tmp_path, monkeypatch, ["wait", "oom"])
    assert not any(_alive(p) for p in pids)
    assert result.results[0] is None  # the waiting rank was stopped before it wrote anything
    settings = _settings(gpus=2, parallel="ddp")
    report = gather(result, [None, None])
    assert report.error["rank"] == 1 and report.error["kind"] == "out_of_memory"
    assert [c["out_of_memory"] for c in report.cards] == [False, True]
    report.checks = checks(report, settings)
    assert "rank 1" in report.checks["fits_budget"]["message"]
    assert outcome(report).exit_code == 3


def test_a_signal_ends_the_run_and_every_rank(qtool_forks, tiny, tmp_path):
    proc = qtool_forks.qtool("verify", str(tiny), "--device", "cpu", "--gpus", "2", "--parallel", "ddp", "--mode",
                             "lora", "--seq-len", "32", "--steps", "100000", "--precision", "fp32", cwd=ROOT,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 120
    pids: list[int] = []
    while time.monotonic() < deadline and len(pids) < 2:
        pids = [int(p.read_text()) for p in tmp_path.glob("qtool-ranks-*/rank*.pid") if p.read_text().strip()]
        time.sleep(0.2)
    assert len(pids) == 2, "the ranks did not start"
    time.sleep(3)  # well inside the run: loading or stepping
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "qtool: error: interrupted", err
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids)
    assert not list(tmp_path.glob("qtool-ranks-*"))


def test_every_card_is_held_to_its_own_budget():
    from qtool.verify.cards import card_row
    from qtool.verify.report import VerifyReport
    from qtool.verify.verdict import checks, outcome

    gib = 2**30

    def dev(i, reserved):
        return {"device": f"cuda:{i}", "name": "card", "total_bytes": 80 * gib, "peak_allocated_bytes": reserved - gib,
                "peak_reserved_bytes": reserved, "outside_torch_bytes": gib // 2}

    # card 0 needs 20.5 GiB of a 24 GiB budget, card 1 needs 12.5 GiB of a 12 GiB one: mixed cards, 1 is over
    cards = [card_row(0, dev(0, 20 * gib), budget=24 * gib, cap=None, load_peak=None, steps_peak=None),
             card_row(1, dev(1, 12 * gib), budget=12 * gib, cap=None, load_peak=None, steps_peak=None)]
    assert [c["fits"] for c in cards] == [True, False]
    report = VerifyReport(model={"name": "m", "description": "d"}, settings={}, device={"name": "card"}, versions={},
                          loaded=True, loss=1.0, loss_finite=True, grads_finite=True, steps_requested=2, cards=cards)
    report.checks = checks(report, _settings(gpus="rtx-4090,rtx-3060"))
    fits = report.checks["fits_budget"]
    assert fits["passed"] is False and fits["message"].startswith("card 1:")
    assert outcome(report).exit_code == 3
    report.cards[1] = card_row(1, dev(1, 11 * gib), budget=12 * gib, cap=None, load_peak=None, steps_peak=None)
    report.checks = checks(report, _settings(gpus="rtx-4090,rtx-3060"))
    assert report.checks["fits_budget"]["passed"] is True and outcome(report) is None


def test_pipeline_cards_come_from_the_meter_per_device():
    """--parallel pipeline runs in one process: each entry of memory.per_device (qtool.verify.meter) is a card."""
    from qtool.verify.cards import pipeline_cards
    from qtool.verify.report import VerifyReport

    mib = 2**20
    per_device = [{"device": f"cuda:{i}", "name": "card", "total_bytes": 80_000 * mib,
                   "peak_allocated_bytes": (5 + i) * 1000 * mib, "peak_reserved_bytes": (6 + i) * 1000 * mib,
                   "outside_torch_bytes": 700 * mib, "load_peak_allocated_bytes": (4 + i) * 1000 * mib,
                   "steps_peak_allocated_bytes": (5 + i) * 1000 * mib} for i in range(2)]
    report = VerifyReport(model={}, settings={}, device={}, versions={}, memory={"per_device": per_device})
    pipeline_cards(report, [6700 * mib, 6700 * mib], [None, None])
    assert [c["device"] for c in report.cards] == ["cuda:0", "cuda:1"]
    assert [c["needed_bytes"] for c in report.cards] == [6700 * mib, 7700 * mib]
    assert [c["fits"] for c in report.cards] == [True, False]  # 6700 <= 6700; 7700 > 6700
    assert report.cards[1]["load_peak_allocated_bytes"] == 5000 * mib
