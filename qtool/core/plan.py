"""The tensor plan: one record per tensor saying what happens to it.

Built once (from the meta-device model, see `qtool.core.meta`) and shared by `estimate`,
`quantize --dry-run` and `quantize`, so the numbers they print cannot disagree.
Pure Python: no torch here, so a plan summary cached for a preset loads instantly.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

QUANTIZE = "quantize"
KEEP = "keep"

# Why a tensor is kept in 16/32-bit (shown by --dry-run and estimate).
REASON_LINEAR = "nn.Linear weight"
REASON_CONV1D = "Conv1D weight"
REASON_NOT_LINEAR = "not a Linear/Conv1D weight"  # embeddings, norms, position tables
REASON_BIAS = "bias"
REASON_SKIPPED = "in modules_to_not_convert"  # lm_head / output embedding / tied / last module
REASON_USER_SKIP = "in --skip-modules"
REASON_FP32 = "in _keep_in_fp32_modules"
REASON_FUSED = "fused 3-D tensor bitsandbytes cannot quantize"


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one model parameter."""

    name: str  # parameter name in the model (tied parameters appear once)
    shape: tuple[int, ...]
    action: str  # QUANTIZE or KEEP
    reason: str
    keep_fp32: bool = False  # kept tensors listed in _keep_in_fp32_modules stay fp32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorGroup:
    """Tensors with the same shape and fate, counted: a compact, cacheable plan."""

    shape: tuple[int, ...]
    action: str
    reason: str
    keep_fp32: bool
    count: int
    example: str  # one tensor name of the group

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelPlan:
    """All tensors of a model plus what the plan warns about."""

    model_type: str
    architecture: str
    groups: list[TensorGroup]
    tensors: list[TensorPlan] | None = None  # full list when built from the model; None when loaded from a cache
    tied: list[tuple[str, str]] = field(default_factory=list)  # (kept name, dropped alias)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(g.numel * g.count for g in self.groups)

    @property
    def quantized_params(self) -> int:
        return sum(g.numel * g.count for g in self.groups if g.action == QUANTIZE)

    @property
    def kept_params(self) -> int:
        return self.total_params - self.quantized_params

    def kept_by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for g in self.groups:
            if g.action == KEEP:
                out[g.reason] += g.numel * g.count
        return dict(out)

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "architecture": self.architecture,
            "groups": [
                {**asdict(g), "shape": list(g.shape)} for g in self.groups
            ],
            "tied": [list(t) for t in self.tied],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ModelPlan":
        groups = [TensorGroup(**{**g, "shape": tuple(g["shape"])}) for g in d["groups"]]
        return cls(
            model_type=d["model_type"],
            architecture=d["architecture"],
            groups=groups,
            tied=[tuple(t) for t in d.get("tied", [])],
            warnings=list(d.get("warnings", [])),
        )


def group_tensors(tensors: list[TensorPlan]) -> list[TensorGroup]:
    """Collapse a full plan into groups, in first-seen order (deterministic)."""
    order: dict[tuple, list] = {}
    for t in tensors:
        key = (t.shape, t.action, t.reason, t.keep_fp32)
        if key in order:
            order[key][0] += 1
        else:
            order[key] = [1, t.name]
    return [
        TensorGroup(shape=k[0], action=k[1], reason=k[2], keep_fp32=k[3], count=v[0], example=v[1])
        for k, v in order.items()
    ]
