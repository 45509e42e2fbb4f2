#!/usr/bin/env bash
# Train the bundled default model from ../shared/data, end to end, on this kind of machine
# (2 CPU cores): one command, resumable, every stage's wall time logged.
#
#   launch/train_default.sh [--work-dir out/default] [--seed 0] [--pretrain-steps N]
#       [--sft-steps N] [--eval-seeds "0 1 2"] [--install] [--smoke] [--dry-run] [options]
#   launch/train_default.sh --profile gpu ...   # the same chain sized for one GPU
#
# Stages, in order (WORK = --work-dir; commands with --dry-run):
#   data-sft        data_prep.build_sft: ASAP -> WORK/sft_data (train/val shards, split.json,
#                   val_pieces.txt); the piece-wise split (--split-seed) fixes the validation set
#   pretrain-files  data_prep.pretrain_files: ASAP *training* performances + POP909 + GiantMIDI,
#                   minus validation pieces and files whose content overlaps them
#   tokenize        data_prep.tokenize --file-list ...: WORK/shards/pretrain (8 shards; shard 7 held out)
#   pretrain        pianist_jax.train configs/PROFILE/pretrain.yaml -> WORK/runs/pretrain
#   sft             pianist_jax.train configs/PROFILE/sft.yaml, init from the pre-trained params
#                   (PROFILE: default, or default_gpu with --profile gpu)
#   export          pianist_jax.export -> WORK/export (float32; bfloat16 if it would exceed 30 MB)
#   eval-set        pianist_jax.evaluate.eval_set: WORK/eval/{scores,human} (validation pieces)
#   decoding        pianist_jax.evaluate.choose_decoding: per-slot temperature / top-p chosen on the
#                   validation pieces by both judges -> WORK/export/decoding.json (render's
#                   defaults for this model); every candidate in WORK/eval/decoding/choices.json
#   render-seedK    pianist_jax.render the validation scores with the exported model, seed K
#   evaluate-seedK  pianist_jax.evaluate vs the humans, histograms and note by note (--scores)
#                   -> WORK/eval/metrics/seedK/metrics.json
#   evaluate-deadpan  the same for the scores themselves (deadpan baseline; human vs human is in
#                   every metrics.json)
#   card            pianist_jax.artifacts.model_card: WORK/export/{MODEL_CARD.md,card.json}
#   install         (--install) copy WORK/export to pianist_jax/assets/default
#
# Resuming: a stage whose command already finished (WORK/stamps/<stage>.done holds its command)
# is skipped; an interrupted stage is rerun with the same command and picks up where it stopped
# (tokenize skips finished shards, training resumes from its newest checkpoint). A stage whose
# command changed (other steps, seed, overrides; for the trainings also an edited config file)
# starts over from an empty output, and every stage after a stage that ran is redone. Wall
# times: WORK/times.json (per stage and total), logs: WORK/logs/<stage>.log.
#
# Options:
#   --work-dir DIR        outputs (default out/default, out/default-gpu with --profile gpu;
#                         out/default-smoke with --smoke)
#   --profile cpu|gpu     cpu (default): configs/default/, the bundled model's recipe for 2 CPU
#                         cores; gpu: configs/default_gpu/, a 4x wider model and 8x larger
#                         batches for one GPU (bfloat16 export if float32 exceeds 30 MB)
#   --seed N              training seed (params, data order, masking) of both stages (0)
#   --split-seed N        ASAP train/validation split seed (0; changes the validation pieces)
#   --pretrain-steps N    pre-training steps (config: 600); warmup becomes N/10
#   --sft-steps N         fine-tuning steps (config: 1600); warmup becomes N/10
#   --pretrain-set K=V    extra dotted override for pre-training (repeatable), e.g.
#                         --pretrain-set train.batch_size=16 ; --sft-set K=V likewise
#   --eval-seeds "0 1 2"  rendering seeds for the evaluation (mean and spread over them)
#   --eval-pieces N       only the first N validation pieces (default all)
#   --render-batch N      rows rendered together (8)
#   --export-dtype D      auto (default), float32 or bfloat16
#   --workers N           processes for build_sft / tokenize (nproc)
#   --sft-data DIR        use this finished build_sft output (e.g. another run's WORK/sft_data)
#                         instead of running data-sft: linked as WORK/sft_data
#   --no-pretrain         fine-tune from random parameters: no pretrain-files, tokenize or
#                         pretrain stage (the ablation "what does pre-training buy")
#   --stop-after STAGE    stop after this stage (e.g. tokenize: only prepare the data)
#   --install             copy the export (with its card) into pianist_jax/assets/default
#   --smoke               tiny model, a few steps per stage, 26 ASAP performances, 6 files per
#                         pre-training corpus, 2 shards, one evaluation piece and seed: the whole
#                         chain in a few minutes (tests/test_default_recipe.py; not a usable model)
#   --dry-run             print each stage's command, run nothing
# Environment: DATA (default ../shared/data next to the repository), PYTHON (python).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
data="${DATA:-$repo/../shared/data}"
max_bytes=30000000  # the bundled model's size limit: 30 MB

