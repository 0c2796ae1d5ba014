# The image of the flow-run pods on Kubernetes (the Prefect work pool's base job template,
# deployments/templates/prefect-kubernetes-job-template.json, names it). NEVER BUILT on the machines this project is
# developed on (no container engine there): tests/unit/test_container_image.py only checks that it agrees with the
# job template, prefect.yaml and pyproject.toml. Build and push it yourself:
#   docker build -t REGISTRY/canaryflow:TAG . && docker push REGISTRY/canaryflow:TAG
# then `canaryflow k8s pool` and set the pool's `image` variable to it.
#
# CPU only: the flows validate, optimize, package and load-test; serving (and its GPU) is TorchServe's own image.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CANARYFLOW_PROJECT_DIR=/opt/canaryflow \
    HOME=/tmp \
    PREFECT_HOME=/tmp/prefect \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/canaryflow

# torch first, the CPU wheel, pinned as in pyproject.toml: any later resolve that admits another torch pulls GBs
# of CUDA libraries
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md prefect.yaml ./
COPY canaryflow canaryflow
COPY deployments deployments
COPY validation validation
COPY tasks tasks
COPY flows flows
RUN pip install '.[tensorflow]'

# the job template runs it as uid/gid 1000 with a read-only root filesystem: /tmp and the state dir are emptyDirs,
# the seal key a read-only Secret volume
USER 1000:1000
CMD ["prefect", "flow-run", "execute"]
