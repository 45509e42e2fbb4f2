"""Note-level judge: does a rendering perform *this* score, note by note, as humans do?

The histogram metrics (`pianist_jax.evaluate`) pool every note of every piece, so a model that
ignores its input and draws from the right marginal distributions scores well there. This
judge pairs each score note with its performed note and asks, per piece:

* velocity r - Pearson r between the note's velocity and the humans' mean velocity of the
  same score note;
* local-tempo r - per successive score onset, ``log(performed / notated)`` time across a
  span of ``2 * TEMPO_HALF_SPAN`` onsets centred on it (the smoothing), against the humans'
  mean of the same curve;
* articulation r - ``log(performed / notated duration)`` per note, against the humans' mean;
* pedal agreement - the share of notes whose sustain state at the onset (CC64 >= 64) equals
  the human majority's (ties count as pedal down).

A prediction with no variation (the deadpan score's articulation, say) has r 0, not NaN.
Figures are averaged over pieces. The human ceiling scores each human against the mean of the
*other* humans of its piece (pieces with >= 2); the deadpan floor scores the score MIDI itself.

Humans are paired with the score through their match file (`<performance>.match[.gz]` beside
the performance, symbolic links followed: ASAP's layout) or else the automatic aligner.
Renderings keep the score's notes, so they are paired by pitch in order of occurrence (the
k-th C4 of the rendering is the score's k-th C4); a rendering of the score's first K notes
only pairs with those; otherwise, if a pitch's count differs, the automatic aligner pairs it.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pianist_jax import midi
from pianist_jax import tokenizer as tk
from pianist_jax.data import align

FIGURES = ("velocity_r", "tempo_r", "articulation_r", "pedal_agreement")
PEDAL_DOWN = 64
TEMPO_HALF_SPAN = 2  # local tempo over score onsets g-2 .. g+2
ONSET_GROUP_MS = 20  # score notes this close start "together" (a chord)


@dataclass(frozen=True)
class NoteFeatures:
    """One performance of a score, per score note (NaN where the note was not performed):
    velocity, log articulation and pedal state [N]; local tempo per score onset group [G]."""

    velocity: np.ndarray
    articulation: np.ndarray
    pedal: np.ndarray
    tempo: np.ndarray


def onset_groups(score: midi.Notes) -> np.ndarray:
    """Group number of each score note: a new group starts > ONSET_GROUP_MS after the last."""
    if len(score) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([[0], np.cumsum(np.diff(score.onset) > ONSET_GROUP_MS)])


def pair_rendering(score: midi.Notes, perf: midi.Notes) -> np.ndarray:
    """Performed index of each score note for a rendering of that score (module docstring)."""
    idx = np.full(len(score), -1, np.int64)
    for p in np.unique(np.concatenate([score.pitch, perf.pitch])):
        s, r = np.flatnonzero(score.pitch == p), np.flatnonzero(perf.pitch == p)
        if len(s) < len(r):
            return align.auto_align(score, perf)[0]
        idx[s[: len(r)]] = r
    if not np.array_equal(np.flatnonzero(idx >= 0), np.arange(len(perf))):  # not a prefix
        return align.auto_align(score, perf)[0]
    return idx


def pair_human(score: midi.Notes, perf: midi.Notes, perf_path: Path) -> np.ndarray:
    """Performed index per score note from the performance's match file, else the aligner."""
    real = Path(perf_path).resolve()
    for match in (real.with_suffix(".match.gz"), real.with_suffix(".match")):
        if match.is_file():
            try:
                return align.match_align(score, perf, align.read_match(match))["idx"]
            except align.AlignError:
                break
    return align.auto_align(score, perf)[0]


