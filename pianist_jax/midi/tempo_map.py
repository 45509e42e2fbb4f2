"""Expressive tempo mapping (PAPER_NOTES §4): a ms-timed rendering re-expressed on the score's grid.

A rendering is a `midi.Notes` in ms; a DAW wants notes on the score's beats and the expression
in a tempo track.  We estimate a tempo curve from score vs rendered onsets and write every note
and CC64 event in ticks of it: the file re-reads (`midi.read_midi`) to the rendering's exact
milliseconds while the notes sit on, or next to, the score's beats.

Algorithm (the choices the notes leave open are fixed here):
  * score beats come from the score file's own ticks: each `read_midi(score)` note gets its onset
    tick exactly, by running the reader's normalisation with the note index carried along;
  * anchors: score onsets are grouped when closer than `group_ms` (20 ms) to the group's first
    onset, in score time; a group's anchor sits at its most common score tick (ties: earliest)
    and its rendered time is the MEDIAN rendered onset of the notes at that tick;
  * anchors must strictly increase in beats and in rendered ms: we keep the longest such chain
    and drop the others; then inner anchors with an out-of-range tempo on both sides (a wrong
    match) go too (`info['n_anchors_dropped']` counts both);
  * the file needs time 0 at tick 0, so a virtual anchor (beat 0, 0 ms) starts the map.  To keep
    a sane tempo before the first note the score's beat axis may be shifted by whole bars of its
    first time signature (`info['shift_beats']`; time/key signatures move with it, so they keep
    their place relative to the notes); anchors at beat <= 0 after the shift give way to it;
  * tempo per segment = ms per beat between consecutive anchors, clamped to [min_bpm, max_bpm]
    (20-400 BPM), rounded to whole microseconds with the rounding error carried into the next
    segment so it never accumulates; after the last anchor the last tempo continues;
  * events are placed by inverting the *written* (clamped, rounded) tempo map, so clamping only
    moves notes off their score beat (`info['max_grid_error_beats']`), never off their time;
  * ticks per beat: the smallest multiple of the score's that is >= 480 and keeps one tick under
    0.9 ms at the slowest allowed tempo, so every event reads back to its exact millisecond;
  * no anchor at all, or only one (a single note / one chord): constant 120 BPM, no shift.
Pitch comes from the score (for notes that have a score note), velocity from the rendering.
"""

from __future__ import annotations

import bisect
import difflib
import os
import warnings
from dataclasses import dataclass

import mido
import numpy as np

from pianist_jax import midi
from pianist_jax.midi import events as midi_events

MIN_BPM, MAX_BPM = 20.0, 400.0
GROUP_MS = 20.0
FALLBACK_US = 500_000  # 120 BPM
MIN_TICKS_PER_BEAT = 480
MAX_TICK_MS = 0.9  # longest tick at the slowest tempo: half a tick stays < 0.5 ms
SIGNATURES = ("time_signature", "key_signature")


class TempoMapWarning(UserWarning):
    """The rendering needed a repair (negative times, velocities, an automatic alignment)."""


@dataclass(frozen=True)
class ScoreGrid:
    """The score as `read_midi` sees it, plus each note's onset in the file's own ticks."""

    notes: midi.Notes
    tick: np.ndarray  # int64 [N] onset tick of each note of `notes`
    ticks_per_beat: int
    signatures: list  # [(tick, MetaMessage)] time and key signatures, time-ordered


@dataclass(frozen=True)
class TempoMapped:
    """Tick-level result: tempo map, signatures and notes/pedal in output ticks."""

    ticks_per_beat: int
    tempos: list  # [(tick, microseconds per beat)], first at tick 0
    signatures: list  # [(tick, MetaMessage)]
    notes: midi.Notes  # onset/offset/pedal_ms in output ticks; overlaps resolved
    rendering: midi.Notes  # the same notes in ms, exactly as the file should read back
    info: dict


def read_score_grid(path) -> ScoreGrid:
    """Read a score MIDI file and find the tick of every normalised note's onset."""
    notes = midi.read_midi(path)
    tpb, ev = midi.read_events(path)
    pairs = midi_events.pair_notes(ev)
    keep = pairs.channel != 9
    start, end = pairs.start[keep], pairs.end[keep]
    n = len(start)
    ms = np.rint(
        1000.0
        * midi.tick_to_seconds(np.concatenate([start, end]), ev.tempo_changes, tpb, ev.max_tick)
    ).astype(np.int64)
    carried = midi.normalise(
        ms[:n],
        ms[n:],
        pairs.pitch[keep],
        np.arange(n),  # index rides
        pairs.order[keep],
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
    )
    if not (
        np.array_equal(carried.onset, notes.onset)
        and np.array_equal(carried.offset, notes.offset)
        and np.array_equal(carried.pitch, notes.pitch)
    ):
        raise RuntimeError(
            f"{path}: tempo_map.read_score_grid no longer reproduces "
            "midi.read_midi's normalisation; update it alongside midi.py"
        )
    tick = start[carried.velocity]
    return ScoreGrid(notes, tick, tpb, _signatures(path))


