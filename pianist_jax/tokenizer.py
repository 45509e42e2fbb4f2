"""The unified 8-tokens-per-note representation (PAPER_NOTES §1): the only place ids live.

Each note is `[Pitch, IOI, Velocity, Duration, Pedal1, Pedal2, Pedal3, Pedal4]`; ids are laid
out exactly as in the reference implementation so checkpoints are interchangeable.  Encoding
and decoding are vectorised with numpy and produce the reference's ids bit for bit.
"""

from __future__ import annotations

import numpy as np

from pianist_jax import midi

TOKENIZER_VERSION = "pt-unified-8/1"

PAD, MASK, BOS, EOS, PLAY = 0, 1, 2, 3, 4
PITCH_START = 5  # pitch 0..127      -> 5..132
VELOCITY_START = 133  # velocity 0..127 -> 133..260
TIME_START = 261  # ms 0..4999 (IOI and duration) -> 261..5260
PEDAL_START = 5261  # CC64 value 0..127 -> 5261..5388
VOCAB_SIZE = 5389
TOKENS_PER_NOTE = 8
MAX_IOI_MS = 4990  # IOI ids stop at 261 + 4990; also the pedal gap assumed after the last note
MIN_RENDER_IOI_MS = 5  # a rendering keeps IOI >= 5 ms where the score's IOI is > 0

SLOT_NAMES = ("pitch", "ioi", "velocity", "duration", "pedal1", "pedal2", "pedal3", "pedal4")
# token slot -> kind, as sampling settings and model switches name them (the pitch has none)
SLOT_KIND = (None, "ioi", "velocity", "duration", "pedal", "pedal", "pedal", "pedal")
assert len(SLOT_NAMES) == len(SLOT_KIND) == TOKENS_PER_NOTE
PITCH, IOI, VELOCITY, DURATION = 0, 1, 2, 3
# Valid id range [lo, hi) of each slot: clamp when encoding, mask when sampling.
SLOT_RANGES = np.array(
    [
        (PITCH_START, PITCH_START + 128),
        (TIME_START, TIME_START + MAX_IOI_MS + 1),
        (VELOCITY_START, VELOCITY_START + 128),
        (TIME_START, TIME_START + 5000),
    ]
    + [(PEDAL_START, PEDAL_START + 128)] * 4,
    dtype=np.int64,
)
# What a rendering may sample per slot: the valid ranges, less velocity 0. A MIDI note_on with
# velocity 0 is a note_off, so no performed note has it (the bundled model still drew it for 2
# of 2,311 notes of a Chopin etude, which the MIDI writer then had to play at velocity 1).
RENDER_RANGES = SLOT_RANGES.copy()
RENDER_RANGES[VELOCITY, 0] += 1
_SLOT_OFFSET = np.array([PITCH_START, TIME_START, VELOCITY_START, TIME_START] + [PEDAL_START] * 4)


def pedal_at(notes: midi.Notes, times_ms: np.ndarray) -> np.ndarray:
    """Last CC64 value at or before each (integer or fractional) time; 0 before any event."""
    values = np.concatenate([[0], notes.pedal_value])  # index 0: "no event yet"
    return values[np.searchsorted(notes.pedal_ms, np.floor(times_ms), side="right")]


def pedal_sample_points(onset: np.ndarray, gap_next: np.ndarray) -> np.ndarray:
    """[N, 4] times floor(onset + gap * k / 4), k = 0..3: where encoding samples the pedal and
    decoding places it, so the two always agree (exact integer arithmetic)."""
    return onset[:, None] + (gap_next[:, None] * np.arange(4)) // 4


