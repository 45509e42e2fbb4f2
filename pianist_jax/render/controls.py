"""A musician's controls over a rendering: how much expression, tempo, dynamics, which pedal.

They work note by note on a performance and the score it was rendered from. The two are
note-aligned (note i of the rendering performs score note i, in the score's order), so
"expressiveness 0.5" can mean: every note halfway between the score and the performance.

- expressiveness x: timing, durations, velocities and pedal interpolate between the score
  (x = 0, exactly) and the performance (x = 1, exactly); x > 1 exaggerates the deviations.
  Timing interpolates each inter-onset interval geometrically around the performance's
  overall tempo, so x = 0.5 keeps half the rubato, not half a tempo change.
- tempo t: the performance t times as fast (rubato kept).
- dynamics d: velocity deviations from the piece's mean scaled by d. Scaled integers leave
  gaps (d = 2 gives only every other value), so for d > 1 each note is also moved by up to
  (d - 1) / 2 by a fixed low-discrepancy sequence over the notes: the velocity histogram stays
  smooth, the result is deterministic, and no note moves past a neighbour value's range.
- pedal: the model's, none, or the score's own (its pedal marks, placed on the performance's
  clock). Under `expressiveness` the pedal's depth interpolates too, so where the score has no
  pedal the model's (binary) pedal is kept from x = 0.5 up.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pianist_jax import midi, tokenizer

PEDAL_CHOICES = ("model", "none", "score")
RANGES = {"expressiveness": (0, 4), "tempo": (0.25, 4), "dynamics": (0, 4)}  # inclusive


@dataclasses.dataclass(frozen=True)
class Controls:
    expressiveness: float = 1.0
    tempo: float = 1.0
    dynamics: float = 1.0
    pedal: str = "model"

    def __post_init__(self):
        for name, (lo, hi) in RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:  # also rejects NaN
                raise ValueError(f"{name} must be between {lo} and {hi}, not {value}")
        if self.pedal not in PEDAL_CHOICES:
            raise ValueError(f"pedal must be one of {', '.join(PEDAL_CHOICES)}, not {self.pedal!r}")

    @property
    def identity(self) -> bool:
        return (self.expressiveness, self.tempo, self.dynamics, self.pedal) == (1, 1, 1, "model")


GOLDEN = (5**0.5 - 1) / 2


def scale_dynamics(velocity: np.ndarray, d: float) -> np.ndarray:
    """Velocities (int64, 1-127) with their deviations from the mean scaled by ``d``."""
    velocity = np.asarray(velocity, np.float64)
    if d == 1 or not len(velocity):
        return np.clip(np.rint(velocity), 1, 127).astype(np.int64)
    mean = velocity.mean()
    fill = max(d - 1, 0) * ((np.arange(len(velocity)) * GOLDEN) % 1.0 - 0.5)
    return np.clip(np.rint(mean + d * (velocity - mean) + fill), 1, 127).astype(np.int64)


def _iois(onset: np.ndarray) -> np.ndarray:
    return np.diff(onset.astype(np.float64), prepend=0.0)


def _pedal_samples(notes: midi.Notes) -> np.ndarray:
    """[N, 4] CC64 values where the tokenizer samples the pedal, on `notes`' own clock."""
    gap = np.append(np.diff(notes.onset), tokenizer.MAX_IOI_MS)
    return tokenizer.pedal_at(notes, tokenizer.pedal_sample_points(notes.onset, gap))


def performance_times(performance: midi.Notes, score: midi.Notes, score_ms) -> np.ndarray:
    """Times on the score's clock -> the performance's: piecewise linear through the first
    note of each distinct score onset (kept monotone), the last piece extended."""
    s_on, first = np.unique(score.onset, return_index=True)
    p_on = np.maximum.accumulate(performance.onset[first].astype(np.float64))
    score_ms = np.asarray(score_ms, np.float64)
    if len(s_on) == 1:
        return p_on[0] + (score_ms - s_on[0])
    when = np.interp(score_ms, s_on, p_on)
    slope = (p_on[-1] - p_on[-2]) / max(s_on[-1] - s_on[-2], 1)
    late = score_ms > s_on[-1]
    when[late] = p_on[-1] + slope * (score_ms[late] - s_on[-1])
    return when