def _signatures(path) -> list:
    mf = midi.parse_midi(path)
    found = []
    for track in mf.tracks:
        tick = 0
        for msg in track:
            tick += msg.time
            if msg.type in SIGNATURES:
                found.append((tick, msg.copy(time=0)))
    found.sort(key=lambda x: x[0])  # stable: same-tick order follows the tracks
    return found


def default_correspondence(score_pitch: np.ndarray, rendered_pitch: np.ndarray) -> np.ndarray:
    """Note i <-> score note i when the pitch sequences are equal; else align them (difflib).

    difflib matches the longest common runs of pitches; unmatched rendered notes get -1.
    """
    if np.array_equal(score_pitch, rendered_pitch):
        return np.arange(len(rendered_pitch), dtype=np.int64)
    corr = np.full(len(rendered_pitch), -1, dtype=np.int64)
    sm = difflib.SequenceMatcher(
        None, score_pitch.tolist(), rendered_pitch.tolist(), autojunk=False
    )
    for a, b, size in sm.get_matching_blocks():
        corr[b : b + size] = np.arange(a, a + size)
    return corr


def _ms_to_ticks(ms, knot_tick, knot_ms, ms_per_tick) -> np.ndarray:
    """Invert a piecewise-linear tick -> ms map (last piece extends); nearest tick, >= 0."""
    ms = np.asarray(ms, dtype=np.float64)
    seg = np.clip(np.searchsorted(knot_ms, ms, side="right") - 1, 0, len(knot_ms) - 1)
    tick = knot_tick[seg] + (ms - knot_ms[seg]) / ms_per_tick[seg]
    return np.maximum(np.rint(tick), 0).astype(np.int64)


def _anchors(
    grid: ScoreGrid, onset: np.ndarray, corr: np.ndarray, group_ms: float, mspb_range: tuple
):
    """(score ticks, rendered ms) of the anchors, strictly increasing in both; and #dropped."""
    s_on = grid.notes.onset
    group, g, first = np.zeros(len(s_on), dtype=np.int64), 0, s_on[0]  # read_midi: >= 1 note
    for i in range(1, len(s_on)):
        if s_on[i] - first >= group_ms:  # a new group starts group_ms after the last start
            first, g = s_on[i], g + 1
        group[i] = g
    r_idx = np.flatnonzero(corr >= 0)
    s_idx = corr[r_idx]
    order = np.argsort(group[s_idx], kind="stable")
    r_idx, s_idx = r_idx[order], s_idx[order]
    bounds = np.flatnonzero(np.diff(group[s_idx])) + 1
    ticks, times = [], []
    for rs, ss in zip(np.split(r_idx, bounds), np.split(s_idx, bounds)):
        if not len(ss):
            continue
        g_ticks, g_times = grid.tick[ss], onset[rs]
        values, counts = np.unique(g_ticks, return_counts=True)
        best = values[np.argmax(counts)]  # np.unique sorts: ties go to the earliest tick
        ticks.append(int(best))
        times.append(float(np.median(g_times[g_ticks == best])))
    chain = _longest_increasing(np.array(ticks), np.array(times))
    n_found = len(times)
    ticks, times = np.array(ticks, np.int64)[chain], np.array(times)[chain]
    keep = _without_spikes(ticks / grid.ticks_per_beat, times, mspb_range)
    return ticks[keep], times[keep], n_found - int(keep.sum())


def _without_spikes(beats: np.ndarray, ms: np.ndarray, mspb_range: tuple) -> np.ndarray:
    """Mask dropping inner anchors whose segments on BOTH sides have an out-of-range tempo.

    A wrongly matched note makes such a spike (too slow into it, too fast out of it); a real
    fermata or rush makes only one side extreme and stays.  Repeated until none is left.
    """
    keep = np.ones(len(ms), dtype=bool)
    for _ in range(100):
        idx = np.flatnonzero(keep)
        mspb = np.diff(ms[idx]) / np.diff(beats[idx])
        bad = (mspb < mspb_range[0]) | (mspb > mspb_range[1])
        spike = bad[:-1] & bad[1:]
        if not spike.any():
            break
        # drop every other flagged anchor of a run, so a spike's neighbour is judged again
        first_of_run = spike & ~np.append(False, spike[:-1])
        keep[idx[1:-1][first_of_run]] = False
    return keep


