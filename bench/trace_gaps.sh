#!/usr/bin/env bash
# Issue 9's two open Unsloth cells in one GPU call (one H100/H200), every run its own process, side by side
# (allocator peaks are per process):
#   1. Mixtral (4 layers) QLoRA at 512 tokens: measured 5.78 GiB, estimated 5.47 (-5.5%); its forward peak is
#      the same at 512 and 2048 tokens, ~0.45 GiB above the dequantized gate_up stack (docs/benchmarks.md,
#      "Miss"). `qtool verify --recipe unsloth`, traced (QTOOL_MEMORY_HISTORY, then tools/peak_trace.py: what is
#      alive at the peak), once as Unsloth runs by default and once with UNSLOTH_BLOCK_COMPILE=0 (no per-layer
#      torch.compile), which tells whether the compiled block holds the unnamed part.
#   2. Gemma-2 (4 layers) QLoRA at 512/2048/8192 under Unsloth, never measured: by default the first backward
#      raised an empty AssertionError inside Inductor (torch 2.11); with UNSLOTH_BLOCK_COMPILE=0 the soft-capped
#      attention's compile (max_autotune) outlasted a 185 s call. Three runs: (a) the default, 512 only, for the
#      assertion's whole traceback; (b) UNSLOTH_BLOCK_COMPILE=0, as Unsloth compiles the attention; (c) the same
#      with TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN (cuBLAS GEMMs, nothing to autotune). Rows record the
#      switches (`env`); tracebacks go to tracebacks.txt beside the rows.
# Reports, rows and the traces' summaries go under $OUT (the pickles stay on the machine: they can be large).
#   WHEELS=".whl .dev/recipe-wheels/trl .dev/recipe-wheels/unsloth" OUT=$OUT bash bench/trace_gaps.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/carried_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
limit=${LIMIT:-540}

traced() {  # traced NAME ARCH LAYERS [VAR=VALUE...]: qtool verify --recipe unsloth at 512, then the peak's summary
  local name=$1 arch=$2 layers=$3 work
  shift 3
  work=$(mktemp -d)
  python3 -c "import json, sys; sys.path.insert(0, 'bench'); from recipe_gpu import case_config; \
print(json.dumps(case_config('$arch', $layers)))" > "$work/config.json" || return
  mkdir -p "$work/mh"
  ( cd "$work" && env "$@" QTOOL_DEBUG=1 QTOOL_MEMORY_HISTORY="$work/mh/r" timeout "$limit" python3 -m qtool verify \
      "$work/config.json" --recipe unsloth --mode qlora --seq-len 512 --steps 2 --json \
      > "$OUT/$name.json" 2> "$OUT/$name.err" )
  echo "$name: qtool verify exit $?" | tee -a "$OUT/summary.txt"
  if compgen -G "$work/mh/r.*.pickle" > /dev/null; then
    python3 tools/peak_trace.py "$work"/mh/r.*.pickle --top 25 --json "$OUT/$name.peaks.json" \
      > "$OUT/$name.peaks.txt" 2>&1
    echo "$name: peak_trace exit $?" | tee -a "$OUT/summary.txt"
  fi
  rm -rf "$work"
}

rows() {  # rows NAME SEQS [VAR=VALUE...]: bench/recipe_gpu.py's Unsloth rows for Gemma-2 (4 layers)
  local name=$1 seqs=$2
  shift 2
  mkdir -p "$OUT/$name"
  env "$@" python3 bench/recipe_gpu.py --cases "" --unsloth gemma-2-9b:4 --skip-infer gemma-2-9b --seqs "$seqs" \
    --budget "$limit" --job-timeout "$limit" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name: recipe_gpu exit $?" | tee -a "$OUT/summary.txt"
}

traced mixtral_512 mixtral-8x7b 4 &
traced mixtral_512_noblock mixtral-8x7b 4 UNSLOTH_BLOCK_COMPILE=0 &
rows gemma2_default 512 &
rows gemma2_noblock 512,2048,8192 UNSLOTH_BLOCK_COMPILE=0 &
rows gemma2_noblock_aten 512,2048,8192 UNSLOTH_BLOCK_COMPILE=0 TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN &
wait
for f in "$OUT"/gemma2_*.log; do echo "== $f"; tail -n 8 "$f"; done
for f in "$OUT"/mixtral_*.peaks.txt; do echo "== $f"; head -n 14 "$f"; done