def pedal_changes(onset: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CC64 events of notes at `onset` whose 4 pedal samples are `values [N, 4]`: placed at the
    sample points (the last note's gap counts as MAX_IOI_MS), repeats of a value dropped."""
    gap_next = np.append(np.diff(onset), MAX_IOI_MS)
    when = pedal_sample_points(onset, gap_next).reshape(-1)
    value = np.asarray(values).reshape(-1)
    changed = value != np.concatenate([[0], value[:-1]])
    return when[changed], value[changed]


def encode_notes(notes: midi.Notes) -> np.ndarray:
    """Normalised notes -> int32 ids of shape [8 * N]."""
    onset = notes.onset.astype(np.int64)
    ioi = np.diff(onset, prepend=0)
    gap_next = np.append(ioi[1:], MAX_IOI_MS)  # pedal is sampled over the *raw* next gap
    # The last integer-ms event at or before onset + gap*k/4 is the last one at or before
    # its floor.
    sample = pedal_sample_points(onset, gap_next)
    raw = (
        np.concatenate(
            [
                np.stack([notes.pitch, ioi, notes.velocity, notes.duration], 1),
                pedal_at(notes, sample),
            ],
            axis=1,
        )
        + _SLOT_OFFSET
    )
    ids = np.clip(raw, SLOT_RANGES[:, 0], SLOT_RANGES[:, 1] - 1)
    return ids.reshape(-1).astype(np.int32)


def encode_file(path) -> np.ndarray:
    """The normalised token ids of a MIDI file (length 8 x notes); the reference's ids."""
    return encode_notes(midi.read_midi(path))


def _check_ids(ids: np.ndarray, name: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size % TOKENS_PER_NOTE:
        raise ValueError(f"{name}: length {ids.size} is not a multiple of {TOKENS_PER_NOTE}")
    return ids.reshape(-1, TOKENS_PER_NOTE)


def _stretch_capped_gaps(ioi: np.ndarray, duration: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """Lengthen capped IOIs so every note ends at or before the next onset of its pitch.

    Without this, a note whose duration was capped at 4999 ms can overrun a same-pitch note
    whose gap was capped at 4990 ms, and the reader would cut it (the reference decoder has
    this defect).  Only capped gaps move, each by the smallest amount that suffices.
    """
    capped = np.flatnonzero(ioi >= MAX_IOI_MS)
    if not len(capped):
        return ioi
    ioi = ioi.copy()
    n = len(ioi)
    by_pitch = np.lexsort((np.arange(n), pitch))
    nxt = np.full(n, -1)
    same = pitch[by_pitch[1:]] == pitch[by_pitch[:-1]]
    nxt[by_pitch[:-1][same]] = by_pitch[1:][same]
    for i in capped.tolist():
        held = np.flatnonzero(nxt[:i] >= i)  # notes before i whose next same-pitch note is >= i
        if not len(held):
            continue
        onset = np.cumsum(ioi)
        # onset of nxt[k] moves with onset[i]; it must not come before the end of k
        need = onset[held] + duration[held] - (onset[nxt[held]] - onset[i])
        ioi[i] += max(0, int(need.max() - onset[i]))
    return ioi


def decode_ids(ids, score_ids=None) -> midi.Notes:
    """Ids -> notes + CC64 events (ms). Ids outside a slot's range are clamped into it.

    With `score_ids` (the score a rendering was made from), an IOI the score has as > 0 is
    kept >= 5 ms so chords and runs do not collapse.  Pedal values are placed at the floor of
    the 4 sample points (the reference rounds, which can land 1 ms after the sample point),
    so encode(decode(ids)) == ids; repeats of the previous value are dropped.  A capped IOI
    (4990 ms means "4990 ms or more") is stretched just enough that no held note is cut by a
    later note of its pitch, which keeps that round trip exact too.
    """
    tok = _check_ids(ids, "ids")
    tok = np.clip(tok, SLOT_RANGES[:, 0], SLOT_RANGES[:, 1] - 1) - _SLOT_OFFSET
    ioi = tok[:, IOI]
    if score_ids is not None:
        ref = _check_ids(score_ids, "score_ids")
        if len(ref) != len(tok):
            raise ValueError(f"score_ids has {len(ref)} notes but ids has {len(tok)}")
        ioi = np.where(ref[:, IOI] - TIME_START > 0, np.maximum(ioi, MIN_RENDER_IOI_MS), ioi)
    ioi = _stretch_capped_gaps(ioi, tok[:, DURATION], tok[:, PITCH])
    onset = np.cumsum(ioi)
    pedal_ms, pedal_value = pedal_changes(onset, tok[:, 4:])
    return midi.Notes(
        onset=onset,
        offset=onset + tok[:, DURATION],
        pitch=tok[:, PITCH],
        velocity=tok[:, VELOCITY],
        pedal_ms=pedal_ms,
        pedal_value=pedal_value,
    )


def decode_to_midi(ids, out_path, score_ids=None) -> midi.Notes:
    """Write ids as a ms-timed MIDI file (500 tpb, 120 BPM); returns the decoded notes."""
    notes = decode_ids(ids, score_ids)
    midi.write_midi(notes, out_path)
    return notes
