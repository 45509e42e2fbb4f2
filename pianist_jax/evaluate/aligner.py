"""How well does the automatic aligner reproduce the match-file alignment on ASAP?

    python -m pianist_jax.evaluate.aligner --asap /work/shared/data/asap
        [--n 30] [--out out/sft/aligner_eval.json] [--workers N]

A fixed selection (``select``: performances whose match alignment ASAP marks robust, evenly
spaced in path order) is aligned three ways: the reference = the note pairs taken from the match
file (``align.match_align``'s ``from_match``), the automatic aligner with beat annotations, and
without them (coarse DTW).  Precision and recall are over (score note index, performance note
index) pairs.  ``build_sft`` locates match score notes in ``midi_score.mid`` through a map
fitted on automatic pairs or on the two scores, whichever pairs more; so that the reference
does not depend on the aligner under test, here that map is always fitted on the two scores
alone (``align.score_anchors``: common pitch subsequence), and the agreement (Jaccard) with the
``build_sft`` reference is reported as ``ref_agreement``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from data_prep.build_sft import read_metadata
from data_prep.tokenize import _imap
from pianist_jax import midi
from pianist_jax.data import align


def select(rows: list[dict], asap: Path, n: int = 30) -> list[dict]:
    """n robust performances with a match file, evenly spaced in sorted path order."""
    ok = [
        r
        for r in rows
        if r.get("robust_note_alignment", "").startswith("1")
        and r["match_file"]
        and (asap / r["match_file"]).is_file()
    ]
    if not ok:
        raise SystemExit(f"{asap}: no performance with a robust match alignment")
    take = np.unique(np.linspace(0, len(ok) - 1, min(n, len(ok))).round().astype(int))
    return [ok[i] for i in take]


def pairs(idx: np.ndarray) -> set[tuple[int, int]]:
    got = np.flatnonzero(idx >= 0)
    return set(zip(got.tolist(), idx[got].tolist()))


def precision_recall(found: set, ref: set) -> tuple[float, float]:
    hit = len(found & ref)
    return hit / max(len(found), 1), hit / max(len(ref), 1)


def evaluate_one(task: tuple[str, dict]) -> dict:
    """Worker: the three alignments of one performance and their agreement."""
    root, row = task

    asap = Path(root)
    score = midi.read_midi(asap / row["midi_score"])
    perf = midi.read_midi(asap / row["midi_performance"])
    match = align.read_match(asap / row["match_file"])
    sb = align.read_beats(asap / row["midi_score_annotations"])
    pb = align.read_beats(asap / row["performance_annotations"])
    res = align.match_align(
        score, perf, match, sb, pb, beat_anchors=align.score_anchors(score, match)
    )
    ref = pairs(np.where(res["from_match"], res["idx"], -1))
    res_prod = align.match_align(score, perf, match, sb, pb)  # as build_sft does it
    ref_prod = pairs(np.where(res_prod["from_match"], res_prod["idx"], -1))
    beats, how = align.auto_align(score, perf, sb, pb)
    dtw, _ = align.auto_align(score, perf)
    out = {
        "performance": row["midi_performance"],
        "score_notes": len(score),
        "ref_pairs": len(ref),
        "warp": how,
        "ref_agreement": round(len(ref & ref_prod) / max(len(ref | ref_prod), 1), 4),
    }
    for name, idx in (("beats", beats), ("dtw", dtw)):
        found = pairs(idx)
        p, r = precision_recall(found, ref)
        out[name] = {
            "pairs": len(found),
            "hits": len(found & ref),
            "precision": round(p, 4),
            "recall": round(r, 4),
        }
    return out


def evaluate(asap: Path, n: int = 30, workers: int = 1) -> dict:
    """Per-performance rows plus pooled (micro) and mean precision/recall per method."""
    tasks = [(str(asap), r) for r in select(read_metadata(asap), asap, n)]
    with ExitStack() as stack:
        pool = None
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            stack.callback(pool.shutdown, cancel_futures=True)
        rows = list(_imap(pool, evaluate_one, tasks, max(workers, 1)))
    summary = {}
    ref = sum(r["ref_pairs"] for r in rows)
    for name in ("beats", "dtw"):
        hits = sum(r[name]["hits"] for r in rows)
        found = sum(r[name]["pairs"] for r in rows)
        summary[name] = {
            "pooled_precision": round(hits / max(found, 1), 4),
            "pooled_recall": round(hits / max(ref, 1), 4),
            "mean_precision": round(float(np.mean([r[name]["precision"] for r in rows])), 4),
            "mean_recall": round(float(np.mean([r[name]["recall"] for r in rows])), 4),
            "min_precision": min(r[name]["precision"] for r in rows),
            "min_recall": min(r[name]["recall"] for r in rows),
        }
    summary["reference_agreement_mean"] = round(
        float(np.mean([r["ref_agreement"] for r in rows])), 4
    )
    return {
        "n": len(rows),
        "selection": "robust_note_alignment=1, evenly spaced by path",
        "summary": summary,
        "performances": rows,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{'performance':58s} {'notes':>6s} {'ref':>6s} {'warp':>5s}  "
        f"{'P beats':>7s} {'R beats':>7s}  {'P dtw':>6s} {'R dtw':>6s}"
    ]
    for r in result["performances"]:
        lines.append(
            f"{r['performance'][:58]:58s} {r['score_notes']:6d} {r['ref_pairs']:6d} "
            f"{r['warp']:>5s}  {r['beats']['precision']:7.4f} {r['beats']['recall']:7.4f}"
            f"  {r['dtw']['precision']:6.4f} {r['dtw']['recall']:6.4f}"
        )
    for name, s in result["summary"].items():
        lines.append(f"{name}: {s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pianist_jax.evaluate.aligner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--asap", required=True, type=Path)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("out/sft/aligner_eval.json"))
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    result = evaluate(args.asap, args.n, args.workers)
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
