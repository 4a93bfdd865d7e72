#!/usr/bin/env bash
# The GPU continuation of the default model: sequences a CPU cannot afford, in two phases that each fit one
# 10-minute command on one H200 (from the repository root, on a CUDA machine):
#
#   PHASE=1 INIT=<export of the CPU schedule> bash train/gpu_long.sh   # 16,384 x 2 (200 steps), 32,768 (567)
#   PHASE=2 INIT=<phase 1's export>           bash train/gpu_long.sh   # 65,536 (196 steps)
#
# Each phase starts from INIT's weights (train.py --init-from: fresh optimiser) with its own data seed; both
# use the long regime's data (needles 80% / key-value 20%, up to 6 needles, a fifth on an edge line, HCA
# penalty). The step counts are those of the model card's run, where each phase's last stage was fitted to
# the time left (BUDGET=<minutes> passes --time-budget, which logs the fitted length); without BUDGET they run
# as written. Phase 1 first checks the CUDA logits of INIT against the CPU's (bench/cuda_parity.py).
# Needs the token pools cached in train/runs/pool_*.npy (a GPU machine may lack the /usr/share/doc corpus).
# $OUT receives train.log, log.jsonl and each stage end's weights (step<N>/, shards of < 16 MiB).
set -uo pipefail
PHASE=${PHASE:-1}
INIT=${INIT:-assets/model}
RUN=${RUN:-train/runs/gpu-phase$PHASE}
OUT=${OUT:-$RUN/out}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
LOG="$OUT/train.log"

OPTS='"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}'
case $PHASE in
  1) SEED=4651; STAGES='["gpu-16k", 200, 16384, 2, false, 1e-4, {'"$OPTS"'}], ["gpu-32k", 567, 32768, 1, false, 5e-5, {'"$OPTS"'}]' ;;
  2) SEED=4652; STAGES='["gpu-64k", 196, 65536, 1, false, 3e-5, {'"$OPTS"'}]' ;;
  *) echo "PHASE must be 1 or 2" >&2; exit 2 ;;
esac
EXP=${EXP:-'{"task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}, "mix": [["niah", 0.8], ["kv", 0.2]], "stages": ['"$STAGES"']}'}
BUDGET_ARGS=()
TIMEOUT=3600
if [ -n "${BUDGET:-}" ]; then
  BUDGET_ARGS=(--time-budget "$BUDGET")
  TIMEOUT=$(awk "BEGIN {print int($BUDGET * 60 + 60)}")  # leaves the copy below its time if a step runs long
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  [ "$PHASE" = 1 ] && timeout 60 $PY bench/cuda_parity.py --model "$INIT" --tokens 16384 --decode 16 --device "$DEVICE"
} 2>&1 | tee "$LOG"

timeout "$TIMEOUT" $PY train/train.py --out "$RUN" --init-from "$INIT" --seed "$SEED" --device "$DEVICE" \
  --workers 8 --query-block 2048 --score-budget-mb 4096 "${BUDGET_ARGS[@]}" \
  --eval-every 250 --eval-n 8 --ckpt-minutes 100 --export-stages "$RUN/exp" --shard-mb 15 \
  --experiment "$EXP" 2>&1 | tee -a "$LOG"
cp "$RUN/log.jsonl" "$OUT/" 2>/dev/null
for d in "$RUN"/exp/step*; do
  [ -d "$d" ] && mkdir -p "$OUT/$(basename "$d")" && cp "$d"/*.safetensors "$OUT/$(basename "$d")/"
done
ls -la "$OUT" "$OUT"/step* 2>/dev/null
