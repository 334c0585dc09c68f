"""The module tree device_map="auto" places: names, classes, parameters (element counts, quantized or kept),
buffers, and which blocks must not be split, in named_children order.

Presets read it from configs/layouts/<preset>.json (written by tools/gen_layouts.py from the meta-device model,
as configs/plans; a test rebuilds them), so `qtool estimate 70b --gpus 2` imports no torch. Size shorthands get
the analytic Llama tree; anything else is read off the meta-device model. Identical decoder layers are stored
once with a repeat count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from qtool.core import presets
from qtool.core.dtypes import itemsize
from qtool.core.plan import QUANTIZE
from qtool.estimate.placement import Node

LAYOUT_VERSION = 1
QUANTIZED, KEPT = "q", "k"
MODEL_DTYPE = "model"  # a buffer created in the model's dtype (anything else: its own dtype, e.g. inv_freq fp32)


@dataclass(frozen=True)
class Layout:
    """A model's module tree as plain data (JSON-able) plus its tied aliases (alias -> target)."""

    tree: dict
    tied: dict

    def to_dict(self) -> dict:
        return {"version": LAYOUT_VERSION, "tree": self.tree, "tied": self.tied}

    def nodes(self, dtype: str, *, quantized: bool = True) -> Node:
        """The tree with the bytes transformers counts at placement: 0.5 per quantized element (when the model
        loads 4-bit), the dtype's size for the rest (the model is built in `dtype` before any weight loads), a
        buffer its own dtype's."""
        def size(n: int, kind: str) -> float:
            return n * (0.5 if kind == QUANTIZED and quantized else itemsize(dtype))

        return _expand(self.tree, "", size, dtype)

    def params(self) -> dict[str, tuple[int, bool]]:
        """Every parameter but the tied aliases, in order: full name -> (elements, quantized?)."""
        root = _expand(self.tree, "", lambda n, kind: (n, kind == QUANTIZED), "float32")
        return {name: v for name, v in root.tensors("params") if name not in self.tied}


def _expand(d: dict, prefix: str, size, dtype: str) -> Node:
    name = f"{prefix}.{d['n']}" if prefix and d["n"] else (d["n"] or prefix)
    node = Node(name, d["c"], no_split=bool(d.get("x")))
    node.params = [(p, size(n, kind)) for p, n, kind in d.get("p", ())]
    node.buffers = [(b, n * itemsize(dtype if t == MODEL_DTYPE else t)) for b, n, t in d.get("b", ())]
    for child in d.get("k", ()):
        if "repeat" in child:
            start = int(child["node"]["n"])
            for i in range(child["repeat"]):
                node.children.append(_expand({**child["node"], "n": str(start + i)}, name, size, dtype))
        else:
            node.children.append(_expand(child, name, size, dtype))
    return node


def _compress(children: list[dict]) -> list[dict]:
    """Runs of numbered children that differ only by their number become one {"repeat": k, "node": first}."""
    out: list[dict] = []
    for child in children:
        last = out[-1] if out else None
        if last is not None and child["n"].isdigit():
            template = last.get("node", last)
            count = last.get("repeat", 1)
            same = {**child, "n": template["n"]} == template
            if same and template["n"].isdigit() and int(child["n"]) == int(template["n"]) + count:
                out[-1] = {"repeat": count + 1, "node": template}
                continue
        out.append(child)
    return out


