# Longlens on NVIDIA GPUs: the app under torchrun, one process per visible GPU (scripts/docker-entrypoint.sh).
#
#   docker build -t longlens .
#   docker run --gpus all -p 7860:7860 -v /models:/models longlens --model /models/DeepSeek-V4-Flash
#
# torch's CUDA wheels carry the CUDA runtime, cuBLAS and NCCL as pip packages, so the image needs only the
# host's driver, which `--gpus` mounts (NVIDIA Container Toolkit): a plain Python 3.11 base, as in development.
FROM python:3.11-slim-bookworm

# PyTorch's wheel index for the CUDA build (cu129: CUDA 12.9, what the FP8 block-scaled matmuls need on Hopper).
ARG TORCH_CUDA=cu129
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Chromium: the PNG/SVG figure export (runtime/report.py); everything else runs without it.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# requirements.txt as it is; its exact torch pin is met by the CUDA build of the same version named here.
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/${TORCH_CUDA} \
        -r requirements.txt "torch==2.13.0+${TORCH_CUDA}"

COPY . .
EXPOSE 7860
ENTRYPOINT ["scripts/docker-entrypoint.sh"]