def _longest_increasing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Indices (ascending) of a longest chain strictly increasing in both a and b."""
    order = np.lexsort((-b, a))  # equal a: larger b first, so a chain never takes two of them
    tails, tail_idx = [], []  # b and index of the smallest-ending chain of each length
    prev = np.full(len(a), -1)
    for i in order.tolist():
        k = bisect.bisect_left(tails, b[i])
        if k == len(tails):
            tails.append(b[i])
            tail_idx.append(i)
        else:
            tails[k], tail_idx[k] = b[i], i
        prev[i] = tail_idx[k - 1] if k else -1
    chain, i = [], tail_idx[-1] if tail_idx else -1
    while i >= 0:
        chain.append(i)
        i = prev[i]
    return np.array(sorted(chain), np.int64)


def _bar_beats(grid: ScoreGrid, tick: int) -> float:
    """Bar length in quarter notes of the time signature in force at `tick` (4/4 if none)."""
    sigs = [m for t, m in grid.signatures if m.type == "time_signature" and t <= tick]
    return sigs[-1].numerator * 4.0 / sigs[-1].denominator if sigs else 4.0


def _tempo_segments(knot_tick, target_ms, tpb, min_mspb, max_mspb):
    """Integer-microsecond tempo per segment, error carried forward; actual ms at each knot."""
    us, actual, clamped = [], [0.0], 0
    for k in range(len(knot_tick) - 1):
        beats = (knot_tick[k + 1] - knot_tick[k]) / tpb
        want = (target_ms[k + 1] - actual[k]) / beats
        mspb = min(max(want, min_mspb), max_mspb)
        clamped += abs(mspb - want) > 1e-6
        us.append(int(round(mspb * 1000)))
        actual.append(actual[k] + _ms_per_tick(us[-1], tpb) * (knot_tick[k + 1] - knot_tick[k]))
    us.append(us[-1] if us else FALLBACK_US)  # after the last anchor: the last tempo goes on
    return np.array(us, np.int64), np.array(actual), clamped


def _ms_per_tick(us: int, tpb: int) -> float:
    """Exactly the reader's arithmetic (tick_to_seconds via mido.tempo2bpm), in ms."""
    return 1000.0 * (60 / mido.tempo2bpm(us)) / float(tpb)


def _output_tpb(score_tpb: int, max_mspb: float) -> int:
    need = max(MIN_TICKS_PER_BEAT, max_mspb / MAX_TICK_MS)
    tpb = score_tpb * int(np.ceil(need / score_tpb))
    if tpb > 32767:
        raise ValueError(
            f"min tempo {60000 / max_mspb:.3g} BPM needs {tpb} ticks per beat "
            f"(MIDI allows 32767); raise min_bpm"
        )
    return tpb


def _clean_rendering(path, rendered: midi.Notes, grid: ScoreGrid, corr):
    """Rendered times >= 0, velocities 1..127, correspondence checked; notes use score pitch."""
    if not isinstance(rendered, midi.Notes):
        raise TypeError(f"{path}: rendered must be midi.Notes, got {type(rendered).__name__}")
    if len(rendered) == 0:
        raise ValueError(f"{path}: the rendering has no notes")
    n_score = len(grid.notes)
    if corr is None:
        corr = default_correspondence(grid.notes.pitch, rendered.pitch)
        if not np.array_equal(grid.notes.pitch, rendered.pitch):
            warnings.warn(
                f"{path}: rendering ({len(rendered)} notes) does not have the score's "
                f"{n_score} pitches in order; aligned by pitch sequence "
                f"({int((corr >= 0).sum())} matched)",
                TempoMapWarning,
                stacklevel=3,
            )
    corr = np.asarray(corr, dtype=np.int64)
    if corr.shape != (len(rendered),):
        raise ValueError(
            f"{path}: correspondence needs one entry per rendered note "
            f"({len(rendered)}), got shape {corr.shape}"
        )
    if corr.max(initial=-1) >= n_score or corr.min(initial=-1) < -1:
        raise ValueError(f"{path}: correspondence entries must be -1 or 0..{n_score - 1}")
    times = [rendered.onset, rendered.offset, rendered.pedal_ms]
    n_negative = int(sum((t < 0).sum() for t in times))
    if n_negative:
        warnings.warn(
            f"{path}: {n_negative} negative rendered times clamped to 0 ms",
            TempoMapWarning,
            stacklevel=3,
        )
    n_bad = int(((rendered.velocity < 1) | (rendered.velocity > 127)).sum())
    if n_bad:
        warnings.warn(
            f"{path}: {n_bad} velocities outside 1..127 clipped", TempoMapWarning, stacklevel=3
        )
    pitch = np.where(corr >= 0, grid.notes.pitch[np.maximum(corr, 0)], rendered.pitch)
    onset, offset, pedal_ms = (np.maximum(t, 0) for t in times)
    return (
        midi.Notes(
            onset,
            offset,
            pitch,
            np.clip(rendered.velocity, 1, 127),
            pedal_ms,
            np.clip(rendered.pedal_value, 0, 127),
        ),
        corr,
        n_negative,
    )


