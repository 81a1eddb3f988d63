#!/bin/bash
# Submit the whole CT-RATE pipeline as three dependent SLURM jobs, from the checkout on a login node:
# preprocessing array (one shard per task) -> merge -> multi-node training.
#
#   NUM_SHARDS=16 NODES=2 GPUS_PER_NODE=4 scripts/slurm/submit_ctclip_pipeline.sh \
#       /data/ct_rate/volumes/train /data/ct_rate/train_metadata.csv /data/stores/train_volumes.h5 \
#       --txt_filepath /data/ct_rate/train_reports.csv --output_dir runs/vitb --model_config dinov2_vitb14
#
# Arguments: the NIfTI folder, its metadata CSV, the merged store to make (.h5); every further flag goes
# to scripts/ctclip_train.py (this script adds --ct_filepath <store>). Environment: NUM_SHARDS (16),
# PREPROCESS_FLAGS (more flags for scripts/ctclip_preprocess.py, e.g. "--target_shape 160 224 224"),
# MERGE_MODE (copy or virtual; copy), NODES (2), GPUS_PER_NODE (4); PYTHON / CONTAINER / APPTAINER_BIND
# reach the jobs (scripts/slurm/common.sh), as do ALLOW_FAILED_VOLUMES and SLURM's own SBATCH_ACCOUNT,
# SBATCH_PARTITION, ... Each job starts only when the one before it succeeded (afterok); if a
# preprocessing task fails, fix it, resubmit that task (sbatch --array=<I> ...; it resumes), then
# submit scripts/slurm/ctclip_merge.sbatch and scripts/slurm/ctclip_train.sbatch by hand.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2  # the usage above
    exit 2
fi
VOLUMES=$1 METADATA=$2 STORE=$3
shift 3
if [[ "$STORE" != *.h5 ]]; then
    echo "the store must be an .h5 path, got $STORE" >&2
    exit 2
fi
# the jobs run in the folder they were submitted from, and relative paths mean the same here and there
[[ -f scripts/slurm/common.sh ]] || { echo "run this from the ct-toolkit checkout ($PWD is not one)" >&2; exit 2; }
NUM_SHARDS=${NUM_SHARDS:-16}
read -r -a preprocess_flags <<< "${PREPROCESS_FLAGS:-}"
# the shard stores are <stem>.shard-<I>-of-<N>.h5 beside the store (ctclip/data/shards.py: shard_path)
shards="${STORE%.h5}.shard-*-of-$NUM_SHARDS.h5"

job=$(sbatch --parsable --array=0-$((NUM_SHARDS - 1)) scripts/slurm/ctclip_preprocess.sbatch --num_shards "$NUM_SHARDS" \
    --ct_data_path "$VOLUMES" --metadata_path "$METADATA" --ct_out_path "$STORE" \
    ${preprocess_flags[@]+"${preprocess_flags[@]}"})
preprocess=${job%%;*}
job=$(sbatch --parsable --dependency="afterok:$preprocess" scripts/slurm/ctclip_merge.sbatch \
    --stores "$shards" --out "$STORE" --mode "${MERGE_MODE:-copy}")
merge=${job%%;*}
job=$(sbatch --parsable --dependency="afterok:$merge" --nodes="${NODES:-2}" --gpus-per-node="${GPUS_PER_NODE:-4}" \
    scripts/slurm/ctclip_train.sbatch --ct_filepath "$STORE" "$@")
train=${job%%;*}

echo "preprocess array $preprocess ($NUM_SHARDS tasks) -> merge $merge -> train $train"
echo "watch: squeue -j $preprocess,$merge,$train   afterwards: sacct -j $preprocess --format=JobID,State,ExitCode"
