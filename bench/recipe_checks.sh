#!/usr/bin/env bash
# One GPU call (issue 9, helper recipe10): three recipe_run.sh side by side on one card, each its own process and
# install folder (allocator peaks are per process):
#   t: the Trainer on Llama-3-8B (4 layers) at 512 under --precision bf16/fp16/fp32 and optim adamw_torch /
#      paged_adamw_8bit (checks of the estimate, not fits), and trl's SFTTrainer on Mistral-7B (4 layers) at
#      2048/8192 (re-measuring rows whose model changed), rows into $OUT/t;
#   u: Gemma-2-9B (4 layers) under Unsloth QLoRA 512/2048/8192 with UNSLOTH_BLOCK_COMPILE=0 (Unsloth's per-layer
#      torch.compile raised an empty AssertionError in Gemma2DecoderLayer on torch 2.11), rows into $OUT/u.
#   bash bench/recipe_checks.sh     (from the root of a copy of the repo two levels under the checkout: .dev/NAME)
set -uo pipefail
cd "$(dirname "$0")/.."
W="../../.whl ../recipe-wheels/trl"
SITE=/tmp/st WHEELS="$W" OUT=$OUT/t bash bench/recipe_run.sh --cases llama-3-8b:4 --recipes trainer --seqs 512 \
  --infer "" --variants bf16:adamw8bit,fp16:adamw8bit,fp32:adamw8bit,bf16:adamw,bf16:paged_adamw8bit \
  --budget "${BUDGET:-190}" --job-timeout "${BUDGET:-190}" > "$OUT/t.log" 2>&1 &
SITE=/tmp/sm WHEELS="$W" OUT=$OUT/t bash bench/recipe_run.sh --cases mistral-7b:4 --recipes sft --seqs 2048,8192 \
  --infer "" --budget "${BUDGET:-190}" --job-timeout "${BUDGET:-190}" > "$OUT/m.log" 2>&1 &
UNSLOTH_BLOCK_COMPILE=0 SITE=/tmp/su WHEELS="$W ../recipe-wheels/unsloth" OUT=$OUT/u bash bench/recipe_run.sh \
  --cases "" --unsloth gemma-2-9b:4 --skip-infer gemma-2-9b --seqs 512,2048,8192 \
  --budget "${BUDGET:-190}" --job-timeout "${BUDGET:-190}" > "$OUT/u.log" 2>&1
wait
for f in t m u; do echo "== $f"; tail -n 14 "$OUT/$f.log"; done
