# `mmpipe serve` in a container (CPU). The model folder and the config it was trained with are
# mounted; the service answers on port 8000.
#
#   docker build -t mmpipe-serve .
#   docker run --rm -p 8000:8000 --shm-size=2g \
#       -v "$PWD/store/demo/models/attention-image+text+audio:/model:ro" mmpipe-serve
#   curl -s localhost:8000/healthz
#
# Another config: mount it and pass it first, e.g. `... -v "$PWD/my.yaml:/config.yaml:ro" mmpipe-serve
# /config.yaml --model /model --host 0.0.0.0`. Any `mmpipe serve` option can follow (--replicas,
# --quantize int8, --max-batch-size, ...). Ray keeps its object store in /dev/shm: give it room
# (--shm-size). `docker stop` sends SIGTERM, which stops Serve and Ray cleanly in about 10 s: use
# `docker stop -t 30`.
#
# CUDA variant: a base image with CUDA's runtime and Python 3.11, and torch from the default index
# (its Linux wheels carry the CUDA libraries), then give the replicas a GPU:
#   docker build -t mmpipe-serve:cuda \
#       --build-arg BASE=rayproject/ray:2.58.0-py311-cu128 --build-arg TORCH_INDEX=https://pypi.org/simple .
#   docker run --rm --gpus all -p 8000:8000 --shm-size=8g -v ...:/model:ro mmpipe-serve:cuda \
#       configs/demo.yaml --model /model --host 0.0.0.0 --replica-gpus 1
# GPU feature encoders configured in the stages then run on the replica's GPU; the fusion model
# stays on the CPU, as in `mmpipe predict`, so the probabilities are the same. (--quantize int8 is
# for CPU replicas and is refused with --replica-gpus.)
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=1

WORKDIR /opt/mmpipe
# torch first and pinned, from the CPU wheel index (the registry's default build carries ~5 GB of
# CUDA libraries a CPU image does not use); nothing installed afterwards may replace it.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml constraints.txt README.md ./
COPY core core
COPY pipeline pipeline
COPY stages stages
COPY training training
COPY configs configs
RUN pip install -c constraints.txt . \
    && useradd --create-home mmpipe
USER mmpipe

EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
ENTRYPOINT ["mmpipe", "serve"]
CMD ["configs/demo.yaml", "--model", "/model", "--host", "0.0.0.0", "--port", "8000", "--set", "ray.dashboard=false"]
