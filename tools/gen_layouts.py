"""Write configs/layouts/<preset>.json for every model preset (run after adding or changing a preset).

    .venv/bin/python tools/gen_layouts.py            # all presets
    .venv/bin/python tools/gen_layouts.py gpt2 ...   # some

Each file holds the module tree device_map="auto" places (qtool.estimate.layout.from_model on the meta device:
names, classes, element counts, quantized or kept, buffers, no-split blocks, tied aliases) and a hash of the
preset's config so a stale cache is ignored. tests/test_estimate_cards.py rebuilds them and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtool.core import presets  # noqa: E402
from qtool.estimate.layout import cache_record, layouts_dir, meta_layout  # noqa: E402


def main(names: list[str]) -> int:
    names = names or sorted(presets.model_presets())
    layouts_dir().mkdir(exist_ok=True)
    for name in names:
        layout = meta_layout(presets.load_model_preset(name), source=presets.model_presets()[name])
        path = layouts_dir() / f"{name}.json"
        path.write_text(json.dumps(cache_record(name, layout), separators=(",", ":")) + "\n")
        print(f"{path}: {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
