# lmforge trainer image (CUDA): the image of the PyTorchJob's `pytorch`
# containers. Each pod runs `lmforge worker ...`, which reads the operator's
# distributed environment (MASTER_ADDR, WORLD_SIZE, RANK, PET_*) and trains with
# NCCL on the pod's GPUs (gloo where a pod has none).
#
#   lmforge images build --role trainer                         # CUDA (cu126)
#   lmforge images build --role trainer --trainer-variant cpu   # a CPU trainer
#   docker build -f docker/trainer.Dockerfile --build-arg TORCH_VARIANT=cu130 ...
#
# The tag is the package version: the compiled pipeline names exactly that
# image (src/lmforge/pipeline/images.py).
#
# Build context: the repository root (see /.dockerignore). linux/amd64 only:
# the ve-fairseq wheel is published for manylinux x86_64 alone.
#
# Base image: python:3.11-slim-bookworm plus PyTorch's CUDA wheel, rather than
# pytorch/pytorch or nvidia/cuda, because
#   - lmforge requires Python 3.11 (>=3.11,<3.12, as ve-fairseq 0.12.3's
#     cp311 wheel does); pytorch/pytorch:2.13.0-* ships Python 3.12 in conda,
#     and Ubuntu 22.04 (nvidia/cuda's base) has only an early 3.11.0 package;
#   - the CUDA torch wheel already carries its CUDA runtime, cuBLAS, cuDNN and
#     NCCL as pinned nvidia-* wheels and loads those; an nvidia/cuda -runtime
#     base would add a second, unused copy (~3 GB). The GPU driver (libcuda,
#     nvidia-smi) is not in any image: the NVIDIA container toolkit mounts it;
#   - the steps image is built the same way on the same base, so the two
#     images differ only in which torch wheel they hold.
#
# TORCH_VARIANT picks the wheel: cu126 (default) runs on any driver >= 525.60
# (CUDA 12 minor-version compatibility) and covers A100 and H100/H200 (sm_80,
# sm_90); Blackwell (sm_100/sm_120) needs a newer build (cu129, or cu130 with
# a driver >= 580). `cpu` makes a CPU trainer (gloo): what runs the emulated
# PyTorchJob's replicas as containers on a machine without a GPU.
#
# The other build arguments (BASE_IMAGE, PIP_INDEX_URL, TORCH_INDEX_URL, and
# PIP_NO_INDEX/PIP_FIND_LINKS for a wheelhouse build) are the steps image's:
# see docker/steps.Dockerfile.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ARG TORCH_VARIANT=cu126
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

# pip compiles every module it installs to .pyc here, so that the runtime stage,
# whose venv is read-only to its non-root user, imports torch and fairseq
# without recompiling them in every pod.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Empty (but for its README) unless the build is a wheelhouse build.
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml requirements.lock ./

# The order of scripts/install.sh: torch pinned exactly first (the variant's
# wheel, --no-deps: its dependencies, nvidia-* and triton at the exact versions
# torch pins, are resolved with lmforge's, held to requirements.lock); then
# lmforge's dependencies; then ve-fairseq --no-deps (its wheel declares
# torchaudio, which would pull another torch).
RUN pip install --no-cache-dir --no-deps --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0+${TORCH_VARIANT}" \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps ve-fairseq==0.12.3

# A smoke import of the dependencies (no GPU is needed to import a CUDA torch):
# a missing runtime dependency or a torch of another variant fails the build.
RUN python3 -c "import torch, fairseq, mlflow, boto3; assert torch.__version__ == '2.13.0+${TORCH_VARIANT}', torch.__version__; assert (torch.version.cuda is None) == ('${TORCH_VARIANT}' == 'cpu')"

# Step 4 in a stage of its own: lmforge goes to /opt/lmforge (its console script
# to /opt/lmforge-bin), which the runtime stage lays over the dependencies' venv.
# A source change then rebuilds only these small layers; the ~2 GB venv layer of
# the runtime stage stays cached.
FROM builder AS app
# Build arguments are per stage: building lmforge's wheel needs the same package sources.
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
COPY README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps --target /opt/lmforge . \
    && mv /opt/lmforge/bin /opt/lmforge-bin


FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="lmforge-trainer" \
      org.opencontainers.image.description="lmforge fairseq training worker (CUDA, or CPU with TORCH_VARIANT=cpu)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric UID: Kubernetes can only enforce runAsNonRoot for a numeric USER.
RUN groupadd --gid 10001 lmforge \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin lmforge

COPY --from=builder /opt/venv /opt/venv
COPY --from=app /opt/lmforge/ /opt/venv/lib/python3.11/site-packages/
COPY --from=app /opt/lmforge-bin/ /opt/venv/bin/

# NVIDIA_DRIVER_CAPABILITIES: what the container toolkit mounts from the host
# driver (compute: libcuda; utility: nvidia-smi). NVIDIA_VISIBLE_DEVICES is
# deliberately not set: the Kubernetes device plugin sets it from the pod's
# nvidia.com/gpu limit, and a default of "all" would hand every GPU of a node
# to a pod that asked for none.
# GIT_PYTHON_REFRESH=quiet: mlflow imports GitPython, which warns when git is
# absent; training does not need git.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GIT_PYTHON_REFRESH=quiet \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/lmforge

# The assembled venv imports lmforge, and its console script runs.
RUN /opt/venv/bin/python3 -c "import lmforge.cli, lmforge.worker" && /opt/venv/bin/lmforge --version

USER 10001:10001
WORKDIR /home/lmforge

ENTRYPOINT ["lmforge", "worker"]
CMD ["--help"]