def note_features(score: midi.Notes, perf: midi.Notes, idx: np.ndarray) -> NoteFeatures:
    """Per-note features of ``perf`` paired to ``score`` by ``idx`` (-1: unpaired)."""
    ok = idx >= 0
    take = np.where(ok, idx, 0)

    def paired(values):
        return np.where(ok, np.asarray(values, float)[take] if len(perf) else 0.0, np.nan)

    velocity = paired(perf.velocity)
    with np.errstate(divide="ignore", invalid="ignore"):
        articulation = np.log(
            np.maximum(paired(perf.duration), 1.0) / np.maximum(score.duration, 1.0)
        )
    state = (tk.pedal_at(perf, perf.onset) >= PEDAL_DOWN).astype(float) if len(perf) else []
    pedal = paired(state)
    return NoteFeatures(velocity, articulation, pedal, local_tempo(score, paired(perf.onset)))


def local_tempo(score: midi.Notes, performed_onset: np.ndarray) -> np.ndarray:
    """``log(performed / notated)`` time from onset group g - w to g + w per group g (NaN where
    either end has no performed note or the performed span is not positive)."""
    group = onset_groups(score)
    n_groups = int(group[-1]) + 1 if len(group) else 0
    notated = np.array([score.onset[group == g].mean() for g in range(n_groups)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN group
        played = np.array([np.nanmean(performed_onset[group == g]) for g in range(n_groups)])
    out = np.full(n_groups, np.nan)
    w = TEMPO_HALF_SPAN
    if n_groups > 2 * w:
        lo, hi = np.arange(n_groups - 2 * w), np.arange(2 * w, n_groups)
        span_p, span_s = played[hi] - played[lo], notated[hi] - notated[lo]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[w : n_groups - w] = np.where(
                (span_p > 0) & (span_s > 0), np.log(span_p / span_s), np.nan
            )
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r over the entries where both are finite; 0 when either side is constant
    (a prediction without variation carries no information); NaN with < 3 entries."""
    both = np.isfinite(x) & np.isfinite(y)
    if both.sum() < 3:
        return math.nan
    x, y = x[both] - x[both].mean(), y[both] - y[both].mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 1e-12 else 0.0


def _mean(rows: list[np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(rows), axis=0)


def judge(pred: NoteFeatures, refs: list[NoteFeatures]) -> dict:
    """The four figures of one performance of a piece against reference performances of it."""
    ref = {
        name: _mean([getattr(r, name) for r in refs])
        for name in ("velocity", "articulation", "tempo", "pedal")
    }
    majority = np.where(np.isfinite(ref["pedal"]), ref["pedal"] >= 0.5, np.nan)
    both = np.isfinite(majority) & np.isfinite(pred.pedal)
    return {
        "velocity_r": pearson(pred.velocity, ref["velocity"]),
        "tempo_r": pearson(pred.tempo, ref["tempo"]),
        "articulation_r": pearson(pred.articulation, ref["articulation"]),
        "pedal_agreement": (
            float((pred.pedal[both] == majority[both]).mean()) if both.any() else math.nan
        ),
        "pedal_down": finite_mean(pred.pedal),
    }


def finite_mean(values) -> float:
    """Mean of the values that are numbers (not None, not NaN); NaN if there are none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def average(rows: list[dict], keys=(*FIGURES, "pedal_down")) -> dict:
    """Mean of each figure over the rows that have it (NaN if none)."""
    return {k: finite_mean(r.get(k) for r in rows) for k in keys}


@dataclass
class Piece:
    """A score with its human performances, each already paired note by note."""

    name: str
    score: midi.Notes
    humans: list[NoteFeatures]

    @property
    def deadpan(self) -> NoteFeatures:
        return note_features(self.score, self.score, np.arange(len(self.score)))


@functools.lru_cache(maxsize=1024)
def _human(score_path: Path, path: Path, _stamps) -> NoteFeatures:
    """A human performance paired with its score (cached: aligning is the slow part, and a
    choice among renderings judges the same humans again; file times are in the key)."""
    score, perf = midi.read_midi(score_path), midi.read_midi(path)
    return note_features(score, perf, pair_human(score, perf, path))


def load_piece(name: str, score_path, human_paths) -> Piece:
    """Read a score and its human performances and pair every performance with the score."""
    score_path = Path(score_path).resolve()
    humans = []
    for path in map(Path, human_paths):
        stamps = (score_path.stat().st_mtime_ns, path.resolve().stat().st_mtime_ns)
        try:
            humans.append(_human(score_path, path, stamps))
        except (midi.MidiError, align.AlignError):
            continue  # an unreadable human file leaves the others (the histograms do too)
    if not humans:
        raise ValueError("none of its human performances could be read and paired")
    return Piece(name, midi.read_midi(score_path), humans)


def judge_rendering(piece: Piece, rendering_path) -> dict:
    """A rendering of ``piece`` against the mean of its humans."""
    perf = midi.read_midi(rendering_path)
    return judge(note_features(piece.score, perf, pair_rendering(piece.score, perf)), piece.humans)


def human_ceiling(piece: Piece) -> dict | None:
    """Each human against the mean of the others, averaged; None with < 2 humans."""
    if len(piece.humans) < 2:
        return None
    rows = [judge(h, piece.humans[:i] + piece.humans[i + 1 :]) for i, h in enumerate(piece.humans)]
    return average(rows)


def evaluate(items: list[tuple[str, Path, Path, list[Path]]], log=print) -> dict:
    """``items`` = (piece, rendering, score, human performances): per-piece figures and their
    means for the rendering, the deadpan score and the human ceiling. A piece whose files
    cannot be read or paired is skipped with one warning line."""
    per_piece = []
    for name, pred_path, score_path, human_paths in items:
        try:
            piece = load_piece(name, score_path, human_paths)
            row = {
                "piece": name,
                "n_notes": len(piece.score),
                "n_humans": len(piece.humans),
                "prediction": judge_rendering(piece, pred_path),
                "deadpan": judge(piece.deadpan, piece.humans),
                "human_ceiling": human_ceiling(piece),
                "human_pedal_down": finite_mean(finite_mean(h.pedal) for h in piece.humans),
            }
        except (midi.MidiError, align.AlignError, ValueError) as err:
            log(f"warning: note-level judge skips {name}: {getattr(err, 'reason', err)}")
            continue
        per_piece.append(row)
    out = {
        side: average([p[side] for p in per_piece if p[side] is not None])
        for side in ("prediction", "deadpan", "human_ceiling")
    }
    out["human_pedal_down"] = finite_mean(p["human_pedal_down"] for p in per_piece)
    out["n_pieces"] = len(per_piece)
    out["n_ceiling_pieces"] = sum(p["human_ceiling"] is not None for p in per_piece)
    out["per_piece"] = per_piece
    return out


def format_table(notes: dict, label: str) -> str:
    """Rows: the rendering, the deadpan score, the human ceiling; columns: the four figures."""
    head = f"{'note level':<26}" + "".join(f"{k:>17}" for k in (*FIGURES, "pedal_down"))
    if not notes["n_pieces"]:
        return "note level: no piece could be judged (see the warnings)"
    rows = [head]
    for side, name in (
        ("prediction", label),
        ("deadpan", "deadpan score"),
        ("human_ceiling", "human vs other humans"),
    ):
        vals = notes[side]
        rows.append(
            f"{name[:25]:<26}"
            + "".join(
                f"{'nan' if vals[k] is None or math.isnan(vals[k]) else f'{vals[k]:.3f}':>17}"
                for k in (*FIGURES, "pedal_down")
            )
        )
    down = notes["human_pedal_down"]
    rows.append(
        f"{notes['n_pieces']} pieces ({notes['n_ceiling_pieces']} with >= 2 humans for "
        f"the ceiling); humans hold the pedal at "
        f"{'nan' if down is None or math.isnan(down) else f'{down:.2f}'} of onsets"
    )
    return "\n".join(rows)
