"""qtool estimate over several GPUs: device_map="auto" placement equal to transformers', FSDP sharding arithmetic
against a real meta model, one card equal to the one-GPU report, mixed cards, JSON and the CLI's answer."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qtool.cli.app import main
from qtool.core import presets
from qtool.core.config import resolve_settings
from qtool.core.models import resolve_model
from qtool.core.sizes import parse_size
from qtool.estimate import estimate_report, fsdp, layout, memory, placement
from qtool.estimate.cards import estimate_cards
from qtool.estimate.pipeline import device_map
from tests.tinymodels import llama_config

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def _settings(**flags):
    return resolve_settings(flags, command="estimate", env={}, cwd=ROOT / "tests")


def _real_device_map(config: dict, max_memory: dict) -> dict:
    """transformers' own: the model built as from_pretrained builds it (meta, bf16, Linear4bit), then
    _get_device_map(device_map="auto"); the quantizer's CPU/disk refusal is switched off to compare overflow too."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig
    from transformers.integrations.accelerate import _get_device_map
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.utils.generic import ContextManagers

    from qtool.core.meta import hf_config, model_class

    cfg = hf_config(config)
    cls = model_class(cfg)
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True,
                                                               bnb_4bit_compute_dtype=torch.bfloat16))
    with ContextManagers(cls.get_init_context(torch.bfloat16, True, False, None) + [torch.device("meta")]):
        model = cls(cfg)
        quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map="auto", checkpoint_files=None,
                                   use_kernels=False)
    quantizer.validate_environment = lambda *a, **k: None
    return dict(_get_device_map(model, "auto", dict(max_memory), quantizer))


def _mine(lay: layout.Layout, max_memory: dict, quantized: bool = True, leaf: str = "biggest") -> dict:
    root = lay.nodes("bfloat16", quantized=quantized)
    balanced = placement.balanced_memory(root, max_memory, set(lay.tied), leaf=leaf)
    factor = placement.BNB_MAX_MEMORY if quantized else 1
    return placement.infer_device_map(root, {k: v * factor for k, v in balanced.items()}, lay.tied)


