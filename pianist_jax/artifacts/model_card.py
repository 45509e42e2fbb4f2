"""Model card of a `launch/train_default.sh` run, and the recipe's per-stage wall-time log.

    python -m pianist_jax.artifacts.model_card write --work-dir WORK --export WORK/export \
        [--seeds 0 1 2]
        [--command "launch/train_default.sh ..."] [--smoke]
    python -m pianist_jax.artifacts.model_card record-time WORK/times.json STAGE SECONDS \
        [--status ran]

``write`` reads the recipe's work directory (layout below) and writes ``card.json`` and
``MODEL_CARD.md`` into the export directory, so the card travels with the model:

    WORK/sft_data/{summary.json,split.json}           data_prep.build_sft
    WORK/pretrain_files/summary.json                   data_prep.pretrain_files
    WORK/shards/pretrain/manifest.json                 data_prep.tokenize
    WORK/runs/{pretrain,sft}/{config.yaml,metrics.jsonl}  pianist_jax.train
    EXPORT/{model.yaml,export.json,model.safetensors}  pianist_jax.export
    WORK/eval/metrics/{seed<K>,deadpan}/metrics.json   pianist_jax.evaluate
    WORK/times.json                                    record-time (one entry per stage)

Contents: data (corpora, files, notes, tokens, excluded validation overlaps, the split), model
config and parameter count, per stage the steps, batch, block and tokens seen (steps x batch x
block), last losses, wall time per stage and in total, the paper's metrics (JS distance and
histogram intersection per dimension and overall) on the validation pieces for the bundled
model (mean, sample standard deviation, min and max over the seeds), the deadpan score and the
human baseline, the date and the git commit. Missing inputs leave their fields null (a card can
be written for a partial run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pianist_jax.render.decoding import describe
from pianist_jax.scaling.fit import parse_metrics

DIMENSIONS = ("velocity", "duration", "ioi", "pedal", "overall")
SCORES = ("js", "intersection")
TARGET_JS = 0.20  # the bundled model aims at an overall JS distance of at most this
REPO = Path(__file__).resolve().parents[2]  # the checkout (git facts for the card)


# ----------------------------------------------------------------------------- wall times


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def read_times(path: Path) -> dict:
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"stages": {}, "total_seconds": 0.0}


def record_time(path: Path, stage: str, seconds: float, status: str = "ran") -> dict:
    """Add one stage's outcome to ``times.json`` and return the new contents.

    ``ran``: the stage finished; its ``seconds`` are this attempt's, and earlier failed or
    interrupted attempts since the last success are summed into ``earlier_attempts_seconds``.
    ``failed``: counted into those earlier attempts. ``skipped``: the output was already complete;
    the recorded time of the run that made it is kept. ``total_seconds`` sums the finished
    stages' ``seconds`` (the wall time of an uninterrupted run of the recipe).
    """
    if status not in ("ran", "failed", "skipped"):
        raise ValueError(f"status must be ran, failed or skipped, got {status!r}")
    path = Path(path)
    times = read_times(path)
    entry = times["stages"].setdefault(stage, {"seconds": None, "status": None})
    now = _now()
    if status == "ran":
        entry.update(
            seconds=round(float(seconds), 2),
            status="ran",
            finished=now,
            earlier_attempts_seconds=round(entry.get("pending_seconds", 0.0), 2),
        )
        entry.pop("pending_seconds", None)
    elif status == "failed":
        entry["pending_seconds"] = round(entry.get("pending_seconds", 0.0) + float(seconds), 2)
        entry["last_failure"] = now
        if entry.get("status") != "ran":
            entry["status"] = "failed"
    else:
        entry["last_skipped"] = now
        if entry.get("status") is None:
            entry["status"] = "skipped"
    times["total_seconds"] = round(
        sum(e["seconds"] or 0.0 for e in times["stages"].values() if e.get("status") == "ran"), 2
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(times, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return times


# ----------------------------------------------------------------------------- card


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _yaml(path: Path) -> Any:
    import yaml  # imported here: record-time runs after every stage and must start fast

    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def _metrics_lines(path: Path) -> list[dict]:

    return parse_metrics(path.read_text(encoding="utf-8")) if path.is_file() else []


def training_stage(run_dir: Path) -> dict | None:
    """Steps, batch, block, tokens seen and last losses of one training run directory."""
    cfg = _yaml(run_dir / "config.yaml")
    if cfg is None:
        return None
    train, data = cfg.get("train", {}), cfg.get("data", {})
    lines = _metrics_lines(run_dir / "metrics.jsonl")
    tr = [m for m in lines if m["split"] == "train"]
    ev = [m for m in lines if m["split"] == "eval"]
    reached = tr[-1]["step"] if tr else 0
    batch, block = train.get("batch_size"), data.get("block_size")
    tail = [m["loss"] for m in tr[-50:]]
    return {
        "name": cfg.get("name"),
        "kind": data.get("kind"),
        "steps_planned": train.get("steps"),
        "steps": reached,
        "batch_size": batch,
        "block_size": block,
        "tokens_per_step": batch * block if batch and block else None,
        "tokens_seen": reached * batch * block if batch and block else None,
        "lr": train.get("lr"),
        "schedule": train.get("schedule"),
        "warmup_steps": train.get("warmup_steps"),
        "seed": train.get("seed"),
        "init_from": train.get("init_from"),
        "sources": [s.get("path") for s in data.get("sources", [])],
        "train_loss_last50": sum(tail) / len(tail) if tail else None,
        "eval": {k: ev[-1].get(k) for k in ("step", "loss", "accuracy")} if ev else None,
    }


def _stats(values: list[float]) -> dict:
    import numpy as np

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
    }


def _scores(block: dict | None) -> dict | None:
    if not block:
        return None
    return {d: {s: block.get(d, {}).get(s) for s in SCORES} for d in DIMENSIONS}


def evaluation(metrics_dir: Path, seeds: list[int]) -> dict:
    per_seed = {}
    for seed in seeds:
        m = _json(metrics_dir / f"seed{seed}" / "metrics.json")
        if m is not None:
            per_seed[str(seed)] = m
    deadpan = _json(metrics_dir / "deadpan" / "metrics.json")
    any_m = deadpan or next(iter(per_seed.values()), None)
    human = (any_m or {}).get("human_baseline") or None
    model = (
        {
            d: {s: _stats([m["prediction"][d][s] for m in per_seed.values()]) for s in SCORES}
            for d in DIMENSIONS
        }
        if per_seed
        else None
    )
    overall = model["overall"]["js"]["mean"] if model else None
    return {
        "seeds": [int(s) for s in per_seed],
        "seeds_requested": list(seeds),
        "pieces": (any_m or {}).get("pieces"),
        "n_pieces": (any_m or {}).get("n_pieces"),
        "n_human_performances": (any_m or {}).get("n_human_performances"),
        "model": model,
        "model_per_seed": {s: _scores(m["prediction"]) for s, m in per_seed.items()},
        "deadpan": _scores(deadpan["prediction"]) if deadpan else None,
        "human": _scores(human["scores"]) if human else None,
        "human_pieces": human.get("n_pieces") if human else None,
        "target_overall_js": TARGET_JS,
        "meets_target": None if overall is None else bool(overall <= TARGET_JS),
        "notes": note_level(per_seed),
    }


NOTE_FIGURES = ("velocity_r", "tempo_r", "articulation_r", "pedal_agreement", "pedal_down")


def note_level(per_seed: dict) -> dict | None:
    """The note-level judge's figures (`pianist_jax.evaluate.note_level`): the model's over
    seeds, and
    the deadpan score's and the human ceiling's (the same in every seed's metrics)."""
    blocks = [m["notes"] for m in per_seed.values() if m.get("notes")]
    if not blocks:
        return None
    first = blocks[0]
    ceiling = dict(first["human_ceiling"], pedal_down=first.get("human_pedal_down"))
    return {
        "model": {k: _stats([b["prediction"][k] for b in blocks]) for k in NOTE_FIGURES},
        "deadpan": first["deadpan"],
        "human": ceiling,
        "n_pieces": first["n_pieces"],
        "n_ceiling_pieces": first["n_ceiling_pieces"],
    }


def git_info(repo: Path = REPO) -> dict:
    """Commit and whether the tree had uncommitted changes (read-only git calls)."""

    def run(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", str(repo), *args],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def build_card(
    work: Path,
    export: Path,
    seeds: list[int],
    *,
    command: str | None = None,
    smoke: bool = False,
    repo: Path = REPO,
) -> dict:
    work, export = Path(work), Path(export)
    info = _json(export / "export.json") or {}
    weights = export / "model.safetensors"
    sft = _json(work / "sft_data" / "summary.json")
    split = _json(work / "sft_data" / "split.json")
    files = _json(work / "pretrain_files" / "summary.json")
    manifest = _json(work / "shards" / "pretrain" / "manifest.json")
    times = read_times(work / "times.json")
    stages = {k: training_stage(work / "runs" / k) for k in ("pretrain", "sft")}
    seen = [s["tokens_seen"] for s in stages.values() if s and s.get("tokens_seen")]
    return {
        "card_version": 1,
        "smoke": smoke,
        "date": _now(),
        "git": git_info(repo),
        "command": command,
        "model": {
            "config": _yaml(export / "model.yaml"),
            "num_params": info.get("num_params"),
            "dtype": info.get("dtype"),
            "tokenizer_version": info.get("tokenizer_version"),
            "weights_bytes": weights.stat().st_size if weights.is_file() else None,
            "source": info.get("source"),
            "decoding": _json(export / "decoding.json"),
        },
        "data": {
            "sft": None
            if sft is None
            else {
                k: sft.get(k)
                for k in (
                    "performances",
                    "aligned",
                    "quarantined",
                    "records",
                    "notes_kept",
                    "tokens",
                    "windows",
                    "segments_kept",
                    "pooled_paired_pct",
                )
            },
            "split": None
            if split is None
            else {
                "seed": split.get("seed"),
                "val_fraction": split.get("val_fraction"),
                "unit": split.get("unit"),
                "val_pieces": split.get("val_pieces"),
                "n_train_pieces": len(split.get("train_pieces", [])),
            },
            "pretrain_files": None
            if files is None
            else {k: files.get(k) for k in ("files", "excluded", "overlap", "limit")},
            "pretrain_shards": None
            if manifest is None
            else {
                "num_shards": manifest.get("num_shards"),
                "totals": manifest.get("totals"),
                "corpora": {
                    name: {
                        k: c.get(k)
                        for k in ("files", "notes", "tokens", "duplicates", "quarantined")
                    }
                    for name, c in (manifest.get("corpora") or {}).items()
                },
            },
        },
        "training": {**stages, "tokens_seen_total": sum(seen) if seen else None},
        "wall_time": times,
        "evaluation": evaluation(work / "eval" / "metrics", seeds),
    }


# ----------------------------------------------------------------------------- markdown


def _f(x, nd=4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _n(x) -> str:
    return "-" if x is None else f"{x:,}"


def _hms(seconds) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def render_markdown(card: dict) -> str:
    ev, model, tr = card["evaluation"], card["model"], card["training"]
    cfg = model.get("config") or {}
    lines = ["# pianist-jax default model", ""]
    if card.get("smoke"):
        lines += [
            "**Smoke run: a tiny model trained for a few steps to test the recipe. "
            "Not a usable model.**",
            "",
        ]
    git = card.get("git") or {}
    lines += [
        "Score MIDI -> expressive performance MIDI (timing, dynamics, articulation, sustain "
        "pedal); every output note is a score note. Trained by `launch/train_default.sh` "
        "(pre-training by masked denoising, then fine-tuning on aligned ASAP score/performance "
        "pairs).",
        "",
        f"- Date: {card.get('date')}; git commit {git.get('commit') or '-'}"
        f"{' (uncommitted changes)' if git.get('dirty') else ''}",
        f"- Command: `{card.get('command') or '-'}`",
        f"- Parameters: {_n(model.get('num_params'))} ({model.get('dtype')}, "
        f"{_f((model.get('weights_bytes') or 0) / 1e6, 1)} MB); encoder {cfg.get('encoder_layers')}"
        f" / decoder {cfg.get('decoder_layers')} layers, hidden {cfg.get('hidden')}, mlp "
        f"{cfg.get('mlp')}, heads {cfg.get('num_heads')} (kv {cfg.get('num_kv_heads')}, dim "
        f"{cfg.get('head_dim')}); tokenizer {model.get('tokenizer_version')}",
        "",
        "## Data",
        "",
    ]
    data = card["data"]
    shards = data.get("pretrain_shards") or {}
    if shards:
        lines += [
            "Pre-training corpus (ASAP training performances + unlabeled MIDI; the "
            f"validation pieces left out), {shards.get('num_shards')} shards, the last one "
            "held out for the pre-training loss:",
            "",
            "| corpus | files | notes | tokens | duplicates | quarantined |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, c in (shards.get("corpora") or {}).items():
            lines.append(
                f"| {name} | {_n(c.get('files'))} | {_n(c.get('notes'))} | "
                f"{_n(c.get('tokens'))} | {_n(c.get('duplicates'))} | "
                f"{_n(c.get('quarantined'))} |"
            )
        t = shards.get("totals") or {}
        lines += [
            f"| total | {_n(t.get('files'))} | {_n(t.get('notes'))} | "
            f"{_n(t.get('tokens'))} | {_n(t.get('duplicates'))} | "
            f"{_n(t.get('quarantined'))} |",
            "",
        ]
    pf = data.get("pretrain_files") or {}
    if pf.get("excluded"):
        left = "; ".join(
            f"{corpus}: " + ", ".join(f"{n} ({why})" for why, n in reasons.items())
            for corpus, reasons in pf["excluded"].items()
        )
        lines += [
            f"Left out of pre-training: {left}. ('overlaps validation': sharing more "
            f"than {(pf.get('overlap') or {}).get('threshold')} of its pitch 4-grams with "
            "a validation score.)",
            "",
        ]
    sft, split = data.get("sft") or {}, data.get("split") or {}
    if sft:
        rec = sft.get("records") or {}
        lines += [
            f"Fine-tuning: ASAP (CC BY-NC-SA 4.0) {_n(sft.get('aligned'))} of "
            f"{_n(sft.get('performances'))} performances aligned to their scores, "
            f"{_n(rec.get('train'))} train / {_n(rec.get('val'))} validation segments, "
            f"{_n(sft.get('tokens'))} target tokens.",
            "",
        ]
    if split:
        lines += [
            f"Validation pieces (piece-wise split, seed {split.get('seed')}, fraction "
            f"{split.get('val_fraction')}): {', '.join(split.get('val_pieces') or [])}.",
            "",
        ]
    lines += [
        "## Training",
        "",
        "| stage | steps | batch x block | tokens seen | lr | last train loss | "
        "eval loss | wall time |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    stages = (card.get("wall_time") or {}).get("stages", {})
    for name in ("pretrain", "sft"):
        s = tr.get(name)
        if not s:
            continue
        ev_s = s.get("eval") or {}
        lines.append(
            f"| {name} | {_n(s['steps'])} | {s['batch_size']} x {s['block_size']} | "
            f"{_n(s['tokens_seen'])} | {s['lr']} | {_f(s['train_loss_last50'], 3)} | "
            f"{_f(ev_s.get('loss'), 3)} | "
            f"{_hms((stages.get(name) or {}).get('seconds'))} |"
        )
    if tr.get("sft") and not tr.get("pretrain"):
        lines += [
            "",
            "No pre-training: fine-tuned from random parameters "
            "(`launch/train_default.sh --no-pretrain`).",
        ]
    lines += [
        "",
        f"Tokens seen in total: {_n(tr.get('tokens_seen_total'))} "
        "(steps x batch x block, both stages).",
        "",
        "## Wall time",
        "",
        "| stage | wall time | status |",
        "|---|---:|---|",
    ]
    for name, e in stages.items():
        lines.append(f"| {name} | {_hms(e.get('seconds'))} | {e.get('status')} |")
    lines += [
        f"| **total** | **{_hms((card.get('wall_time') or {}).get('total_seconds'))}** | |",
        "",
    ]
    lines += ["## Evaluation on the validation pieces", ""]
    if ev.get("n_pieces"):
        lines += [
            f"{ev['n_pieces']} pieces, {ev.get('n_human_performances')} human "
            "performances (`python -m pianist_jax.evaluate`: pooled histograms of "
            "velocity, duration, IOI and pedal against the humans of the same pieces; "
            "JS = Jensen-Shannon distance, lower is better; HI = histogram intersection, "
            "higher is better). Model: mean ± sample std over seeds "
            f"{', '.join(map(str, ev.get('seeds') or []))}. Human: each human against the "
            f"other humans of its piece ({ev.get('human_pieces') or 0} pieces with >= 2).",
            "",
        ]
    header = "| | " + " | ".join(f"{d} JS | {d} HI" for d in DIMENSIONS) + " |"
    lines += [header, "|---|" + "---:|" * (2 * len(DIMENSIONS))]

    def row(label, scores, stats=False):
        cells = []
        for d in DIMENSIONS:
            for s in SCORES:
                v = (scores or {}).get(d, {}).get(s)
                if stats:
                    cells.append(
                        "-"
                        if not v or v.get("mean") is None
                        else f"{v['mean']:.4f} ± {v['std']:.4f}"
                    )
                else:
                    cells.append(_f(v))
        return f"| {label} | " + " | ".join(cells) + " |"

    lines += [
        row("deadpan score", ev.get("deadpan")),
        row("this model", ev.get("model"), stats=True),
        row("human vs human", ev.get("human")),
    ]
    for seed, scores in (ev.get("model_per_seed") or {}).items():
        lines.append(row(f"seed {seed}", scores))
    if ev.get("meets_target") is not None:
        lines += [
            "",
            f"Overall JS target <= {ev['target_overall_js']}: "
            f"{'met' if ev['meets_target'] else 'NOT met'}.",
        ]
    if dec := (card.get("model") or {}).get("decoding"):
        lines += [
            "",
            f"Sampling (the renderer's defaults for this model, `decoding.json`): "
            f"{describe(dec)}; chosen by {dec.get('chosen_by')}.",
        ]
    if notes := ev.get("notes"):
        lines += [
            "",
            "Note by note (`--scores`: each score note's performed velocity, local "
            "tempo and articulation against the humans' mean of the same note, Pearson r "
            "per piece; pedal agreement with the human majority at each onset; pedal "
            f"down = share of onsets pedalled; means over {notes['n_pieces']} pieces; "
            f"human: each against the others, {notes['n_ceiling_pieces']} pieces):",
            "",
            "| | " + " | ".join(k.replace("_", " ") for k in NOTE_FIGURES) + " |",
            "|---|" + "---:|" * len(NOTE_FIGURES),
        ]
        for label, vals in (
            ("deadpan score", notes["deadpan"]),
            ("this model", notes["model"]),
            ("human vs other humans", notes["human"]),
        ):
            cells = [
                (f"{v['mean']:.3f} ± {v['std']:.3f}" if v.get("mean") is not None else "-")
                if isinstance(v, dict)
                else _f(v, 3)
                for v in (vals.get(k) for k in NOTE_FIGURES)
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Use",
        "",
        "`python -m pianist_jax.render SCORE.mid` (this model is the default when "
        "`--model` is not given). The weights were trained on ASAP, whose license "
        "(CC BY-NC-SA 4.0) restricts commercial use; POP909 (MIT) and GiantMIDI "
        "excerpts (CC BY 4.0) were used for pre-training.",
        "",
    ]
    return "\n".join(lines)


def write_card(work: Path, export: Path, seeds: list[int], **kwargs) -> dict:
    card = build_card(work, export, seeds, **kwargs)
    export = Path(export)
    export.mkdir(parents=True, exist_ok=True)
    (export / "card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    (export / "MODEL_CARD.md").write_text(render_markdown(card), encoding="utf-8")
    return card


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pianist_jax.artifacts.model_card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write EXPORT/card.json and EXPORT/MODEL_CARD.md")
    w.add_argument("--work-dir", required=True, type=Path)
    w.add_argument("--export", type=Path, help="export directory (default WORK/export)")
    w.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    w.add_argument("--command", help="the recipe command line, for the card")
    w.add_argument("--smoke", action="store_true", help="mark the card as a smoke run")
    t = sub.add_parser("record-time", help="add a stage's wall time to times.json")
    t.add_argument("times", type=Path)
    t.add_argument("stage")
    t.add_argument("seconds", type=float)
    t.add_argument("--status", choices=("ran", "failed", "skipped"), default="ran")
    args = ap.parse_args(argv)
    if args.cmd == "record-time":
        times = record_time(args.times, args.stage, args.seconds, args.status)
        print(
            f"{args.stage}: {args.status} {args.seconds:.1f} s "
            f"(total {times['total_seconds']:.1f} s)"
        )
        return 0
    export = args.export or args.work_dir / "export"
    card = write_card(args.work_dir, export, args.seeds, command=args.command, smoke=args.smoke)
    ev = card["evaluation"]
    js = (ev.get("model") or {}).get("overall", {}).get("js", {})
    print(
        f"wrote {export}/MODEL_CARD.md and card.json (overall JS "
        f"{_f(js.get('mean'))} ± {_f(js.get('std'))} over seeds {ev.get('seeds')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
