#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM slice, end to end. Every stage is idempotent: after a preemption
# (or any failure) re-run the same command and it carries on where it stopped.
#
#   launch/tpu_pretrain.sh --name pianist --zone us-central2-b --accelerator-type v4-32 \
#       --bucket my-bucket [--spot] [--teardown] [--dry-run] [dotted.overrides ...]
#
# Stages (--stages; default create,install,tokenize,train, --teardown appends teardown):
#   create    READY -> reuse, STOPPED -> start, missing -> create, PREEMPTED/TERMINATED ->
#             delete and create again (gcloud compute tpus tpu-vm describe/create).
#   install   `git archive HEAD` to every worker (--worker=all) in ~/pianist-jax; a Python 3.11
#             venv (~/venv, uv) with requirements.txt + jax[tpu]==<pinned jax> (pulls libtpu);
#             gcsfuse from Google's apt repository.
#   tokenize  skipped once $SHARDS/manifest.json exists. Each worker (--worker=I, all at once)
#             copies the raw corpora ($DATA: asap/, unlabeled/{pop909,giantmidi}) and the shards
#             done so far to local disk, writes its own shard range (tokenize_shared.sh
#             --num-hosts W --host-index I), uploads it to $SHARDS; worker 0 merges the manifest.
#   train     one command on all workers at once (--worker=all, --distributed).
#   teardown  delete the slice once training has finished (the bucket stays).
#
# Storage: $OUT's bucket is mounted by gcsfuse at ~/gcs on every worker and train.output_dir is
# $OUT through it: checkpoints, config.yaml, metrics.jsonl land in the bucket (a hierarchical-
# namespace bucket makes Orbax's directory renames atomic). Shards are not read through gcsfuse
# (ArrayRecord reads are random access): every worker copies $SHARDS to its local disk
# (~/shards/pretrain, `gcloud storage rsync`, a no-op when up to date). Resume: the trainer
# restores the newest committed checkpoint in train.output_dir/checkpoints by itself (params,
# optimiser, step, data-iterator position): a re-run with the same output dir resumes, and
# on preemption SIGTERM saves a checkpoint first.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; cat <<EOF
Flags [environment variable]:
  --name NAME --zone ZONE   TPU VM name and zone [TPU_NAME, ZONE] (required)
  --project PROJECT         project [PROJECT] (default: gcloud's configured project)
  --accelerator-type TYPE   v4-32, v5litepod-16, v5p-64, v6e-16, ... [ACCELERATOR_TYPE]
  --runtime-version V       TPU VM image [RUNTIME_VERSION] (default: by TPU generation)
  --num-workers N           hosts in the slice [NUM_WORKERS] (default: from the type)
  --bucket BUCKET           [BUCKET] sets the defaults of --out, --shards and --data:
  --out, --shards, --data   [OUT, SHARDS, DATA] train.output_dir (gs://BUCKET/runs/RUN), the
                            shards (gs://BUCKET/shards/pretrain), raw corpora (gs://BUCKET/data)
  --run RUN                 run name in the default --out [RUN] (pretrain)
  --config FILE             [CONFIG] (configs/pretrain.yaml)
  --spot                    create a Spot (preemptible) slice [SPOT=1]
  --stages LIST             comma-separated subset of create,install,tokenize,train [STAGES]
  --teardown                delete the slice after training
  --detach                  train in the background (log: ~/train-RUN.log on each worker)
  --dry-run                 print every command and run none (gcloud is never called)
Other arguments go to pianist_jax.train (dotted.key=value overrides or its flags).
EOF
}
die() { echo "error: $*" >&2; exit 2; }

NAME="${TPU_NAME:-}" ZONE="${ZONE:-}" PROJECT="${PROJECT:-}" ACCEL="${ACCELERATOR_TYPE:-}"
RUNTIME="${RUNTIME_VERSION:-}" NWORKERS="${NUM_WORKERS:-}" BUCKET="${BUCKET:-}"
OUT="${OUT:-}" SHARDS="${SHARDS:-}" DATA="${DATA:-}" CONFIG="${CONFIG:-configs/pretrain.yaml}"
RUN="${RUN:-pretrain}" SPOT="${SPOT:-0}" STAGES="${STAGES:-create,install,tokenize,train}"
DRY_RUN=0 DETACH=0 overrides=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name) NAME="${2:?}"; shift ;;             --zone) ZONE="${2:?}"; shift ;;
    --project) PROJECT="${2:?}"; shift ;;       --accelerator-type) ACCEL="${2:?}"; shift ;;
    --runtime-version) RUNTIME="${2:?}"; shift ;; --num-workers) NWORKERS="${2:?}"; shift ;;
    --bucket) BUCKET="${2:?}"; shift ;;         --out) OUT="${2:?}"; shift ;;
    --run) RUN="${2:?}"; shift ;;               --shards) SHARDS="${2:?}"; shift ;;
    --data) DATA="${2:?}"; shift ;;             --config) CONFIG="${2:?}"; shift ;;
    --stages) STAGES="${2:?}"; shift ;;         --teardown) STAGES+=",teardown" ;;
    --spot) SPOT=1 ;;  --detach) DETACH=1 ;;  --dry-run) DRY_RUN=1 ;;
    --) shift; overrides+=("$@"); break ;;
    *) overrides+=("$1") ;;
  esac
  shift