work="" seed=0 split_seed=0 pretrain_steps="" sft_steps="" eval_seeds="0 1 2" eval_pieces=""
render_batch=8 export_dtype=auto workers="$(nproc 2>/dev/null || echo 2)" stop_after=""
install=0 smoke=0 dry_run=0 pretrain_set=() sft_set=() sft_data_from="" no_pretrain=0
profile=cpu
cmdline="launch/train_default.sh$(printf ' %q' "$@")"

die() { echo "error: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --work-dir) need "$@"; work="$2"; shift 2 ;;
    --profile) need "$@"; profile="$2"; shift 2 ;;
    --seed) need "$@"; seed="$2"; shift 2 ;;
    --split-seed) need "$@"; split_seed="$2"; shift 2 ;;
    --pretrain-steps) need "$@"; pretrain_steps="$2"; shift 2 ;;
    --sft-steps) need "$@"; sft_steps="$2"; shift 2 ;;
    --pretrain-set) need "$@"; pretrain_set+=("$2"); shift 2 ;;
    --sft-set) need "$@"; sft_set+=("$2"); shift 2 ;;
    --eval-seeds) need "$@"; eval_seeds="$2"; shift 2 ;;
    --eval-pieces) need "$@"; eval_pieces="$2"; shift 2 ;;
    --render-batch) need "$@"; render_batch="$2"; shift 2 ;;
    --export-dtype) need "$@"; export_dtype="$2"; shift 2 ;;
    --workers) need "$@"; workers="$2"; shift 2 ;;
    --sft-data) need "$@"; sft_data_from="$2"; shift 2 ;;
    --no-pretrain) no_pretrain=1; shift ;;
    --stop-after) need "$@"; stop_after="$2"; shift 2 ;;
    --install) install=1; shift ;;
    --smoke) smoke=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for n in "$seed" "$split_seed" "$render_batch" "$workers" ${pretrain_steps:+"$pretrain_steps"} \
         ${sft_steps:+"$sft_steps"} ${eval_pieces:+"$eval_pieces"}; do
  [[ "$n" =~ ^[0-9]+$ ]] || die "expected a non-negative integer, got '$n'"
done
read -r -a seeds <<< "$eval_seeds"
[[ ${#seeds[@]} -gt 0 ]] || die "--eval-seeds is empty"
for s in "${seeds[@]}"; do [[ "$s" =~ ^[0-9]+$ ]] || die "bad --eval-seeds entry '$s'"; done
case "$export_dtype" in auto | float32 | bfloat16) ;; *) die "--export-dtype: auto|float32|bfloat16" ;; esac
case "$profile" in
  cpu) configs=configs/default ;;
  gpu) configs=configs/default_gpu ;;
  *) die "--profile: cpu or gpu, got '$profile'" ;;
esac
if [[ $install == 1 && $smoke == 1 ]]; then
  die "--install with --smoke would bundle a smoke-test model; refused"