def tempo_map_notes(
    score_path,
    rendered: midi.Notes,
    correspondence=None,
    *,
    min_bpm: float = MIN_BPM,
    max_bpm: float = MAX_BPM,
    group_ms: float = GROUP_MS,
) -> TempoMapped:
    """Estimate the tempo map and place every rendered note and pedal event on it (ticks).

    `correspondence[i]` = score note index of rendered note i, or -1 (default: identity when
    the pitch sequences are equal, else `default_correspondence`).  `info`: n_anchors,
    n_anchors_dropped, n_segments_clamped, bpm_min/bpm_max (written tempos), ticks_per_beat,
    shift_beats (quarter notes added to score beats), n_matched/n_unmatched, n_negative_clamped,
    fallback, max/median_grid_error_beats (matched onsets vs their score beat).
    """
    if not 0 < min_bpm < max_bpm:
        raise ValueError(f"need 0 < min_bpm < max_bpm, got {min_bpm}, {max_bpm}")
    grid = read_score_grid(score_path)
    clean, corr, n_negative = _clean_rendering(score_path, rendered, grid, correspondence)
    min_mspb, max_mspb = 60000.0 / max_bpm, 60000.0 / min_bpm
    tpb = _output_tpb(grid.ticks_per_beat, max_mspb)
    scale = tpb // grid.ticks_per_beat
    s_ticks, a_ms, n_dropped = _anchors(grid, clean.onset, corr, group_ms, (min_mspb, max_mspb))
    shift, fallback = 0, None
    if len(s_ticks) >= 2:
        b = s_ticks / grid.ticks_per_beat
        first_mspb = float(np.clip((a_ms[1] - a_ms[0]) / (b[1] - b[0]), min_mspb, max_mspb))
        bar = _bar_beats(grid, int(s_ticks[0]))
        lead = a_ms[0] - b[0] * first_mspb  # when score beat 0 would sound at the first tempo
        bars = max(int(round(lead / (bar * first_mspb))), -int(np.floor(b[0] / bar + 1e-9)))
        shift = int(round(bars * bar * tpb))
        o_ticks = s_ticks * scale + shift
        keep = o_ticks > 0
        knot_tick = np.concatenate([[0], o_ticks[keep]])
        target = np.concatenate([[0.0], a_ms[keep]])
    else:
        fallback = "constant_120_bpm"
        knot_tick, target = np.zeros(1, np.int64), np.zeros(1)
    us, actual, n_clamped = _tempo_segments(knot_tick, target, tpb, min_mspb, max_mspb)
    ms_per_tick = np.array([_ms_per_tick(int(u), tpb) for u in us])

    def to_ticks(ms):
        return _ms_to_ticks(ms, knot_tick, actual, ms_per_tick)

    on_t = to_ticks(clean.onset)
    placed = midi.Notes(
        on_t,
        to_ticks(clean.offset),
        clean.pitch,
        clean.velocity,
        to_ticks(clean.pedal_ms),
        clean.pedal_value,
    )
    matched = corr >= 0
    grid_err = np.abs(on_t[matched] - (grid.tick[corr[matched]] * scale + shift)) / tpb
    bpm = 60e6 / us
    info = {
        "n_anchors": int(len(knot_tick) - 1),
        "n_anchors_dropped": int(n_dropped),
        "n_segments_clamped": int(n_clamped),
        "bpm_min": float(bpm.min()),
        "bpm_max": float(bpm.max()),
        "ticks_per_beat": tpb,
        "shift_beats": shift / tpb,
        "n_matched": int(matched.sum()),
        "n_unmatched": int((~matched).sum()),
        "n_negative_clamped": n_negative,
        "fallback": fallback,
        "max_grid_error_beats": float(grid_err.max(initial=0.0)),
        "median_grid_error_beats": float(np.median(grid_err)) if len(grid_err) else 0.0,
    }
    return TempoMapped(
        tpb,
        list(zip(knot_tick.tolist(), us.tolist())),
        _place_signatures(grid.signatures, scale, shift),
        midi.resolve_same_pitch_overlaps(placed),
        midi.resolve_same_pitch_overlaps(clean),
        info,
    )


