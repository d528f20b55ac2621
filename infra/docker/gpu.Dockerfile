# GPU image: the GPU worker (training with TRL + DeepSpeed, vLLM rollouts and evaluation). NVIDIA container runtime.
# Build from the repository root: docker build -f infra/docker/gpu.Dockerfile -t arft-gpu .
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends git make bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/arft
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY arft_core/ arft_core/
COPY flows/ flows/
# The base image's CUDA torch stays; the CPU lock is not used here (it pins the CPU build).
RUN pip install -e . "deepspeed>=0.16" \
    && pip install --no-deps fanoutqa==1.1.1 \
    && pip install "dvc[s3]==3.67.1" boto3
# The normal (CUDA) vLLM build, the newest TRL 1.16 supports: `rollout.engine: auto` uses it. It brings its own
# torch and a transformers < 5.20 (pip notes arft's 5.23 pin; arft runs on vLLM's, as in the CPU vLLM env).
RUN pip install "vllm==0.31.0"
COPY dvc.yaml params.yaml Makefile ./
COPY infra/ infra/
CMD ["arft", "--help"]
