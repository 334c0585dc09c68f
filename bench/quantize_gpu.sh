#!/usr/bin/env bash
# qtool quantize --device cuda vs transformers' own path vs the I/O floor, full Llama-3-8B shape (16 GB bf16
# in, 5.7 GB NF4-DQ out; ~35 GB free disk in $WORK). Prints one table; rows + log in $OUT (2 files).
#   bash bench/quantize_gpu.sh [--layers 32] [--skip-transformers]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl
fi
export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT="${OUT:-./out}"
WORK="${WORK:-/tmp/qtool-qbench}"
mkdir -p "$OUT" "$WORK"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; nproc; free -g | head -2; df -h "$WORK" | tail -1; } 2>&1 | tee "$OUT/quantize_bench.txt"
python3 bench/quantize_bench.py --layers 32 --device cuda --io-floor --workdir "$WORK" \
  --json "$OUT/quantize_bench.json" "$@" 2>&1 | tee -a "$OUT/quantize_bench.txt"
