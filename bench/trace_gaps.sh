#!/usr/bin/env bash
# Issue 9's open Unsloth cells in one GPU call (one H100/H200), every run its own process, side by side
# (allocator peaks are per process). Call 7's first run (docs/benchmarks.md) measured Gemma-2 and showed both
# Mixtral's and Gemma-2's 512-token peaks in the *first* step's forward (the second step's is lower though it
# holds the optimizer state): this call traces those peaks from the steps on (tools/peak_trace.py --after).
#   1. Mixtral (4 layers) QLoRA 512, `qtool verify --recipe unsloth`, traced, as Unsloth runs by default and with
#      UNSLOTH_BLOCK_COMPILE=0 (no per-layer torch.compile).
#   2. Gemma-2 (4 layers) QLoRA 512 and 8192 under UNSLOTH_BLOCK_COMPILE=0, traced (by default the first backward
#      raises an empty AssertionError inside Inductor on torch 2.11).
#   3. Gemma-2's rows (bench/recipe_gpu.py, UNSLOTH_BLOCK_COMPILE=0, 512/2048/8192) and the default's 512 row,
#      whose traceback goes to tracebacks.txt.
# CALL=7 ran those; CALL=8 (the default) runs each (architecture, length) in a fresh process: Mixtral at 2048
# and 8192 (the recorded rows ran after 512 in one process: does a fresh process's first step add more?),
# Gemma-2 at 512/2048/16384 under adamw8bit (16384: a check of the soft-capped attention's terms, which were
# derived from 512-8192), and bench/recipe_gpu.py's Gemma-2 512 row traced (it loads with max_seq_length 8192).
# CALL=9: checks (nothing read from them): Mixtral at batch 2 and at 6 layers, Gemma-2 at batch 2 x 4096, a second
# MoE architecture (Qwen3-30B-A3B, 4 layers) under Unsloth and the Trainer, Qwen2.5 at 8192 in a fresh process.
# CALL=11: the setting end to end (--no-unsloth-block-compile through qtool verify; Gemma-2's default fails in one line).
# Everything comes back in one $OUT/results.tgz (the pickles stay on the machine: they can be large).
#   WHEELS=".whl .dev/recipe-wheels/trl .dev/recipe-wheels/unsloth" OUT=$OUT bash bench/trace_gaps.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/carried_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
limit=${LIMIT:-540}

res=$OUT/r
mkdir -p "$res"

traced() {  # traced NAME ARCH LAYERS SEQ OPTIMIZER [VAR=VALUE...]: qtool verify --recipe unsloth, then the steps' peak
  local name=$1 arch=$2 layers=$3 seq=$4 optim=$5 work
  shift 5
  work=$(mktemp -d)
  python3 -c "import json, sys; sys.path.insert(0, 'bench'); from recipe_gpu import case_config; \
print(json.dumps(case_config('$arch', $layers)))" > "$work/config.json" || return
  mkdir -p "$work/mh"
  ( cd "$work" && env "$@" QTOOL_DEBUG=1 QTOOL_MEMORY_HISTORY="$work/mh/r" timeout "$limit" python3 -m qtool verify \
      "$work/config.json" --recipe unsloth --mode qlora --seq-len "$seq" --optimizer "$optim" --steps 2 --json \
      > "$res/$name.json" 2> "$res/$name.err" )
  echo "$name: qtool verify exit $?" | tee -a "$res/summary.txt"
  if compgen -G "$work/mh/r.*.pickle" > /dev/null; then
    for after in training_step _inner_training_loop; do
      python3 tools/peak_trace.py "$work"/mh/r.*.pickle --top 30 --after $after --json "$res/$name.$after.json" \
        > "$res/$name.$after.txt" 2>&1
      echo "$name: peak_trace --after $after exit $?" | tee -a "$res/summary.txt"
    done
  fi
  rm -rf "$work"
}

check() {  # check NAME ARCH LAYERS "QTOOL VERIFY OPTIONS" [VAR=VALUE...]: a traced verify run, any recipe
  local name=$1 arch=$2 layers=$3 opts=$4 work
  shift 4
  work=$(mktemp -d)
  python3 -c "import json, sys; sys.path.insert(0, 'bench'); from recipe_gpu import case_config; \
print(json.dumps(case_config('$arch', $layers)))" > "$work/config.json" || return
  mkdir -p "$work/mh"
  # shellcheck disable=SC2086
  ( cd "$work" && env "$@" QTOOL_MEMORY_HISTORY="$work/mh/r" timeout "$limit" python3 -m qtool verify \
      "$work/config.json" $opts --steps 2 --json > "$res/$name.json" 2> "$res/$name.err" )
  echo "$name: qtool verify exit $?" | tee -a "$res/summary.txt"
  if compgen -G "$work/mh/r.*.pickle" > /dev/null; then
    python3 tools/peak_trace.py "$work"/mh/r.*.pickle --top 30 --after training_step --json "$res/$name.peaks.json" \
      > "$res/$name.peaks.txt" 2>&1
  fi
  rm -rf "$work"
}

rows() {  # rows NAME SEQS [VAR=VALUE...]: bench/recipe_gpu.py's Unsloth rows for Gemma-2 (4 layers)
  local name=$1 seqs=$2
  shift 2
  mkdir -p "$res/$name"
  env "$@" python3 bench/recipe_gpu.py --cases "" --unsloth gemma-2-9b:4 --skip-infer gemma-2-9b --seqs "$seqs" \
    --budget "$limit" --job-timeout "$limit" --out "$res/$name" > "$res/$name.log" 2>&1
  echo "$name: recipe_gpu exit $?" | tee -a "$res/summary.txt"
}

