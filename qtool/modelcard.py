"""README.md for a quantized checkpoint: where it came from, with which settings, and how to load it.

Never contains tokens or local user paths beyond the source name the user typed.
"""

from __future__ import annotations

from qtool import __version__
from qtool.sizes import format_bytes


def model_card(plan, result) -> str:
    s = plan.settings
    counts = plan.counts()
    source = plan.source_name
    rev = f" (revision `{plan.revision}`)" if plan.revision else ""
    skip = ", ".join(s.skip_modules) if s.skip_modules else "none (transformers' defaults: output head, tied modules)"
    lines = [
        "---",
        "tags:",
        "- bitsandbytes",
        "- 4-bit",
        f"- {s.quant_type}",
        "- qtool",
        "library_name: transformers",
        *( [f"base_model: {source}"] if "/" in source else [] ),
        "---",
        "",
        f"# {source} — bitsandbytes 4-bit ({s.quant_type.upper()})",
        "",
        f"Quantized from `{source}`{rev} with qtool {__version__}, streaming one tensor at a time.",
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
        f"- architecture: {plan.architecture}, {plan.total_parameters:,} parameters",
        f"- tensors: {counts['quantized']} quantized, {counts['kept']} kept",
        f"- input: {format_bytes(result.input_bytes)}, output: {format_bytes(result.output_bytes)} "
        f"({100 * (1 - result.output_bytes / result.input_bytes):.1f}% smaller)" if result.input_bytes else "",
        "",
    ]
    if plan.warnings:
        lines += ["## Notes", ""] + [f"- {w}" for w in plan.warnings] + [""]
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
