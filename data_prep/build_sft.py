"""ASAP -> aligned (score ids, performance target ids) shards for supervised fine-tuning.

    python -m data_prep.build_sft --asap /work/shared/data/asap --out out/shards/asap_sft
        [--workers N] [--val-fraction 0.05] [--seed 0] [--num-shards K] [--limit N]
        [--no-progress]

Every performance of ``metadata.csv`` is aligned to its folder's ``midi_score.mid``
(``pianist_jax.data.align``: the match file when there is a usable one, else the automatic aligner
on the beat annotations, or DTW when they are missing or disagree in count).  Runs of >= 5
unpaired score notes cut the piece; segments under 64 notes are dropped; unpaired notes inside
a segment are interpolated (``target_notes``).  The target has the score's notes and pitches on
the performance's timeline (onsets made non-decreasing; inside a chord the notes are ordered as
played, and the score side uses the same order), with the performance's pedal binarised, and
both sides are re-based to start at 0 (PAPER_NOTES §3).  One record per segment:
``ids`` = score ids (encoder input, kind 'score'), ``extras['performance']`` = target ids of the
same length and pitch tokens (decoder target), source ``<folder>/<performer>.mid#seg<k>``.

Outputs under --out: ``train/`` and ``val/`` shards, ``split.json`` (piece-wise split: the
folders of one composer/title, e.g. a movement with and without repeats, stay together),
``val_pieces.txt`` (per validation folder: score path, then its performance paths, tab-separated,
relative to the ASAP root named on the first line), ``report.jsonl`` (one line per performance),
``quarantine.jsonl`` (failures, skipped) and ``summary.json``.

Determinism: tasks are sorted, results consumed in task order, a performance's segments go to
the shard picked by a hash of its path, and the writers are single-threaded: the same inputs
give byte-identical shards whatever --workers is.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.tokenize import _imap, _one_line
from pianist_jax import midi, tokenizer  # none of these imports JAX
from pianist_jax.data import align, records

log = logging.getLogger("data_prep.build_sft")
CORPUS = "asap"
WINDOW, HOP = 4096, 2048  # SFT windows (tokens) with 50% overlap: only counted here
_COLUMNS = (
    "composer",
    "title",
    "folder",
    "midi_score",
    "midi_performance",
    "performance_annotations",
    "midi_score_annotations",
    "match_file",
)


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Segment:
    """One aligned stretch of a piece: score notes [start, stop) and their token ids."""

    start: int
    stop: int
    score_ids: np.ndarray  # int32 [8 * n]
    target_ids: np.ndarray  # int32 [8 * n], same pitch tokens as score_ids
    n_interpolated: int


def cut_segments(paired: np.ndarray, min_run: int = 5, min_notes: int = 64):
    """([start, stop) ranges kept, number of ranges dropped as too short): runs of >= min_run
    unpaired notes are cut out, the pieces between them kept if they have >= min_notes."""
    bad = np.concatenate([[False], ~paired, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(bad))
    runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_run]
    bounds = [0] + [x for r in runs for x in r] + [len(paired)]
    spans = [(a, b) for a, b in zip(bounds[::2], bounds[1::2]) if b > a]
    kept = [(a, b) for a, b in spans if b - a >= min_notes]
    return kept, len(spans) - len(kept)


def _interp_by_onset(x, x_known, v_known) -> np.ndarray:
    """Linear interpolation in score time of per-onset means of known values (held at ends)."""
    ux, inv = np.unique(x_known, return_inverse=True)
    means = np.bincount(inv, weights=v_known) / np.bincount(inv)
    return np.interp(x, ux, means)


def target_notes(
    score: midi.Notes, perf: midi.Notes, idx: np.ndarray
) -> tuple[midi.Notes, np.ndarray]:
    """(target, order): the performance target of score notes (ms, perf timeline) and the note
    order it uses, a permutation of the score's to apply to the score side too.

    Paired notes take their performed onset, velocity and duration.  Unpaired notes: onset
    from the monotone score->performance warp through the pairs (linear between the nearest
    paired neighbours in score time, local tempo past the ends); velocity interpolated in
    score time; duration = score duration x the neighbours' performed/score duration ratio
    (geometric interpolation), so it follows both tempo and articulation.

    Order: the notes of one score chord (equal score onsets) are put in the order they were
    played (stable: ties keep the score's pitch order); chords and single notes stay in score
    order.  Onsets are then made non-decreasing (running max; a moved note keeps its duration).
    Keeping the score's pitch order inside chords instead would flatten every chord note played
    before a lower one to IOI 0: on ASAP 37% of target IOIs under 200 ms were 0 that way,
    against 3% in the performances themselves, and a model trained on it plays chords as
    unhumanly exact blocks.  The sustain pedal is binarised (>= 64 -> 127, else 0).
    """
    got = idx >= 0
    if got.sum() < 2:
        raise ValueError("need at least 2 paired notes to build a target")
    q = idx[got]
    x_on = score.onset[got].astype(float)
    ax, ay = align.monotone_anchors(x_on, perf.onset[q])
    onset = np.where(got, perf.onset[np.maximum(idx, 0)], np.rint(align.warp(score.onset, ax, ay)))
    vel = np.rint(_interp_by_onset(score.onset, x_on, perf.velocity[q].astype(float)))
    ratio = np.log(np.maximum(perf.duration[q], 1) / np.maximum(score.duration[got], 1))
    dur = np.rint(
        np.maximum(score.duration, 1) * np.exp(_interp_by_onset(score.onset, x_on, ratio))
    )
    velocity = np.where(got, perf.velocity[np.maximum(idx, 0)], np.clip(vel, 1, 127))
    duration = np.where(got, perf.duration[np.maximum(idx, 0)], np.maximum(dur, 1))
    order = np.lexsort((onset, score.onset))  # lexsort is stable: ties keep score order
    onset = np.maximum.accumulate(onset[order].astype(np.int64))
    pedal = np.where(perf.pedal_value >= 64, 127, 0).astype(np.int64)
    target = midi.Notes(
        onset,
        onset + duration[order].astype(np.int64),
        score.pitch[order],
        velocity[order].astype(np.int64),
        perf.pedal_ms.copy(),
        pedal,
    )
    return target, order


def _take(notes: midi.Notes, order: np.ndarray) -> midi.Notes:
    """The notes in `order` (pedal unchanged)."""
    return midi.Notes(
        notes.onset[order],
        notes.offset[order],
        notes.pitch[order],
        notes.velocity[order],
        notes.pedal_ms,
        notes.pedal_value,
    )


def _slice(notes: midi.Notes, a: int, b: int, base: int = 0) -> midi.Notes:
    """Notes [a, b) with every time (pedal too) shifted by -base."""
    return midi.Notes(
        notes.onset[a:b] - base,
        notes.offset[a:b] - base,
        notes.pitch[a:b],
        notes.velocity[a:b],
        notes.pedal_ms - base,
        notes.pedal_value,
    )


def sft_segments(
    score: midi.Notes, perf: midi.Notes, idx: np.ndarray, min_run: int = 5, min_notes: int = 64
) -> tuple[list[Segment], int]:
    """(segments, number dropped as too short) of (score ids, target ids) for one pair.

    Each segment is re-based to start at 0 in both timelines (first IOI 0) and encoded with
    `tokenizer.encode_notes`, which keeps the given note order, so the target's pitch tokens
    equal the score's even where target onsets tie.  Pedal before a segment's first note still
    sets its state (events at negative times are read, never written).
    """
    spans, dropped = cut_segments(idx >= 0, min_run, min_notes)
    out = []
    for a, b in spans:
        target, order = target_notes(_slice(score, a, b), perf, idx[a:b])  # own pairs only
        s_ids = tokenizer.encode_notes(_take(_slice(score, a, b, score.onset[a]), order))
        t_ids = tokenizer.encode_notes(_slice(target, 0, b - a, target.onset[0]))
        if not np.array_equal(s_ids[::8], t_ids[::8]):
            raise ValueError(f"segment [{a}, {b}): target pitch tokens differ from the score's")
        out.append(Segment(a, b, s_ids, t_ids, int((idx[a:b] < 0).sum())))
    return out, dropped


# ----------------------------------------------------------------------------- corpus


def read_metadata(asap: Path) -> list[dict]:
    """metadata.csv rows sorted by performance path; clear error for a missing column."""
    path = asap / "metadata.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise SystemExit(f"{path}: cannot read ({err.strerror or err})") from err
    missing = [c for c in _COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise SystemExit(f"{path}: no rows or missing columns {missing}")
    return sorted(rows, key=lambda r: r["midi_performance"])


def piece_of(row: dict) -> str:
    """Split unit: composer/title (covers e.g. '17-1' and '17-1_no_repeat')."""
    return f"{row['composer']}/{row['title']}"


def make_split(rows: list[dict], val_fraction: float, seed: int) -> dict:
    """Deterministic piece-wise split: a seeded permutation of the sorted piece names."""
    if not 0.0 <= val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {val_fraction}")
    pieces = sorted({piece_of(r) for r in rows})
    n_val = min(len(pieces) - 1, max(1, round(val_fraction * len(pieces)))) if val_fraction else 0
    perm = np.random.default_rng(seed).permutation(len(pieces))
    val = sorted(pieces[i] for i in perm[:n_val])
    folders = {
        s: sorted({r["folder"] for r in rows if (piece_of(r) in val) == (s == "val")})
        for s in ("train", "val")
    }
    return {
        "seed": seed,
        "val_fraction": val_fraction,
        "unit": "composer/title",
        "val_pieces": val,
        "train_pieces": sorted(set(pieces) - set(val)),
        "val_folders": folders["val"],
        "train_folders": folders["train"],
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _beats(path: Path, notes: list[str]):
    if not path.is_file():
        return None
    try:
        return align.read_beats(path)
    except align.AlignError as err:
        notes.append(f"beats unusable: {err.reason}")
        return None


def align_one(task: tuple[str, dict, int, int]) -> dict:
    """Worker: one performance -> record bytes + report line, or a quarantine reason."""
    root, row, min_run, min_notes = task
    asap = Path(root)
    perf_rel = row["midi_performance"]
    report = {"performance": perf_rel, "folder": row["folder"]}
    if row.get("robust_note_alignment"):  # ASAP's flag: match alignment checked as reliable
        report["robust"] = row["robust_note_alignment"].startswith("1")
    try:
        with warnings.catch_warnings(record=True) as caught:  # MidiWarning: repaired files
            warnings.simplefilter("always")
            score = midi.read_midi(asap / row["midi_score"])
            perf = midi.read_midi(asap / perf_rel)
        notes = [_one_line(str(w.message)) for w in caught]
        sb = _beats(asap / row["midi_score_annotations"], notes)
        pb = _beats(asap / row["performance_annotations"], notes)
        res = None
        match_path = asap / row["match_file"] if row["match_file"] else None
        if match_path is not None and match_path.is_file():
            try:
                res = align.match_align(score, perf, align.read_match(match_path), sb, pb)
            except align.AlignError as err:
                notes.append(f"match file unusable, automatic aligner used: {err.reason}")
        if res is None:
            idx, how = align.auto_align(score, perf, sb, pb)
            res = {"idx": idx, "from_match": np.zeros(len(score), bool), "warp": how}
        idx = res["idx"]
        segs, dropped = sft_segments(score, perf, idx, min_run, min_notes)
        n, paired = len(score), int((idx >= 0).sum())
        kept = sum(s.stop - s.start for s in segs)
        report.update(
            {
                "source": "match" if "pairs_in_file" in res else "auto",
                "warp": res["warp"],
                "score_notes": n,
                "perf_notes": len(perf),
                "paired": paired,
                "from_match": int(res["from_match"].sum()),
                "match_pairs_in_file": res.get("pairs_in_file", 0),
                "match_snotes_in_file": res.get("snotes_in_file", 0),
                "matched_pct": round(100 * paired / n, 2),
                "from_match_pct": round(100 * res["from_match"].sum() / n, 2),
                "interpolated_pct": round(
                    100 * sum(s.n_interpolated for s in segs) / max(kept, 1), 2
                ),
                "segments_kept": len(segs),
                "segments_dropped": dropped,
                "notes_kept": kept,
                "tokens": 8 * kept,
                "windows": sum(windows(8 * (s.stop - s.start)) for s in segs),
                "notes": notes,
            }
        )
        if "located_by" in res:  # which map found the match score notes in the score
            report["located_by"] = res["located_by"]
        for k in ("snotes_located", "perf_located"):
            if k in res:
                report[k] = round(res[k], 4)
        digest = _sha256(asap / perf_rel)
        recs = [
            records.encode_record(
                s.score_ids,
                source=f"{perf_rel}#seg{k}",
                corpus=CORPUS,
                kind="score",
                n_notes=s.stop - s.start,
                content_hash=digest,
                tokenizer_version=tokenizer.TOKENIZER_VERSION,
                extras={"performance": s.target_ids},
            )
            for k, s in enumerate(segs)
        ]
        return {"ok": True, "records": recs, "report": report}
    except Exception as err:  # noqa: BLE001 - one bad performance must never stop the batch
        reason = err.reason if isinstance(err, (midi.MidiError, align.AlignError)) else str(err)
        return {
            "ok": False,
            "report": report,
            "reason": _one_line(f"{type(err).__name__}: {reason}"),
        }


def windows(n_tokens: int) -> int:
    """SFT windows of one segment: 4096 tokens, hop 2048."""
    return 1 if n_tokens <= WINDOW else 1 + math.ceil((n_tokens - WINDOW) / HOP)


def shard_of(perf_rel: str, num_shards: int) -> int:
    return int(hashlib.sha256(perf_rel.encode()).hexdigest()[:16], 16) % num_shards


class Shards:
    """Writers for one split; temp files renamed into place on close."""

    def __init__(self, directory: Path, num_shards: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("shard-*"):
            old.unlink()
        self.final = [directory / records.shard_filename(i, num_shards) for i in range(num_shards)]
        self.tmp = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in self.final]
        self.writers = [ArrayRecordWriter(str(t), records.ARRAY_RECORD_OPTIONS) for t in self.tmp]
        self.count = [0] * num_shards

    def write(self, key: str, recs: list[bytes]) -> None:
        i = shard_of(key, len(self.writers))
        for r in recs:
            self.writers[i].write(r)
        self.count[i] += len(recs)

    def close(self) -> None:
        for w, t, f in zip(self.writers, self.tmp, self.final):
            w.close()
            os.replace(t, f)


def write_val_pieces(path: Path, asap: Path, rows: list[dict], val_folders: list[str]) -> None:
    scores = {r["folder"]: r["midi_score"] for r in rows}
    lines = [f"# asap_root\t{asap.resolve()}"]
    for folder in val_folders:
        perfs = sorted(r["midi_performance"] for r in rows if r["folder"] == folder)
        lines.append("\t".join([scores[folder], *perfs]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def summarise(reports: list[dict], n_quarantined: int, seconds: float) -> dict:
    ok = [r for r in reports if "score_notes" in r]
    tot = {
        k: sum(r[k] for r in ok)
        for k in (
            "score_notes",
            "paired",
            "from_match",
            "notes_kept",
            "tokens",
            "windows",
            "segments_kept",
            "segments_dropped",
        )
    }
    m = [r for r in ok if r["source"] == "match"]
    m_notes = max(sum(r["score_notes"] for r in m), 1)
    m_file = max(sum(r["match_pairs_in_file"] for r in m), 1)
    robust = [r for r in m if r.get("robust")]
    interp = sum(r["interpolated_pct"] * r["notes_kept"] / 100 for r in ok)
    return {
        "performances": len(reports),
        "aligned": len(ok),
        "quarantined": n_quarantined,
        "from_match_file": len(m),
        "automatic": len(ok) - len(m),
        **tot,
        "pooled_paired_pct_match_perfs": round(100 * sum(r["paired"] for r in m) / m_notes, 2),
        "pooled_from_match_pct": round(100 * sum(r["from_match"] for r in m) / m_notes, 2),
        "match_pairs_mapped_pct": round(100 * sum(r["from_match"] for r in m) / m_file, 2),
        # the annotation's own ceiling: the share of its score notes it pairs at all
        "match_files_own_paired_pct": round(
            100
            * sum(r["match_pairs_in_file"] for r in m)
            / max(sum(r["match_snotes_in_file"] for r in m), 1),
            2,
        ),
        "located_by_scores": sum(r.get("located_by") == "scores" for r in m),
        "pooled_paired_pct_robust_match_perfs": round(
            100 * sum(r["paired"] for r in robust) / max(sum(r["score_notes"] for r in robust), 1),
            2,
        ),
        "pooled_paired_pct": round(100 * tot["paired"] / max(tot["score_notes"], 1), 2),
        "interpolated_pct_kept": round(100 * interp / max(tot["notes_kept"], 1), 2),
        "seconds": round(seconds, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.build_sft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--asap", required=True, type=Path, help="ASAP root (holds metadata.csv)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="'spawn' worker processes; 0 or 1 = in this process",
    )
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-shards", type=int, default=4, help="train shards (val: 1)")
    ap.add_argument(
        "--limit",
        type=int,
        help="only the first N performances (the split is still made over all pieces)",
    )
    ap.add_argument("--min-run", type=int, default=5, help="unpaired run that cuts a segment")
    ap.add_argument("--min-notes", type=int, default=64, help="shortest segment kept")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.num_shards < 1:
        raise SystemExit("--num-shards must be >= 1")
    t0 = time.monotonic()
    rows = read_metadata(args.asap)
    split = make_split(rows, args.val_fraction, args.seed)
    val_folders = set(split["val_folders"])
    todo = rows[: args.limit] if args.limit else rows
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    write_val_pieces(out / "val_pieces.txt", args.asap, rows, split["val_folders"])
    tasks = [(str(args.asap), r, args.min_run, args.min_notes) for r in todo]
    reports, quarantine = [], []
    with ExitStack() as stack:
        pool = None
        if args.workers > 1:
            pool = ProcessPoolExecutor(
                args.workers, mp_context=multiprocessing.get_context("spawn")
            )
            stack.callback(pool.shutdown, cancel_futures=True)
        shards = {"train": Shards(out / "train", args.num_shards), "val": Shards(out / "val", 1)}
        bar = tqdm(total=len(tasks), desc="aligning", unit="perf", disable=args.no_progress)
        for row, res in zip(todo, _imap(pool, align_one, tasks, max(args.workers, 1))):
            split_name = "val" if row["folder"] in val_folders else "train"
            res["report"]["split"] = split_name
            reports.append(res["report"])
            if res["ok"]:
                shards[split_name].write(row["midi_performance"], res["records"])
            else:
                res["report"]["quarantined"] = res["reason"]
                log.warning("quarantined %s: %s", row["midi_performance"], res["reason"])
                quarantine.append({"performance": row["midi_performance"], "reason": res["reason"]})
            bar.update(1)
        bar.close()
        for s in shards.values():
            s.close()
    with open(out / "report.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in reports)
    with open(out / "quarantine.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, sort_keys=True) + "\n" for q in quarantine)
    summary = summarise(reports, len(quarantine), time.monotonic() - t0)
    summary["records"] = {k: sum(s.count) for k, s in shards.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    worst = sorted((r for r in reports if "matched_pct" in r), key=lambda r: r["matched_pct"])[:10]
    print(json.dumps(summary, indent=1))
    print("lowest paired %:")
    for r in worst:
        print(f"  {r['matched_pct']:6.2f}%  {r['source']:5s} {r['warp']:5s} {r['performance']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
