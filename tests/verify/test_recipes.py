"""The recipes users launch, on the CPU: a real transformers.Trainer under `qtool verify --recipe trainer`,
the optimizer names of TrainingArguments, the recipe arithmetic of `qtool estimate`, and the one-line errors
for recipes whose packages are missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qtool.cli.app import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128
SEQ = ["--seq-len", "24", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    """A tiny Llama in bf16 with transformers' own init, written by save_pretrained."""
    return tiny_model(init="transformers", vocab_size=VOCAB, torch_dtype="bfloat16", dtype="bfloat16")


def _verify(argv, capsys) -> tuple[int, dict | None, str]:
    code = main(["verify", *argv, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def test_default_recipe_is_a_real_trainer(tiny, capsys):
    code, r, _ = _verify([str(tiny), *SEQ, "--optimizer", "adamw_8bit"], capsys)
    assert code == 0, r
    assert r["settings"]["recipe"] == "trainer" and r["settings"]["optimizer"] == "adamw8bit"
    # what ran: TrainingArguments as a user writes them
    assert r["trainer"] == {"class": "transformers.Trainer", "optim": "adamw_bnb_8bit", "bf16": True, "fp16": False,
                            "gradient_checkpointing": True}
    assert [s["step"] for s in r["steps"]] == [1, 2] and r["loss_finite"] and r["grads_finite"]
    assert {"forward_peak", "backward_peak", "optimizer_step_peak", "after_step"} <= set(r["phases"])
    assert r["recipe"]["runner"] == "transformers.Trainer"


def test_loop_recipe_is_qtools_loop(tiny, capsys):
    code, r, _ = _verify([str(tiny), *SEQ, "--recipe", "loop", "--steps", "1"], capsys)
    assert code == 0
    assert "trainer" not in r and r["recipe"] == {"recipe": "loop", "precision": "bf16"}


def test_fp16_on_cpu_runs_fp32_with_a_note(tiny, capsys):
    code, r, _ = _verify([str(tiny), *SEQ, "--precision", "fp16", "--steps", "1"], capsys)
    assert code == 0
    assert r["trainer"]["fp16"] is False and r["trainer"]["bf16"] is False
    assert any("fp16" in n for n in r["notes"])


def test_a_second_trainer_on_the_same_model_still_autocasts(tiny):
    """accelerate marks a prepared model and skips it the next time: recipes.release must undo that, or every
    Trainer after the first on one model (bench/recipe_gpu.py runs several) trains without autocast."""
    from transformers import AutoModelForCausalLM

    from qtool.verify import recipes
    from qtool.core.config import resolve_settings
    from qtool.verify import Meter, VerifyOptions, VerifyReport, wrap_for_training

    settings = resolve_settings({"mode": "lora", "seq_len": 16, "recipe": "trainer"}, env={})
    model = wrap_for_training(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16), settings)
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    ids = torch.randint(0, VOCAB, (1, 16))
    for _ in range(2):
        report = VerifyReport(model={}, settings={}, device={}, versions={})
        recipes.train_with_trainer(model, ids, settings, VerifyOptions(device="cpu", steps=1),
                                   Meter([torch.device("cpu")]), {}, report)
        assert report.loss_finite
    assert seen == [True, True]
    assert "_is_accelerate_prepared" not in model.__dict__ and "forward" not in model.__dict__


def test_trainer_optim_names_cover_every_optimizer():
    from qtool.core.config import OPTIMIZERS
    from qtool.verify.recipes import TRAINER_OPTIM
    from transformers.training_args import OptimizerNames

    assert set(TRAINER_OPTIM) == set(OPTIMIZERS)
    assert {OptimizerNames(v) for v in TRAINER_OPTIM.values()}  # each is a name TrainingArguments accepts


def test_sft_recipe_needs_trl(tiny, capsys):
    missing = any(importlib.util.find_spec(m) is None for m in ("trl", "datasets", "triton"))
    code = main(["verify", str(tiny), *SEQ, "--recipe", "sft", "--steps", "1"])
    err = capsys.readouterr().err
    if missing:
        assert code == 2
        lines = [x for x in err.splitlines() if x.startswith("qtool: error:")]
        assert len(lines) == 1 and "--recipe sft" in lines[0] and "Traceback" not in err
    else:  # installed: the recipe runs
        assert code == 0, err


@pytest.mark.parametrize("mode", ["qlora", "inference"])
def test_unsloth_recipe_is_refused_in_one_line_where_it_cannot_run(tiny, capsys, mode):
    """Without unsloth installed: one line naming the extra. Installed: the CPU is refused (Unsloth's kernels
    are Triton, CUDA only). Either way exit 2, before anything is loaded."""
    code = main(["verify", str(tiny), *SEQ, "--mode", mode, "--recipe", "unsloth", "--steps", "1"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("qtool: error:")]
    assert code == 2 and len(lines) == 1 and "--recipe unsloth" in lines[0] and "Traceback" not in err
    if importlib.util.find_spec("unsloth") is None:
        assert "not installed" in lines[0]
    else:
        assert "CUDA" in lines[0]


def _random_spec(tmp_path):
    from qtool.core.models import resolve_model

    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
           "dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return resolve_model(str(tmp_path / "config.json"))


def test_unsloth_checkpoint_writes_random_weights_and_removes_them(tmp_path):
    """Unsloth loads from files: random weights become a 16-bit checkpoint in a temp folder, which
    transformers loads back with every weight of the config, and which is gone afterwards."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtool.verify.inputs import VerifyOptions, resolve_source
    from qtool.verify.recipes import unsloth_checkpoint

    spec = _random_spec(tmp_path)
    options = VerifyOptions(device="cpu")
    with unsloth_checkpoint(spec, resolve_source(spec, options), options) as folder:
        kept = folder
        with safe_open(folder / "model.safetensors", "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert dtypes == {torch.bfloat16}
        assert model.config.num_hidden_layers == 2 and model.get_input_embeddings().weight.shape == (VOCAB, 64)
        assert (folder / "tokenizer.json").is_file()
    assert not kept.exists()


def test_unsloth_checkpoint_is_removed_on_errors(tmp_path):
    from qtool.verify.inputs import VerifyOptions, resolve_source
    from qtool.verify.recipes import unsloth_checkpoint

    spec = _random_spec(tmp_path)
    options = VerifyOptions(device="cpu")
    with pytest.raises(RuntimeError, match="load failed"):
        with unsloth_checkpoint(spec, resolve_source(spec, options), options) as folder:
            kept = folder
            raise RuntimeError("load failed")
    assert not kept.exists()


def test_unsloth_checkpoint_uses_a_checkpoint_folder_as_it_is(tiny):
    from qtool.core.models import resolve_model
    from qtool.verify.inputs import VerifyOptions, resolve_source
    from qtool.verify.recipes import unsloth_checkpoint

    spec, options = resolve_model(str(tiny)), VerifyOptions(device="cpu")
    with unsloth_checkpoint(spec, resolve_source(spec, options), options) as folder:
        assert folder == tiny
    assert tiny.is_dir()


# --- estimate: recipes are arithmetic ---------------------------------------------------------------


def _estimate(*args, model: str = "llama-3-8b") -> dict:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "qtool", "estimate", model, "--json", *args], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _preset(name: str) -> dict:
    return json.loads((Path(__file__).resolve().parents[2] / "configs" / "models" / f"{name}.json").read_text())


def test_estimate_trainer_holds_a_16bit_copy_of_lm_head():
    cfg = json.loads((Path(__file__).resolve().parents[2] / "configs" / "models" / "llama-3-8b.json").read_text())
    loop = _estimate("--recipe", "loop", "--seq-len", "512")
    trainer = _estimate("--recipe", "trainer", "--seq-len", "512")
    copy = cfg["vocab_size"] * cfg["hidden_size"] * 2  # autocast's bf16 cast of the fp32 lm_head weight
    assert trainer["breakdown"]["lm_head_16bit"] == copy
    assert trainer["settings"]["recipe"] == "trainer" and loop["settings"]["recipe"] == "loop"
    assert trainer["peak_bytes"] > loop["peak_bytes"]


def test_estimate_sft_has_no_full_logits_and_16bit_adapters():
    trainer = _estimate("--recipe", "trainer", "--seq-len", "8192")
    sft = _estimate("--recipe", "sft", "--seq-len", "8192")
    assert "logits" not in sft["breakdown"] and "logits" in trainer["breakdown"]
    assert sft["breakdown"]["lora_params"] * 2 == trainer["breakdown"]["lora_params"]
    assert sft["peak_bytes"] < trainer["peak_bytes"]


def test_estimate_unsloth_keeps_embeddings_16bit_and_offloads_checkpoints():
    unsloth = _estimate("--recipe", "unsloth")
    assert "kept_fp32" not in unsloth["breakdown"] and "activation_checkpoints" not in unsloth["breakdown"]
    assert unsloth["breakdown"]["weights"] == unsloth["weights"]["nf4_dq"]["gpu"]


def test_estimate_unsloth_offloads_to_two_buffers_and_keeps_fp32_adapters():
    """Unsloth's checkpoints go to host memory through two B x S x hidden buffers; its adapters are fp32 (the
    same bytes as the Trainer's, twice trl's bf16 ones)."""
    cfg = _preset("llama-3-8b")
    unsloth = _estimate("--recipe", "unsloth", "--seq-len", "2048")["breakdown"]
    sft = _estimate("--recipe", "sft", "--seq-len", "2048")["breakdown"]
    assert unsloth["offload_buffers"] == 2 * 2048 * cfg["hidden_size"] * 2
    assert unsloth["lora_params"] == 2 * sft["lora_params"]


def test_estimate_unsloth_masks_a_sliding_window_only_past_it():
    cfg = _preset("mistral-7b")
    window = cfg["sliding_window"]
    inside = _estimate("--recipe", "unsloth", "--seq-len", str(window), model="mistral-7b")["breakdown"]
    past = _estimate("--recipe", "unsloth", "--seq-len", str(2 * window), model="mistral-7b")["breakdown"]
    assert "window_mask" not in inside
    assert past["window_mask"] == (2 * window) ** 2 * 2  # S x S in bf16


def test_estimate_unsloth_quantizes_moe_experts():
    """bitsandbytes' path keeps Mixtral's fused 3-D experts 16-bit; Unsloth's loader quantizes them: at least
    3/4 of their 16-bit bytes are gone (4-bit codes are a quarter, plus block statistics)."""
    cfg = _preset("mixtral-8x7b")
    expert_bytes = (cfg["num_hidden_layers"] * cfg["num_local_experts"] * 3 * cfg["hidden_size"]
                    * cfg["intermediate_size"] * 2)
    trainer = _estimate("--mode", "inference", "--recipe", "trainer", model="mixtral-8x7b")["breakdown"]
    unsloth = _estimate("--mode", "inference", "--recipe", "unsloth", model="mixtral-8x7b")["breakdown"]
    saved = trainer["weights"] - unsloth["weights"]
    assert 0.74 * expert_bytes < saved < 0.75 * expert_bytes
