#!/usr/bin/env bash
# One command for a lent GPU, about 10 minutes on one H100 / H200, from a fresh clone; prints one table.
#   1. dry run of d20 planned for an H100 (fake GPU), then the same steps run for real on this GPU: the allocator's
#      peak beside the plan's, per stage
#   2. every stage at tiny size as plain processes on the GPU, bf16 (base with torch.compile): tokenizer ->
#      base -> mid -> SFT -> RL
#   3. base training throughput and MFU at d12 and d20 (bf16, compile, MuonAdamW), Engine and scheduler decode tok/s
# Any failure names its step; logs are in $SMOKE_DIR (default /tmp/gpu_smoke, or $OUT/gpu_smoke when $OUT is set).
# Usage: bash bench/gpu_smoke.sh          (PYTHON=... picks the interpreter; it needs a CUDA build of torch)
#        SMOKE_DEVICE=cpu bash bench/gpu_smoke.sh   runs step 2 on the CPU alone (to check the script itself)
# Packages missing there (rustbpe, for the tokenizer) can be carried as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${SMOKE_DEVICE:-cuda}
LOGS=${SMOKE_DIR:-${OUT:+$OUT/gpu_smoke}}
LOGS=${LOGS:-/tmp/gpu_smoke}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
  echo "gpu_smoke: no CUDA GPU here ($PY: torch.cuda.is_available() is False, or no torch); run it on a GPU box" \
       "(SMOKE_DEVICE=cpu checks the script on a CPU)" >&2
  exit 2
fi

ROWS=()
FAILED=0
# step NAME CMD...: run, log to $LOGS/NAME.log, keep the log's last line as the figure
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" >"$LOGS/$name.log" 2>&1; then status=ok; else status="FAILED"; FAILED=1; fi
  local figure
  figure=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | cut -c1-150)
  ROWS+=("$(printf '%-16s %-7s %5ss  %s' "$name" "$status" $((SECONDS - t0)) "$figure")")
  [ "$status" = ok ] || tail -20 "$LOGS/$name.log"
}

ROOT=$(mktemp -d)
TINY="--max-seq-len 256 --device-type $DEVICE --run dummy"
TASKS=$("$PY" -c "from nanochat.dataset import PACKAGE_TASK_DATA; print(PACKAGE_TASK_DATA)")
export NANOCHAT_BASE_DIR=$ROOT

if [ "$DEVICE" = cuda ]; then
  step dryrun_plan "$PY" -m nanochat.dryrun --preset d20 --gpu h100
  step dryrun_device "$PY" -m nanochat.dryrun --preset d20 --device cuda --gpus 1
fi
step tokenizer "$PY" -c "
from nanochat.dataset import resolve_source
from nanochat.tokenizer import RustBPETokenizer
source = resolve_source('fallback')
docs = (doc[:10000] for unit in source.units('train') for doc in source.read_unit(unit))
tok = RustBPETokenizer.train_from_iterator((d for _, d in zip(range(3000), docs)), 4096)
tok.save('$ROOT/tokenizer')
print('tokenizer: vocab', tok.get_vocab_size())"
step base_tiny "$PY" -m nanochat.base_train --depth 4 --aspect-ratio 32 --head-dim 64 --window-pattern SL \
  --device-batch-size 8 --total-batch-size 4096 --num-iterations 30 --eval-every 15 --eval-tokens 8192 \
  --core-metric-every -1 --sample-every 30 --data fallback --compile 1 $TINY
step mid_tiny "$PY" -m nanochat.chat_train --stage mid --device-batch-size 8 --total-batch-size 4096 \
  --num-iterations 10 --eval-every 10 --eval-tokens 8192 --mixture-scale 0.005 --task-data "$TASKS" $TINY
step sft_tiny "$PY" -m nanochat.chat_train --stage sft --device-batch-size 4 --target-examples-per-step 8 \
  --num-iterations 10 --eval-every 10 --eval-steps 4 --eval-metrics-every 10 --eval-metrics-max-problems 16 \
  --mixture-scale 0.1 --task-data "$TASKS" $TINY
step rl_tiny "$PY" -m nanochat.chat_rl --num-iterations 2 --examples-per-step 2 --num-samples 4 \
  --device-batch-size 4 --max-new-tokens 32 --eval-every 2 --eval-examples 8 --task-data "$TASKS" \
  --device-type "$DEVICE" --run dummy
if [ "$DEVICE" = cuda ]; then
  for depth in 12 20; do
    step "train_d$depth" "$PY" bench/bench_train.py --device cuda --compile --optimizer --depth "$depth" \
      --seq-len 2048 --device-batch-size 16 --warmup 5 --steps 20
  done
  step decode "$PY" bench/bench_engine.py --device cuda --depth 12 --seq-len 2048 --num-samples 8 \
    --new-tokens 256 --rounds 3
fi

echo
echo "gpu_smoke on $("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() \
  else 'cpu')") (logs: $LOGS)"
printf '%s\n' "${ROWS[@]}"
[ -f "$LOGS/dryrun_device.log" ] && sed -n '/^stage/,/^base training/p' "$LOGS/dryrun_device.log"
rm -rf "$ROOT"
exit $FAILED