fi

if [[ -z "$work" ]]; then
  work="out/default"
  [[ $profile == gpu ]] && work="out/default-gpu"
  [[ $smoke == 1 ]] && work="$work-smoke"
  work="$repo/$work"
elif [[ "$work" != /* ]]; then
  work="$PWD/$work"
fi
if [[ -n "$sft_data_from" ]]; then
  [[ -f "$sft_data_from/summary.json" && -f "$sft_data_from/val_pieces.txt" ]] ||
    die "--sft-data $sft_data_from: not a finished data_prep.build_sft output (no summary.json)"
  sft_data_from="$(cd "$sft_data_from" && pwd)"
fi
cd "$repo"
if [[ -d "$data" ]]; then data="$(cd "$data" && pwd)"; fi

# --------------------------------------------------------------------------- stage settings

num_shards=8 sft_limit=() files_limit=() pre_smoke=() sft_smoke=()
if [[ $smoke == 1 ]]; then
  num_shards=2
  sft_limit=(--limit 26)   # rows are sorted by path; row 25 is the first validation performance
  files_limit=(--limit 6)
  pre_smoke=(model=tiny data.block_size=256 train.batch_size=4 train.steps=8
             train.warmup_steps=2 train.log_every=2 train.eval_every=4 train.eval_steps=2
             train.checkpoint_every=4)
  sft_smoke=(model=tiny data.block_size=1024 data.window_stride=512 train.batch_size=2
             train.steps=6 train.warmup_steps=1 train.log_every=2 train.eval_every=3
             train.eval_steps=2 train.checkpoint_every=3)
  [[ -n "$eval_pieces" ]] || eval_pieces=1
  [[ "$eval_seeds" != "0 1 2" ]] || seeds=(0)
fi
steps_set() {  # steps_set N -> train.steps=N train.warmup_steps=N/10
  [[ -z "$1" ]] || echo "train.steps=$1 train.warmup_steps=$(($1 / 10))"
}
read -r -a pre_steps <<< "$(steps_set "$pretrain_steps")"
read -r -a sft_steps_args <<< "$(steps_set "$sft_steps")"
last=$((num_shards - 1))
shard_glob="$(printf 'shard-0000[0-%d]-of-%05d.array_record' $((last - 1)) "$num_shards")"
[[ $num_shards -ge 2 && $num_shards -le 10 ]] || die "internal: num_shards must be in 2..10"
if [[ $last -eq 1 ]]; then shard_glob="$(printf 'shard-00000-of-%05d.array_record' "$num_shards")"; fi
held_out="$(printf 'shard-%05d-of-%05d.array_record' "$last" "$num_shards")"

# --------------------------------------------------------------------------- stage runner

interrupted=0
trap 'interrupted=1' INT TERM  # checked after each stage (bash runs it once the stage exits)
prev_id=""  # id of the last stage done: each stage's key includes it, so redoing a stage
            # redoes every stage after it
record_time() {  # record_time STAGE SECONDS STATUS
  "$py" -m pianist_jax.artifacts.model_card record-time "$work/times.json" "$1" "$2" --status "$3" \
    >/dev/null
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

# stage NAME [--clean PATH]... [--mkdir DIR]... [--show TEXT] [--config] -- COMMAND...
# --clean: removed when the stage starts over; --show: what --dry-run prints for a shell function;
# --config: COMMAND takes --print-config, and the config it resolves joins the stage's key, so
# editing a config file (not only the command) redoes the stage
stage() {
  local name="$1" clean=() mkdirs=() show="" config=0
  shift
  while [[ "$1" != "--" ]]; do
    case "$1" in
      --clean) clean+=("$2"); shift 2 ;;
      --mkdir) mkdirs+=("$2"); shift 2 ;;
      --show) show="$2"; shift 2 ;;
      --config) config=1; shift ;;
      *) die "internal: stage $name: bad option $1" ;;
    esac
  done
  shift
  local cmd key
  cmd="$(printf '%q ' "$@")"
  if [[ $dry_run == 1 ]]; then
    printf '[%s] %s\n' "$name" "${show:-$cmd}"
    return 0
  fi
  key="$cmd| after $prev_id"
  if [[ $config == 1 ]]; then
    key+="| config $("$@" --print-config | cksum)" || die "$name: cannot resolve its config"
  fi
  local stamps="$work/stamps"
  mkdir -p "$stamps" "$work/logs"
  if [[ -f "$stamps/$name.done" && "$(head -n 1 "$stamps/$name.done")" == "$key" ]]; then
    echo "==> [$name] done already ($stamps/$name.done); skipped"
    prev_id="$(sed -n 2p "$stamps/$name.done")"
    record_time "$name" 0 skipped
    return 0
  fi
  if [[ ! -f "$stamps/$name.key" || "$(cat "$stamps/$name.key")" != "$key" ]]; then
    local p  # a new command or new inputs: start from an empty output (else: resume)
    for p in "${clean[@]}"; do
      [[ "$p" == "$work"/* ]] || die "internal: refusing to remove $p (outside $work)"
      rm -rf -- "$p"
    done
  fi
  rm -f "$stamps/$name.done"
  printf '%s\n' "$key" > "$stamps/$name.key"
  local d
  for d in "${mkdirs[@]}"; do mkdir -p "$d"; done
  echo "==> [$name] $cmd"
  local t0="$EPOCHREALTIME" rc=0 log="$work/logs/$name.log"
  # tee ignores Ctrl-C, so a trainer that catches it can save its checkpoint and log to the end
  "$@" 2>&1 | (trap '' INT TERM; exec tee "$log") || rc=$?
  # A trainer stopped by a signal exits 0 after saving ("preempted"): not a finished stage.
  if [[ $rc != 0 || $interrupted == 1 ]] || grep -qF "(preempted)" "$log"; then
    record_time "$name" "$(elapsed "$t0")" failed
    echo "error: stage $name stopped after $(elapsed "$t0") s (exit $rc); log: $log;" \
         "rerun the same command to resume" >&2
    if [[ $interrupted == 1 ]]; then exit 130; fi
    exit 1
  fi
  local secs
  secs="$(elapsed "$t0")"
  record_time "$name" "$secs" ran
  prev_id="$name@$EPOCHREALTIME"
  printf '%s\n%s\n' "$key" "$prev_id" > "$stamps/$name.done"
  echo "==> [$name] finished in ${secs} s"
}

stop_here() {  # stop_here STAGE: exit after STAGE when --stop-after names it
  if [[ "$stop_after" == "$1" ]]; then
    echo "==> stopping after $1 (--stop-after)" >&2
    exit 0
  fi
}

# Commands that need earlier outputs to build (read at stage time; --dry-run shows the default).
sft_val_empty() {
  [[ $dry_run == 0 && -f "$work/sft_data/summary.json" ]] || return 1
  "$py" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["records"]["val"] != 0)' \
    "$work/sft_data/summary.json"
}
eval_listing() {  # the validation pieces to evaluate (all, or the first --eval-pieces)
  local full="$work/sft_data/val_pieces.txt"
  if [[ -z "$eval_pieces" ]]; then
    echo "$full"
  else
    echo "$work/eval_pieces.txt"
    if [[ $dry_run == 0 ]]; then
      awk -v n="$eval_pieces" '/^#/ { print; next } NF && k < n { print; k++ }' "$full" \
        > "$work/eval_pieces.txt"
    fi
  fi
}
export_model() {  # export_model RUN OUT DTYPE: auto = float32 unless it exceeds the size limit
  local dtype="$3"
  [[ "$dtype" != auto ]] || dtype=float32
  "$py" -m pianist_jax.export "$1" "$2" --dtype "$dtype"
  local bytes
  bytes="$(stat -c %s "$2/model.safetensors")"
  if [[ "$3" == auto && $bytes -gt $max_bytes ]]; then
    echo "float32 weights are $bytes bytes (> $max_bytes): exporting bfloat16"
    "$py" -m pianist_jax.export "$1" "$2" --dtype bfloat16
    bytes="$(stat -c %s "$2/model.safetensors")"
  fi
  echo "model.safetensors: $bytes bytes"
  [[ $bytes -le $max_bytes ]] || { echo "error: export exceeds $max_bytes bytes" >&2; return 1; }
}

if [[ $dry_run == 0 ]]; then
  for d in "$data/asap" "$data/unlabeled/pop909" "$data/unlabeled/giantmidi"; do
    [[ -d "$d" ]] || die "missing $d (set DATA=... to the folder holding asap/ and unlabeled/)"
  done
  mkdir -p "$work"
  echo "==> $cmdline  (work dir $work)"
fi

# --------------------------------------------------------------------------- stages

skip() {  # skip STAGE WHY: a stage this invocation leaves out
  if [[ $dry_run == 1 ]]; then printf '[%s] skipped: %s\n' "$1" "$2"; return 0; fi
  echo "==> [$1] skipped: $2"
  record_time "$1" 0 skipped
}
if [[ -n "$sft_data_from" ]]; then
  if [[ $dry_run == 0 ]]; then
    if [[ -e "$work/sft_data" && ! -L "$work/sft_data" ]]; then
      die "--sft-data: $work/sft_data exists and is not a link; use another --work-dir"
    fi
    ln -sfn "$sft_data_from" "$work/sft_data"
  fi
  skip data-sft "--sft-data $sft_data_from (linked as $work/sft_data)"
  prev_id="sft-data:$sft_data_from"
else
  stage data-sft --clean "$work/sft_data" -- \
    "$py" -m data_prep.build_sft --asap "$data/asap" --out "$work/sft_data" --workers "$workers" \
    --val-fraction 0.05 --seed "$split_seed" --num-shards 4 --no-progress "${sft_limit[@]}"
fi
stop_here data-sft

if [[ $no_pretrain == 1 ]]; then
  for s in pretrain-files tokenize pretrain; do
    skip "$s" "--no-pretrain"
    stop_here "$s"
  done
  prev_id="$prev_id no-pretrain"
  init_from="train.init_from=null"
else
  stage pretrain-files --clean "$work/pretrain_files" -- \
    "$py" -m data_prep.pretrain_files --split "$work/sft_data/split.json" --asap "$data/asap" \
    --corpus "pop909=$data/unlabeled/pop909" --corpus "giantmidi=$data/unlabeled/giantmidi" \
    --out-dir "$work/pretrain_files" "${files_limit[@]}"
  stop_here pretrain-files

  lists="$work/pretrain_files"
  stage tokenize --clean "$work/shards/pretrain" -- \
    "$py" -m data_prep.tokenize --file-list "$lists/asap.txt:asap" \
    --file-list "$lists/pop909.txt:pop909" --file-list "$lists/giantmidi.txt:giantmidi" \
    --output "$work/shards/pretrain" --num-shards "$num_shards" --workers "$workers" --no-progress
  stop_here tokenize

  stage pretrain --clean "$work/runs/pretrain" --config -- \
    "$py" -m pianist_jax.train --config "$configs/pretrain.yaml" --no-progress \
    "data.sources.0.path=$work/shards/pretrain/$shard_glob" \
    "data.eval_sources.0.path=$work/shards/pretrain/$held_out" \
    "train.output_dir=$work/runs/pretrain" "train.seed=$seed" "data.seed=$seed" \
    "${pre_smoke[@]}" "${pre_steps[@]}" "${pretrain_set[@]}"
  stop_here pretrain
  init_from="train.init_from=$work/runs/pretrain"
fi

sft_eval=("data.eval_sources.0.path=$work/sft_data/val")
if sft_val_empty; then sft_eval=("data.eval_sources=[]"); fi  # --limit left no validation record
stage sft --clean "$work/runs/sft" --config -- \
  "$py" -m pianist_jax.train --config "$configs/sft.yaml" --no-progress \
  "data.sources.0.path=$work/sft_data/train" "${sft_eval[@]}" \
  "train.output_dir=$work/runs/sft" "$init_from" \
  "train.seed=$seed" "data.seed=$seed" "${sft_smoke[@]}" "${sft_steps_args[@]}" "${sft_set[@]}"
stop_here sft

export_show="$py -m pianist_jax.export $work/runs/sft $work/export --dtype"
if [[ $export_dtype == auto ]]; then
  export_show+=" float32  # again with --dtype bfloat16 if model.safetensors > $max_bytes bytes"
else
  export_show+=" $export_dtype"
fi
stage export --clean "$work/export" --show "$export_show" -- \
  export_model "$work/runs/sft" "$work/export" "$export_dtype"
stop_here export

listing="$(eval_listing)"
stage eval-set --clean "$work/eval" -- "$py" -m pianist_jax.evaluate.eval_set "$listing" "$work/eval"
stop_here eval-set

decoding_smoke=()
[[ $smoke == 0 ]] || decoding_smoke=(--max-notes 32)
stage decoding --clean "$work/eval/decoding" -- \
  "$py" -m pianist_jax.evaluate.choose_decoding "$work/export" "$work/eval" --work "$work/eval/decoding" \
  --batch-size "$render_batch" --write "${decoding_smoke[@]}"
stop_here decoding

scores=("$work"/eval/scores/*.mid)  # the literal pattern until eval-set has run (--dry-run)
for s in "${seeds[@]}"; do
  stage "render-seed$s" --clean "$work/eval/pred/seed$s" --mkdir "$work/eval/pred/seed$s" -- \
    "$py" -m pianist_jax.render "${scores[@]}" --out-dir "$work/eval/pred/seed$s" \
    --model "$work/export" --seed "$s" --batch-size "$render_batch" --no-progress
done
stop_here render

for s in "${seeds[@]}"; do
  stage "evaluate-seed$s" --clean "$work/eval/metrics/seed$s" -- \
    "$py" -m pianist_jax.evaluate --pred "$work/eval/pred/seed$s" --human "$work/eval/human" \
    --scores "$work/eval/scores" --out "$work/eval/metrics/seed$s" --label "seed$s"
done
stage evaluate-deadpan --clean "$work/eval/metrics/deadpan" -- \
  "$py" -m pianist_jax.evaluate --pred "$work/eval/scores" --human "$work/eval/human" \
  --scores "$work/eval/scores" --out "$work/eval/metrics/deadpan" --label deadpan
stop_here evaluate

# The card is rewritten on every invocation (cheap), so it always holds the latest times.
card_flags=()
[[ $smoke == 0 ]] || card_flags=(--smoke)
card_cmd=("$py" -m pianist_jax.artifacts.model_card write --work-dir "$work" --export "$work/export"
          --seeds "${seeds[@]}" --command "$cmdline" "${card_flags[@]}")
if [[ $dry_run == 1 ]]; then
  printf '[card] %s\n' "$(printf '%q ' "${card_cmd[@]}")"
else
  echo "==> [card]"
  "${card_cmd[@]}"
fi
stop_here card

if [[ $install == 1 ]]; then
  dest="$repo/pianist_jax/assets/default"
  if [[ $dry_run == 1 ]]; then
    printf '[install] rm -rf %q && cp -r %q %q\n' "$dest" "$work/export" "$dest"
  else
    echo "==> [install] $work/export -> $dest"
    rm -rf -- "$dest"
    cp -r -- "$work/export" "$dest"
    chmod -R u=rwX,go=rX -- "$dest"  # the export is written 0700/0600 (a private temp dir)
    du -sh "$dest"
  fi
fi

if [[ $dry_run == 0 ]]; then
  "$py" - "$work/times.json" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
for name, e in t["stages"].items():
    print(f"  {name:18s} {e.get('seconds') or 0:9.1f} s  {e.get('status')}")
print(f"  {'total':18s} {t['total_seconds']:9.1f} s")
EOF
fi
