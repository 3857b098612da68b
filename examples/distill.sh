#!/usr/bin/env bash
# One network taught by an ensemble (the model card's "Distillation"): the bundled model and a
# network trained apart from it joined with `dermtool ensemble`, its predictions on the training
# images written by `dermtool infer`, then the bundled model fine-tuned with step 4's recipe twice
# on the same batches: once with those predictions as half of each target (`--teacher ...
# --distill 0.5`), once without (the control). Their last epochs are scored on the three
# validation sets and paired against the bundled model and against each other.
#
#   DATA=../shared/data CACHE=cache SPLITS=splits SECOND=runs/m-B192-s1 bash examples/distill.sh
#
# $CACHE holds the jpeg256 caches j-{isic,ham,i20}-train192 and j-{isic,ham,i20}-val192
# (`dermtool preprocess --chain jpeg256 --fit squash --size 192`); $SPLITS holds ham/ and i20/
# from `dermtool split` (the model card's Data section); $SECOND is a model folder trained apart
# from the bundled model (examples/ablate_size_encoder.sh's B192 run, made a folder by
# examples/last_weights_model.py). EPOCHS, STEPS and DISTILL can be overridden (the model card:
# 5 x 300 steps, 0.5); the two fine-tunes run side by side, one CPU core each.
set -euo pipefail
DATA=${DATA:?set DATA to the folder holding isic2017, ham10000 and isic2020}
CACHE=${CACHE:?set CACHE to the folder of the jpeg256 caches}
SPLITS=${SPLITS:?set SPLITS to the folder with the ham and i20 splits}
SECOND=${SECOND:?set SECOND to a model folder trained apart from the bundled model}
START=${START:-weights/isic-ham-lite0-joint-192}
WORK=${WORK:-distill-work}
EPOCHS=${EPOCHS:-5}
STEPS=${STEPS:-300}
DISTILL=${DISTILL:-0.5}
mkdir -p "$WORK"

# 1. the teacher: both networks averaged, over the training images only (never the validation sides)
[ -d "$WORK/teacher-model" ] || dermtool ensemble "$WORK/teacher-model" "$START" "$SECOND" --float16
teachers=()
for set in "isic:$DATA/isic2017/train/images:" "ham:$DATA/ham10000/images:$SPLITS/ham/train.txt" \
           "i20:$DATA/isic2020/images:$SPLITS/i20/train.txt"; do
  IFS=: read -r name images ids <<< "$set"
  only=()
  if [ -n "$ids" ]; then only=(--ids "$ids"); fi
  dermtool infer "$images" "${only[@]}" --model "$WORK/teacher-model" --out "$WORK/teacher/$name" --resume
  teachers+=(--teacher "$WORK/teacher/$name/predictions.csv")
done

# 2. the same fine-tune (step 4 of the model card) with and without the teacher, the same seed
fine_tune() {  # fine_tune NAME CORE [options]
  local name=$1 core=$2
  shift 2
  if [ ! -f "$WORK/$name/state.json" ]; then
    taskset -c "$core" dermtool train "$CACHE/j-isic-train192" "$CACHE/j-ham-train192" "$CACHE/j-i20-train192" \
      --val "$CACHE/j-isic-val192" --val "$CACHE/j-ham-val192" --val "$CACHE/j-i20-val192" \
      --task joint --preset lite0 --input-chain jpeg256 --color-constancy shades-of-gray --init-from "$START" \
      --augment flips+color-strong+lesion-crop+chain --sampler balanced --schedule cosine --learning-rate 1e-4 \
      --epochs "$EPOCHS" --steps-per-epoch "$STEPS" --batch-size 16 --dice --freeze stem --seg-batch 4 --ema 0.99 \
      --consistency 3 --seed 9 --out "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1 || {
      code=$?
      # one write, so the two runs' messages do not interleave when both fail
      printf 'distill.sh: dermtool train of the %s run failed (exit %s); the end of %s:\n%s\n' \
        "$name" "$code" "$WORK/$name.log" "$(tail -n 5 "$WORK/$name.log")" >&2
      exit "$code"
    }
  fi
  # the last epoch's weights, as the ablation scripts compare (no epoch chosen on validation)
  [ -d "$WORK/m-$name" ] || python examples/last_weights_model.py "$WORK/$name" "$WORK/m-$name"
}
fine_tune distilled 0 "${teachers[@]}" --distill "$DISTILL" & a=$!
fine_tune control 1 & b=$!
failed=0
wait $a || failed=$?  # both waited for, so neither run is left behind when the other fails
wait $b || failed=$?
[ "$failed" = 0 ] || exit "$failed"

# 3. validation: the real infer + score on the three sets, paired on the same images
for model in "$START" "$WORK/m-distilled" "$WORK/m-control"; do
  python bench/validation.py "$model" --split "$SPLITS/ham" --isic2020-split "$SPLITS/i20" \
      --isic-val "$DATA/isic2017/val" --ham "$DATA/ham10000" --isic2020 "$DATA/isic2020" \
    --work "$WORK/validation" --bootstrap 200
done
start_name=$(basename "$START")
{ python bench/paired.py --work "$WORK/validation" --a "$start_name" --b m-distilled m-control --resamples 1000
  python bench/paired.py --work "$WORK/validation" --a m-control --b m-distilled --resamples 1000; } | tee "$WORK/paired.md"
