# clipflow's image for every Ray pod (head, GPU and CPU workers, job submitters) on Kubernetes.
# Base: the official Ray GPU image of the Ray that pyproject.toml pins, on Python 3.11 (the
# RayCluster's rayVersion must match it). The project is installed on top as users install it
# (`pip install .`, not editable, with the `gpu` extra: nvidia-ml-py for MLflow's GPU system metrics)
# and never replaces the image's torch, numpy or ray: they become pip constraints first. torch is
# always pinned: the image's own build when it ships one, else TORCH_VERSION (the Makefile's pin; on
# Linux PyPI's wheel of it is the CUDA build), installed before the project so pip never picks one.
# The sources are removed after the install, so the image runs the installed package.
#
#   docker build -t ghcr.io/clipflow/clipflow:0.1.0 . && docker push ghcr.io/clipflow/clipflow:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

ARG OPENCLIP_PIN=open-clip-torch==3.3.0
ARG TORCH_VERSION=2.13.0
WORKDIR /opt/clipflow
USER root
RUN mkdir -p /opt/clipflow && chown ray:users /opt/clipflow
USER ray

COPY --chown=ray:users pyproject.toml README.md ray_cluster.yaml ./
COPY --chown=ray:users clip_core ./clip_core
COPY --chown=ray:users workflows ./workflows
COPY --chown=ray:users configs ./configs
RUN (pip show torch > /dev/null 2>&1 || pip install --no-cache-dir "torch==${TORCH_VERSION}") && \
    pip freeze | grep -iE '^(torch|numpy|ray)==' > /tmp/image-constraints.txt && \
    cat /tmp/image-constraints.txt && grep -q '^torch==' /tmp/image-constraints.txt && \
    pip install --no-cache-dir -c /tmp/image-constraints.txt ".[gpu]" && \
    rm -rf clip_core workflows build ./*.egg-info

# The OpenAI BPE vocabulary (tokenizer.source=path in configs/vit_*.yaml): OpenCLIP ships the file;
# it is installed without its dependencies only to copy the vocabulary, then removed.
RUN pip install --no-cache-dir --no-deps "${OPENCLIP_PIN}" && \
    python -c "import importlib.util, pathlib; \
from clip_core import Tokenizer; \
bpe = pathlib.Path(importlib.util.find_spec('open_clip').origin).parent / 'bpe_simple_vocab_16e6.txt.gz'; \
Tokenizer.from_openai_bpe(str(bpe)).save('/opt/clipflow/openai-bpe-tokenizer')" && \
    pip uninstall -y open-clip-torch

ENV RAY_TRAIN_V2_ENABLED=1