def from_model(model, quantized: set[str]) -> Layout:
    """The layout of a torch module (meta device is enough); `quantized`: parameter names bnb quantizes."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    model_dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    seen: dict[int, str] = {}
    tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})

    def visit(local: str, module, prefix: str) -> dict:
        name = f"{prefix}.{local}" if prefix and local else (local or prefix)
        d: dict = {"n": local, "c": type(module).__name__}
        if d["c"] in no_split:
            d["x"] = 1
        params = []
        for p, param in module._parameters.items():
            if param is None:
                continue
            full = f"{name}.{p}" if name else p
            if id(param) in seen and full not in tied:
                tied[full] = seen[id(param)]
            seen.setdefault(id(param), full)
            params.append([p, param.numel(), QUANTIZED if full in quantized else KEPT])
        buffers = [[b, t.numel(), MODEL_DTYPE if str(t.dtype).removeprefix("torch.") == model_dtype
                    else str(t.dtype).removeprefix("torch.")] for b, t in module._buffers.items() if t is not None]
        if params:
            d["p"] = params
        if buffers:
            d["b"] = buffers
        kids = [visit(c, m, name) for c, m in module._modules.items() if m is not None]
        if kids:
            d["k"] = _compress(kids)
        return d

    return Layout(visit("", model, ""), tied)


def _llama_tree(cfg: dict, tensors) -> dict:
    """The analytic LlamaForCausalLM tree (qtool.core.plancache.llama_tensors) with its rotary buffers."""
    def linear(name, shape):
        return {"n": name, "c": "Linear", "p": [["weight", shape[0] * shape[1], QUANTIZED]]}

    shapes = {t.name: t.shape for t in tensors}
    h = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    p = "model.layers.0."
    attn = [linear(n, shapes[f"{p}self_attn.{n}.weight"]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [linear(n, shapes[f"{p}mlp.{n}.weight"]) for n in ("gate_proj", "up_proj", "down_proj")]
    mlp.append({"n": "act_fn", "c": "SiLUActivation"})
    norm = {"c": "LlamaRMSNorm", "p": [["weight", h, KEPT]]}
    layer = {"n": "0", "c": "LlamaDecoderLayer", "x": 1, "k": [
        {"n": "self_attn", "c": "LlamaAttention", "k": attn}, {"n": "mlp", "c": "LlamaMLP", "k": mlp},
        {**norm, "n": "input_layernorm"}, {**norm, "n": "post_attention_layernorm"}]}
    vocab = cfg["vocab_size"]
    model = {"n": "model", "c": "LlamaModel", "k": [
        {"n": "embed_tokens", "c": "Embedding", "p": [["weight", vocab * h, KEPT]]},
        {"n": "layers", "c": "ModuleList", "k": [{"repeat": cfg["num_hidden_layers"], "node": layer}]},
        {**norm, "n": "norm"},
        {"n": "rotary_emb", "c": "LlamaRotaryEmbedding",
         "b": [["inv_freq", head_dim // 2, "float32"], ["original_inv_freq", head_dim // 2, "float32"]]}]}
    head = {"n": "lm_head", "c": "Linear", "p": [["weight", vocab * h, KEPT]]}
    return {"n": "", "c": "LlamaForCausalLM", "k": [model, head]}


def layouts_dir():
    return presets.configs_dir() / "layouts"


def cache_record(preset: str, layout: Layout) -> dict:
    from qtool.core.plancache import config_hash

    return {**layout.to_dict(), "preset": preset, "config_sha256": config_hash(presets.load_model_preset(preset)),
            "generated_by": "tools/gen_layouts.py (qtool.estimate.layout.from_model)"}


def load_cached(preset: str, config: dict) -> Layout | None:
    from qtool.core.plancache import config_hash

    try:
        rec = json.loads((layouts_dir() / f"{preset}.json").read_text())
    except (OSError, ValueError):
        return None
    if rec.get("version") != LAYOUT_VERSION or rec.get("config_sha256") != config_hash(config):
        return None
    return Layout(rec["tree"], rec["tied"])


def meta_layout(config: dict, *, skip_modules=(), source: object = "config.json",
                trust_remote_code: bool = False) -> Layout:
    """Read off the meta-device model (imports torch and transformers)."""
    from qtool.core.meta import build_plan, meta_model

    model = meta_model(config, source=source, trust_remote_code=trust_remote_code)
    plan = build_plan(config, skip_modules=list(skip_modules) or None, model=model)
    return from_model(model, {t.name for t in plan.tensors or () if t.action == QUANTIZE})


def layout_for(spec, cached, *, skip_modules=(), trust_remote_code: bool = False) -> Layout:
    """Cache (presets), analytic (size shorthands), else the meta-device model: as the tensor plan."""
    if cached.source == "cache" and spec.preset and not skip_modules:
        found = load_cached(spec.preset, spec.config)
        if found is not None:
            return found
    if cached.source == "analytic":
        return Layout(_llama_tree(spec.config, cached.plan.tensors), {})
    return meta_layout(spec.config, skip_modules=skip_modules, source=spec.config_path or spec.name,
                       trust_remote_code=trust_remote_code)
