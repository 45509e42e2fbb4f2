"""Score <-> performance note alignment for supervised fine-tuning (PAPER_NOTES §3).

Both aligners give, for every score note (``midi.read_midi`` order), the index of its performed
note in the performance's ``read_midi`` notes, or -1:

* ``auto_align`` (any pair of files): score time is warped to performance time beat by beat
  from the annotation files, or without them by a coarse DTW over onset chroma; notes are then
  assigned per pitch with ``linear_sum_assignment`` under a distance gate, the warp is refitted
  through those pairs and a tighter pass follows.
* ``match_align``: a CPJKU match file (v1.0.0 and the older 5.0 layout of (n)ASAP).  Performed
  notes are found by pitch + onset (ticks -> ms).  Match score notes are found in
  ``midi_score.mid`` without decoding time signatures or pickups: a monotone map from match
  beats to score ms is fitted on anchors bridged through the performance by ``auto_align``,
  and on the common pitch subsequence of the two scores (the one that pairs more wins); then
  each match score note takes the same-pitch score note nearest its mapped beat.  Pairs far
  off the warp are dropped; notes the match file leaves unpaired are filled from
  ``auto_align``.  The file readers live in `pianist_jax.midi.match_file`.

No JAX: this runs in data-prep worker processes.
"""

from __future__ import annotations

import difflib
from bisect import bisect_left

import numpy as np
from scipy.optimize import linear_sum_assignment

from pianist_jax import midi
from pianist_jax.midi.match_file import (  # noqa: F401
    AlignError,
    Match,
    parse_match,
    read_beats,
    read_match,  # (re-exported: callers use align.*)
)

PERF_GATE_MS = 5.0  # match-file performed note <-> read_midi note (measured: <= 1 ms on ASAP)
MAX_DEV_MS = 300.0  # a pair this far off the warp through all pairs is dropped (~0.5% on ASAP)


# ----------------------------------------------------------------------------- building blocks


def assign_by_pitch(pitch_a, time_a, pitch_b, time_b, gate) -> np.ndarray:
    """For each a-note the index of its b-note (same pitch, |dt| <= gate) or -1.

    Minimum total |dt| per pitch (``linear_sum_assignment``), where leaving an a-note unpaired
    costs its gate; work is split at time gaps no pair can bridge, so matrices stay small.
    """
    time_a, time_b = np.asarray(time_a, float), np.asarray(time_b, float)
    gate = np.broadcast_to(np.asarray(gate, float), time_a.shape)
    out = np.full(len(time_a), -1, dtype=np.int64)
    for p in np.intersect1d(pitch_a, pitch_b):
        ia, ib = np.flatnonzero(pitch_a == p), np.flatnonzero(pitch_b == p)
        t = np.concatenate([time_a[ia], time_b[ib]])
        reach = np.concatenate([gate[ia], np.zeros(len(ib))])
        # a-notes are intervals [t - gate, t + gate], b-notes points: merge overlapping ones
        order = np.argsort(t - reach, kind="stable")
        covered = np.maximum.accumulate((t + reach)[order])
        block = np.concatenate([[0], np.cumsum((t - reach)[order][1:] > covered[:-1])])
        owner = np.empty(len(t), dtype=np.int64)
        owner[order] = block
        for b in np.unique(owner):
            sa, sb = ia[owner[: len(ia)] == b], ib[owner[len(ia) :] == b]
            if not len(sa) or not len(sb):
                continue
            dt = np.abs(time_a[sa, None] - time_b[None, sb])
            g = gate[sa]
            cost = np.where(dt <= g[:, None], dt, np.inf)
            dummy = np.full((len(sa), len(sa)), np.inf)
            np.fill_diagonal(dummy, g)
            rows, cols = linear_sum_assignment(np.concatenate([cost, dummy], axis=1))
            real = cols < len(sb)
            out[sa[rows[real]]] = sb[cols[real]]
    return out


