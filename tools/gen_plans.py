"""Write configs/plans/<preset>.json for every model preset (run after adding or changing a preset).

    .venv/bin/python tools/gen_plans.py            # all presets
    .venv/bin/python tools/gen_plans.py gpt2 ...   # some

Each file holds the preset's ModelPlan.to_dict() (groups, not the full tensor list) from
qtool.core.meta.build_plan on the meta device, the quantized Linear shapes by module name (for LoRA
targets), and a hash of the preset's config so a stale cache is ignored. tests/core/test_presets.py
rebuilds every plan and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtool.core import presets  # noqa: E402
from qtool.core.meta import build_plan  # noqa: E402
from qtool.core.plancache import cache_record, plans_dir  # noqa: E402


def main(names: list[str]) -> int:
    names = names or sorted(presets.model_presets())
    plans_dir().mkdir(exist_ok=True)
    for name in names:
        plan = build_plan(presets.load_model_preset(name), source=presets.model_presets()[name])
        path = plans_dir() / f"{name}.json"
        path.write_text(json.dumps(cache_record(name, plan), indent=1) + "\n")
        print(f"{path}: {plan.total_params:,} params, {len(plan.groups)} groups")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
