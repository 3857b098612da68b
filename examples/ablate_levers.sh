#!/usr/bin/env bash
# One short run per lever of the cue-breaking recipe (the model card's "What each augmentation lever
# and the colour constancy did"): recipe B from ImageNet, once whole and once with each lever taken
# out, every run scored on the three validation sets and paired against B of the same seed.
#
#   CACHE=cache SPLITS=splits bash examples/ablate_levers.sh
#
# $CACHE holds the jpeg256 caches j-isic-train192, j-ham-train192, j-i20-train192 and j-isic-val192
# (`dermtool preprocess --chain jpeg256 --fit squash --size 192`, as in the README); $SPLITS holds
# ham/ and i20/ from `dermtool split` (the model card's Data section). Needs '.[pretrained]'.
# DATA (default ../shared/data), LEVERS, SEEDS, EPOCHS and STEPS can be overridden (the model
# card: all five levers, seeds 1 and 2 for three of them and seed 3 for geometry, 6 x 259 steps;
# on a 2-core CPU each run takes about 25 minutes on one core).
set -euo pipefail
CACHE=${CACHE:?set CACHE to the folder of the jpeg256 caches}
SPLITS=${SPLITS:?set SPLITS to the folder with the ham and i20 splits}
DATA=${DATA:-../shared/data}  # the folder holding isic2017, ham10000 and isic2020, for the validation
WORK=${WORK:-levers-work}
LEVERS=${LEVERS:-noSoG noGeom noColor noChain noCrop}
SEEDS=${SEEDS:-1 2}
EPOCHS=${EPOCHS:-6}
STEPS=${STEPS:-259}

augment_of() {  # lever -> "AUGMENT COLOUR_CONSTANCY"
  case $1 in
    B) echo "flips+color-strong+lesion-crop+geometry+chain shades-of-gray" ;;
    noSoG) echo "flips+color-strong+lesion-crop+geometry+chain none" ;;
    noGeom) echo "flips+color-strong+lesion-crop+chain shades-of-gray" ;;
    noColor) echo "flips+color+lesion-crop+geometry+chain shades-of-gray" ;;
    noChain) echo "flips+color-strong+lesion-crop+geometry shades-of-gray" ;;
    noCrop) echo "flips+color-strong+geometry+chain shades-of-gray" ;;
    *) echo "unknown lever $1 (one of noSoG noGeom noColor noChain noCrop)" >&2; exit 2 ;;
  esac
}

for lever in $LEVERS; do augment_of "$lever" > /dev/null; done  # an unknown lever stops here, before any run
mkdir -p "$WORK"

for seed in $SEEDS; do
  for lever in B $LEVERS; do
    name=$lever-s$seed
    if [ ! -d "$WORK/m-$name" ]; then  # trained before: only validate (validation.py reuses its outputs)
      read -r aug cc <<< "$(augment_of "$lever")"
      dermtool train "$CACHE/j-isic-train192" "$CACHE/j-ham-train192" "$CACHE/j-i20-train192" \
        --val "$CACHE/j-isic-val192" --task joint --preset lite0 --out "$WORK/$name" \
        --epochs "$EPOCHS" --steps-per-epoch "$STEPS" --batch-size 16 --learning-rate 5e-4 --schedule cosine \
        --sampler balanced --alpha 0.5 --dice --augment "$aug" --input-chain jpeg256 --color-constancy "$cc" \
        --seed "$seed" --ema 0.99 --seg-batch 4 --freeze early --progressive 128
      # the last epoch's weights, as a model folder (the ablation does not choose an epoch)
      python examples/last_weights_model.py "$WORK/$name" "$WORK/m-$name"
    fi
    python bench/validation.py "$WORK/m-$name" --split "$SPLITS/ham" --isic2020-split "$SPLITS/i20" \
      --isic-val "$DATA/isic2017/val" --ham "$DATA/ham10000" --isic2020 "$DATA/isic2020" \
      --work "$WORK/validation" --bootstrap 200
  done
  others=()
  for lever in $LEVERS; do others+=("m-$lever-s$seed"); done
  python bench/paired.py --work "$WORK/validation" --a "m-B-s$seed" --b "${others[@]}" --resamples 1000 \
    | tee "$WORK/paired-s$seed.md"
done
