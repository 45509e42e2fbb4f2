"""Objective evaluation (PAPER_NOTES §5): pooled feature histograms, rendering vs humans.

    python -m pianist_jax.evaluate --pred DIR --human DIR [--scores DIR] [--out DIR]
        [--label NAME] [--weight-by-humans]

`PRED/<piece>.mid` are renderings, `HUMAN/<piece>-<k>.mid` the human performances of the same
piece (`.midi` too, suffix case ignored).  A human file's piece is its name up to the LAST '-'
whose remainder is a non-empty identifier (letters, digits, '_'), so `Op-10-3-2.mid` is piece
`Op-10-3`, take `2`; human files without such a '-' are ignored with a warning.

Features per note are read off our own tokens (`tokenizer.encode_file`), i.e. exactly what the
model sees: velocity 0..127, duration in ms, IOI in ms (the first note's "IOI" is its distance
from time 0, not an interval, so it is left out, as in the reference evaluation), and the pedal
pattern of the 4 pedal tokens binarised at >= 64: `P1*8 + P2*4 + P3*2 + P4` (P1 is the most
significant bit, as in the reference; the scores do not depend on the order).
Histogram bins are half-open `[lo, hi)`, the last one too: a value outside `[lo, hi)` (e.g. a
500 ms duration, an IOI of 200 ms or more) is dropped, as in the reference; how many were dropped
is reported.  Counts are normalised to probabilities; unlike the reference no 1e-10 is added to
every bin (it moves the scores by < 1e-6 and would keep "disjoint" from scoring exactly 1).

Pooling: the prediction side is every rendering's notes once (`--weight-by-humans`: once per
human performance of its piece, which is what the reference's file pairing amounts to); the
reference side is every human performance of the same pieces.
Human baseline, over the pieces with >= 2 humans, built like the prediction side: in round
r = 0..R-1 (R = the most humans any such piece has) each piece's human number r mod n (its
files in name order) plays the "rendering" and the other n-1 humans of that piece are the
reference; both sides are pooled over the pieces, scored, and the scores are averaged over the
rounds, so every human is compared against the other humans of its piece at least once.  (Pooling
every (piece, k) pair into one candidate and one reference histogram instead would be degenerate:
the reference would be the candidate repeated n-1 times, JS 0 whenever n is the same everywhere.)
With `--weight-by-humans` a round's candidate counts n-1 times, like a rendering.
Scores: Jensen-Shannon *distance* `jensenshannon(p, q, base=2)` (0 identical .. 1 disjoint) and
histogram intersection `sum(min(p, q))` (1 identical .. 0 disjoint); "overall" is the mean of
the 4 dimensions.  A side with no value in range makes that dimension (and overall) NaN.

`--scores DIR` (`SCORES/<piece>.mid`, the scores that were rendered) adds the note-level judge
(`pianist_jax.evaluate.note_level`): velocity, local-tempo and articulation r and pedal
agreement with
the humans note by note, beside the deadpan score and the human ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon

from pianist_jax import midi
from pianist_jax import tokenizer as tk
from pianist_jax.evaluate import note_level as note_eval

DIMENSIONS = ("velocity", "duration", "ioi", "pedal")
# dimension -> (number of bins, lo, hi, axis label); bins are [lo, hi) in equal steps
BINS = {
    "velocity": (128, 0, 128, "velocity (MIDI 0-127)"),
    "duration": (250, 0, 500, "duration (ms, 2 ms bins)"),
    "ioi": (200, 0, 200, "inter-onset interval (ms, 1 ms bins)"),
    "pedal": (16, 0, 16, "pedal pattern P1P2P3P4 (value >= 64 -> 1)"),
}
PEDAL_THRESHOLD = 64
MIDI_SUFFIXES = (".mid", ".midi")
_HUMAN_NAME = re.compile(r"(?P<piece>.+)-(?P<take>\w+)")  # greedy: splits at the last '-'

Features = dict[str, np.ndarray]
Hist = dict[str, np.ndarray]


class EvaluationError(Exception):
    """A user error (missing or empty directory, nothing to compare): one line, exit 2."""


# ----------------------------------------------------------------------------- features


def features_from_ids(ids: np.ndarray) -> Features:
    """Token ids [8N] -> per-note feature arrays (see module docstring)."""
    tok = np.asarray(ids, dtype=np.int64).reshape(-1, tk.TOKENS_PER_NOTE)
    bits = (tok[:, 4:] - tk.PEDAL_START) >= PEDAL_THRESHOLD
    return {
        "velocity": tok[:, tk.VELOCITY] - tk.VELOCITY_START,
        "duration": tok[:, tk.DURATION] - tk.TIME_START,
        "ioi": tok[1:, tk.IOI] - tk.TIME_START,
        "pedal": bits.astype(np.int64) @ np.array([8, 4, 2, 1]),
    }


def features(path) -> Features:
    """Features of one MIDI file; raises `midi.MidiError` (file + reason) for a bad file."""
    return features_from_ids(tk.encode_file(path))


def histograms(features_list: Sequence[Features], weights: Sequence[int] | None = None) -> Hist:
    """Pooled integer counts per dimension; `weights[i]` counts features_list[i] that often."""
    weights = [1] * len(features_list) if weights is None else list(weights)
    out = {}
    for dim in DIMENSIONS:
        n, lo, hi, _ = BINS[dim]
        total = np.zeros(n, dtype=np.int64)
        for feats, w in zip(features_list, weights):
            v = feats[dim]
            total += w * np.histogram(v[(v >= lo) & (v < hi)], bins=n, range=(lo, hi))[0]
        out[dim] = total
    return out


def _n_values(features_list: Sequence[Features], weights: Sequence[int], dim: str) -> int:
    return int(sum(w * len(f[dim]) for f, w in zip(features_list, weights)))


# ----------------------------------------------------------------------------- scores


def probabilities(counts: np.ndarray) -> np.ndarray | None:
    """Counts -> probabilities; None when nothing was counted."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else None


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2 (scipy); NaN when a side is empty."""
    p, q = probabilities(p), probabilities(q)
    if p is None or q is None:
        return math.nan
    with np.errstate(invalid="ignore"):
        d = float(jensenshannon(p, q, base=2))
    return 0.0 if math.isnan(d) else d  # sqrt of a -1e-17 rounding residue for p ~= q


def intersection(p: np.ndarray, q: np.ndarray) -> float:
    """Histogram intersection sum(min(p, q)) of the normalised histograms; NaN if one is empty."""
    p, q = probabilities(p), probabilities(q)
    return math.nan if p is None or q is None else float(np.minimum(p, q).sum())


def compare(pred_hist: Hist, ref_hist: Hist) -> dict:
    """{dim: {"js", "intersection"}} for the 4 dimensions plus "overall" (their mean)."""
    out = {
        dim: {
            "js": js_distance(pred_hist[dim], ref_hist[dim]),
            "intersection": intersection(pred_hist[dim], ref_hist[dim]),
        }
        for dim in DIMENSIONS
    }
    out["overall"] = {
        k: float(np.mean([out[d][k] for d in DIMENSIONS])) for k in ("js", "intersection")
    }
    return out


# ----------------------------------------------------------------------------- files


def _midi_files(folder: Path, name: str, log: Callable[[str], None]) -> dict[str, Path]:
    """{stem: path} of the MIDI files directly in `folder` (first of .mid/.midi duplicates)."""
    if not folder.is_dir():
        raise EvaluationError(
            f"{name} directory {folder} does not exist"
            if not folder.exists()
            else f"{name} {folder} is not a directory"
        )
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix.lower() in MIDI_SUFFIXES):
            continue
        if p.stem in files:
            log(f"warning: {p} ignored: {files[p.stem].name} has the same name")
            continue
        files[p.stem] = p
    if not files:
        raise EvaluationError(f"no .mid/.midi files in {name} directory {folder}")
    return files


def human_piece(stem: str) -> tuple[str, str] | None:
    """`piece-k` -> (piece, k), split at the last '-'; None when the name has no such part."""
    m = _HUMAN_NAME.fullmatch(stem)
    return (m["piece"], m["take"]) if m else None


def _load(path: Path, log: Callable[[str], None], skipped: list) -> Features | None:
    """Features of a file, or None (one warning line) when it cannot be used."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            feats = features(path)
        except midi.MidiError as e:
            reason = e.reason
        except OSError as e:
            reason = e.strerror or str(e)
        else:
            reason = None
    for w in caught:
        log(f"warning: {w.message}")
    if reason is not None:
        log(f"warning: skipping {path}: {reason}")
        skipped.append({"file": str(path), "reason": reason})
        return None
    return feats


