#!/usr/bin/env bash
# train/gpu_long.sh's two phases on the CPU, for a rerun without a GPU (the same stages, data seeds and
# options; two torch threads; resumable: rerun the same command after a stop). Slow: phase 1 is 25.1M
# tokens, phase 2 12.9M, several hours each on the 2-vCPU box, against 9 minutes on one H200.
#
#   PHASE=1 INIT=<export of the CPU schedule> bash train/cpu_long.sh
#   PHASE=2 INIT=<phase 1's export, $RUN/exp/step767> bash train/cpu_long.sh
set -euo pipefail
PHASE=${PHASE:-1}
INIT=${INIT:?set INIT to the model folder to start from}
RUN=${RUN:-train/runs/cpu-long$PHASE}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000
OPTS='"mix": [["niah", 0.8], ["kv", 0.2]], "w_hca": 2.0, "task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}'
case $PHASE in
  1) SEED=4651; STAGES='["gpu-16k", 200, 16384, 2, false, 1e-4, {'"$OPTS"'}], ["gpu-32k", 567, 32768, 1, false, 5e-5, {'"$OPTS"'}]' ;;
  2) SEED=4652; STAGES='["gpu-64k", 196, 65536, 1, false, 3e-5, {'"$OPTS"'}]' ;;
  *) echo "PHASE must be 1 or 2" >&2; exit 2 ;;
esac
EXP='{"task": {"value_fmt": "number", "max_needles": 6, "edge_p": 0.2}, "mix": [["niah", 0.8], ["kv", 0.2]], "stages": ['"$STAGES"']}'
$PY train/train.py --out "$RUN" --init-from "$INIT" --seed "$SEED" --threads 2 --query-block 2048 \
  --eval-every 250 --eval-n 8 --export-stages "$RUN/exp" --experiment "$EXP"
