#!/usr/bin/env bash
# The main job on the embedded default: set up, then `pretrain demo` — the whole pipeline (embedded corpus →
# shards → MoE pretraining → evaluation → export → extraction → NYUD-v2 fine-tuning with MLoRE) ending in
# runs/demo/report.md. Re-running resumes: finished stages are skipped, a killed stage continues.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
.venv/bin/pretrain demo "$@"
