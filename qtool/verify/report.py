"""The typed result of a run. Every part of verify writes into one VerifyReport; `to_dict()` is the JSON
document `qtool verify --json` prints (and junit and the human renderer read), the same shape as before it
was typed. Nested sections (model, memory, phases, estimate, checks) stay plain JSON objects."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Sections that exist only when the run got that far (absent from the JSON otherwise).
_OPTIONAL = ("load_seconds", "inputs", "trainable_params", "decode_tokens_per_second", "trainer", "estimate",
             "checks", "exit_code", "cards")


@dataclass
class VerifyReport:
    model: dict[str, Any]  # ref, name, kind, source, description, path, architecture, quantization_config
    settings: dict[str, Any]
    device: dict[str, Any]
    versions: dict[str, Any]
    recipe: dict[str, Any] | None = None
    steps: list[dict] = field(default_factory=list)  # one record per training step or inference round
    phases: dict[str, int] = field(default_factory=dict)  # phase -> peak or level, bytes
    memory: dict[str, Any] = field(default_factory=dict)
    loss: float | str | None = None
    loss_finite: bool | None = None
    grads_finite: bool | None = None
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    quality: dict | None = None
    error: dict | None = None  # {"stage", "kind", "message", "numerical"?}: a condition of the run, not a bug
    notes: list[str] = field(default_factory=list)
    steps_requested: int = 0
    loaded: bool | None = None
    load_seconds: float | None = None
    inputs: dict | None = None
    trainable_params: int | None = None
    decode_tokens_per_second: float | None = None
    trainer: dict | None = None
    estimate: dict | None = None
    checks: dict[str, dict] | None = None
    exit_code: int | None = None
    cards: list[dict] | None = None  # several cards: one row each (qtool/verify/cards.py)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if not (k in _OPTIONAL and v is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VerifyReport":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