@pytest.mark.parametrize("name", ["llama-3-8b", "gemma-2-9b"])
def test_pipeline_placement_16bit_equals_transformers(name):
    """lora/full load the 16-bit model: no quantizer, every element its dtype's size, no x 0.90."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.accelerate import _get_device_map
    from transformers.utils.generic import ContextManagers

    from qtool.core.meta import hf_config, model_class

    config = presets.load_model_preset(name)
    cfg = hf_config(config)
    cls = model_class(cfg)
    with ContextManagers(cls.get_init_context(torch.bfloat16, False, False, None) + [torch.device("meta")]):
        model = cls(cfg)
    lay = layout.load_cached(name, config)
    for n in (2, 3):
        max_memory = {i: 2**40 for i in range(n)}
        assert _mine(lay, max_memory, quantized=False) == dict(_get_device_map(model, "auto", max_memory, None))


TINY = {
    "tiny-llama": llama_config(num_hidden_layers=6),
    "tiny-llama-tied": llama_config(num_hidden_layers=5, tie_word_embeddings=True),
    "tiny-gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=4, n_embd=64, n_head=4,
                      vocab_size=300, n_positions=64),
}


@pytest.mark.parametrize("name", ["llama-3-8b", "gemma-2-9b", "qwen2.5-0.5b", "gpt2", "mixtral-8x7b", "llama-3-70b",
                                  *TINY])
def test_pipeline_placement_equals_transformers(name):
    """The cached layout (presets: torch-free) or the meta one (tiny configs), placed by qtool, gives the very
    device map transformers computes: balanced over 2-4 roomy cards, and under random tight budgets (splits
    inside modules, overflow to the CPU and disk)."""
    config = TINY.get(name) or presets.load_model_preset(name)
    lay = layout.load_cached(name, config) if name not in TINY else layout.meta_layout(config)
    assert lay is not None, "stale configs/layouts cache: run tools/gen_layouts.py"
    total = placement.module_sizes(lay.nodes("bfloat16"), set(lay.tied))[0][""]
    rng = random.Random(name)
    cases = [{**{i: 2**40 for i in range(n)}, "cpu": 2**41} for n in (2, 3, 4)]
    cases += [{i: int(total * rng.uniform(0.15, 0.8)) for i in range(rng.choice((2, 3, 4)))} for _ in range(3)]
    for max_memory in cases:
        assert _mine(lay, max_memory) == _real_device_map(config, max_memory), max_memory


def test_pipeline_placement_equals_older_transformers():
    """transformers before 5.18 balanced with the mean leaf module: qtool's placement under that rule gives the
    maps transformers 5.17's own _get_device_map computed (tests/data/placement_maps.json, recorded by
    tools/gen_placement_maps.py with 5.17 importable), and the current rule gives other maps for most of them."""
    record = json.loads((ROOT / "tests" / "data" / "placement_maps.json").read_text())
    assert record["maps"]
    differs = 0
    for m in record["maps"]:
        rule = placement.leaf_rule(m["transformers"])
        assert rule == "mean"
        lay = layout.load_cached(m["preset"], presets.load_model_preset(m["preset"]))
        max_memory = {**{i: 2**40 for i in range(m["cards"])}, "cpu": 2**41}
        expected = {k: v for k, v in m["device_map"].items()}
        assert _mine(lay, max_memory, leaf=rule) == expected, (m["preset"], m["cards"])
        differs += _mine(lay, max_memory) != expected
    assert differs >= len(record["maps"]) // 2


def test_leaf_rule_by_version():
    assert [placement.leaf_rule(v) for v in ("5.17.0", "5.18.0", "5.24.0.dev0", "4.57.1", "6.0")] == [
        "mean", "biggest", "biggest", "mean", "biggest"]
    from importlib.metadata import version

    assert placement.leaf_rule() == placement.leaf_rule(version("transformers"))


@pytest.mark.parametrize("name", ["llama-3-8b", "gemma-2-9b", "phi-3-mini", "opt-125m"])
def test_layout_cache_is_current(name):
    pytest.importorskip("torch")
    config = presets.load_model_preset(name)
    assert layout.load_cached(name, config) == layout.meta_layout(config)


def test_analytic_layout_matches_meta():
    """Size shorthands without a preset (30b) use the analytic Llama tree: the same as the meta model's."""
    pytest.importorskip("torch")
    spec = resolve_model("30b")
    from qtool.core.plancache import plan_for

    cached = plan_for(spec)
    assert cached.source == "analytic"
    analytic = layout.layout_for(spec, cached)
    meta = layout.meta_layout(spec.config)
    assert analytic.params() == meta.params() and analytic.tied == meta.tied
    for n in (2, 3):
        assert _mine(analytic, {i: 2**40 for i in range(n)}) == _mine(meta, {i: 2**40 for i in range(n)})


@pytest.mark.parametrize("parallel", ["pipeline", "fsdp", "ddp"])
def test_one_card_is_the_one_gpu_report(parallel):
    spec = resolve_model("llama-3-8b")
    s = _settings(parallel=parallel, gpus=1, vram="24GB")
    report = estimate_report(spec, s)
    est = estimate_cards(spec, s)
    (card,) = est.cards
    assert card.terms == report["breakdown"]
    assert card.peak_bytes == report["allocated_peak_bytes"]
    assert card.device_bytes == report["peak_bytes"] and card.fits == report["fits"]


def test_pipeline_conserves_the_model():
    """Spread over cards, the weights, adapters and checkpoints add up to the one-GPU figures (the kept
    tensors' allocator rounding aside). (accelerate may leave a card without layers: on 3 roomy cards llama-3-8b
    goes 6 / 26 / 0 + lm_head, card 1 not reserving room for the largest layer as card 0 does.)"""
    spec = resolve_model("llama-3-8b")
    one = estimate_report(spec, _settings())["breakdown"]
    for n in (2, 3, 4):
        est = estimate_cards(spec, _settings(gpus=n))
        cards = [c.terms for c in est.cards]
        assert sum(est.detail["layers_per_card"]) == 32
        for key in ("lora_params", "lora_grads", "optimizer_states", "activation_checkpoints", "kept_fp32"):
            assert sum(c.get(key, 0) for c in cards) == one[key], key
        assert abs(sum(c.get("weights", 0) for c in cards) - one["weights"]) < 512 * 65
        used = [c for c in cards if c]  # accelerate may leave the last cards empty: nothing placed, nothing held
        assert all(c["cuda_context"] == one["cuda_context"] for c in used)
        head = est.detail["device_map"]["lm_head"]
        assert "logits" in cards[head] and not any("logits" in c for i, c in enumerate(cards) if i != head)


