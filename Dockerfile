# One image for the Ray head and workers of a tuneserve cluster (see k8s/ and docs/kubernetes.md).
#
#   GPU workers (default):  docker build -t tuneserve:0.1.0-ray2.60.0-gpu .
#   CPU only:               docker build --build-arg VARIANT=cpu -t tuneserve:0.1.0-ray2.60.0-cpu .
#
# The Ray version here, `rayVersion` in k8s/ and the pin in pyproject.toml must agree
# (tests/test_deployment.py checks it).
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=gpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}

ARG VARIANT
# The CPU image takes torch's CPU build (no CUDA libraries); the GPU image takes PyPI's CUDA build.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The official image's user: ray (uid 1000, group users 100). Numeric, so that Kubernetes can
# verify runAsNonRoot.
USER 1000:100
WORKDIR /home/ray/tuneserve

# Dependencies first, from the lock: this layer is rebuilt only when the lock changes.
# The GPU image's chat engine is vLLM's CUDA build, pinned, in a venv of its own: its torch and
# transformers pins clash with ours, and serving/engine/vllm_engine.py runs it as a process.
ARG VLLM_VERSION=0.33.0
ENV TUNESERVE_VLLM_PYTHON=/home/ray/vllm/bin/python
COPY --chown=1000:100 requirements.lock ./
RUN if [ "$VARIANT" = "cpu" ]; then \
        export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; \
    fi \
 && pip install --no-cache-dir -r requirements.lock \
 && if [ "$VARIANT" = "gpu" ]; then \
        python -m venv /home/ray/vllm \
     && /home/ray/vllm/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}"; \
    fi

# The project itself, without touching the locked dependencies.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 service ./service
COPY --chown=1000:100 training ./training
COPY --chown=1000:100 serving ./serving
RUN pip install --no-cache-dir --no-deps .

# Ray's own ports (GCS 6379, dashboard 8265, client 10001) stay inside the cluster; the only
# port meant for users is Serve's HTTP port, where the tuneserve API listens.
EXPOSE 8000
