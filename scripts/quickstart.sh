#!/usr/bin/env bash
# The main job on the embedded default: set up, write the embedded corpus, convert it to shards with the real
# converters, pretrain the debug MoE ViT on the cls/det/seg mixture, and evaluate it. Re-running resumes/reuses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
P=.venv/bin/pretrain
[ -f corpus/raw/.complete ] || { $P synth --out corpus/raw && touch corpus/raw/.complete; }
for split in train val; do
  [ -f corpus/shards/imagenet/$split/_info.json ] || $P prepare imagenet --src corpus/raw/imagenet --out corpus/shards/imagenet/$split --split $split --overwrite --min-shards 4
  [ -f corpus/shards/coco/$split/_info.json ] || $P prepare coco --src corpus/raw/coco --out corpus/shards/coco/$split --split $split --overwrite --min-shards 4
  [ -f corpus/shards/ade20k/$split/_info.json ] || $P prepare ade20k --src corpus/raw/ade20k --out corpus/shards/ade20k/$split --split $split --overwrite --min-shards 4
done
$P train configs/debug/pretrain.yaml "$@"
$P evaluate runs/debug
