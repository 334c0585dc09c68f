#!/usr/bin/env bash
# What runs on the multi-GPU machine (no internet; bitsandbytes from the carried wheel in ../../.whl or .whl).
#   bash bench/multigpu_run.sh --runs "8b:2:fsdp:512,..." [--deadline S]   -> results in $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
whl=$(ls ../../.whl/*.whl .whl/*.whl 2>/dev/null | head -1)
[ -n "$whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT="${OUT:-./out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
grep MemTotal /proc/meminfo | tee -a "$OUT/machine.txt"
python3 -c "import torch, transformers, bitsandbytes, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)" | tee -a "$OUT/machine.txt"
python3 bench/multigpu_gpu.py "$@"
