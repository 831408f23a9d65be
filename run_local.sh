#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the main job locally.
#
#   ./run_local.sh                      embed scikit-image's sample photographs
#   ./run_local.sh ~/photos             embed a folder (or a glob, or gs://...)
#   ./run_local.sh ~/photos --max_batch_size 32    any further job options
#
# Environment: MODEL (default mobilenet_v2_100_224), MODEL_HANDLE (a local or
# gs:// SavedModel to use instead of TF-Hub), OUTPUT (default output/local_run).
# Where TF-Hub cannot be reached and no MODEL_HANDLE is given, it says so and
# runs with random weights under a banner (into a separate output folder).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

input=${1:-}
[ $# -gt 0 ] && shift
if [ -z "$input" ]; then
  input=$(python -c 'import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), "data"))')
  echo "No input given: embedding the sample photographs shipped with scikit-image ($input)."
fi
model=${MODEL:-mobilenet_v2_100_224}
output=${OUTPUT:-output/local_run}

if [ -n "${MODEL_HANDLE:-}" ]; then
  model_args=(--model_handle "$MODEL_HANDLE")
elif python -m pipeline fetch-model --model "$model" --timeout 30; then
  model_args=(--model_source tfhub)
else
  output=${OUTPUT:-output/local_run_random_weights}
  cat >&2 <<BANNER

###############################################################################
#  TF-Hub could not be reached (the reason is just above).                    #
#  Running with RANDOM WEIGHTS: the pipeline runs end to end, but the logits  #
#  and feature vectors are NOT meaningful, and the output records that.       #
#  For real weights offline: MODEL_HANDLE=/path/to/saved_model ./run_local.sh #
###############################################################################

BANNER
  model_args=(--model_source random)
fi

status=0
python -m pipeline run --input "$input" --output "$output" --model "$model" \
  "${model_args[@]}" "$@" || status=$?
if [ "$status" -le 1 ]; then
  echo
  echo "Parquet written under $output/embeddings/ (errors under $output/errors/):"
  python -m pipeline show "$output" --limit 3
fi
exit "$status"
