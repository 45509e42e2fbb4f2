#!/usr/bin/env bash
# Tokenize the pre-training corpora in ../shared/data into ArrayRecord shards.
#
#   launch/tokenize_shared.sh [OUT_DIR] [extra data_prep.tokenize flags...]
#
# Environment: DATA (default ../shared/data next to the repo), NUM_SHARDS (8), WORKERS (nproc),
# NUM_HOSTS / HOST_INDEX (run one slice per machine; shards are merged when all are written).
# Corpora: ASAP performances (scores excluded: they are the fine-tuning inputs), POP909,
# GiantMIDI (its kinds are guessed from the folders: ground_truth/ = score).
# Re-running resumes: finished shards are skipped.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${DATA:-$repo/../shared/data}"
out="${1:-$repo/out/shards/pretrain}"
shift || true

if [[ ! -d "$data/asap" || ! -d "$data/unlabeled" ]]; then
  echo "error: expected asap/ and unlabeled/ under $data (set DATA=...)" >&2
  exit 2
fi

args=(
  --input "$data/asap:asap"
  --input "$data/unlabeled/pop909:pop909"
  --input "$data/unlabeled/giantmidi:giantmidi"
  --exclude midi_score.mid
  --output "$out"
  --num-shards "${NUM_SHARDS:-8}"
  --workers "${WORKERS:-$(nproc)}"
)
if [[ -n "${NUM_HOSTS:-}" ]]; then
  args+=(--num-hosts "$NUM_HOSTS" --host-index "${HOST_INDEX:?set HOST_INDEX with NUM_HOSTS}")
fi

cd "$repo"
set -x
exec python -m data_prep.tokenize "${args[@]}" "$@"
