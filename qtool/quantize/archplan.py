"""The plan without transformers, for decoder-only architectures whose tensors qtool knows by heart.

Importing transformers and building the model on the meta device takes 5-8 s, more than the whole read of
an 8B checkpoint from the page cache. For the Llama family (llama, mistral, qwen2, qwen3, gemma, gemma2) the
model's parameters follow from a few config.json fields: this module lists them in state-dict order, with
what `qtool.core.meta.build_plan` and transformers' loading rules decide for each (quantized or kept, tied,
skipped). It answers only when the checkpoint holds exactly those tensors with the expected shapes and
float dtypes and the config is plain (no remote code, no unknown class, every structural field an int);
anything else returns None and the plan goes through transformers as before, which also words the errors.
tests/quantize/test_archplan.py builds both plans for every family and variant and compares them whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qtool.core.dtypes import is_float_dtype
from qtool.core.plan import KEEP, QUANTIZE, REASON_BIAS, REASON_LINEAR, REASON_NOT_LINEAR, REASON_SKIPPED, \
    REASON_USER_SKIP, ModelPlan, TensorPlan, group_tensors

# Buffers some checkpoints carry that transformers recomputes and drops on load (as qtool.quantize.plan)
_DROPPABLE = re.compile(r"(\.rotary_emb\.inv_freq|\.inv_freq|\.attn\.bias|\.attn\.masked_bias|\.position_ids)$")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Family:
    """How one model_type lays out its parameters (read in transformers 5's modeling_<type>.py)."""

    architecture: str  # the *ForCausalLM class
    qkv_bias: str | None  # config field for q/k/v biases; "" = always; None = never
    o_bias: str | None  # the same for o_proj
    mlp_bias: str | None  # for gate/up/down
    qk_norm: bool  # q_norm, k_norm (head_dim) after o_proj
    ffn_norms: bool  # pre_/post_feedforward_layernorm after the two usual norms
    defaults: dict  # config class defaults of the optional fields (tests check them against transformers)


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "attention_bias", "attention_bias", "mlp_bias", False, False,
                    {"attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "head_dim": None}),
    "mistral": Family("MistralForCausalLM", None, None, None, False, False,
                      {"tie_word_embeddings": False, "head_dim": None}),
    "qwen2": Family("Qwen2ForCausalLM", "", None, None, False, False,
                    {"tie_word_embeddings": False, "head_dim": None}),
    "qwen3": Family("Qwen3ForCausalLM", "attention_bias", "attention_bias", None, True, False,
                    {"attention_bias": False, "tie_word_embeddings": False, "head_dim": 128}),
    "gemma": Family("GemmaForCausalLM", "attention_bias", "attention_bias", None, False, False,
                    {"attention_bias": False, "tie_word_embeddings": True, "head_dim": 256}),
    "gemma2": Family("Gemma2ForCausalLM", "attention_bias", "attention_bias", None, False, True,
                     {"attention_bias": False, "tie_word_embeddings": True, "head_dim": 256}),
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size")


def dot_natural_key(s: str):
    """transformers.core_model_loading.dot_natural_key (5.x), the order save_pretrained sorts a converted
    state dict in: dot-separated parts, digits numerically before strings."""
    parts = []
    for part in s.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
        else:
            text = part.rstrip("0123456789")
            digits = part[len(text):]
            parts.append((1, text, int(digits)) if digits else (1, part))
    return parts


def should_convert_module(full_name: str, patterns: list[str] | None) -> bool:
    """transformers.quantizers.quantizers_utils.should_convert_module (5.x): a pattern matches from the start
    up to a module boundary (also as a regex), or as a suffix."""
    if patterns is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", full_name) or full_name.endswith(key) for key in patterns)


@dataclass(frozen=True)
class MetaParam:
    """What the plan reads of a meta-device parameter: shape, dtype, numel()."""

    shape: tuple[int, ...]
    dtype: object  # torch.dtype

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ArchPlan:
    """What qtool.quantize.plan needs from the meta-device model, derived from config.json alone."""

    architecture: str
    dtype: object  # torch.dtype the model loads in
    model_plan: ModelPlan
    meta_sd: dict[str, MetaParam]  # state-dict order
    target_sources: dict[str, list[str]]
    dropped: list[tuple[str, str]]
    # transformers 5 registers its legacy renamings (LayerNorm.gamma -> .weight, ...) for every one of these
    # classes, and save_pretrained then writes the state dict sorted by dot_natural_key
    natural_order: bool = True


def _int_fields(config: dict, family: Family) -> dict | None:
    values = {}
    for key in _REQUIRED:
        v = config.get(key)
        if type(v) is not int or v <= 0:
            return None
        values[key] = v
    for key, default in family.defaults.items():
        v = config.get(key, default)
        if key == "head_dim":
            if v is None and default is None:
                v = values["hidden_size"] // values["num_attention_heads"]
            if type(v) is not int or v <= 0:
                return None
        elif type(v) is not bool:
            return None
        values[key] = v
    return values


def _parameters(family: Family, c: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is an nn.Linear's parameter) in the model's registration order (= its state dict)."""
    h, hd, inter = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def has(field: str | None) -> bool:
        return field == "" or (field is not None and c[field])

    def linear(name: str, out_f: int, in_f: int, bias: bool) -> list:
        return [(f"{name}.weight", (out_f, in_f), True)] + ([(f"{name}.bias", (out_f,), True)] if bias else [])

    params = [("model.embed_tokens.weight", (c["vocab_size"], h), False)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        params += linear(p + "self_attn.q_proj", q, h, has(family.qkv_bias))
        params += linear(p + "self_attn.k_proj", kv, h, has(family.qkv_bias))
        params += linear(p + "self_attn.v_proj", kv, h, has(family.qkv_bias))
        params += linear(p + "self_attn.o_proj", h, q, has(family.o_bias))
        if family.qk_norm:
            params += [(p + "self_attn.q_norm.weight", (hd,), False), (p + "self_attn.k_norm.weight", (hd,), False)]
        params += linear(p + "mlp.gate_proj", inter, h, has(family.mlp_bias))
        params += linear(p + "mlp.up_proj", inter, h, has(family.mlp_bias))
        params += linear(p + "mlp.down_proj", h, inter, has(family.mlp_bias))
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if family.ffn_norms else []
        params += [(f"{p}{n}.weight", (h,), False) for n in norms]
    params.append(("model.norm.weight", (h,), False))
    params.append(("lm_head.weight", (c["vocab_size"], h), True))
    return params


def _config_dtype(config: dict, ckpt, setting: str):
    """As qtool.quantize.plan._load_dtype, for the plain cases only (None: let transformers decide)."""
    import torch

    from qtool.core.dtypes import torch_dtype

    if setting != "auto":
        return getattr(torch, setting)
    named = [config[k] for k in ("dtype", "torch_dtype") if config.get(k) is not None]
    if named:
        if len(set(map(str, named))) != 1 or named[0] not in _FLOAT_DTYPES:
            return None
        return getattr(torch, named[0])
    first = sorted((n, t) for n, t in ckpt.tensors.items() if t.file == ckpt.files[0])
    for _, t in first:
        if is_float_dtype(t.dtype):
            return torch_dtype(t.dtype)
    return torch.float32


def arch_plan(config: dict, ckpt, *, dtype_setting: str = "auto", skip_modules=None,
              trust_remote_code: bool = False) -> ArchPlan | None:
    """The plan of a known architecture from config.json and the checkpoint's headers, or None (use transformers)."""
    family = FAMILIES.get(config.get("model_type"))
    if family is None or trust_remote_code or "auto_map" in config or "quantization_config" in config:
        return None
    if config.get("architectures") not in (None, [family.architecture]):
        return None
    if getattr(ckpt, "format", "safetensors") != "safetensors":
        return None
    c = _int_fields(config, family)
    if c is None:
        return None
    dtype = _config_dtype(config, ckpt, dtype_setting)
    if dtype is None:
        return None
    params = _parameters(family, c)
    tied = c["tie_word_embeddings"]
    alias = "lm_head.weight" if tied else None
    # HfQuantizer.get_modules_to_not_convert: the user's list, else tied modules + the last parameter's
    # module + the output embedding
    if skip_modules:
        try:  # the user's patterns are regexes: a bad one is transformers' path to report
            [re.compile(k) for k in skip_modules]
        except re.error:
            return None
        not_convert = list(skip_modules)
    else:
        not_convert = ["model.embed_tokens", "lm_head", "model.norm"] if tied else ["lm_head"]
    user_skip = list(skip_modules or [])
    tensors: list[TensorPlan] = []
    for name, shape, is_linear in params:
        if name == alias:
            continue
        module, pname = name.rsplit(".", 1)
        if is_linear and pname == "weight" and should_convert_module(module, not_convert):
            tensors.append(TensorPlan(name, shape, QUANTIZE, REASON_LINEAR))
            continue
        if is_linear and pname == "bias":
            reason = REASON_BIAS
        elif is_linear and user_skip and not should_convert_module(module, user_skip):
            reason = REASON_USER_SKIP
        elif is_linear:
            reason = REASON_SKIPPED
        else:
            reason = REASON_NOT_LINEAR
        tensors.append(TensorPlan(name, shape, KEEP, reason))
    model_plan = ModelPlan(model_type=config["model_type"], architecture=family.architecture,
                           groups=group_tensors(tensors), tensors=tensors,
                           tied=[("model.embed_tokens.weight", alias)] if alias else [], warnings=[])
    meta_sd = {name: MetaParam(shape, dtype) for name, shape, _ in params}
    # the checkpoint must hold exactly these tensors (the alias optional, droppable buffers allowed), with
    # the expected shapes and float dtypes: otherwise transformers' own mapping decides (and words the error)
    target_sources: dict[str, list[str]] = {}
    dropped: list[tuple[str, str]] = []
    for key in sorted(ckpt.tensors, key=dot_natural_key):
        info = ckpt.tensors[key]
        if key in meta_sd:
            if tuple(info.shape) != meta_sd[key].shape or not is_float_dtype(info.dtype):
                return None
            target_sources[key] = [key]
        elif _DROPPABLE.search(key):
            dropped.append((key, "buffer transformers recomputes on load (not saved)"))
        else:
            return None
    if any(key not in target_sources for key in meta_sd if key != alias):
        return None
    if alias and target_sources.pop(alias, None):
        dropped.append((alias, "tied to model.embed_tokens.weight (saved once)"))
    return ArchPlan(family.architecture, dtype, model_plan, meta_sd, target_sources, dropped)
