#!/usr/bin/env bash
# Pre-train on GPUs: one node, or several nodes with one process per node (each process drives
# all GPUs of its node; the mesh spans every GPU of every node).
#
#   One node:       OUT=runs/base launch/gpu_pretrain.sh [dotted.overrides ...]
#   SLURM:          srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#                     env OUT=/shared/runs/base launch/gpu_pretrain.sh [overrides ...]
#   By hand:        on every node, COORDINATOR=node0:12355 NUM_NODES=4 NODE_RANK=<0..3> \
#                     OUT=/shared/runs/base launch/gpu_pretrain.sh [overrides ...]
#
# Multi-node: the script passes --coordinator HOST:PORT --num-processes N --process-id I to
# pianist_jax.train, which hands them to jax.distributed.initialize(). Explicit COORDINATOR /
# NUM_NODES / NODE_RANK win; else inside an `srun` step with several tasks they come from SLURM:
# the first host of SLURM_STEP_NODELIST (SLURM_JOB_NODELIST) on COORDINATOR_PORT (12355),
# SLURM_NTASKS and SLURM_PROCID. OUT (train.output_dir) must be a directory every node sees
# (shared filesystem): Orbax writes one checkpoint there together, and re-running the same
# command resumes from its newest checkpoint. SHARDS must hold the 8 shards on every node.
#
# Environment: OUT (required), SHARDS (out/shards/pretrain), CONFIG (configs/pretrain.yaml),
# COORDINATOR / NUM_NODES / NODE_RANK, COORDINATOR_PORT; relative paths are taken from the
# repository root. Flags: --dry-run (print the command, run nothing), -h/--help. Other
# arguments go to pianist_jax.train.
set -euo pipefail

DRY_RUN=0 args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done
: "${OUT:?set OUT (train.output_dir; on a filesystem shared by all nodes)}"
SHARDS="${SHARDS:-out/shards/pretrain}"
CONFIG="${CONFIG:-configs/pretrain.yaml}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# First host of a SLURM node list: scontrol when present, else the compressed form
# "gpu[03-06,09],cpu1" -> gpu03.
first_host() {
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1" | head -n 1
  elif [[ "$1" =~ ^([^,[]+)(\[([0-9]+))? ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[3]}"
  fi
}

dist=()
if [[ -n "${COORDINATOR:-}" ]]; then
  dist=(--coordinator "$COORDINATOR" --num-processes "${NUM_NODES:?set NUM_NODES}"
        --process-id "${NODE_RANK:?set NODE_RANK}")
elif [[ -n "${SLURM_STEP_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
  if [[ -n "${SLURM_NNODES:-}" && "$SLURM_NTASKS" -ne "$SLURM_NNODES" ]]; then
    echo "error: run one task per node (srun --ntasks-per-node=1): each process drives all" \
         "GPUs of its node; got $SLURM_NTASKS tasks on $SLURM_NNODES nodes" >&2
    exit 2
  fi
  nodes="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?no SLURM node list}}"
  host="$(first_host "$nodes")"
  [[ -n "$host" ]] || { echo "error: cannot read the first host of '$nodes'" >&2; exit 2; }
  dist=(--coordinator "$host:${COORDINATOR_PORT:-12355}" --num-processes "$SLURM_NTASKS"
        --process-id "${SLURM_PROCID:?}")
fi

# (${a[@]+"${a[@]}"}: empty arrays under `set -u` on bash < 4.4, e.g. RHEL 7 clusters)
cmd=(python -m pianist_jax.train --config "$CONFIG" ${dist[@]+"${dist[@]}"}
     "train.output_dir=$OUT"
     "data.sources=[{name: pretrain, path: '$SHARDS/shard-0000[0-6]-of-00008.array_record'}]"
     "data.eval_sources=[{name: heldout, path: '$SHARDS/shard-00007-of-00008.array_record'}]"
     ${args[@]+"${args[@]}"})
if ((DRY_RUN)); then printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; echo; exit 0; fi
exec "${cmd[@]}"
