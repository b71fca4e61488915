#!/usr/bin/env bash
# Issue 15's GPU measurements, before and after the change, in one go (~8 minutes on one H100).
# Writes results/bench/<date>-<gpu>/{layer,model}-{before,after}*.{txt,json} and env.txt (commit them).
#
# "before" is BEFORE_REF (default 79ddd75, the last commit before issue 15) for the core, routers and
# training code, run by today's benchmark code (copied over it), so both sides are timed the same way.
# Usage: scripts/gpu-bench.sh            (PY=python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BEFORE_REF=${BEFORE_REF:-79ddd75}
GPU=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))")
OUT="results/bench/$(date -u +%Y%m%d-%H%M)-$(echo "$GPU" | tr -c 'A-Za-z0-9\n' '-')"
mkdir -p "$OUT"
{ echo "device: $GPU"; echo "after: $(git rev-parse HEAD)"; echo "before: $(git rev-parse "$BEFORE_REF")";
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvidia-smi -L || true; } > "$OUT/env.txt"

OLD=$(mktemp -d)
trap 'rm -rf "$OLD"' EXIT
git archive "$BEFORE_REF" | tar -x -C "$OLD"
cp -r "$OLD/routers" "$OLD/moebench/routers" && cp -r "$OLD/tasks" "$OLD/moebench/tasks"
cp moebench/bench/*.py "$OLD/moebench/bench/" && cp moebench/cli/bench.py "$OLD/moebench/cli/bench.py"

side() {  # side before|after name timeout_s args...  (one benchmark, output kept even when it fails)
  local which=$1 name=$2 limit=$3; shift 3
  local path=""; [ "$which" = before ] && path="$OLD"
  echo "== $which $name: moebench bench $*" | tee -a "$OUT/log.txt"
  PYTHONPATH="$path" timeout "$limit" $PY -m moebench bench "$@" --json "$OUT/$name-$which.json" \
    > "$OUT/$name-$which.txt" 2>&1 || echo "   failed or timed out (rc $?)" | tee -a "$OUT/log.txt"
  grep -v '^\[' "$OUT/$name-$which.txt" | head -40 || true
}

LAYER=(layer --device cuda --routers uniform,softmax-topk,ermoe --top-k 2,1 --repeats 20)
for which in before after; do
  side "$which" layer-vit-b 150 "${LAYER[@]}" --preset vit-b             # d=768 h=3072 T=32k bf16: the target
  side "$which" layer-vit-s 120 "${LAYER[@]}" --preset vit-s             # d=384 h=1536 T=32k
done
side after layer-vit-b-200k 150 "${LAYER[@]}" --preset vit-b-large-batch --routers uniform,softmax-topk

MODEL=(model --device cuda --configs vit-s16,clip-b32,vit3d --repeats 10 --warmup 3)
side before model 150 "${MODEL[@]}" --batch-size 128
side after model 150 "${MODEL[@]}" --batch-size 128
side after model-compiled 240 "${MODEL[@]}" --batch-size 128 --compile --configs vit-s16
echo "results in $OUT"
