#!/usr/bin/env bash
# What runs on the multi-GPU machine (no internet; bitsandbytes from the carried wheel in ../../.whl or .whl).
#   bash bench/multigpu_run.sh DEADLINE_S LANE [LANE...]      -> results in $OUT
# A LANE is FIRST_GPU=RUNS (RUNS as bench/multigpu_gpu.py --runs takes them); lanes run side by side, each on
# its own cards (2-card runs on cards 0,1 and 2,3 of a 4-card machine), and write $OUT/lane<FIRST_GPU>.json (and
# .err when a run failed); their progress lines are printed at the end (few files: the device returns 8).
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=$1; shift
whl=$(ls ../../.whl/*.whl .whl/*.whl 2>/dev/null | head -1)
[ -n "$whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl"
# LIBS=DIR: also these wheels (e.g. .dev/libs: the transformers/peft/accelerate CI installs, not the image's)
[ -n "${LIBS:-}" ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$LIBS"/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT="${OUT:-./out}"
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; grep MemTotal /proc/meminfo; nproc
  python3 -c "import torch, transformers, bitsandbytes, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
} 2>&1
pids=()
for lane in "$@"; do
  first=${lane%%=*}; runs=${lane#*=}
  python3 bench/multigpu_gpu.py --first-gpu "$first" --runs "$runs" --deadline "$deadline" --name "lane$first.json" \
    > "/tmp/lane$first.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for lane in "$@"; do cat "/tmp/lane${lane%%=*}.log"; done
