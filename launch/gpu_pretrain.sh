#!/usr/bin/env bash
# Pre-train on GPU nodes. One node: run it as is. Several nodes: start it on every node with
# the same COORDINATOR (host:port of node 0), NUM_NODES and this node's NODE_RANK (under SLURM,
# srun sets these up and `--distributed` alone is enough). One process per node drives all of
# its GPUs; the mesh spans every GPU of every node.
#
#   OUT=runs/base SHARDS=out/shards/pretrain launch/gpu_pretrain.sh model.dtype=bfloat16
set -euo pipefail
: "${OUT:?set OUT (checkpoint dir, shared by all nodes)}"
SHARDS="${SHARDS:-out/shards/pretrain}"
CONFIG="${CONFIG:-configs/pretrain.yaml}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dist=()
if [[ -n "${COORDINATOR:-}" ]]; then
  dist=(--coordinator "$COORDINATOR" --num-processes "${NUM_NODES:?set NUM_NODES}"
        --process-id "${NODE_RANK:?set NODE_RANK}")
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  dist=(--distributed)
fi

exec python -m pianist_jax.train --config "$CONFIG" "${dist[@]}" \
  "train.output_dir=$OUT" \
  "data.sources=[{name: pretrain, path: '$SHARDS/shard-0000[0-6]-of-00008.array_record'}]" \
  "data.eval_sources=[{name: heldout, path: '$SHARDS/shard-00007-of-00008.array_record'}]" \
  "mesh.shape=[1,-1,1]" "$@"
