"""README.md for a quantized checkpoint: where it came from, with which settings, under which licence, and how
to load it.

Never contains tokens or local user paths beyond the source name the user typed. Names come from the user or
the source checkpoint, so they are escaped: markdown and HTML in a folder name stay text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qtool import __version__
from qtool.core.sizes import format_bytes

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LICENSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")  # hub licence ids: apache-2.0, llama3.1, cc-by-nc-4.0, other
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|~>])")


def md_text(text: str) -> str:
    """`text` as literal markdown text: HTML characters as entities, markdown syntax backslash-escaped, one line."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def source_license(source: Path | None) -> str | None:
    """The source model's licence id: `license:` of its README front matter (the hub's model card metadata),
    else a `license` field of config.json. Only a plain licence id is carried over."""
    if source is None:
        return None
    found = None
    try:
        card = (Path(source) / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        card = ""
    m = re.match(r"---\r?\n(.*?)\r?\n---", card, re.S)
    if m:
        lic = re.search(r"^license:\s*['\"]?([^'\"\s#]+)", m.group(1), re.M)
        found = lic.group(1) if lic else None
    if found is None:
        try:
            value = json.loads((Path(source) / "config.json").read_text()).get("license")
        except (OSError, ValueError, AttributeError):
            value = None
        found = value if isinstance(value, str) else None
    return found if found and _LICENSE.match(found) else None


def model_card(plan, result) -> str:
    s = plan.settings
    counts = plan.counts()
    source = md_text(plan.source_name)
    rev = f" (revision {md_text(plan.revision)})" if plan.revision else ""
    skip = (md_text(", ".join(s.skip_modules)) if s.skip_modules
            else "none (transformers' defaults: output head, tied modules)")
    license_id = source_license(getattr(plan, "source", None))
    lines = [
        "---",
        *([f"license: {license_id}"] if license_id else []),
        "tags:",
        "- bitsandbytes",
        "- 4-bit",
        f"- {s.quant_type}",
        "- qtool",
        "library_name: transformers",
        *([f"base_model: {plan.source_name}"] if _HUB_ID.match(plan.source_name) else []),
        "---",
        "",
        f"# {source} — bitsandbytes 4-bit ({s.quant_type.upper()})",
        "",
        f"Quantized from {source}{rev} with qtool {__version__}, streaming one tensor at a time.",
        "The tensors are the ones transformers writes for `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`",
        "followed by `save_pretrained`.",
        "",
        "## Settings",
        "",
        "| BitsAndBytesConfig | value |",
        "|---|---|",
        "| load_in_4bit | True |",
        f"| bnb_4bit_quant_type | {s.quant_type} |",
        f"| bnb_4bit_use_double_quant | {s.double_quant} |",
        f"| bnb_4bit_compute_dtype | {s.compute_dtype} |",
        f"| bnb_4bit_quant_storage | {s.quant_storage} |",
        f"| blocksize | {s.blocksize} |",
        f"| llm_int8_skip_modules | {skip} |",
        f"| dtype of kept tensors | {plan.model_dtype} |",
        "",
        "## Sizes",
        "",
        f"- architecture: {md_text(plan.architecture)}, {plan.total_parameters:,} parameters",
        f"- tensors: {counts['quantized']} quantized, {counts['kept']} kept",
        f"- input: {format_bytes(result.input_bytes)}, output: {format_bytes(result.output_bytes)} "
        f"({100 * (1 - result.output_bytes / result.input_bytes):.1f}% smaller)" if result.input_bytes else "",
        "",
    ]
    if plan.warnings:
        lines += ["## Notes", ""] + [f"- {md_text(w)}" for w in plan.warnings] + [""]
    if license_id:
        lines += ["## Licence", "", f"The source model's licence applies: {license_id} (from its model card).", ""]
    lines += [
        "## How to load",
        "",
        "```python",
        f"from transformers import {auto_class(plan.architecture)}, AutoTokenizer",
        "",
        f'model = {auto_class(plan.architecture)}.from_pretrained("path/to/this/folder", device_map="auto")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "The quantization settings are read from `config.json`; no extra arguments are needed.",
        "bitsandbytes must be installed. For QLoRA, wrap the model with peft's `prepare_model_for_kbit_training`.",
        "",
    ]
    return "\n".join(lines)


def auto_class(architecture: str) -> str:
    """The transformers Auto class a user loads this architecture with."""
    for suffix, cls in (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                        ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"), ("ForMaskedLM", "AutoModelForMaskedLM"),
                        ("ForSequenceClassification", "AutoModelForSequenceClassification")):
        if architecture.endswith(suffix):
            return cls
    return "AutoModel"
