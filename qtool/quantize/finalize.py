"""Step 4: what goes beside the shards: config.json with quantization_config, the tokenizer and other
files of the source (only regular files inside it), sentence-transformers module folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qtool.quantize.plan import QuantizePlan
from qtool.core.sizes import format_bytes

# Files that are weights (never copied) or that we write ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx", ".onnx_data")
_OWN_FILES = {"config.json", "README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_SMALL_FILE_LIMIT = 50 * 2**20  # for extra files; tokenizer files are copied whatever their size
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "spm", "sentencepiece", "special_tokens_map", "added_tokens",
                       "chat_template", "preprocessor_config", "processor_config")


def write_config(plan: QuantizePlan, out_dir: Path, trust_remote_code: bool = False) -> None:
    """config.json as save_pretrained writes it for a model loaded with this BitsAndBytesConfig."""
    from transformers import AutoConfig

    from qtool.core.meta import hf_config

    try:
        cfg = AutoConfig.from_pretrained(str(plan.source), trust_remote_code=trust_remote_code)
    except Exception:  # fall back to the dict we validated
        cfg = hf_config(plan.config, source=plan.source / "config.json", trust_remote_code=trust_remote_code)
    import torch

    cfg.dtype = getattr(torch, plan.model_dtype)
    for sub in getattr(cfg, "sub_configs", {}) or {}:
        if getattr(cfg, sub, None) is not None:
            getattr(cfg, sub).dtype = cfg.dtype
    cfg.quantization_config = plan.settings.bnb_config()
    cfg.architectures = [plan.architecture]
    cfg.save_pretrained(str(out_dir))


def write_generation_config(plan: QuantizePlan, out_dir: Path) -> bool:
    """generation_config.json as save_pretrained writes it for a generative model; False if none."""
    try:
        from transformers import GenerationConfig

        from qtool.core.meta import hf_config

        if plan.architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            GenerationConfig.from_model_config(hf_config(plan.config)).save_pretrained(str(out_dir))
            return True
    except Exception:
        pass
    return False


def _safe_file(path: Path, allowed: list[Path]) -> str | None:
    """Why `path` must not be copied, or None: only regular files whose real location is inside the
    checkpoint (a symlink to /proc/self/environ or /etc/shadow would copy secrets into the output)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "a broken or looping symlink"
    if not any(real == a or a in real.parents for a in allowed):
        return f"a symlink to {real}, outside the checkpoint"
    if not real.is_file():
        return "not a regular file"
    return None


def _copy_tree(src: Path, dst: Path, allowed: list[Path], skipped: list[tuple[str, str]], rel: str) -> None:
    """A sentence-transformers module folder (1_Pooling/, 2_Dense/ ...), with the same regular-file rule."""
    dst.mkdir(exist_ok=True)
    for p in sorted(src.iterdir()):
        name = f"{rel}/{p.name}"
        if p.is_dir() and not p.is_symlink():
            _copy_tree(p, dst / p.name, allowed, skipped, name)
            continue
        why = _safe_file(p, allowed)
        if why:
            skipped.append((name, why))
        else:
            shutil.copyfile(p, dst / p.name)


def _module_folders(source: Path) -> list[str]:
    """The folders sentence-transformers' modules.json names (its loader needs them beside the model)."""
    try:
        modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(modules, list):
        return []
    folders = []
    for m in modules:
        path = m.get("path") if isinstance(m, dict) else None
        if isinstance(path, str) and path and "/" not in path and path not in (".", "..") and not path.startswith("."):
            folders.append(path)
    return folders


def copy_small_files(source: Path, out_dir: Path, plan: QuantizePlan,
                     helper=None) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokenizer, generation config, other small files and sentence-transformers module folders; never
    weights, never our own files, never anything outside the checkpoint. -> (copied, [(skipped, why)]).
    `helper`: a qtool.quantize.sidecar.Sidecar that made the generation config out of process."""
    from qtool.core.checkpoint import _allowed_roots

    allowed = _allowed_roots(source)
    copied: list[str] = []
    skipped: list[tuple[str, str]] = []
    for p in sorted(source.iterdir()):
        if p.name.startswith(".") or p.name in _OWN_FILES or p.is_dir():
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        why = _safe_file(p, allowed)
        if why is None and p.stat().st_size > _SMALL_FILE_LIMIT and not p.name.startswith(_TOKENIZER_PREFIXES):
            why = f"{format_bytes(p.stat().st_size)}, over the {format_bytes(_SMALL_FILE_LIMIT)} limit for extra files"
        if why:
            skipped.append((p.name, why))
            continue
        shutil.copyfile(p, out_dir / p.name)
        copied.append(p.name)
    for folder in _module_folders(source):
        if (source / folder).is_dir() and not (source / folder).is_symlink():
            _copy_tree(source / folder, out_dir / folder, allowed, skipped, folder)
            copied.append(folder + "/")
    if "generation_config.json" not in copied:  # save_pretrained writes one for generative models
        made = helper.write(out_dir, "generation_config.json") if helper is not None else None
        if made if made is not None else write_generation_config(plan, out_dir):
            copied.append("generation_config.json")
    return copied, skipped


def finalize(plan: QuantizePlan, out_dir: Path, result: dict, *, trust_remote_code: bool = False,
             helper=None) -> list[tuple[str, str]]:
    """Everything beside the shards: the index (several shards), config.json, the source's other files.
    -> the files of the source that were not copied, with why. `helper` (qtool.quantize.sidecar) has made
    the two files that need transformers in another process; where it could not, they are made here."""
    from qtool.quantize.sink import write_index

    if len(result["files"]) > 1:
        write_index(out_dir, result["weight_map"],
                    {"total_parameters": plan.total_parameters, "total_size": result["total_size"]})
    if helper is None or not helper.write(out_dir, "config.json"):
        write_config(plan, out_dir, trust_remote_code=trust_remote_code)
    _, skipped = copy_small_files(plan.source, out_dir, plan, helper)
    return skipped
