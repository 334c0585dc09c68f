"""`qtool estimate`: bytes per format (formats) and the peak of a run term by term (memory), assembled into
one report (report). Pure arithmetic: nothing here imports torch for presets and sizes."""

from qtool.estimate.report import display_name, estimate_report, has_vocab_head, kept_dtype, lora_linears

__all__ = ["display_name", "estimate_report", "has_vocab_head", "kept_dtype", "lora_linears"]
