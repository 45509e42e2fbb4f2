#!/usr/bin/env bash
# Pre-train on a Cloud TPU pod slice: the same command runs on every host; JAX discovers the
# pod (jax.distributed.initialize() with no arguments), each host reads its own share of the
# records, and checkpoints go to a path every host sees (a gs:// bucket or a shared disk).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a OUT=gs://my-bucket/runs/base \
#     SHARDS=gs://my-bucket/shards/pretrain launch/tpu_pretrain.sh [dotted.overrides ...]
#
# Shards: tokenize once (data_prep.tokenize, optionally --num-hosts/--host-index on many
# machines) and copy them to the bucket. Preemption: SIGTERM saves a checkpoint; rerunning this
# script resumes exactly.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${OUT:?set OUT (checkpoint dir)}"
: "${SHARDS:?set SHARDS (directory of shard-*-of-*.array_record)}"
REPO_DIR="${REPO_DIR:-~/pianist-jax}"
CONFIG="${CONFIG:-configs/pretrain.yaml}"

overrides=(
  "train.output_dir=$OUT"
  "data.sources=[{name: pretrain, path: '$SHARDS/shard-0000[0-6]-of-00008.array_record'}]"
  "data.eval_sources=[{name: heldout, path: '$SHARDS/shard-00007-of-00008.array_record'}]"
  "mesh.shape=[1,-1,1]"
  "$@"
)
quoted=$(printf " %q" "${overrides[@]}")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO_DIR
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && pip install -q -e . --no-deps
  python -m pianist_jax.train --config $CONFIG --distributed --no-progress$quoted
"