def monotone_anchors(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Strictly increasing (x, y) anchors: median y per distinct x, then the longest chain
    increasing in both (drops pairs that contradict the majority's order)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not len(x):
        return x, y
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    ux, first, count = np.unique(xs, return_index=True, return_counts=True)
    uy = 0.5 * (ys[first + (count - 1) // 2] + ys[first + count // 2])  # median per distinct x
    tails: list[float] = []
    tail_idx: list[int] = []
    prev = np.full(len(uy), -1)
    for i, v in enumerate(uy):
        k = bisect_left(tails, v)
        prev[i] = tail_idx[k - 1] if k else -1
        if k == len(tails):
            tails.append(v), tail_idx.append(i)
        else:
            tails[k], tail_idx[k] = v, i
    chain, i = [], tail_idx[-1] if tail_idx else -1
    while i >= 0:
        chain.append(i)
        i = prev[i]
    chain = np.array(chain[::-1], dtype=np.int64)
    return ux[chain], uy[chain]


def warp(x, ax, ay, end_span: int = 4) -> np.ndarray:
    """Piecewise-linear map through anchors (ax, ay), extrapolated at each end with the slope
    over the last `end_span` anchor intervals (the local tempo)."""
    x = np.asarray(x, float)
    if len(ax) == 0:
        return x.copy()
    if len(ax) == 1:
        return x - ax[0] + ay[0]
    y = np.interp(x, ax, ay)
    k = min(end_span, len(ax) - 1)
    lo = (ay[k] - ay[0]) / (ax[k] - ax[0])
    hi = (ay[-1] - ay[-1 - k]) / (ax[-1] - ax[-1 - k])
    y = np.where(x < ax[0], ay[0] + (x - ax[0]) * lo, y)
    return np.where(x > ax[-1], ay[-1] + (x - ax[-1]) * hi, y)


def _local_step(x, ax, ay) -> np.ndarray:
    """Warped length of one x unit around x (e.g. ms per beat), from the anchor slopes."""
    if len(ax) < 2:
        return np.ones(len(x))
    slope = np.diff(ay) / np.diff(ax)
    seg = np.clip(np.searchsorted(ax, x, side="right") - 1, 0, len(slope) - 1)
    return slope[seg]


# ----------------------------------------------------------------------------- aligners


def refine(score: midi.Notes, perf: midi.Notes, idx: np.ndarray, ax, ay, gates) -> np.ndarray:
    """Pair the still-unpaired score notes with unused performed notes: warp score onsets
    through anchors (ax, ay), assign per pitch under gates[0], refit anchors from all pairs,
    repeat with the next gate.  Existing pairs in `idx` are kept."""
    idx = idx.copy()
    fixed = idx >= 0
    for gate in gates:
        idx[~fixed] = -1
        free_s = np.flatnonzero(~fixed)
        free_p = np.setdiff1d(np.arange(len(perf)), idx[fixed])
        got = assign_by_pitch(
            score.pitch[free_s],
            warp(score.onset[free_s], ax, ay),
            perf.pitch[free_p],
            perf.onset[free_p],
            gate,
        )
        idx[free_s[got >= 0]] = free_p[got[got >= 0]]
        paired = idx >= 0
        if paired.sum() >= 2:
            ax, ay = monotone_anchors(score.onset[paired], perf.onset[idx[paired]])
    return idx


def drop_outliers(
    score: midi.Notes, perf: midi.Notes, idx: np.ndarray, max_dev: float = MAX_DEV_MS
) -> np.ndarray:
    """Unpair notes whose performed onset is more than max_dev ms off the monotone warp
    through all pairs (a wrong pair would drag the running-max target timeline along)."""
    got = np.flatnonzero(idx >= 0)
    if len(got) < 2:
        return idx
    ax, ay = monotone_anchors(score.onset[got], perf.onset[idx[got]])
    far = np.abs(perf.onset[idx[got]] - warp(score.onset[got], ax, ay)) > max_dev
    out = idx.copy()
    out[got[far]] = -1
    return out


def _onset_chroma(onset, pitch, t0: float, hop: float, frames: int) -> np.ndarray:
    """[frames, 13] unit rows: pitch-class counts of onsets per frame (+ a 'silent' bin)."""
    f = np.clip(((onset - t0) / hop).astype(np.int64), 0, frames - 1)
    feat = np.zeros((frames, 13))
    np.add.at(feat, (f, pitch % 12), 1.0)
    feat[:-1] += 0.5 * feat[1:]  # smear one frame so near-boundary onsets still overlap
    feat[:, 12] = feat[:, :12].sum(1) == 0
    return feat / np.linalg.norm(feat, axis=1, keepdims=True)


def dtw_anchors(score: midi.Notes, perf: midi.Notes, max_frames: int = 3000):
    """Coarse (score ms, perf ms) anchors from DTW over onset chroma frames (no annotations).

    Score time is first stretched to the performance's length; steps (1,1), (1,2), (2,1) keep
    the local tempo ratio within [1/2, 2] and let each row depend only on earlier rows, so the
    recursion is vectorised per row.  The frame hop grows with the piece (<= max_frames rows).
    """
    s0, p0 = float(score.onset.min()), float(perf.onset.min())
    s_span = max(float(score.onset.max()) - s0, 1.0)
    p_span = max(float(perf.onset.max()) - p0, 1.0)
    hop = max(200.0, p_span / max_frames)
    ratio = p_span / s_span
    n_p = int(p_span // hop) + 1
    n_s = int(s_span * ratio // hop) + 1
    cost = 1.0 - (
        _onset_chroma((score.onset - s0) * ratio, score.pitch, 0.0, hop, n_s)
        @ _onset_chroma(perf.onset, perf.pitch, p0, hop, n_p).T
    ).astype(np.float32)
    acc = np.full((n_s, n_p), np.inf, dtype=np.float32)
    back = np.zeros((n_s, n_p), dtype=np.int8)  # 0: (1,1)  1: (2,1)  2: (1,2)
    acc[0, 0] = cost[0, 0]
    for i in range(1, n_s):
        cand = np.full((3, n_p), np.inf, dtype=np.float32)
        cand[0, 1:] = acc[i - 1, :-1]
        if i >= 2:
            cand[1, 1:] = acc[i - 2, :-1]
        cand[2, 2:] = acc[i - 1, :-2]
        back[i] = np.argmin(cand, axis=0)
        acc[i] = cost[i] + cand[back[i], np.arange(n_p)]
    i, j, path = n_s - 1, n_p - 1, []
    if not np.isfinite(acc[i, j]):  # lengths too different for the step set: one line
        return np.array([s0, s0 + s_span]), np.array([p0, p0 + p_span])
    while i > 0 or j > 0:
        path.append((i, j))
        di, dj = ((1, 1), (2, 1), (1, 2))[back[i, j]]
        i, j = i - di, j - dj
    path.append((0, 0))
    ij = np.array(path[::-1], dtype=float)
    return monotone_anchors(s0 + (ij[:, 0] + 0.5) * hop / ratio, p0 + (ij[:, 1] + 0.5) * hop)


def auto_align(
    score: midi.Notes,
    perf: midi.Notes,
    score_beats=None,
    perf_beats=None,
) -> tuple[np.ndarray, str]:
    """(perf index per score note or -1, warp used: 'beats' | 'dtw').

    Beat annotations (ms) are used when both are given with equal counts (they correspond one
    to one); otherwise a coarse DTW over onset chroma gives the first warp.  Both are refined
    by `refine` with narrowing gates.
    """
    idx = np.full(len(score), -1, dtype=np.int64)
    if (
        score_beats is not None
        and perf_beats is not None
        and len(score_beats) == len(perf_beats)
        and len(score_beats) >= 2
    ):
        ax, ay = monotone_anchors(score_beats, perf_beats)
        seg = np.clip(np.searchsorted(ax, score.onset, side="right") - 1, 0, max(len(ax) - 2, 0))
        beat_ms = np.diff(ay)[seg] if len(ax) > 1 else np.full(len(score), 500.0)
        gate1 = np.clip(0.4 * beat_ms, 60.0, 400.0)
        idx, how = refine(score, perf, idx, ax, ay, gates=(gate1, 80.0)), "beats"
    else:
        ax, ay = dtw_anchors(score, perf)
        hop = float(np.median(np.diff(ay))) if len(ay) > 1 else 200.0
        idx, how = refine(score, perf, idx, ax, ay, gates=(max(2 * hop, 400.0), 150.0, 80.0)), "dtw"
    return drop_outliers(score, perf, idx), how


def score_anchors(score: midi.Notes, match: Match, min_block: int = 4):
    """(match beat, score ms) anchors from the two scores alone: the longest common
    subsequence of their pitch sequences in (onset, pitch) order, blocks >= min_block.
    Unlike the bridge through the performance this sees a section one score repeats and the
    other does not (e.g. an exposition repeat in ``midi_score.mid`` the pianist skipped)."""
    order = np.lexsort((match.snote_pitch, match.snote_beat))
    sm = difflib.SequenceMatcher(
        None, match.snote_pitch[order].tolist(), score.pitch.tolist(), autojunk=False
    )
    blocks = [b for b in sm.get_matching_blocks() if b.size >= min_block]
    ia = np.concatenate([np.arange(b.a, b.a + b.size) for b in blocks] + [np.zeros(0, int)])
    ib = np.concatenate([np.arange(b.b, b.b + b.size) for b in blocks] + [np.zeros(0, int)])
    return match.snote_beat[order][ia], score.onset[ib].astype(float)


def bridge_anchors(score: midi.Notes, n_perf: int, match: Match, q: np.ndarray, auto: np.ndarray):
    """(match beat, score ms) anchors bridged through the performance: a match score note whose
    performed note (``q``) the automatic aligner paired with a same-pitch score note."""
    score_of_perf = np.full(n_perf, -1, dtype=np.int64)
    score_of_perf[auto[auto >= 0]] = np.flatnonzero(auto >= 0)
    j = np.where(q >= 0, score_of_perf[np.maximum(q, 0)], -1)
    ok = j >= 0
    ok[ok] = score.pitch[j[ok]] == match.snote_pitch[ok]
    return match.snote_beat[ok], score.onset[j[ok]]


def _pairs_through(score, perf, match, q, auto, anchors) -> dict:
    """Match pairs located in the score through one (match beat -> score ms) map, outliers
    dropped, leftovers filled from the automatic pairs, then one tight pass."""
    bx, by = monotone_anchors(*anchors)
    ms_per_beat = np.median(np.diff(by) / np.diff(bx)) if len(bx) > 1 else 500.0
    step = _local_step(match.snote_beat, bx, by) if len(bx) > 1 else ms_per_beat
    gate = 10.0 + 0.3 * np.clip(step, 0.25 * ms_per_beat, 4 * ms_per_beat)
    s2j = assign_by_pitch(
        match.snote_pitch, warp(match.snote_beat, bx, by), score.pitch, score.onset, gate
    )
    from_file = np.full(len(score), -1, dtype=np.int64)
    pair = (s2j >= 0) & (q >= 0)
    from_file[s2j[pair]] = q[pair]
    # a match pair far off the warp through the others is wrong (broken alignments exist);
    # then fill from the automatic pairs whose both notes are still free, then one tight pass
    idx = drop_outliers(score, perf, from_file)
    take = (idx < 0) & (auto >= 0)
    take[take] = ~np.isin(auto[take], idx[idx >= 0])
    idx[take] = auto[take]
    if (idx >= 0).sum() >= 2:
        ax, ay = monotone_anchors(score.onset[idx >= 0], perf.onset[idx[idx >= 0]])
        idx = drop_outliers(score, perf, refine(score, perf, idx, ax, ay, gates=(80.0,)))
    return {
        "idx": idx,
        "from_match": (idx >= 0) & (idx == from_file),
        "snotes_located": float((s2j >= 0).mean()),
    }


def match_align(
    score: midi.Notes,
    perf: midi.Notes,
    match: Match,
    score_beats=None,
    perf_beats=None,
    beat_anchors=None,
) -> dict:
    """Pairs from a match file, then the automatic aligner on the leftovers.

    Match score notes are located in ``midi_score.mid`` through a (match beat -> score ms)
    map fitted two ways: bridged through the performance by the automatic pairs, and from the
    two scores alone (`score_anchors`); the way that pairs more notes wins (ties: the bridge).
    On ASAP the score-only map wins where the two scores differ by a repeat (e.g.
    ``Rachmaninoff/Preludes_op_32/10/FONG08``: 1,004 -> 2,225 of 2,723 notes paired).
    ``beat_anchors`` = (match beats, score ms) replaces both (e.g. to evaluate the automatic
    aligner against a performance-independent map).

    Returns {'idx': perf index per score note (-1 unpaired), 'from_match': bool mask of pairs
    taken from the match file, 'snotes_located': fraction of match score notes found in the
    score, 'perf_located': fraction of match performed notes found in the performance MIDI,
    'located_by': 'performance' | 'scores' | 'given', 'pairs_in_file' / 'snotes_in_file': the
    match file's own pairs and score notes (their ratio is the share of its score notes the
    annotators found performed), 'auto': the automatic aligner's own result, 'warp': its warp}.
    """
    perf_of = assign_by_pitch(
        match.perf_pitch, match.perf_onset, perf.pitch, perf.onset, PERF_GATE_MS
    )
    auto, how = auto_align(score, perf, score_beats, perf_beats)
    has = match.snote_perf >= 0
    q = np.full(len(match.snote_beat), -1, dtype=np.int64)
    q[has] = perf_of[match.snote_perf[has]]
    if beat_anchors is not None:
        res = {**_pairs_through(score, perf, match, q, auto, beat_anchors), "located_by": "given"}
    else:
        bridge = bridge_anchors(score, len(perf), match, q, auto)
        res = {**_pairs_through(score, perf, match, q, auto, bridge), "located_by": "performance"}
        scores = score_anchors(score, match)
        alt = _pairs_through(score, perf, match, q, auto, scores) if len(scores[0]) > 1 else None
        if alt is not None and (alt["idx"] >= 0).sum() > (res["idx"] >= 0).sum():
            res = {**alt, "located_by": "scores"}
    return {
        **res,
        "pairs_in_file": int(has.sum()),
        "snotes_in_file": len(has),
        "auto": auto,
        "warp": how,
        "perf_located": float((perf_of >= 0).mean()) if len(perf_of) else 1.0,
    }