def test_pipeline_embeddings_first_head_last():
    spec = resolve_model("llama-3-8b")
    dmap = estimate_cards(spec, _settings(gpus=2)).detail["device_map"]
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == 1


def _independent_units(config: dict, n: int) -> tuple[int, int, int]:
    """(bytes of one rank's weight shards, one decoder layer's flat bytes, the root's) from a real meta model
    with bitsandbytes' Linear4bit: a quantized weight of k elements packs into k/4 bf16 storage elements."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    from qtool.core.meta import meta_model

    model = meta_model(config)
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True,
                                                               bnb_4bit_quant_storage=torch.bfloat16))
    quantizer.preprocess_model(model=model, dtype=torch.bfloat16, device_map="auto", checkpoint_files=None,
                               use_kernels=False)
    units: dict[str, int] = {}
    layer_names = {name for name, m in model.named_modules() if type(m).__name__ in model._no_split_modules}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            unit = next((ln for ln in layer_names if mname == ln or mname.startswith(ln + ".")), "root")
            elements = p.numel() // 4 if isinstance(module, Linear4bit) and pname == "weight" else p.numel()
            units[unit] = units.get(unit, 0) + elements
    shard = sum(math.ceil(math.ceil(e / n) * 2 / 512) * 512 for e in units.values())
    layer = next(v for k, v in units.items() if k != "root")
    return shard, 2 * layer, 2 * units["root"]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_fsdp_shards_match_a_meta_model(n):
    spec = resolve_model("llama-3-8b")
    s = _settings(gpus=n, parallel="fsdp", quant_storage="bfloat16", dtype="bfloat16")
    est = estimate_cards(spec, s)
    shard, layer, root = _independent_units(spec.config, n)
    assert est.detail["layer_bytes"] == layer and est.detail["root_bytes"] == root
    assert all(c.terms["weights_shard"] == shard for c in est.cards)
    # conservation: the ranks' shards hold the whole flat model, padding (< n elements per unit) and the
    # allocator's 512-byte rounding aside
    total = 32 * layer + root
    assert total <= n * shard < total + 33 * n * (2 * n + 512)


def test_fsdp_monotonic_and_offload():
    spec = resolve_model("70b")
    ests = [estimate_cards(spec, _settings(gpus=n, parallel="fsdp")) for n in (2, 4, 8)]
    steps = [e.detail["phases"]["step"] for e in ests]
    assert steps[0] > steps[1] > steps[2]
    # transformers 5.20+ (CI's): each rank's allocator warmup asks for the whole 4-bit model, whatever N; an
    # unbounded card grants it, and it is every card's peak
    warmups = {e.detail["phases"]["warmup"] for e in ests}
    assert len(warmups) == 1 and {e.detail["phase"] for e in ests} == {"warmup"}
    assert {e.cards[0].peak_bytes for e in ests} == warmups
    # up to 5.19 the projections and lm_head counted 1 / N: the step is the peak again, and the warmup shrinks
    old = [estimate_cards(spec, _settings(gpus=n, parallel="fsdp"), transformers_version="5.17.0") for n in (2, 4, 8)]
    assert {e.detail["phase"] for e in old} == {"step"} and [e.cards[0].peak_bytes for e in old] == steps
    assert warmups.pop() > old[0].detail["phases"]["warmup"] > old[1].detail["phases"]["warmup"]
    # on a real 24 GB card the warmup asks for the card less 1.2 GiB at most, and the step decides
    card = estimate_cards(spec, _settings(gpus=2, parallel="fsdp", gpu="rtx-4090"))
    assert card.detail["phases"]["warmup"] == card.cards[0].budget_bytes - fsdp.WARMUP_SPARE
    assert card.detail["phase"] == "step"
    # without ram-efficient loading every rank loads the whole 4-bit model on its card first: for 70b that is
    # each card's peak, whatever N
    eager = [estimate_cards(spec, _settings(gpus=n, parallel="fsdp", fsdp_ram_efficient=False)) for n in (2, 4)]
    assert {e.detail["phase"] for e in eager} <= {"load", "wrap"}
    loading = max(eager[0].detail["phases"]["load"], eager[0].detail["phases"]["wrap"])
    assert {e.cards[0].peak_bytes for e in eager} == {loading}
    base = estimate_cards(spec, _settings(gpus=2, parallel="fsdp"))
    off = estimate_cards(spec, _settings(gpus=2, parallel="fsdp", fsdp_offload_params=True))
    # what leaves each card (shards, their grads, the optimizer) is what host RAM gains, once per rank
    moved = base.detail["phases"]["step"] - off.detail["phases"]["step"]
    assert moved > 18 * GiB and off.host_ram_bytes - base.host_ram_bytes == 2 * moved
    eager = estimate_cards(spec, _settings(gpus=2, parallel="fsdp", fsdp_ram_efficient=False))
    assert eager.host_ram_bytes == 2 * base.host_ram_bytes
    grad_op = estimate_cards(spec, _settings(gpus=2, parallel="fsdp", fsdp_sharding="shard_grad_op"))
    whole = estimate_cards(spec, _settings(gpus=2, parallel="fsdp", fsdp_sharding="no_shard"))
    # shard_grad_op holds every layer gathered at the end of the forward on top of its shards: more than no_shard
    assert base.detail["phases"]["step"] < whole.detail["phases"]["step"] < grad_op.detail["phases"]["step"]


def test_ddp_is_a_full_copy_plus_buckets():
    spec = resolve_model("llama-3-8b")
    one = estimate_report(spec, _settings())
    est = estimate_cards(spec, _settings(gpus=2, parallel="ddp"))
    for card in est.cards:
        assert card.terms["ddp_buckets"] == one["breakdown"]["lora_grads"]
        assert card.device_bytes == one["peak_bytes"] + one["breakdown"]["lora_grads"] + memory.NCCL_BYTES
        assert card.peak_bytes == one["allocated_peak_bytes"] + one["breakdown"]["lora_grads"]


def test_mixed_cards():
    """Each card's memory is its budget; the pipeline gives the larger card more layers; with FSDP the
    smallest card decides."""
    spec = resolve_model("70b")
    est = estimate_cards(spec, _settings(gpus="rtx-3060,a100-80gb"))
    assert [c.budget_bytes for c in est.cards] == [parse_size("12 GiB"), parse_size("80 GiB")]
    layers = est.detail["layers_per_card"]
    assert layers[0] < layers[1] and not est.detail["offloaded"]
    # placement counts 4-bit weights only: they fit the small card, QLoRA's fp32 embeddings and the step do not
    assert est.cards[0].terms["weights"] < 0.9 * parse_size("12 GiB") < est.cards[0].device_bytes
    # the big card first: it takes its balanced half, the rest does not fit the small last card
    backwards = estimate_cards(spec, _settings(gpus="a100-80gb,rtx-3060"))
    assert backwards.detail["offloaded"] and backwards.fits is False
    spec = resolve_model("llama-3-8b")
    fsdp = estimate_cards(spec, _settings(gpus="rtx-3060,a100-80gb", parallel="fsdp", seq_len=8192, batch_size=2))
    assert fsdp.cards[0].fits is False and fsdp.cards[1].fits is True and fsdp.fits is False


def test_json_has_one_peak_per_card(capsys):
    code = main(["estimate", "70b", "--gpus", "3", "--parallel", "fsdp", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["fits"] is None and r["parallel"] == "fsdp" and r["gpus"] == 3
    assert [c["index"] for c in r["cards"]] == [0, 1, 2]
    for c in r["cards"]:
        outside = c["terms"]["cuda_context"] + c["terms"].get("nccl_buffers", 0)  # none yet at the warmup
        assert c["peak_bytes"] + outside == c["device_bytes"] == sum(c["terms"].values())
    assert r["host_ram_bytes"] > 0 and "breakdown" in r


def test_cli_70b_on_two_4090s_fsdp(capsys):
    code = main(["estimate", "70b", "--gpu", "rtx-4090", "--gpus", "2", "--parallel", "fsdp"])
    out = capsys.readouterr()
    assert code == 3
    assert out.err.strip().splitlines()[-1].startswith(
        "qtool: error: llama-3-70b: does not fit on 2 x rtx-4090 with fsdp: card 0 needs")
    assert "card" in out.out and "budget" in out.out and "rtx-4090" in out.out
    code = main(["estimate", "70b", "--gpu", "rtx-4090", "--gpus", "2", "--parallel", "fsdp",
                 "--no-fsdp-ram-efficient"])
    out = capsys.readouterr()
    assert code == 3 and out.err.strip().endswith("while loading: every rank loads the whole 4-bit model first")
    code = main(["estimate", "8b", "--gpu", "rtx-4090", "--gpus", "2", "--parallel", "fsdp", "--fsdp-offload-params"])
    out = capsys.readouterr()
    assert code == 0 and "Fits on 2 x rtx-4090 with fsdp" in out.out and "Host RAM" in out.out
    # the offloaded step is the one measured miss: a warning (stderr, JSON), and only with offload
    assert "not fully modelled" in out.err
    main(["estimate", "8b", "--gpu", "rtx-4090", "--gpus", "2", "--parallel", "fsdp"])
    assert "not fully modelled" not in capsys.readouterr().err


def test_offload_warning_covers_the_measured_step(capsys):
    """The headroom the offload warning asks for covers every recorded offloaded step (measured / estimate - 1,
    recomputed from docs/multigpu_measurements.json), and is not more than a point above the worst."""
    import json
    import sys

    from qtool.estimate import fsdp

    sys.path.insert(0, str(ROOT / "bench"))
    from compare_multigpu import compare

    rows = json.loads((ROOT / "docs" / "multigpu_measurements.json").read_text())
    over = [c["step"] / c["step_estimate"] - 1 for r in rows if "--fsdp-offload-params" in (r.get("flags") or [])
            for c in compare(r) if c["step"] and c["step_estimate"]]
    assert over and max(over) <= fsdp.OFFLOAD_MEASURED_OVER <= max(over) + 0.01
    code = main(["estimate", "8b", "--gpus", "2", "--parallel", "fsdp", "--fsdp-offload-params", "--json"])
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert code == 0 and any(f"{fsdp.OFFLOAD_MEASURED_OVER:.0%} above" in w for w in warnings)


@pytest.mark.parametrize("args,says", [
    (["--recipe", "unsloth", "--gpus", "2", "--parallel", "pipeline"], "--recipe unsloth is modelled on one GPU"),
    (["--gpus", "2", "--parallel", "fsdp", "--mode", "inference"], "for inference over several cards"),
    (["--gpus", "2", "--parallel", "fsdp", "--mode", "full"], "--parallel fsdp --mode full is not modelled"),
    (["--gpus", "4", "--parallel", "fsdp", "--mode", "lora"], "--parallel fsdp --mode lora is not modelled")])
def test_unmodelled_strategies_are_refused_in_one_line(capsys, args, says):
    """Another run's figures are not an answer: FSDP's estimate is FSDP-QLoRA training, Unsloth's one card."""
    code = main(["estimate", "8b", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("qtool: error: ") and says in err[0]
    assert main(["estimate", "8b", "--gpus", "2", "--parallel", "ddp", "--mode", "full"]) == 0


def test_one_gpu_output_unchanged(capsys):
    main(["estimate", "8b", "--gpu", "rtx-4090"])
    one = capsys.readouterr().out
    main(["estimate", "8b", "--gpu", "rtx-4090", "--gpus", "1", "--parallel", "fsdp"])
    assert capsys.readouterr().out == one


def test_no_torch_for_several_gpus():
    code = ("import sys; from qtool.cli.app import main; "
            "rcs = [main(['estimate', '70b', '--gpus', '2', '--parallel', p, '--json']) for p in "
            "('pipeline', 'fsdp', 'ddp')]; "
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'accelerate') if m in sys.modules]; "
            "print('HEAVY', heavy, rcs, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY [] [0, 0, 0]" in r.stderr, r.stderr


def test_fsdp_units_match_a_real_fsdp_wrap(tmp_path, qtool_forks, hermetic_env):
    """A real FSDP1 wrap of a 4-bit LoRA model on 2 CPU ranks (tests/fsdp_ranks.py, each rank a process forked
    from one that has imported torch and transformers, with the variables torch.distributed.run would set): the
    decoder layers' and the root's flat parameters, the LoRA units and each rank's chunk are what
    qtool.estimate.fsdp counts."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from tests.tinymodels import write_checkpoint

    from qtool.estimate import fsdp
    from qtool.estimate.report import estimate_basis

    config = llama_config(num_hidden_layers=3, torch_dtype="bfloat16")
    write_checkpoint(tmp_path / "m", config, dtype=torch.bfloat16)
    port = str(29500 + random.randrange(1000))
    code = f"import runpy; runpy.run_path({str(ROOT / 'tests' / 'fsdp_ranks.py')!r}, run_name='__main__')"
    env = {**qtool_forks._env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    ranks = [qtool_forks.python(code, str(tmp_path / "m"), "4", cwd=tmp_path,
                                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    outs = [rank.communicate(timeout=300) for rank in ranks]
    line = next((x for x in outs[0][0].splitlines() if x.startswith("UNITS ")), None)
    assert line, outs[0][1][-3000:] + outs[1][1][-3000:]
    real = json.loads(line[len("UNITS "):])
    s = _settings(gpus=2, parallel="fsdp", quant_storage="bfloat16", dtype="bfloat16", lora_rank=4)
    spec = resolve_model(str(tmp_path / "m"))
    u = fsdp.model_units(estimate_basis(spec, s), s)
    frozen = sorted(n for n, _, dtype, trainable in real if not trainable)
    assert all(dtype == "torch.bfloat16" for _, _, dtype, trainable in real if not trainable)
    assert frozen == sorted([u.layer_bytes // 2] * 3 + [u.root_bytes // 2])
    lora = sorted(n for n, _, dtype, trainable in real if trainable and dtype == "torch.float32")
    assert len(lora) == sum(1 for _, _, _, t in real if t)
    assert lora == sorted(numel for numel, count in u.lora_units for _ in range(count))
    assert all(local == math.ceil(n / 2) for n, local, _, _ in real)


def test_recorded_multigpu_runs_are_within_5_percent_per_card_and_capped_verdicts_agree():
    """The GPU runs recorded in docs/multigpu_measurements.json (4 x H200 and 2 x H200, issue 13), recomputed
    here without a GPU: every card within 5% of its rank's (FSDP, DDP) or device's (pipeline, placed as the
    recorded transformers version places) max_memory_allocated, and a capped run fits exactly when it ran."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from compare_multigpu import compare

    rows = json.loads((ROOT / "docs" / "multigpu_measurements.json").read_text())
    checked = verdicts = loads = steps = 0
    for row in rows:
        for card in compare(row):
            if card["step"] and card["step_estimate"]:
                # the training steps alone decide the fit when the warmup is the run's peak; parameter offload's
                # step is the one known miss (measured 0.47 GiB over the estimate, 8B on 2 cards; not modelled)
                low, high = (-0.15, -0.10) if "--fsdp-offload-params" in (row.get("flags") or []) else (-0.05, 0.05)
                error = (card["step_estimate"] - card["step"]) / card["step"]
                assert low <= error <= high, (row["model"], row["gpus"], row["seq_len"], row.get("flags"), error)
                steps += 1
            if card["error"] is not None:
                assert abs(card["error"]) <= 0.05, (row["model"], row["gpus"], row["seq_len"], card)
                checked += 1
            if card["load"] and card["load_estimate"] and row.get("parallel") == "fsdp" and row.get("outcome") == "ok":
                # the load's own peak: transformers' allocator warmup (parked) or the whole model
                assert abs(card["load_estimate"] - card["load"]) <= 0.01 * card["load"], (row["model"], card)
                loads += 1
            if card["fits"] is not None and row.get("outcome") in ("ok", "oom") and "--no-fsdp-ram-efficient" \
                    not in (row.get("flags") or []):
                assert card["fits"] == (row["outcome"] == "ok"), (row["model"], row["gpus"], card)
                verdicts += 1
    assert checked >= 80 and verdicts >= 4 and loads >= 30 and steps >= 40
