# lmforge pipeline-steps image (CPU): the `base_image` of every KFP component,
# the train step included (on a cluster it submits the PyTorchJob, whose pods
# run the trainer image). KFP sets the command of each step, so the image only
# has to hold an environment in which `lmforge` and its lazy imports (fairseq,
# mlflow, boto3, kubernetes) all import, with the venv's `python3` first on PATH
# (a component runs `python3 -m kfp.dsl.executor_main`).
#
#   lmforge images build --role steps                      # PyPI, PyTorch's CPU index
#   lmforge images build --wheelhouse DIR --base-image B   # hermetic: no network at all
#   docker build -f docker/steps.Dockerfile -t ghcr.io/lmforge/lmforge-steps:0.1.0 .
#
# The tag is the package version: the compiled pipeline names exactly that
# image (src/lmforge/images.py).
#
# Build arguments (the defaults are what a user with internet needs):
#   BASE_IMAGE       a Debian-based image with Python 3.11 and its venv module
#                    (python:3.11-slim-bookworm; a debootstrap-made bookworm
#                    works the same, see tests/docker_env.py);
#   PIP_INDEX_URL    a PyPI mirror (pip reads the variable itself);
#   TORCH_INDEX_URL  where the CPU torch wheel comes from;
#   PIP_NO_INDEX=1 and PIP_FIND_LINKS=/wheelhouse: install only from the wheels
#                    the build context holds under wheelhouse/ (`lmforge images
#                    wheelhouse DIR` fills them; `lmforge images build
#                    --wheelhouse DIR` sets both and builds with no network).
#
# Build context: the repository root (see /.dockerignore). linux/amd64 only:
# the ve-fairseq wheel is published for manylinux x86_64 alone.
#
# The install order is scripts/install.sh's, minus the test extra:
#   1. torch pinned exactly, as the CPU wheel (~200 MB; PyPI's Linux default is
#      the multi-GB CUDA build). --no-deps: torch's own dependencies are
#      resolved in step 2, held to requirements.lock with everything else;
#   2. lmforge's dependencies held to requirements.lock (layer cached until
#      pyproject.toml or the lock changes);
#   3. ve-fairseq --no-deps (its wheel declares torchaudio, which would pull
#      another torch; its real runtime needs came with step 2);
#   4. lmforge itself, non-editable, last, so a source change rebuilds one
#      small layer.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# pip compiles every module it installs to .pyc here, so that the runtime stage,
# whose venv is read-only to its non-root user, imports torch and mlflow
# without recompiling them in every pod.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Empty (but for its README) unless the build is a wheelhouse build.
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml requirements.lock ./

# Steps 1 to 3. The dependency list is read from pyproject.toml so that it has
# one home; the lock pins every version that resolution reaches.
RUN pip install --no-cache-dir --no-deps --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0+cpu \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps ve-fairseq==0.12.3

# A smoke import of the dependencies: a missing runtime dependency or a torch of
# the wrong build fails the build, not the first pipeline run.
RUN python3 -c "import torch, fairseq, mlflow, boto3, kfp, kubernetes; assert torch.__version__ == '2.13.0+cpu', torch.__version__"

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

LABEL org.opencontainers.image.title="lmforge-steps" \
      org.opencontainers.image.description="lmforge Kubeflow Pipelines steps (CPU)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric UID: Kubernetes can only enforce runAsNonRoot for a numeric USER.
RUN groupadd --gid 10001 lmforge \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin lmforge

COPY --from=builder /opt/venv /opt/venv
COPY --from=app /opt/lmforge/ /opt/venv/lib/python3.11/site-packages/
COPY --from=app /opt/lmforge-bin/ /opt/venv/bin/

# GIT_PYTHON_REFRESH=quiet: mlflow imports GitPython, which warns on every
# import when git is absent; git is not needed in a step.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GIT_PYTHON_REFRESH=quiet \
    HOME=/home/lmforge

# The assembled venv imports lmforge, and its console script runs.
RUN /opt/venv/bin/python3 -c "import lmforge.cli, lmforge.worker" && /opt/venv/bin/lmforge --version

USER 10001:10001
WORKDIR /home/lmforge

CMD ["lmforge", "--help"]
