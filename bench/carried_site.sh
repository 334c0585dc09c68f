# Sourced by the GPU bench scripts (no internet there): the carried wheels (WHEELS: folders of .whl, default
# .whl) go into one --target folder (SITE: its own folder when two runs install side by side), which goes on
# PYTHONPATH before the checkout; the hub is offline and $OUT exists.
site=${SITE:-/tmp/recipe-site}
for d in ${WHEELS:-.whl}; do
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$d"/*.whl || exit
done
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
export OUT="${OUT:-./out}"
mkdir -p "$OUT"