def _place_signatures(signatures, scale: int, shift: int) -> list:
    """Score signatures at score tick * scale + shift; ones before tick 0 collapse onto 0."""
    placed: dict = {}
    for tick, msg in signatures:
        out = max(tick * scale + shift, 0)
        placed[(msg.type, out)] = msg  # later one wins at the same tick (as a reader sees)
    return sorted(((t, m) for (_, t), m in placed.items()), key=lambda x: x[0])


def to_midi_file(tm: TempoMapped, track_name: str = "Piano") -> mido.MidiFile:
    """Type-1 file: track 0 tempo + signatures, track 1 notes + CC64 (offs, pedal, ons per tick)."""
    meta = [(t, 0, mido.MetaMessage("set_tempo", tempo=int(u))) for t, u in tm.tempos]
    meta += [(t, 1, m) for t, m in tm.signatures]
    meta.sort(key=lambda x: (x[0], x[1]))
    notes = tm.notes
    n, p = len(notes), len(notes.pedal_ms)
    times = np.concatenate([notes.offset, notes.pedal_ms, notes.onset])
    kind = np.concatenate([np.zeros(n, int), np.ones(p, int), np.full(n, 2)])
    a = np.concatenate([notes.pitch, np.full(p, midi.SUSTAIN_CC), notes.pitch])
    b = np.concatenate([np.zeros(n, np.int64), notes.pedal_value, notes.velocity])
    order = np.lexsort((np.arange(len(times)), kind, times))
    events = []
    for i in order.tolist():
        k, x, y = kind[i], int(a[i]), int(b[i])
        msg = (
            mido.Message("control_change", control=x, value=y, channel=0)
            if k == 1
            else mido.Message("note_on" if k else "note_off", note=x, velocity=y, channel=0)
        )
        events.append((int(times[i]), msg))
    head = [
        (0, mido.MetaMessage("track_name", name=track_name)),
        (0, mido.Message("program_change", program=0, channel=0)),
    ]
    tempo_head = [(0, mido.MetaMessage("track_name", name="Tempo map"))]
    return mido.MidiFile(
        type=1,
        ticks_per_beat=tm.ticks_per_beat,
        tracks=[_track(tempo_head + [(t, m) for t, _, m in meta]), _track(head + events)],
    )


def _track(events) -> mido.MidiTrack:
    track, last = mido.MidiTrack(), 0
    for t, msg in events:
        track.append(msg.copy(time=t - last))
        last = t
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def write_tempo_mapped(
    score_path, rendered: midi.Notes, out_path, correspondence=None, **options
) -> dict:
    """Write the tempo-mapped MIDI file and check it: returns `info` with re-read errors (ms).

    `options` go to `tempo_map_notes` (min_bpm, max_bpm, group_ms).  The check re-reads the
    file with `midi.read_midi` and compares with the rendering as written (score pitches,
    clamped times/velocities, same-pitch overlaps resolved): onset, offset and pedal errors.
    """
    tm = tempo_map_notes(score_path, rendered, correspondence, **options)
    tmp = f"{out_path}.tmp{os.getpid()}"
    to_midi_file(tm).save(tmp)
    os.replace(tmp, out_path)
    want, got = tm.rendering, midi.read_midi(out_path)
    info = dict(tm.info, n_notes_written=len(want), n_notes_reread=len(got))
    if len(got) != len(want) or not np.array_equal(got.pitch, want.pitch):
        raise RuntimeError(
            f"{out_path}: re-read notes differ from the rendering "
            f"({len(got)} vs {len(want)} notes); this is a bug"
        )
    info["max_onset_error_ms"] = int(np.abs(got.onset - want.onset).max())
    info["max_offset_error_ms"] = int(np.abs(got.offset - want.offset).max())
    info["max_pedal_error_ms"] = (
        int(np.abs(got.pedal_ms - want.pedal_ms).max(initial=0))
        if len(got.pedal_ms) == len(want.pedal_ms)
        else None
    )
    return info
