#!/usr/bin/env bash
# The whole thesis pipeline on ISIC 2017, laid out as downloaded from the challenge site:
#
#   ISIC=/path/to/isic2017 bash examples/isic2017.sh
#
# with $ISIC holding (unzipped):
#   ISIC-2017_Training_Data/            ISIC-2017_Training_Part1_GroundTruth/   ISIC-2017_Training_Part3_GroundTruth.csv
#   ISIC-2017_Validation_Data/          ISIC-2017_Validation_Part1_GroundTruth/ ISIC-2017_Validation_Part3_GroundTruth.csv
#   ISIC-2017_Test_v2_Data/             ISIC-2017_Test_v2_Part1_GroundTruth/    ISIC-2017_Test_v2_Part3_GroundTruth.csv
#
# Steps: preprocess -> train seg, cls (encoder from seg: thesis hypothesis 1), joint -> infer -> score.
# SIZE, EPOCHS and PRESET can be overridden; the thesis preset is PRESET=thesis SIZE=388 FIT=pad MARGIN=92.
set -euo pipefail
ISIC=${ISIC:?set ISIC to the folder holding the unzipped ISIC 2017 downloads}
WORK=${WORK:-isic2017-work}
PRESET=${PRESET:-compact}
SIZE=${SIZE:-160}
FIT=${FIT:-squash}
MARGIN=${MARGIN:-0}
EPOCHS=${EPOCHS:-60}
mkdir -p "$WORK"

for split in Training Validation; do
  dermtool preprocess "$ISIC/ISIC-2017_${split}_Data" --out "$WORK/cache-$split" \
    --size "$SIZE" --fit "$FIT" --margin "$MARGIN"
done

common=(--val "$WORK/cache-Validation" --preset "$PRESET" --size "$SIZE" --fit "$FIT" --epochs "$EPOCHS")
dermtool train "$WORK/cache-Training" --task seg   --out "$WORK/run-seg"   --dice "${common[@]}"
dermtool train "$WORK/cache-Training" --task cls   --out "$WORK/run-cls"   --init-from "$WORK/run-seg" "${common[@]}"
dermtool train "$WORK/cache-Training" --task joint --out "$WORK/run-joint" --dice --alpha 0.5 "${common[@]}"

TEST="$ISIC/ISIC-2017_Test_v2"
for run in seg cls joint; do
  dermtool infer "${TEST}_Data" --out "$WORK/pred-$run" --model "$WORK/run-$run"
done
# seg masks + cls probabilities from the separate models, then the joint model alone
dermtool score "$WORK/pred-cls/predictions.csv" "${TEST}_Part3_GroundTruth.csv" \
  --pred-masks "$WORK/pred-seg" --truth-masks "${TEST}_Part1_GroundTruth" --json "$WORK/score-separate.json"
dermtool score "$WORK/pred-joint/predictions.csv" "${TEST}_Part3_GroundTruth.csv" \
  --pred-masks "$WORK/pred-joint" --truth-masks "${TEST}_Part1_GroundTruth" --json "$WORK/score-joint.json"
