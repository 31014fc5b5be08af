#!/usr/bin/env bash
# GPU checks in one go (one CUDA device): the ViT-B training-step benchmark (bench_gpu_step.py), the CUDA/bf16 paths
# of pretraining and fine-tuning on the embedded corpus, and the MLoRE block/decoder benchmark on the GPU. Usage: bash benchmarks/gpu_check.sh OUT_DIR
# Prints one "GPU-CHECK <name> ok|FAILED" line per check; logs and JSON land in OUT_DIR.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
W=$(mktemp -d)
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
check() {  # name, command...: run, keep the log, say ok or FAILED with the exit code
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then echo "GPU-CHECK $name ok ($((SECONDS - t0)) s)"
  else echo "GPU-CHECK $name FAILED rc=$? ($((SECONDS - t0)) s)"; tail -n 25 "$OUT/$name.log"; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1
# issue 26: one training step at ViT-B size (dense timm ViT-B/16, our dense ViT-B, the Mod-Squad MoE config; bf16,
# batch 128, 224 px): images/s, MFU, host syncs per step; one JSON line per figure in the log (~2-3 min on an H100)
check bench_gpu_step $PY benchmarks/bench_gpu_step.py --batch 128 --rounds 5 --json "$OUT/gpu_step.json"
check synth $PY -m pretrain synth --out "$W/raw" --scale 0.5
for d in imagenet:imagenet coco:coco ade20k:ade20k nyud:NYUDv2; do
  for s in train val; do
    check "prepare_${d%%:*}_$s" $PY -m pretrain prepare "${d%%:*}" --src "$W/raw/${d##*:}" --out "$W/shards/${d%%:*}/$s" \
      --split $s --min-shards 2 --workers 4
  done
done
# pretraining on CUDA in bf16 (ZeRO-1, NCCL, one rank), then evaluation and a resume
check train_bf16 $PY -m pretrain train configs/debug/pretrain.yaml data.root="$W/shards" output_dir="$W/run" \
  engine.precision=bf16 train.max_steps=120 train.ckpt_every=60 data.num_workers=4 logging.plots=false logging.wandb=disabled
check train_resume $PY -m pretrain train configs/debug/pretrain.yaml data.root="$W/shards" output_dir="$W/run" \
  engine.precision=bf16 train.max_steps=140 train.ckpt_every=60 data.num_workers=4 logging.plots=false logging.wandb=disabled
check evaluate $PY -m pretrain evaluate "$W/run" eval.num_workers=2
cp "$W/run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
# fine-tuning on CUDA in bf16 from the pretraining run, MLoRE decoder
check finetune_bf16 $PY -m pretrain finetune configs/debug/finetune.yaml data.root="$W/shards" output_dir="$W/ft" \
  finetune.init_from="$W/run" engine.precision=bf16 train.max_steps=60 data.num_workers=4 logging.plots=false logging.wandb=disabled
cp "$W/ft/metrics.jsonl" "$OUT/finetune_metrics.jsonl" 2>/dev/null
# the MLoRE block on the GPU (bf16 matmuls are not used here: the benchmark is fp32, as on CPU)
check bench_mlore $PY benchmarks/bench_mlore.py --device cuda --rounds 5 --decoder pascal_vitl --json "$OUT/mlore_gpu.json"
