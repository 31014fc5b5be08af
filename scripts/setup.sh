#!/usr/bin/env bash
# Create .venv and install the project with its dev extra. Safe to run again (reuses the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision are pinned in pyproject.toml; on the project's machines pip serves them from local disk.
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -c "import torch, deepspeed, webdataset, timm, pycocotools; print('pretrain env ok: torch', torch.__version__)"