done

[[ -n "$NAME" && -n "$ZONE" ]] || die "set --name and --zone (or TPU_NAME and ZONE)"
[[ "$ACCEL" =~ -([0-9]+)$ ]] || die "set --accelerator-type (or ACCELERATOR_TYPE), e.g. v4-32"
size="${BASH_REMATCH[1]}"
OUT="${OUT:-${BUCKET:+gs://$BUCKET/runs/$RUN}}"
SHARDS="${SHARDS:-${BUCKET:+gs://$BUCKET/shards/pretrain}}"
DATA="${DATA:-${BUCKET:+gs://$BUCKET/data}}"
for v in "$OUT" "$SHARDS" "$DATA"; do  # pasted into remote scripts unquoted: keep them plain
  [[ "$v" =~ ^gs://[A-Za-z0-9._-]+/[A-Za-z0-9._/-]+$ ]] || die "'$v': want gs://BUCKET/PATH"
done
[[ "$OUT" =~ ^gs://([^/]+)/(.*[^/])/*$ ]]
OUT_BUCKET="${BASH_REMATCH[1]}" OUT_PATH="${BASH_REMATCH[2]}"
[[ "$NAME$RUN" =~ ^[A-Za-z0-9._-]+$ ]] || die "--name and --run: letters, digits, . _ - only"
[[ "$CONFIG" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--config: a plain path inside the repository"
[[ ",$STAGES" =~ ^(,(create|install|tokenize|train|teardown))+$ ]] || die "bad --stages $STAGES"
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
! { ((DETACH)) && has_stage teardown; } || die "--detach and --teardown exclude each other"

# Hosts: v2/v3/v4/v5p sizes count TensorCores (8 per host); v5e/v6e sizes count chips (4 per
# host in multi-host slices, one host up to 8 chips). Default runtime (TPU VM image) per family.
case "$ACCEL" in
  v5litepod-* | v5e-*) hosts=$((size <= 8 ? 1 : size / 4)) image="v2-alpha-tpuv5-lite" ;;
  v6e-*) hosts=$((size <= 8 ? 1 : size / 4)) image="v2-alpha-tpuv6e" ;;
  v5p-*) hosts=$(((size + 7) / 8)) image="v2-alpha-tpuv5" ;;
  *) hosts=$(((size + 7) / 8)) image="tpu-ubuntu2204-base" ;;
esac
NWORKERS="${NWORKERS:-$hosts}" RUNTIME="${RUNTIME:-$image}"
[[ "$NWORKERS" =~ ^[1-9][0-9]*$ ]] || die "--num-workers: a positive integer"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$REPO/requirements.txt")"
NUM_SHARDS=8  # configs/pretrain.yaml: shards 0-6 train, shard 7 is held out for evaluation
where=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || where+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm); ssh=("${tpu[@]}" ssh "$NAME" "${where[@]}")

# Print a command (a remote script, always last as --command=..., as a heredoc; without the
# leading "+ " the printed text is valid bash); run it unless --dry-run.
show() {
  local line="+" arg
  for arg in "$@"; do
    if [[ "$arg" == --command=* ]]; then
      # shellcheck disable=SC2016  # the $(cat ...) is printed, not run
      printf '%s --command="$(cat <<'\''REMOTE'\''\n%s\nREMOTE\n)"\n' "$line" "${arg#--command=}"
      return
    fi
    line+=" $(printf %q "$arg")"
  done
  echo "$line"
}
run() { show "$@"; ((DRY_RUN)) || "$@"; }
note() { echo "# $*"; }
# A remote script from the template on stdin: @X@ takes this script's value; $HOME and the
# like are left to the worker's shell.
remote() {
  local t
  t="$(cat)"; t="${t//@SHARDS@/$SHARDS}"; t="${t//@DATA@/$DATA}"; t="${t//@CONFIG@/$CONFIG}"
  t="${t//@OUT_BUCKET@/$OUT_BUCKET}"; t="${t//@OUT_PATH@/$OUT_PATH}"; t="${t//@RUN@/$RUN}"
  t="${t//@JAX@/$JAX_VERSION}"; t="${t//@NWORKERS@/$NWORKERS}"; t="${t//@W@/${w:-}}"
  printf %s "${t//@NUM_SHARDS@/$NUM_SHARDS}"
}

note "slice $NAME: $ACCEL, $NWORKERS workers, runtime $RUNTIME, zone $ZONE; shards $SHARDS"

if has_stage create; then
  create=("${tpu[@]}" create "$NAME" "${where[@]}" --accelerator-type="$ACCEL"
          --version="$RUNTIME" --scopes=https://www.googleapis.com/auth/cloud-platform)
  if ((SPOT)); then create+=(--spot); fi
  describe=("${tpu[@]}" describe "$NAME" "${where[@]}" --format="value(state)")
  note "by state: READY reuse, none create, STOPPED start, PREEMPTED/TERMINATED delete + create"
  show "${describe[@]}"
  if ((DRY_RUN)); then show "${create[@]}"; else
    state="$("${describe[@]}" 2>/dev/null || true)"
    case "$state" in
      READY) note "reusing $NAME" ;;
      "") run "${create[@]}" ;;
      STOPPED) run "${tpu[@]}" start "$NAME" "${where[@]}" ;;
      PREEMPTED | TERMINATED)
        run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet; run "${create[@]}" ;;
      *) die "$NAME is $state; re-run once it is READY (or delete it)" ;;
    esac
  fi
