#!/usr/bin/env bash
# The CPU test suite on the GPU machine's CPU (issue 8: the suite must pass on any x86-64 CPU), with the
# versions CI installs except torch (the image's CUDA build, its GPU hidden so every test takes the CPU paths).
# Carry .whl (slim bitsandbytes) and .dev/libs (the other wheels, `pip download --no-deps` of CI's pip freeze
# minus torch/numpy). Results: $OUT/cpu_suite.txt. all-MiniLM-L6-v2 (88 MB) cannot travel: those tests skip.
#   bash tools/device_cpu_suite.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .dev/libs/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  echo "== $(date -u +%FT%TZ) $(nproc) cores"
  lscpu | grep -E "Model name"
  grep -o -w -E "avx512[a-z_0-9]*|amx[a-z_0-9]*" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  python3 -c "import torch, transformers, bitsandbytes, peft, accelerate, huggingface_hub as h; print('torch', torch.__version__, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| hub', h.__version__); from bitsandbytes.functional import has_avx512bf16; print('bitsandbytes has_avx512bf16():', has_avx512bf16())"
  python3 -m pytest -q -p no:cacheprovider "$@" tests 2>&1
  echo "pytest exit $?"
} 2>&1 | tee "$OUT/cpu_suite.txt"
