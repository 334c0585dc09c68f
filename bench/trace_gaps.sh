#!/usr/bin/env bash
# Issue 9's two open Unsloth cells in one GPU call (one H100/H200), each traced: what is alive at the allocated
# peak, from torch's allocator history (QTOOL_MEMORY_HISTORY, then tools/peak_trace.py; docs/verify.md).
#   1. Mixtral (4 layers) QLoRA at 512 tokens: measured 5.78 GiB, estimated 5.47 (-5.5%); its forward peak is
#      the same at 512 and 2048 tokens, ~0.45 GiB above the dequantized gate_up stack (docs/benchmarks.md,
#      "Miss"). Candidates from unsloth_zoo's source: a copy of the packed 4-bit stack (nf4_dequant_triton's
#      `packed.contiguous()`), or a selective-dequant chunk beside the full stack.
#   2. Gemma-2 (4 layers) QLoRA at 512, never measured: Unsloth compiles its soft-capped attention (Inductor
#      autotuning) for longer than the 185 s a call had. GEMMA2_TIMEOUT gives it more (default 420 s).
# Reports and traces' summaries go under $OUT (the pickles stay on the machine: they can be large).
#   WHEELS="../../.whl ../recipe-wheels/trl ../recipe-wheels/unsloth" OUT=$OUT bash bench/trace_gaps.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/carried_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"

run() {  # run NAME ARCH LAYERS TIMEOUT: qtool verify --recipe unsloth, traced, then the peak's summary
  local name=$1 arch=$2 layers=$3 limit=$4 work
  work=$(mktemp -d)
  python3 -c "import json, sys; sys.path.insert(0, 'bench'); from recipe_gpu import case_config; \
print(json.dumps(case_config('$arch', $layers)))" > "$work/config.json" || return
  mkdir -p "$work/mh"
  ( cd "$work" && QTOOL_MEMORY_HISTORY="$work/mh/r" timeout "$limit" python3 -m qtool verify "$work/config.json" \
      --recipe unsloth --mode qlora --seq-len 512 --steps 2 --json > "$OUT/$name.json" 2> "$OUT/$name.err" )
  echo "$name: qtool verify exit $?" | tee -a "$OUT/summary.txt"
  if compgen -G "$work/mh/r.*.pickle" > /dev/null; then
    python3 tools/peak_trace.py "$work"/mh/r.*.pickle --json "$OUT/$name.peaks.json" > "$OUT/$name.peaks.txt" 2>&1
    echo "$name: peak_trace exit $?" | tee -a "$OUT/summary.txt"
  fi
}

run mixtral_unsloth_512 mixtral-8x7b 4 "${MIXTRAL_TIMEOUT:-150}"
run gemma2_unsloth_512 gemma-2-9b 4 "${GEMMA2_TIMEOUT:-420}"