fi

if has_stage install; then
  tarball="${TMPDIR:-/tmp}/pianist-jax-$NAME.tar.gz"
  ((DRY_RUN)) || [[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]] ||
    note "warning: uncommitted changes are not shipped (git archive HEAD)"
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  run "${tpu[@]}" scp "$tarball" "$NAME:pianist-jax.tar.gz" "${where[@]}" --worker=all
  run "${ssh[@]}" --worker=all --command="$(remote <<'EOF'
set -euo pipefail
rm -rf "$HOME/pianist-jax" && mkdir -p "$HOME/pianist-jax"
tar -xzf "$HOME/pianist-jax.tar.gz" -C "$HOME/pianist-jax"
if ! command -v gcsfuse >/dev/null; then
  key=/usr/share/keyrings/cloud.google.asc
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$key" >/dev/null
  echo "deb [signed-by=$key] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
python3 -m pip install -q --user uv
"$HOME/.local/bin/uv" venv -q --allow-existing --python 3.11 "$HOME/venv"
source "$HOME/venv/bin/activate"
cd "$HOME/pianist-jax"  # requirements-tpu.txt, where present, pins libtpu exactly
"$HOME/.local/bin/uv" pip install -q -r requirements.txt 'jax[tpu]==@JAX@' \
  $([[ -f requirements-tpu.txt ]] && echo "-r requirements-tpu.txt")
