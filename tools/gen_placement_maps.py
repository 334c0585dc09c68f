"""Record the device maps an installed transformers computes for device_map="auto" (4-bit), for tests.

    PYTHONPATH=/path/to/transformers-5.17 .venv/bin/python tools/gen_placement_maps.py tests/data/placement_maps.json

transformers 5.18 changed get_balanced_memory's buffer (the mean leaf module became the biggest one), which
moves the split between cards. CI installs one transformers; to keep checking qtool's placement for the older
rule, run this once with the older transformers importable first on PYTHONPATH: it appends that version's
maps (presets x 2-4 roomy cards) to the file, computed by transformers' own _get_device_map on meta models
(tests/estimate/test_estimate_cards.py builds them the same way). tests/estimate/test_estimate_cards.py
compares qtool's placement under the recorded version's rule with every recorded map.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PRESETS = ("llama-3-8b", "llama-2-13b", "gemma-2-9b", "llama-3-70b", "mixtral-8x7b", "qwen2.5-0.5b")


def main(argv: list[str]) -> int:
    import transformers

    from estimate.test_estimate_cards import _real_device_map  # the same construction the tests use
    from qtool.core import presets

    path = Path(argv[0])
    record = json.loads(path.read_text()) if path.exists() else {"maps": []}
    record["maps"] = [m for m in record["maps"] if m["transformers"] != transformers.__version__]
    for name in PRESETS:
        for n in (2, 3, 4):
            max_memory = {**{i: 2**40 for i in range(n)}, "cpu": 2**41}
            dmap = _real_device_map(presets.load_model_preset(name), max_memory)
            record["maps"].append({"transformers": transformers.__version__, "preset": name, "cards": n,
                                   "device_map": dmap})
            print(transformers.__version__, name, n, {c: sum(1 for v in dmap.values() if v == c) for c in range(n)})
    path.write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
