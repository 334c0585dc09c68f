#!/usr/bin/env bash
# The recipe bench on the GPU machine (no internet): the carried wheels (bitsandbytes; trl, datasets; unsloth,
# unsloth_zoo, torchao, cut_cross_entropy and their needs) go into one --target folder, then
# bench/recipe_gpu.py runs with the given options; with VERIFY_UNSLOTH=1, `qtool verify --recipe unsloth`
# (qlora and inference) on a 2-layer Llama-3-8B config runs beside it, its JSON reports under $OUT.
# UNSLOTH_BLOCK_COMPILE=0 turns Unsloth's per-decoder-layer torch.compile off (recorded in each row's env).
#   WHEELS="../../.whl ../recipe-wheels/trl ../recipe-wheels/unsloth" bash bench/recipe_run.sh [recipe_gpu.py options]
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/carried_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "${VERIFY_UNSLOTH:-0}" = 1 ]; then
  cfg=$(mktemp -d)
  python3 -c "import json, sys; sys.path.insert(0, 'bench'); from recipe_gpu import case_config; \
print(json.dumps(case_config('llama-3-8b', 2)))" > "$cfg/config.json"
  ( cd "$(mktemp -d)" && for mode in qlora inference; do
      timeout "${VERIFY_TIMEOUT:-240}" python3 -m qtool verify "$cfg/config.json" --recipe unsloth --mode "$mode" \
        --seq-len 1024 --steps 2 --json > "$OUT/verify_unsloth_$mode.json" 2> "$OUT/verify_unsloth_$mode.err"
      echo "qtool verify --recipe unsloth --mode $mode: exit $?"
    done ) &
fi
python3 bench/recipe_gpu.py "$@"
wait
