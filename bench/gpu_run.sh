#!/usr/bin/env bash
# What the lead runs on the GPU machine (no internet; bitsandbytes comes as a carried wheel in .whl/).
#   bash bench/gpu_run.sh [verify_gpu.py options]      -> results in $OUT (default ./out)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl
fi
export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT="${OUT:-./out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, bitsandbytes, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| peft', peft.__version__)"
python3 bench/verify_gpu.py "$@"