def human_baseline(
    takes: Sequence[Sequence[Features]], weight_by_humans: bool = False
) -> dict | None:
    """Leave-one-out rounds over pieces with >= 2 humans (module docstring); None if none."""
    takes = [t for t in takes if len(t) >= 2]
    if not takes:
        return None
    rounds = []
    for r in range(max(len(t) for t in takes)):
        cand = [t[r % len(t)] for t in takes]
        w = [len(t) - 1 if weight_by_humans else 1 for t in takes]
        ref = [f for t in takes for i, f in enumerate(t) if i != r % len(t)]
        hist = {"candidate": histograms(cand, w), "reference": histograms(ref)}
        rounds.append({"scores": compare(hist["candidate"], hist["reference"]), "histograms": hist})
    scores = {
        row: {
            k: float(np.mean([rd["scores"][row][k] for rd in rounds]))
            for k in ("js", "intersection")
        }
        for row in (*DIMENSIONS, "overall")
    }
    return {
        "scores": scores,
        "n_pieces": len(takes),
        "n_performances": sum(len(t) for t in takes),
        "rounds": rounds,
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return int(x) if isinstance(x, np.integer) else x


# ----------------------------------------------------------------------------- evaluation


def evaluate_dirs(
    pred,
    human,
    out=None,
    label: str | None = None,
    weight_by_humans: bool = False,
    log: Callable[[str], None] | None = None,
    scores=None,
) -> dict:
    """Evaluate `pred` against `human`; writes OUT/metrics.json and OUT/<dim>.png (OUT
    defaults to PRED/eval; `out=False` writes nothing).  Returns the metrics dict.
    `scores`: the rendered scores' directory, for the note-level judge (metrics["notes"]).
    Raises `EvaluationError` for user errors."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    pred, human = Path(pred), Path(human)
    label = label or pred.resolve().name or "prediction"
    pred_files = _midi_files(pred, "--pred", log)
    takes: dict[str, list[Path]] = {}
    for stem, path in _midi_files(human, "--human", log).items():
        split = human_piece(stem)
        if split is None:
            log(f"warning: {path} ignored: human files are named <piece>-<k>.mid")
            continue
        takes.setdefault(split[0], []).append(path)
    for piece in sorted(set(pred_files) - set(takes)):
        log(
            f"warning: no human performance {human}/{piece}-<k>.mid for {pred_files[piece]}; "
            "piece skipped"
        )
    if unrendered := sorted(set(takes) - set(pred_files)):
        log(f"note: {len(unrendered)} piece(s) in {human} have no rendering in {pred} (ignored)")
    common = sorted(set(pred_files) & set(takes))
    if not common:
        raise EvaluationError(
            f"no pieces in common between --pred {pred} and --human {human} "
            "(renderings <piece>.mid, humans <piece>-<k>.mid)"
        )
    skipped: list = []
    pieces, pred_feats, human_feats = [], [], []
    for piece in common:
        pf = _load(pred_files[piece], log, skipped)
        hf = [f for f in (_load(p, log, skipped) for p in takes[piece]) if f is not None]
        if pf is None or not hf:
            if pf is not None:
                log(f"warning: piece {piece} skipped: none of its human files could be read")
            continue
        pieces.append(piece)
        pred_feats.append(pf)
        human_feats.append(hf)
    if not pieces:
        raise EvaluationError("nothing left to evaluate: every piece had an unreadable file")

    pred_w = [len(hf) if weight_by_humans else 1 for hf in human_feats]
    flat_h = [f for hf in human_feats for f in hf]
    hist = {"prediction": histograms(pred_feats, pred_w), "human": histograms(flat_h)}
    n_values = {
        "prediction": {d: _n_values(pred_feats, pred_w, d) for d in DIMENSIONS},
        "human": {d: _n_values(flat_h, [1] * len(flat_h), d) for d in DIMENSIONS},
    }
    baseline = human_baseline([hf for hf in human_feats if len(hf) >= 2], weight_by_humans)
    metrics = {
        "label": label,
        "pred_dir": str(pred),
        "human_dir": str(human),
        "weight_by_humans": weight_by_humans,
        "pieces": pieces,
        "n_pieces": len(pieces),
        "n_human_performances": len(flat_h),
        "n_notes": {
            "prediction": sum(len(f["velocity"]) for f in pred_feats),
            "human": sum(len(f["velocity"]) for f in flat_h),
        },
        "prediction": compare(hist["prediction"], hist["human"]),
        "human_baseline": baseline,
        "bins": {
            d: {"n_bins": n, "range": [lo, hi], "label": lab}
            for d, (n, lo, hi, lab) in BINS.items()
        },
        "dropped_out_of_range": {
            side: {d: n_values[side][d] - int(hist[side][d].sum()) for d in DIMENSIONS}
            for side in n_values
        },
        "histograms": {d: {side: h[d] for side, h in hist.items()} for d in DIMENSIONS},
        "skipped": skipped,
        "human_pieces_without_prediction": unrendered,
        "notes": None if scores is None else _note_level(pieces, pred_files, takes, scores, log),
    }
    metrics = _jsonable(metrics)
    if out is not False:
        out = Path(out) if out is not None else pred / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_histograms(metrics, out)
        metrics["out_dir"] = str(out)
    return metrics


def _note_level(pieces, pred_files, takes, scores, log) -> dict:
    score_files = _midi_files(Path(scores), "--scores", log)
    items = [(p, pred_files[p], score_files[p], takes[p]) for p in pieces if p in score_files]
    if missing := [p for p in pieces if p not in score_files]:
        log(
            f"warning: no score {scores}/<piece>.mid for {len(missing)} piece(s) "
            f"({', '.join(missing[:3])}...): left out of the note-level judge"
        )
    if not items:
        raise EvaluationError(f"--scores {scores}: no score for any evaluated piece")
    return note_eval.evaluate(items, log)


def plot_histograms(metrics: dict, out: Path) -> list[Path]:
    """OUT/<dim>.png: prediction vs pooled human probabilities, scores in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for dim in DIMENSIONS:
        n, lo, hi, xlabel = BINS[dim]
        h = metrics["histograms"][dim]
        p_pred = probabilities(h["prediction"])
        p_hum = probabilities(h["human"])
        fig = Figure(figsize=(10, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        sides = [
            (p_hum, f"human, pooled ({metrics['n_human_performances']} performances)", "tab:blue"),
            (p_pred, f"{metrics['label']} ({metrics['n_pieces']} pieces)", "tab:red"),
        ]
        if dim == "pedal":
            x = np.arange(n)
            for i, (p, name, color) in enumerate(sides):
                if p is not None:
                    ax.bar(x + (i - 0.5) * 0.4, p, 0.4, label=name, color=color, alpha=0.75)
            ax.set_xticks(x, [f"{i:04b}" for i in x], rotation=45)
        else:
            edges = np.linspace(lo, hi, n + 1)
            for p, name, color in sides:
                if p is not None:
                    ax.stairs(p, edges, label=name, color=color, linewidth=1.2)
            ax.set_xlim(lo, hi)
        s = metrics["prediction"][dim]
        title = f"{dim}: JS {_fmt(s['js'])}, intersection {_fmt(s['intersection'])}"
        if metrics["human_baseline"]:
            b = metrics["human_baseline"]["scores"][dim]
            title += f"  (human vs human: JS {_fmt(b['js'])}, {_fmt(b['intersection'])})"
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("probability")
        ax.legend()
        fig.tight_layout()
        paths.append(out / f"{dim}.png")
        fig.savefig(paths[-1], dpi=100)
    return paths


def _fmt(x) -> str:
    return "nan" if x is None else f"{x:.4f}"


def format_table(metrics: dict) -> str:
    """The score table (rows: dimensions + overall; prediction and human-baseline columns)."""
    groups = [(metrics["label"], metrics["prediction"])]
    if metrics["human_baseline"]:
        groups.append(("human baseline", metrics["human_baseline"]["scores"]))
    head = f"{'':<10}" + "".join(f"{name[:26]:>28}" for name, _ in groups)
    sub = f"{'dimension':<10}" + f"{'JS':>12}{'intersection':>16}" * len(groups)
    rows = [
        f"{row:<10}"
        + "".join(f"{_fmt(s[row]['js']):>12}{_fmt(s[row]['intersection']):>16}" for _, s in groups)
        for row in (*DIMENSIONS, "overall")
    ]
    info = (
        f"{metrics['n_pieces']} pieces, {metrics['n_notes']['prediction']} rendered notes, "
        f"{metrics['n_human_performances']} human performances "
        f"({metrics['n_notes']['human']} notes)"
    )
    if metrics["human_baseline"]:
        info += f"; baseline over {metrics['human_baseline']['n_pieces']} pieces with >= 2 humans"
    else:
        info += "; no piece has >= 2 humans, so no human baseline"
    lines = [head, sub, *rows, info]
    if metrics.get("notes"):
        lines += ["", note_eval.format_table(metrics["notes"], metrics["label"])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pianist_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--pred", required=True, help="renderings: PRED/<piece>.mid")
    ap.add_argument("--human", required=True, help="human performances: HUMAN/<piece>-<k>.mid")
    ap.add_argument(
        "--scores", help="the rendered scores: SCORES/<piece>.mid (adds the note-level judge)"
    )
    ap.add_argument("--out", help="output directory (default PRED/eval)")
    ap.add_argument("--label", help="name of the prediction column (default: PRED's name)")
    ap.add_argument(
        "--weight-by-humans",
        action="store_true",
        help="count each rendering once per human performance of its piece",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = evaluate_dirs(
            args.pred, args.human, args.out, args.label, args.weight_by_humans, scores=args.scores
        )
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an unwritable --out
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    print(f"wrote {metrics['out_dir']}/metrics.json and {len(DIMENSIONS)} PNG histograms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
