"""Options shared by several commands, declared once. Defaults are None = 'not given', so the
config layer can tell a flag from a default (flag > env > file > preset > default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Q = "Quantization (BitsAndBytesConfig)"
R = "Run settings"

ModelArg = Annotated[str, typer.Argument(help="Size (70b), preset (llama-3-8b), local dir/config.json, or hub id (org/name).", show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Project settings file (TOML).", show_default=False)]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Settings preset from configs/presets.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON report to stdout.")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).", show_default=False)]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow architectures that need code from the repository (never implied).")]

QuantTypeOpt = Annotated[Optional[str], typer.Option("--quant-type", help="nf4 | fp4  [default: nf4]", rich_help_panel=Q, show_default=False)]
DoubleQuantOpt = Annotated[Optional[bool], typer.Option("--double-quant/--no-double-quant", help="Quantize the absmax too  [default: on]", rich_help_panel=Q, show_default=False)]
ComputeDtypeOpt = Annotated[Optional[str], typer.Option("--compute-dtype", help="bfloat16 | float16 | float32  [default: bfloat16]", rich_help_panel=Q, show_default=False)]
BlocksizeOpt = Annotated[Optional[int], typer.Option("--blocksize", help="4-bit block size  [default: 64]", rich_help_panel=Q, show_default=False)]
QuantStorageOpt = Annotated[Optional[str], typer.Option("--quant-storage", help="Storage dtype of packed weights  [default: uint8]", rich_help_panel=Q, show_default=False)]
SkipModulesOpt = Annotated[Optional[str], typer.Option("--skip-modules", help="Comma-separated modules kept 16-bit (llm_int8_skip_modules).", rich_help_panel=Q, show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="dtype of kept tensors: auto | bfloat16 | float16 | float32  [default: auto]", rich_help_panel=Q, show_default=False)]

ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="inference | qlora | lora | full  [default: qlora]", rich_help_panel=R, show_default=False)]
SeqLenOpt = Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence  [default: 2048]", rich_help_panel=R, show_default=False)]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Sequences per step  [default: 1]", rich_help_panel=R, show_default=False)]
LoraRankOpt = Annotated[Optional[int], typer.Option("--lora-rank", "-r", help="LoRA rank  [default: 16]", rich_help_panel=R, show_default=False)]
LoraAlphaOpt = Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha  [default: 32]", rich_help_panel=R, show_default=False)]
LoraTargetsOpt = Annotated[Optional[str], typer.Option("--lora-targets", help="Comma-separated module names, or all-linear  [default: all-linear]", rich_help_panel=R, show_default=False)]
OptimizerOpt = Annotated[Optional[str], typer.Option("--optimizer", help="adamw | adamw8bit | paged_adamw8bit | paged_adamw32bit | adafactor | sgd, or a TrainingArguments.optim name (adamw_torch, adamw_8bit, ...)  [default: adamw]", rich_help_panel=R, show_default=False)]
RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help="What runs the steps: trainer (transformers.Trainer) | sft (trl's SFTTrainer, qtool[trl]) | loop (a plain loop) | unsloth  [default: trainer]", rich_help_panel=R, show_default=False)]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="Trainer mixed precision: bf16 | fp16 | fp32  [default: bf16]", rich_help_panel=R, show_default=False)]
GradCkptOpt = Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="[default: on]", rich_help_panel=R, show_default=False)]
VramOpt = Annotated[Optional[str], typer.Option("--vram", help="Memory budget: 24GB, 24 GiB, 24000MB.", rich_help_panel=R, show_default=False)]
GpuOpt = Annotated[Optional[str], typer.Option("--gpu", help="GPU from the catalogue (rtx-4090, a100-80gb, ...): its memory is the budget.", rich_help_panel=R, show_default=False)]
