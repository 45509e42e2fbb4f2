"""Tempo-mapped MIDI (PAPER_NOTES §4) must play exactly like the ms rendering it came from."""

from __future__ import annotations

import csv
from pathlib import Path

import mido
import numpy as np
import pytest

from pianist_jax import midi
from pianist_jax.midi import tempo_map
from tests.midi_fixtures import note_track, save

TPB = 480
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _score_file(path) -> Path:
    """3/4 in D major, 100 BPM then 75 BPM from bar 5; melody + chords; pedal; 4/4 + F later."""
    bar = 3 * TPB
    notes = []
    for b in range(8):
        for beat in range(3):
            t = b * bar + beat * TPB
            notes.append((t, t + TPB - 20, 72 + (b + beat) % 7, 80))
            if beat == 0:  # a chord on every downbeat
                notes += [(t, t + bar - 30, p, 60) for p in (50, 54, 57)]
        notes.append((b * bar + 2 * TPB + TPB // 2, b * bar + 3 * TPB - 10, 79, 70))  # eighth
    notes += [(8 * bar, 8 * bar + 4 * TPB, p, 70) for p in (50, 57, 62, 66)]  # final chord
    pedal = [
        (b * bar + 10, mido.Message("control_change", control=64, value=v))
        for b in range(8)
        for v in (127,)
    ]
    pedal += [
        (b * bar + bar - 40, mido.Message("control_change", control=64, value=0)) for b in range(8)
    ]
    meta = mido.MidiTrack(
        [
            mido.MetaMessage("time_signature", numerator=3, denominator=4, time=0),
            mido.MetaMessage("key_signature", key="D", time=0),
            mido.MetaMessage("set_tempo", tempo=600_000, time=0),
            mido.MetaMessage("set_tempo", tempo=800_000, time=4 * bar),
            mido.MetaMessage("time_signature", numerator=4, denominator=4, time=2 * bar),
            mido.MetaMessage("key_signature", key="F", time=0),
        ]
    )
    return save(path, [meta, note_track(notes, extra=pedal)], ticks_per_beat=TPB)


def _render(score: midi.Notes, delay_ms: float = 150.0, seed: int = 0) -> midi.Notes:
    """Rubato (smooth monotone warp), chords spread, velocities varied, pedal warped too."""
    rng = np.random.default_rng(seed)

    def warp(t):
        t = np.asarray(t, dtype=np.float64)
        return delay_ms + 1.08 * t + 250.0 * np.sin(t / 1500.0)  # slope 1.08 +- 0.17 > 0

    onset = warp(score.onset) + rng.integers(-12, 13, len(score))  # chord notes spread
    onset = np.maximum(np.rint(onset), 0).astype(np.int64)
    offset = np.maximum(np.rint(warp(score.offset)).astype(np.int64), onset + 5)
    velocity = rng.integers(25, 121, len(score))
    pedal_ms = np.rint(warp(score.pedal_ms)).astype(np.int64)
    return midi.Notes(
        onset, offset, score.pitch.copy(), velocity, pedal_ms, score.pedal_value.copy()
    )


def _expected(rendered: midi.Notes, pitch: np.ndarray) -> midi.Notes:
    return midi.resolve_same_pitch_overlaps(
        midi.Notes(
            rendered.onset,
            rendered.offset,
            pitch,
            rendered.velocity,
            rendered.pedal_ms,
            rendered.pedal_value,
        )
    )


def _assert_plays_like(path, want: midi.Notes, tol_ms: int = 2) -> None:
    got = midi.read_midi(path)
    assert len(got) == len(want)
    assert np.abs(got.onset - want.onset).max() <= tol_ms
    assert np.array_equal(got.pitch, want.pitch)
    assert np.array_equal(got.velocity, want.velocity)
    assert np.abs(got.offset - want.offset).max() <= tol_ms
    assert len(got.pedal_ms) == len(want.pedal_ms)
    assert np.abs(got.pedal_ms - want.pedal_ms).max(initial=0) <= tol_ms
    assert np.array_equal(got.pedal_value, want.pedal_value)


def _note_on_ticks(path) -> list:
    tick, found = 0, []
    for msg in mido.MidiFile(path).tracks[1]:
        tick += msg.time
        if msg.type == "note_on" and msg.velocity > 0:
            found.append(tick)
    return found


def _meta_by_track(path):
    mf = mido.MidiFile(path)
    out = []
    for track in mf.tracks:
        tick, found = 0, []
        for msg in track:
            tick += msg.time
            if msg.is_meta and msg.type != "track_name" and msg.type != "end_of_track":
                found.append((tick, msg))
        out.append(found)
    return mf, out


def test_rubato_rendering_reads_back_exactly_with_signatures(tmp_path):
    score_path = _score_file(tmp_path / "score.mid")
    score = midi.read_midi(score_path)
    rendered = _render(score)
    out = tmp_path / "mapped.mid"
    info = tempo_map.write_tempo_mapped(score_path, rendered, out)
    _assert_plays_like(out, _expected(rendered, score.pitch))
    assert info["max_onset_error_ms"] <= 2 and info["max_pedal_error_ms"] <= 2
    assert info["shift_beats"] == 0 and info["n_segments_clamped"] == 0
    assert info["n_anchors"] >= 30  # every beat and eighth is an anchor
    # the 150 ms before the first chord is absorbed by beat 1, so that chord sits late on
    # the grid; every later note sits next to its score beat (chord spread ~0.02 beat)
    assert info["max_grid_error_beats"] < 0.25
    tpb = info["ticks_per_beat"]
    grid = np.unique(tempo_map.read_score_grid(score_path).tick) * (tpb // TPB)
    on_ticks = np.array(_note_on_ticks(out))
    later = on_ticks[on_ticks > tpb]
    assert np.abs(later[:, None] - grid[None, :]).min(axis=1).max() < 0.05 * tpb
    assert 40 < info["bpm_min"] < info["bpm_max"] < 200

    mf, metas = _meta_by_track(out)
    assert mf.type == 1 and len(mf.tracks) == 2
    assert mf.ticks_per_beat == info["ticks_per_beat"] and mf.ticks_per_beat % TPB == 0
    assert all(m.type != "set_tempo" for m in metas[1])
    tempos = [(t, m.tempo) for t, m in metas[0] if m.type == "set_tempo"]
    assert len(tempos) == info["n_anchors"] + 1 and tempos[0][0] == 0
    scale = mf.ticks_per_beat // TPB
    sigs = sorted(
        (t, m.type, str(getattr(m, "key", getattr(m, "numerator", ""))))
        for t, m in metas[0]
        if m.type != "set_tempo"
    )
    bar = 3 * TPB
    assert sigs == sorted(
        [
            (0, "time_signature", "3"),
            (0, "key_signature", "D"),
            (6 * bar * scale, "time_signature", "4"),
            (6 * bar * scale, "key_signature", "F"),
        ]
    )


def test_late_start_shifts_by_whole_bars_and_negative_times_clamp(tmp_path):
    score_path = _score_file(tmp_path / "score.mid")
    score = midi.read_midi(score_path)
    rendered = _render(score, delay_ms=5000.0, seed=1)
    out = tmp_path / "late.mid"
    info = tempo_map.write_tempo_mapped(score_path, rendered, out)
    _assert_plays_like(out, _expected(rendered, score.pitch))
    assert info["shift_beats"] > 0 and info["shift_beats"] % 3 == 0  # whole 3/4 bars
    _, metas = _meta_by_track(out)
    tpb = info["ticks_per_beat"]
    ts = [t for t, m in metas[0] if m.type == "time_signature"]
    assert ts == [round(info["shift_beats"] * tpb), round((18 + info["shift_beats"]) * tpb)]

    early = _render(score, delay_ms=-40.0, seed=2)  # first notes before 0 ms
    assert early.onset.min() == 0  # _render clamps; make one genuinely negative
    early = midi.Notes(
        early.onset - np.where(early.onset == 0, 30, 0),
        early.offset,
        early.pitch,
        early.velocity,
        early.pedal_ms,
        early.pedal_value,
    )
    with pytest.warns(tempo_map.TempoMapWarning, match="negative"):
        info = tempo_map.write_tempo_mapped(score_path, early, out)
    clamped = midi.Notes(
        np.maximum(early.onset, 0),
        early.offset,
        early.pitch,
        early.velocity,
        np.maximum(early.pedal_ms, 0),
        early.pedal_value,
    )
    _assert_plays_like(out, _expected(clamped, score.pitch))
    assert info["n_negative_clamped"] > 0


def test_counts_differ_extra_and_missing_note(tmp_path):
    score_path = _score_file(tmp_path / "score.mid")
    score = midi.read_midi(score_path)
    full = _render(score, seed=3)
    drop = 17
    keep = np.flatnonzero(np.arange(len(score)) != drop)
    corr = np.append(keep, -1)  # the extra note (before the first anchor) has no score note
    rendered = midi.Notes(
        np.append(full.onset[keep], 40),
        np.append(full.offset[keep], 90),
        np.append(full.pitch[keep], 101),
        np.append(full.velocity[keep], 33),
        full.pedal_ms,
        full.pedal_value,
    )
    out = tmp_path / "differ.mid"
    info = tempo_map.write_tempo_mapped(score_path, rendered, out, correspondence=corr)
    pitch = np.append(score.pitch[keep], 101)
    _assert_plays_like(out, _expected(rendered, pitch))
    assert info["n_unmatched"] == 1 and info["n_matched"] == len(score) - 1

    with pytest.warns(tempo_map.TempoMapWarning, match="aligned by pitch"):
        info = tempo_map.write_tempo_mapped(score_path, rendered, out)  # automatic alignment
    _assert_plays_like(out, _expected(rendered, pitch))
    assert info["n_unmatched"] >= 1

    with pytest.raises(ValueError, match="one entry per rendered note"):
        tempo_map.tempo_map_notes(score_path, rendered, correspondence=corr[:-1])
    with pytest.raises(ValueError, match="-1 or 0.."):
        tempo_map.tempo_map_notes(score_path, rendered, correspondence=corr + len(score))


def test_single_chord_falls_back_to_120_bpm_and_overlaps_resolve(tmp_path):
    path = save(tmp_path / "chord.mid", [note_track([(0, 960, p, 70) for p in (60, 64, 67)])])
    # rendering: chord then the same pitches again, overlapping the first strike of each
    onset = np.array([300, 310, 305, 800, 820, 805])
    offset = np.array([1200, 900, 1300, 1500, 1600, 1700])
    pitch = np.array([60, 64, 67, 60, 64, 67])
    rendered = midi.Notes(
        onset,
        offset,
        pitch,
        np.array([50, 60, 70, 80, 90, 100]),
        np.array([0, 700]),
        np.array([127, 0]),
    )
    corr = np.array([0, 1, 2, -1, -1, -1])
    tm = tempo_map.tempo_map_notes(path, rendered, corr)
    assert tm.tempos == [(0, 500_000)] and tm.info["fallback"] == "constant_120_bpm"
    out = tmp_path / "chord_mapped.mid"
    info = tempo_map.write_tempo_mapped(path, rendered, out, corr)
    want = _expected(rendered, pitch)
    assert len(want) == 6 and want.offset[0] == 800  # first 60 cut at the repeat
    _assert_plays_like(out, want)
    assert info["max_onset_error_ms"] == 0

    one = save(tmp_path / "one.mid", [note_track([(960, 1200, 60, 70)])])  # a single note
    rendered = midi.Notes(
        np.array([2345]),
        np.array([2600]),
        np.array([60]),
        np.array([0]),
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
    )
    with pytest.warns(tempo_map.TempoMapWarning, match="velocities"):
        info = tempo_map.write_tempo_mapped(one, rendered, tmp_path / "one_mapped.mid")
    assert info["fallback"] == "constant_120_bpm" and info["max_onset_error_ms"] == 0
    got = midi.read_midi(tmp_path / "one_mapped.mid")
    assert got.onset.tolist() == [2345] and got.velocity.tolist() == [1]


def test_extreme_gap_is_clamped_but_times_still_match(tmp_path):
    score_path = _score_file(tmp_path / "score.mid")
    score = midi.read_midi(score_path)
    r = _render(score, seed=4)
    late = r.onset >= np.sort(np.unique(r.onset))[20]
    onset = r.onset + np.where(late, 40_000, 0)  # a 40 s fermata: slower than 20 BPM
    rendered = midi.Notes(
        onset, r.offset + np.where(late, 40_000, 0), r.pitch, r.velocity, r.pedal_ms, r.pedal_value
    )
    info = tempo_map.write_tempo_mapped(score_path, rendered, tmp_path / "gap.mid")
    assert info["n_segments_clamped"] >= 1 and info["bpm_min"] >= 20 - 1e-6
    _assert_plays_like(tmp_path / "gap.mid", _expected(rendered, score.pitch))


def test_bad_score_file_names_it(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not midi")
    notes = midi.Notes(
        *(np.zeros(1, np.int64) for _ in range(4)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    )
    with pytest.raises(midi.MidiError, match="bad.mid"):
        tempo_map.tempo_map_notes(bad, notes)


def test_real_asap_score(tmp_path):
    """A real score: its performance when note counts match, otherwise a warped copy."""
    meta = SHARED_DATA / "asap" / "metadata.csv"
    if not meta.is_file():
        pytest.skip("../shared/data/asap not present")
    with open(meta) as f:
        rows = list(csv.DictReader(f))
    picks = [rows[0]] + [
        r for r in rows if r["midi_performance"].endswith("Prelude/bwv_848/LeeSH01M.mid")
    ][:1]
    used_performance = False
    for row in picks:
        score_path = SHARED_DATA / "asap" / row["midi_score"]
        score = midi.read_midi(score_path)
        perf = midi.read_midi(SHARED_DATA / "asap" / row["midi_performance"])
        out = tmp_path / "real.mid"
        if len(perf) == len(score):
            used_performance = True
            # literal note i <-> score note i (score pitches), then the default pitch alignment
            identity = np.arange(len(perf))
            info = tempo_map.write_tempo_mapped(score_path, perf, out, identity)
            _assert_plays_like(out, _expected(perf, score.pitch))
            assert info["max_onset_error_ms"] == 0
            with pytest.warns(tempo_map.TempoMapWarning, match="aligned by pitch"):
                info = tempo_map.write_tempo_mapped(score_path, perf, out)
            _assert_plays_like(out, _expected(perf, perf.pitch))
            assert info["n_matched"] > 0.8 * len(perf)
        else:
            rendered = _render(score, delay_ms=900.0, seed=5)
            info = tempo_map.write_tempo_mapped(score_path, rendered, out)
            _assert_plays_like(out, _expected(rendered, score.pitch))
        assert info["max_onset_error_ms"] == 0 and info["n_anchors"] > 100
    assert used_performance or len(picks) == 1
