#!/usr/bin/env bash
# dermtool infer over one folder as a SLURM job array of 4 parts, then a merge job.
#
#   bash examples/slurm/infer-array.sh IMAGES OUT [infer options ...]
#
# Run it on the login node. It submits itself as an array of 4 tasks (the --array line below);
# each runs `dermtool infer IMAGES --out OUT --shard auto`, which takes its part K of N from
# SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT. A merge job waits for
# the whole array and writes OUT/predictions.csv (`dermtool merge`, which checks that every
# part is there and every image has its row).
#
# - IMAGES and OUT must lie on a file system every node mounts (a shared home, /scratch).
# - The number of parts is the --array line alone (0-7 makes 8); nothing else changes.
# - Options after OUT go to every part: --model runs/joint, --engine litert, --tta 4, ...
# - A part that failed or ran out of time: submit the whole script again, the same way
#   (`bash examples/slurm/infer-array.sh IMAGES OUT ...`). Every task runs with --resume, so the
#   finished parts skip all their images and the cut one does only what it lacks; the merge job
#   follows. Do not resubmit one task alone (`sbatch --array=2`): SLURM then reports an array of
#   one task, which --shard auto reads as part 1 of 1, the whole folder.
# - The merge runs after the array ends whatever its exit codes (afterany): an infer part exits
#   1 when some images were unreadable (named in its log), and merge lists those; a missing or
#   incomplete part makes merge stop with one line naming the part to rerun.
#
#SBATCH --job-name=dermtool-infer
#SBATCH --array=0-3
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=dermtool-infer-%A_%a.log
set -euo pipefail
usage="usage: bash infer-array.sh IMAGES OUT [infer options ...]"
IMAGES=${1:?$usage}
OUT=${2:?$usage}
shift 2

if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then  # a task of the array: its part of the folder
  exec dermtool infer "$IMAGES" --out "$OUT" --shard auto --resume "$@"
fi

# on the login node: the array, then the merge once every task has ended
array=$(sbatch --parsable "$0" "$IMAGES" "$OUT" "$@")
merge=$(sbatch --parsable --dependency=afterany:"${array%%;*}" --job-name=dermtool-merge \
  --output=dermtool-merge-%j.log --wrap "dermtool merge $(printf %q "$OUT")")
echo "submitted job array ${array%%;*} (dermtool infer, one task per part) and job ${merge%%;*} (dermtool merge $OUT)"