"$HOME/.local/bin/uv" pip install -q --no-deps -e .
EOF
)"
fi

if has_stage tokenize; then
  pids=()
  for ((w = 0; w < NWORKERS; w++)); do
    first=$((w * NUM_SHARDS / NWORKERS)) end=$(((w + 1) * NUM_SHARDS / NWORKERS))
    ((first < end)) || continue  # more workers than shards
    note "worker $w: shards $first-$((end - 1)) of $NUM_SHARDS"
    cmd=("${ssh[@]}" --worker="$w" --command="$(remote <<'EOF'
set -euo pipefail
if gcloud storage ls @SHARDS@/manifest.json >/dev/null 2>&1; then echo "shards complete"; exit 0; fi
source "$HOME/venv/bin/activate" && cd "$HOME/pianist-jax"
mkdir -p "$HOME/data" "$HOME/shards/pretrain"
gcloud storage rsync --recursive @DATA@ "$HOME/data"
gcloud storage rsync @SHARDS@ "$HOME/shards/pretrain"
DATA="$HOME/data" NUM_SHARDS=@NUM_SHARDS@ launch/tokenize_shared.sh "$HOME/shards/pretrain" \
  --num-hosts @NWORKERS@ --host-index @W@ --no-progress
gcloud storage rsync "$HOME/shards/pretrain" @SHARDS@
EOF
)")
    show "${cmd[@]}"
    if ((DRY_RUN)); then continue; fi
    { "${cmd[@]}" 2>&1 | sed -u "s/^/[worker $w] /"; } &
    pids+=("$!")
  done
  failed=0; for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || failed=1; done
  ((failed == 0)) || die "tokenization failed on a worker; re-run to resume (done shards stay)"
  note "all shards written: worker 0 merges the manifest"
  run "${ssh[@]}" --worker=0 --command="$(remote <<'EOF'
set -euo pipefail
if gcloud storage ls @SHARDS@/manifest.json >/dev/null 2>&1; then exit 0; fi
source "$HOME/venv/bin/activate" && cd "$HOME/pianist-jax"
gcloud storage rsync @SHARDS@ "$HOME/shards/pretrain"
python -m data_prep.merge_manifests "$HOME/shards/pretrain"
gcloud storage rsync "$HOME/shards/pretrain" @SHARDS@
EOF
)"
fi

if has_stage train; then
  note "resume: a re-run continues from the newest checkpoint in $OUT/checkpoints"
  train="$(remote <<'EOF'
python -m pianist_jax.train --config @CONFIG@ --distributed --no-progress \
  "train.output_dir=$HOME/gcs/@OUT_PATH@" \
  "data.sources=[{name: pretrain, path: '$HOME/shards/pretrain/shard-0000[0-6]-of-00008.array_record'}]" \
  "data.eval_sources=[{name: heldout, path: '$HOME/shards/pretrain/shard-00007-of-00008.array_record'}]"
EOF
)"
  if ((${#overrides[@]})); then train+="$(printf ' %q' "${overrides[@]}")"; fi
  if ((DETACH)); then
    train="nohup $train > \"\$HOME/train-$RUN.log\" 2>&1 < /dev/null &
echo \"training in the background: tail -f ~/train-$RUN.log\""
  fi
  run "${ssh[@]}" --worker=all --command="$(remote <<'EOF'
set -euo pipefail
source "$HOME/venv/bin/activate" && cd "$HOME/pianist-jax"
mkdir -p "$HOME/gcs" "$HOME/shards/pretrain"
mountpoint -q "$HOME/gcs" ||
  gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 @OUT_BUCKET@ "$HOME/gcs"
gcloud storage rsync @SHARDS@ "$HOME/shards/pretrain"
EOF
)
$train"
fi

! has_stage teardown || run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet
