"""Inputs of a run, checked before anything is loaded: options, where the weights come from, the device,
the size against the machine, the reference, the tokenizer, and the batch of token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qtool.core.config import Settings
from qtool.core.errors import BadInput, DeviceError, DoesNotFit, WeightsError
from qtool.core.models import ModelSpec

QUALITY_TOKENS = 256  # tokens of the first sequence compared against --reference


@dataclass(frozen=True)
class VerifyOptions:
    device: str = "cuda"  # "cuda", "cuda:N" or "cpu"
    device_map: str | None = None  # None: one device; "auto": spread over all GPUs with accelerate
    steps: int = 2  # training steps, or prefill+decode rounds; 0 = load only
    decode_tokens: int = 4
    data: Path | None = None  # text file tokenized with the model's tokenizer instead of random ids
    reference: str | None = None  # 16-bit model to compare outputs with
    revision: str | None = None
    trust_remote_code: bool = False
    tolerance: float = 0.05  # |estimate - measured| / measured, informational (measured: within 2.4%)
    seed: int = 0
    lr: float = 1e-4
    allow_pickle: bool = False  # read .bin/.pt checkpoints (pickle can run code)


@dataclass
class Source:
    """Where the weights come from."""

    kind: str  # "random" | "checkpoint-4bit" | "checkpoint-16bit"
    path: Path | None
    description: str
    quantization_config: dict | None = None
    tokenizer_dir: Path | None = None


# ----------------------------------------------------------------------------------------------- input


def resolve_source(spec: ModelSpec, options: VerifyOptions) -> Source:
    """Presets, shorthands and bare config files give random weights; directories and hub ids give weights."""
    if spec.kind in ("preset", "shorthand", "approximation"):
        return Source("random", None, f"random weights from the {spec.name} config (no checkpoint)")
    if spec.kind == "local" and spec.config_path is not None and Path(spec.ref).expanduser().is_file():
        return Source("random", None, f"random weights from {spec.config_path} (no checkpoint)")
    if spec.kind == "hub":
        from qtool.core import hub

        root, sha = hub.download_checkpoint(spec.name, revision=options.revision)
        where = f"{spec.name}@{sha[:12]}" if sha else spec.name
    else:
        root, where = Path(spec.path), str(spec.path)
    return _checkpoint_source(root, where, allow_pickle=options.allow_pickle)


def _checkpoint_source(root: Path, where: str, *, allow_pickle: bool = False) -> Source:
    from qtool.core.checkpoint import Checkpoint

    with Checkpoint.open(root, allow_pickle=allow_pickle) as ckpt:
        method = ckpt.prequantized_method()
        config = ckpt.config or {}
    tok = root if any((root / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")) else None
    if method is None:
        return Source("checkpoint-16bit", root, f"16-bit checkpoint {where}, quantized while loading", tokenizer_dir=tok)
    qc = config.get("quantization_config") or {}
    if method != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit", True)) or qc.get("load_in_8bit"):
        raise WeightsError(f"quantized with {method} {'8-bit' if qc.get('load_in_8bit') else ''}".strip()
                           + ": verify runs bnb-4bit or 16-bit checkpoints", path=root)
    return Source("checkpoint-4bit", root, f"bnb-4bit checkpoint {where}", quantization_config=qc, tokenizer_dir=tok)


def check_inputs(options: VerifyOptions) -> None:
    """Exit-2 conditions about --data and --reference, checked before anything is loaded or downloaded.
    A hub --reference is only resolved here (its config.json); its weights come after the model's."""
    if options.data is not None:
        data = Path(options.data).expanduser()
        if not data.exists():
            raise BadInput("--data: no such file", path=data)
        if not data.is_file():
            raise BadInput("--data: not a file (expected a text file)", path=data)
    if options.reference:
        _reference_spec(options)


def check_device(options: VerifyOptions) -> None:
    """Exit-2 conditions about the device, checked before anything is loaded."""
    import torch

    dev = options.device
    if dev != "cpu" and not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise DeviceError(f"invalid device {dev!r}: expected cuda, cuda:N or cpu")
    if dev == "cpu":
        if options.device_map not in (None, "cpu"):
            raise DeviceError("--device-map auto spreads over GPUs; it cannot be combined with --device cpu")
        return
    if not torch.cuda.is_available():
        built = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise DeviceError(f"CUDA is not available (torch {torch.__version__} is {built}); "
                          "pass --device cpu to run the same steps on the CPU")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"no device {dev}: {torch.cuda.device_count()} GPU(s) visible")
    if options.device_map not in (None, "auto"):
        raise DeviceError(f"invalid --device-map {options.device_map!r}: only 'auto' is supported")


def fit_positions(spec: ModelSpec, settings: Settings) -> tuple[Settings, str | None]:
    """A sequence longer than the model's positions is refused when asked for (learned position embeddings
    index out of range; rotary ones run, but measure a model used out of its range); the default 2048 is
    cut to the model's positions, with a note. -> (settings to run, note or None)."""
    import dataclasses

    from qtool.estimate.memory import _first

    cfg = spec.config.get("text_config") if isinstance(spec.config.get("text_config"), dict) else spec.config
    limit = _first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length")
    seq = settings.run.seq_len
    if not isinstance(limit, int) or seq <= limit:
        return settings, None
    if settings.sources.get("seq_len", "default") != "default":
        raise BadInput(f"--seq-len {seq:,} is beyond {spec.name}'s {limit:,} positions (max_position_embeddings)")
    run = dataclasses.replace(settings.run, seq_len=limit)
    return (dataclasses.replace(settings, run=run, values={**settings.values, "seq_len": limit}),
            f"seq_len {limit} (the model's max_position_embeddings) instead of the default {seq}")


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_size(spec: ModelSpec, settings: Settings, options: VerifyOptions) -> None:
    """Runs that cannot work are refused before loading: the estimate over the machine's available RAM
    (--device cpu, exit 2) or well over every GPU's memory (exit 3: it does not fit)."""
    from qtool.core.sizes import format_bytes
    from qtool.verify.verdict import _estimate

    est = _estimate(spec, settings, options).get("allocated_peak_bytes")
    if not est:
        return
    if options.device == "cpu":
        avail = _available_ram()
        if avail is not None and est > avail:
            raise BadInput(f"{spec.name} at batch {settings.run.batch_size} x {settings.run.seq_len:,} tokens needs about "
                           f"{format_bytes(est)} (qtool estimate); this machine has {format_bytes(avail)} available")
        return
    import torch

    ids = range(torch.cuda.device_count()) if options.device_map == "auto" else [
        int(options.device[5:]) if options.device.startswith("cuda:") else 0]
    total = sum(torch.cuda.get_device_properties(i).total_memory for i in ids)
    if est > 1.5 * total:  # the model's own estimate is within a few % measured: 1.5x is no borderline case
        raise DoesNotFit(f"{spec.name} needs about {format_bytes(est)} (qtool estimate), "
                         f"{est / total:.1f}x the {format_bytes(total)} of {len(ids)} GPU(s): not run")


def check_same_architecture(spec: ModelSpec, reference: Path) -> None:
    """--reference must be the same model in 16-bit: same model_type and architecture."""
    from qtool.core.models import read_config_json

    ref = read_config_json(Path(reference) / "config.json")
    mine = (spec.config.get("model_type"), (spec.config.get("architectures") or [None])[0])
    theirs = (ref.get("model_type"), (ref.get("architectures") or [None])[0])
    if mine[0] != theirs[0] or (mine[1] and theirs[1] and mine[1] != theirs[1]):
        raise BadInput(f"--reference is a {theirs[0]} model ({theirs[1]}), {spec.name} a {mine[0]} "
                       f"({mine[1]}): not the same model", path=reference)


def check_tokenizer_code(tokenizer_dir: Path | None, trust_remote_code: bool) -> None:
    """A tokenizer whose tokenizer_config.json maps to the repository's own classes runs that code when
    loaded. Never without --trust-remote-code, and never by asking (transformers prompts in a terminal)."""
    if tokenizer_dir is None or trust_remote_code:
        return
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # unreadable: the tokenizer load reports it
    if isinstance(cfg, dict) and cfg.get("auto_map"):
        raise BadInput("the tokenizer needs code from the repository (auto_map in tokenizer_config.json)",
                       path=path, hint="pass --trust-remote-code if you trust it")


def make_batch(vocab_size: int, batch: int, seq_len: int, *, seed: int, data: Path | None,
               tokenizer_dir: Path | None, trust_remote_code: bool = False):
    """batch x seq_len token ids: random, or the text of `data` tokenized (repeated to fill)."""
    import torch

    if data is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    if tokenizer_dir is None:
        raise BadInput("--data needs the model's tokenizer, and this model has no tokenizer files", path=data)
    try:
        text = Path(data).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput("no such file", path=data) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read as UTF-8 text: {exc}", path=data) from None
    from transformers import AutoTokenizer

    check_tokenizer_code(tokenizer_dir, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)  # never a prompt
    ids = tok(text)["input_ids"]
    if not ids:
        raise BadInput("no tokens in file", path=data)
    need = batch * seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids, dtype=torch.long).view(batch, seq_len).clamp_(max=vocab_size - 1)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _reference_spec(options: VerifyOptions) -> ModelSpec:
    from qtool.core.models import resolve_model

    ref = resolve_model(options.reference, revision=options.revision)
    if ref.kind in ("preset", "shorthand", "approximation") or (ref.kind == "local" and Path(ref.ref).expanduser().is_file()):
        raise BadInput(f"--reference {options.reference}: needs a checkpoint with 16-bit weights, not a config")
    return ref


def _resolve_reference(options: VerifyOptions) -> tuple[Path, str]:
    src = resolve_source(_reference_spec(options), options)
    if src.kind != "checkpoint-16bit":
        raise BadInput("--reference must be a 16-bit checkpoint; this one is already quantized", path=src.path)
    return src.path, src.description
