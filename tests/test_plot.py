"""The performance picture (`pianist_jax.render.plot`): files written, tempo curve, errors."""

import time

import numpy as np
import pytest

from pianist_jax import midi
from pianist_jax.render.plot import performed_beat_bpm, plot_performance

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NO_PEDAL = np.zeros(0, np.int64)


def notes(onset, dur, pitch, velocity=64, pedal_ms=NO_PEDAL, pedal_value=NO_PEDAL) -> midi.Notes:
    onset = np.asarray(onset, np.int64)
    return midi.Notes(
        onset=onset,
        offset=onset + np.broadcast_to(np.asarray(dur, np.int64), onset.shape),
        pitch=np.broadcast_to(np.asarray(pitch, np.int64), onset.shape).copy(),
        velocity=np.broadcast_to(np.asarray(velocity, np.int64), onset.shape).copy(),
        pedal_ms=np.asarray(pedal_ms, np.int64),
        pedal_value=np.asarray(pedal_value, np.int64),
    )


def scaled(score: midi.Notes, factor: float, shift: int = 0) -> midi.Notes:
    """The score played `factor` times as slowly (all times stretched), starting at `shift` ms."""
    return notes(
        np.round(score.onset * factor).astype(np.int64) + shift,
        np.round(score.duration * factor).astype(np.int64),
        score.pitch,
        score.velocity,
    )


def big_piece(n: int = 3000, seed: int = 0) -> tuple[midi.Notes, midi.Notes]:
    """About `n` notes in chords of 1-3 on a 250 ms grid, with a rubato performance and pedal."""
    rng = np.random.default_rng(seed)
    slots = np.repeat(np.arange(n), rng.integers(1, 4, n))[:n]
    onset = slots * 250
    pitch = 36 + (slots * 7 + np.arange(n) * 5) % 60
    score = notes(onset, rng.integers(10, 1000, n), pitch)
    # local tempo 1 + 0.2 sin(t / 20 s) times the notated one, plus 5 ms of timing noise
    warp = onset + 4000.0 * (1.0 - np.cos(onset / 20_000.0)) + rng.normal(0, 5, n)
    perf_on = np.maximum.accumulate(np.maximum(warp, 0)).astype(np.int64)
    end = int(perf_on[-1]) + 2000
    pedal_ms = np.arange(0, end, 1000)
    perf = notes(
        perf_on,
        score.duration,
        pitch,
        rng.integers(20, 120, n),
        pedal_ms=pedal_ms,
        pedal_value=np.where(np.arange(len(pedal_ms)) % 2 == 0, 127, 0),
    )
    return perf, score


def check_png(path, min_size=(100, 100)) -> tuple[int, int]:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_size[0] and height >= min_size[1]
    return width, height


def test_tiny_piece_writes_png(tmp_path):
    score = notes([0, 500, 1000, 1000, 1500], 400, [60, 62, 64, 67, 65])
    velocity = [40, 60, 90, 80, 50]
    perf = notes(score.onset * 2, 700, score.pitch, velocity, [0, 1800], [127, 0])
    out = plot_performance(perf, score, tmp_path / "tiny.png", title="tiny")
    assert out == tmp_path / "tiny.png"
    width, height = check_png(out, min_size=(1000, 800))
    assert width > height
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.png"]  # no temp file left


def test_large_piece_is_fast_and_readable(tmp_path):
    perf, score = big_piece(3000)
    beats = np.arange(0, int(score.onset[-1]), 500)
    start = time.perf_counter()
    out = plot_performance(perf, score, tmp_path / "sub" / "big.png", score_beats_ms=beats)
    elapsed = time.perf_counter() - start
    width, _ = check_png(out, min_size=(2000, 1000))
    assert width <= 24 * 150  # width grows with duration but is capped
    assert elapsed < 20, f"plotting 3,000 notes took {elapsed:.1f} s"


@pytest.mark.parametrize("suffix", [".svg", ".pdf", ".PNG"])
def test_other_formats(tmp_path, suffix):
    score = notes([0, 500, 1000], 300, [60, 64, 67])
    out = plot_performance(score, score, tmp_path / f"p{suffix}")
    assert out.stat().st_size > 0
    head = out.read_bytes()[:8]
    assert head.startswith({".svg": b"<?xml", ".pdf": b"%PDF", ".PNG": PNG_SIGNATURE}[suffix])


def test_single_chord_has_no_tempo_curve_but_plots(tmp_path):
    score = notes([0, 0, 0], 1000, [48, 55, 64])
    times, bpm, notated = performed_beat_bpm(score, score)
    assert len(times) == len(bpm) == len(notated) == 0
    check_png(plot_performance(score, score, tmp_path / "chord.png"))


def test_twice_as_slow_gives_half_the_notated_tempo():
    score = notes(np.arange(0, 8000, 250), 200, 60)
    times, bpm, notated = performed_beat_bpm(scaled(score, 2.0, shift=300), score)
    np.testing.assert_allclose(notated, 120.0)
    np.testing.assert_allclose(bpm, 60.0)
    assert np.all(np.diff(times) > 0)
    np.testing.assert_allclose(times[0], 0.3 + 0.5)  # middle of the first (1 s long) beat


def test_constant_tempo_with_a_beat_map():
    # 3/4 at quarter = 100 (600 ms beats), chords of two with the higher note listed first in the
    # performance's chord (the performance need not be sorted by pitch within a chord)
    onset = np.repeat(np.arange(0, 12_000, 300), 2)
    score = notes(onset, 250, np.tile([60, 48], len(onset) // 2))
    perf = scaled(score, 0.8)
    times, bpm, notated = performed_beat_bpm(perf, score, np.arange(0, 12_000, 600))
    np.testing.assert_allclose(notated, 100.0)
    np.testing.assert_allclose(bpm, 125.0, rtol=1e-3)


def test_tempo_change_is_located():
    # first 4 s at the notated tempo, then twice as slow; beats every 500 ms of score time
    onset = np.arange(0, 8000, 250)
    score = notes(onset, 200, 60)
    perf_on = np.where(onset <= 4000, onset, 4000 + 2 * (onset - 4000))
    _, bpm, _ = performed_beat_bpm(notes(perf_on, 200, 60), score)
    np.testing.assert_allclose(bpm[:8], 120.0)
    np.testing.assert_allclose(bpm[8:], 60.0)


def test_rests_between_notes_are_interpolated():
    # a long rest in the score (no onsets between 1 s and 5 s) played at the same tempo
    score = notes([0, 500, 1000, 5000, 5500], 400, 60)
    _, bpm, _ = performed_beat_bpm(scaled(score, 1.0), score)
    np.testing.assert_allclose(bpm, 120.0)


def test_mismatched_lengths(tmp_path):
    score = notes([0, 500], 400, 60)
    perf = notes([0], 400, 60)
    with pytest.raises(ValueError, match="1 notes but score has 2"):
        plot_performance(perf, score, tmp_path / "x.png")
    with pytest.raises(ValueError, match="1 notes but score has 2"):
        performed_beat_bpm(perf, score)
    assert list(tmp_path.iterdir()) == []


def test_unknown_suffix(tmp_path):
    score = notes([0, 500], 400, 60)
    with pytest.raises(ValueError, match=r"\.png, \.pdf or \.svg"):
        plot_performance(score, score, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_performance(score, score, tmp_path / "noext")
    assert list(tmp_path.iterdir()) == []


def test_empty_performance(tmp_path):
    empty = notes([], 0, 60)
    with pytest.raises(ValueError, match="performance has no notes"):
        plot_performance(empty, empty, tmp_path / "x.png")
