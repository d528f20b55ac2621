# CPU image: the MLflow and Prefect servers and the CPU worker (data, validation, evaluation, promotion).
# Build from the repository root: docker build -f infra/docker/cpu.Dockerfile -t arft-cpu .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends git make bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/arft
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY arft_core/ arft_core/
COPY flows/ flows/
# The CPU lock pins torch==2.13.0 (CPU build); never torchvision on CPU.
RUN pip install -c requirements/constraints-cpu.txt torch==2.13.0 -e . \
    && pip install --no-deps fanoutqa==1.1.1 \
    && pip install "dvc[s3]==3.67.1" boto3 asyncpg Flask-WTF==1.3.0   # Flask-WTF: MLflow's basic auth
COPY dvc.yaml params.yaml Makefile ./
COPY infra/ infra/
CMD ["arft", "--help"]
