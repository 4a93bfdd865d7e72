#!/usr/bin/env bash
# The Docker image's entrypoint: the app on every GPU the container sees, one torchrun process per GPU, served
# on 0.0.0.0:7860; its arguments go to launch.py (e.g. --model /models/DeepSeek-V4-Flash).
#   NPROC=N          processes (GPUs) on this node instead of all of them
#   TORCHRUN_ARGS    more torchrun arguments, e.g. for two nodes:
#                    "--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
# With one GPU or none (the CPU) and no TORCHRUN_ARGS it runs launch.py in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$nproc" -gt 1 ] || [ -n "${TORCHRUN_ARGS:-}" ]; then
    # shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of arguments
    exec torchrun ${TORCHRUN_ARGS:-} --nproc-per-node "$nproc" launch.py --host 0.0.0.0 "$@"
fi
exec python launch.py --host 0.0.0.0 "$@"