case ${CALL:-8} in
7)
  traced mixtral_512 mixtral-8x7b 4 512 adamw &
  traced mixtral_512_noblock mixtral-8x7b 4 512 adamw UNSLOTH_BLOCK_COMPILE=0 &
  traced gemma2_512_noblock gemma-2-9b 4 512 adamw UNSLOTH_BLOCK_COMPILE=0 &
  traced gemma2_8192_noblock gemma-2-9b 4 8192 adamw UNSLOTH_BLOCK_COMPILE=0 &
  rows gemma2_default 512 &
  rows gemma2_noblock 512,2048,8192 UNSLOTH_BLOCK_COMPILE=0 &
  ;;
8)  # each (arch, length) in a fresh process, as a user's run is
  traced mixtral_2048 mixtral-8x7b 4 2048 adamw8bit &
  traced mixtral_8192 mixtral-8x7b 4 8192 adamw8bit &
  traced gemma2_512_noblock_8bit gemma-2-9b 4 512 adamw8bit UNSLOTH_BLOCK_COMPILE=0 &
  traced gemma2_2048_noblock_8bit gemma-2-9b 4 2048 adamw8bit UNSLOTH_BLOCK_COMPILE=0 &
  traced gemma2_16384_noblock_8bit gemma-2-9b 4 16384 adamw8bit UNSLOTH_BLOCK_COMPILE=0 &
  mkdir -p /tmp/rg; QTOOL_MEMORY_HISTORY=/tmp/rg/r rows gemma2_noblock_traced 512 UNSLOTH_BLOCK_COMPILE=0 &
  ;;
9)  # checks of calls 7-8's terms on settings and an architecture they were not read from (nothing fitted)
  check mixtral_b2_1024 mixtral-8x7b 4 "--recipe unsloth --mode qlora --batch-size 2 --seq-len 1024 --optimizer adamw8bit" &
  check mixtral6_1024 mixtral-8x7b 6 "--recipe unsloth --mode qlora --seq-len 1024 --optimizer adamw8bit" &
  check gemma2_b2_4096 gemma-2-9b 4 "--recipe unsloth --mode qlora --batch-size 2 --seq-len 4096 --optimizer adamw8bit" \
    UNSLOTH_BLOCK_COMPILE=0 &
  check qwen3moe_unsloth_2048 qwen3-30b-a3b 4 "--recipe unsloth --mode qlora --seq-len 2048 --optimizer adamw8bit" &
  check qwen3moe_trainer_2048 qwen3-30b-a3b 4 "--recipe trainer --mode qlora --seq-len 2048 --optimizer adamw8bit" &
  check qwen25_unsloth_8192 qwen2.5-7b 4 "--recipe unsloth --mode qlora --seq-len 8192 --optimizer adamw8bit" &
  ;;
10)  # Qwen3-30B-A3B (4 layers) under Unsloth, fresh processes: call 9 measured 4.44 GiB at 2048, estimated 4.20
  check qwen3moe_unsloth_512 qwen3-30b-a3b 4 "--recipe unsloth --mode qlora --seq-len 512 --optimizer adamw8bit" &
  check qwen3moe_unsloth_2048 qwen3-30b-a3b 4 "--recipe unsloth --mode qlora --seq-len 2048 --optimizer adamw8bit" &
  check qwen3moe_unsloth_8192 qwen3-30b-a3b 4 "--recipe unsloth --mode qlora --seq-len 8192 --optimizer adamw8bit" &
  check qwen3moe_unsloth_2048_noblock qwen3-30b-a3b 4 "--recipe unsloth --mode qlora --seq-len 2048 --optimizer adamw8bit" \
    UNSLOTH_BLOCK_COMPILE=0 &
  ;;
11)  # qtool's own switch end to end: Gemma-2 by default (one line naming the switch), and with the switch
  check gemma2_default_512 gemma-2-9b 4 "--recipe unsloth --mode qlora --seq-len 512 --optimizer adamw8bit" &
  check gemma2_flag_2048 gemma-2-9b 4 "--recipe unsloth --mode qlora --seq-len 2048 --optimizer adamw8bit --no-unsloth-block-compile" &
  check mixtral_flag_1024 mixtral-8x7b 4 "--recipe unsloth --mode qlora --seq-len 1024 --optimizer adamw8bit --no-unsloth-block-compile" &
  ;;
esac
wait
cp "$OUT/card.txt" "$res/"
if compgen -G "/tmp/rg/r.*.pickle" > /dev/null; then
  python3 tools/peak_trace.py /tmp/rg/r.*.pickle --top 30 --after training_step --json "$res/rows_traced.json" \
    > "$res/rows_traced.txt" 2>&1
fi
for f in "$res"/gemma2_*.log; do echo "== $f"; tail -n 6 "$f"; done
for f in "$res"/*.training_step.txt "$res"/*.peaks.txt; do [ -f "$f" ] && { echo "== $f"; head -n 12 "$f"; }; done
for f in "$res"/*.json; do python3 -c "import json, sys; d = json.load(open(sys.argv[1])); m = d.get('memory') or {}; \
print(sys.argv[1].rsplit('/', 1)[-1], d.get('exit_code'), m.get('peak_allocated_bytes', 0) / 2**30, \
(d.get('estimate') or {}).get('allocated_peak_bytes', 0) / 2**30, d.get('error'))" "$f" 2>/dev/null; done
tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$res"
