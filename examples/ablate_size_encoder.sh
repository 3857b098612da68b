#!/usr/bin/env bash
# Lite0 at 224 px and Lite1 against Lite0 at 192 px (the model card's "224 px and Lite1 against
# Lite0 at 192 px", issue 17 item 7): recipe B without geometry from ImageNet, the same steps for
# every arm, each run scored on the three validation sets and paired against the 192 px run of
# each seed.
#
#   CACHE=cache SPLITS=splits bash examples/ablate_size_encoder.sh
#
# $CACHE holds the jpeg256 caches j-isic-train192, j-ham-train192, j-i20-train192, j-isic-val192
# and the same four at 224 (`dermtool preprocess --chain jpeg256 --fit squash --size 192`, and
# `--size 224`); $SPLITS holds ham/ and i20/ from `dermtool split` (the model card's Data
# section). Needs '.[pretrained,lite1]'. DATA (default ../shared/data), ARMS, SEEDS, EPOCHS and
# STEPS can be overridden (the model card: seeds 1 and 2 for B192, seed 1 for B224 and L1,
# 6 x 259 steps; on a slow 2-core box each run took 39-55 minutes on one core, two at a time).
set -euo pipefail
CACHE=${CACHE:?set CACHE to the folder of the jpeg256 caches}
SPLITS=${SPLITS:?set SPLITS to the folder with the ham and i20 splits}
DATA=${DATA:-../shared/data}  # the folder holding isic2017, ham10000 and isic2020, for the validation
WORK=${WORK:-size-encoder-work}
ARMS=${ARMS:-B224 L1}
SEEDS=${SEEDS:-1}
EPOCHS=${EPOCHS:-6}
STEPS=${STEPS:-259}

options_of() {  # arm -> "SIZE" then the train options that differ from B192
  case $1 in
    B192) echo "192 --progressive 128" ;;
    B224) echo "224 --size 224 --progressive 160" ;;
    L1) echo "192 --encoder efficientnet-lite1 --progressive 128" ;;
    *) echo "unknown arm $1 (one of B224 L1)" >&2; exit 2 ;;
  esac
}

for arm in $ARMS; do options_of "$arm" > /dev/null; done  # an unknown arm stops here, before any run
mkdir -p "$WORK"

for seed in $SEEDS; do
  for arm in B192 $ARMS; do
    name=$arm-s$seed
    if [ ! -d "$WORK/m-$name" ]; then  # trained before: only validate (validation.py reuses its outputs)
      read -r size options <<< "$(options_of "$arm")"
      # shellcheck disable=SC2086  # $options holds several options
      dermtool train "$CACHE/j-isic-train$size" "$CACHE/j-ham-train$size" "$CACHE/j-i20-train$size" \
        --val "$CACHE/j-isic-val$size" --task joint --preset lite0 --out "$WORK/$name" \
        --epochs "$EPOCHS" --steps-per-epoch "$STEPS" --batch-size 16 --learning-rate 5e-4 --schedule cosine \
        --sampler balanced --alpha 0.5 --dice --augment flips+color-strong+lesion-crop+chain \
        --input-chain jpeg256 --color-constancy shades-of-gray --seed "$seed" --ema 0.99 --seg-batch 4 \
        --freeze early $options
      # the last epoch's weights, as a model folder (the comparison does not choose an epoch)
      python examples/last_weights_model.py "$WORK/$name" "$WORK/m-$name"
    fi
    python bench/validation.py "$WORK/m-$name" --split "$SPLITS/ham" --isic2020-split "$SPLITS/i20" \
      --isic-val "$DATA/isic2017/val" --ham "$DATA/ham10000" --isic2020 "$DATA/isic2020" \
      --work "$WORK/validation" --bootstrap 200
  done
  others=()
  for arm in $ARMS; do others+=("m-$arm-s$seed"); done
  python bench/paired.py --work "$WORK/validation" --a "m-B192-s$seed" --b "${others[@]}" --resamples 1000 \
    | tee "$WORK/paired-s$seed.md"
done