def blend(performance: midi.Notes, score: midi.Notes, x: float) -> midi.Notes:
    """Between the score (x = 0) and the performance (x = 1), note by note (module docstring)."""
    if x == 1:
        return performance
    if x == 0:
        return score
    s_ioi, p_ioi = _iois(score.onset), _iois(performance.onset)
    timed = (s_ioi > 0) & (p_ioi > 0)
    overall = p_ioi[timed].sum() / s_ioi[timed].sum() if timed.any() else 1.0
    scale = overall ** min(x, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ioi = np.where(
            timed, s_ioi * scale * (p_ioi / (overall * s_ioi)) ** x, np.maximum(x * p_ioi, 0)
        )
        s_dur = np.maximum(score.duration, 1).astype(np.float64)
        p_dur = np.maximum(performance.duration, 1).astype(np.float64)
        duration = s_dur * scale * (p_dur / (overall * s_dur)) ** x
    # exaggerated gaps never close: a repeated note stays a note (the renderer's floor)
    ioi = np.where(s_ioi > 0, np.maximum(ioi, tokenizer.MIN_RENDER_IOI_MS), ioi)
    onset = np.rint(np.cumsum(ioi)).astype(np.int64)
    velocity = np.rint(score.velocity + x * (performance.velocity - score.velocity))
    s_pedal = _pedal_samples(score)
    pedal = np.rint(s_pedal + x * (_pedal_samples(performance) - s_pedal))
    pedal_ms, pedal_value = tokenizer.pedal_changes(onset, np.clip(pedal, 0, 127).astype(np.int64))
    return midi.Notes(
        onset=onset,
        offset=onset + np.maximum(np.rint(duration), 1).astype(np.int64),
        pitch=performance.pitch,
        velocity=np.clip(velocity, 1, 127).astype(np.int64),
        pedal_ms=pedal_ms,
        pedal_value=pedal_value,
    )


def score_pedal(performance: midi.Notes, score: midi.Notes) -> tuple[np.ndarray, np.ndarray]:
    """The score's CC64 events moved onto the performance's clock."""
    when = performance_times(performance, score, score.pedal_ms)
    return np.maximum(np.rint(when), 0).astype(np.int64), score.pedal_value.copy()


def apply(performance: midi.Notes, score: midi.Notes, controls: Controls) -> midi.Notes:
    """The performance with the controls applied (the same object when they change nothing)."""
    if len(performance) != len(score) or not np.array_equal(performance.pitch, score.pitch):
        raise ValueError("performance and score must be note-aligned (same pitches, same order)")
    if controls.identity:
        return performance
    notes = blend(performance, score, controls.expressiveness)
    velocity = scale_dynamics(notes.velocity, controls.dynamics)
    if controls.tempo != 1:
        onset = np.rint(notes.onset / controls.tempo).astype(np.int64)
        notes = dataclasses.replace(
            notes,
            onset=onset,
            offset=np.maximum(np.rint(notes.offset / controls.tempo).astype(np.int64), onset + 1),
            pedal_ms=np.rint(notes.pedal_ms / controls.tempo).astype(np.int64),
        )
    pedal_ms, pedal_value = notes.pedal_ms, notes.pedal_value
    if controls.pedal == "none":
        pedal_ms, pedal_value = np.zeros(0, np.int64), np.zeros(0, np.int64)
    elif controls.pedal == "score":
        pedal_ms, pedal_value = score_pedal(notes, score)
    return dataclasses.replace(notes, velocity=velocity, pedal_ms=pedal_ms, pedal_value=pedal_value)
