#!/usr/bin/env bash
# Create .venv and install the project with its dev extra. Safe to run again (reuses the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision are pinned in pyproject.toml; on the project's machines pip serves them from local disk.
.venv/bin/python -m pip install --quiet -e '.[dev]'
# DeepSpeed JIT-compiles its CPU shared-memory collective op the first time a process group starts (minutes on a
# busy machine); build it now so no run or test pays it. Importing pretrain.parallel.engine first sets up the build exactly
# as every run does: the venv's own ninja first on PATH, and the venv's own cache, .venv/torch_extensions (unless
# TORCH_EXTENSIONS_DIR is set), so two environments on one machine never rebuild each other's op.
DS_ACCELERATOR=cpu .venv/bin/python -c "import pretrain.parallel.engine; from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
.venv/bin/python -c "import torch, deepspeed, webdataset, timm, pycocotools; print('pretrain env ok: torch', torch.__version__)"
