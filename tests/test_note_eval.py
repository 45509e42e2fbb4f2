"""Note-level judge (pianist_jax.evaluate.note_level): known answers, pairing, and the
evaluate CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pianist_jax import midi
from pianist_jax.evaluate import note_level as ne

REPO = Path(__file__).resolve().parents[1]


def notes(onset, duration, pitch, velocity, pedal=()):
    onset = np.asarray(onset, np.int64)
    pedal = sorted(pedal)
    return midi.Notes(
        onset,
        onset + np.asarray(duration, np.int64),
        np.asarray(pitch, np.int64),
        np.asarray(velocity, np.int64),
        np.array([t for t, _ in pedal], np.int64),
        np.array([v for _, v in pedal], np.int64),
    )


def score_and_human(n=400, seed=0):
    """A quantized score (chords included) and a 'human' with rubato, dynamics, articulation
    and pedal; both sorted by (onset, pitch) as `midi.read_midi` gives them."""
    rng = np.random.default_rng(seed)
    beat = np.repeat(np.arange(n // 2), 2)  # two-note chords
    pitch = 48 + (np.arange(n) * 7) % 36
    pitch = np.where(np.arange(n) % 2, pitch + 40, pitch)  # chord: low + high, sorted
    s_on = beat * 250
    score = notes(s_on, np.full(n, 200), pitch, np.full(n, 64))
    tempo = np.exp(0.3 * np.sin(np.arange(n // 2) / 9.0))  # slow tempo swings
    h_beat_on = np.concatenate([[0], np.cumsum(250 * tempo[:-1])]).astype(np.int64)
    h_on = h_beat_on[beat]
    vel = np.clip(64 + 30 * np.sin(np.arange(n) / 13.0) + rng.normal(0, 5, n), 1, 127)
    dur = (200 * np.exp(rng.normal(0, 0.4, n))).astype(np.int64)
    pedal = [
        (max(int(h_beat_on[b]) - 1, 0), 127 if (b // 20) % 2 else 0) for b in range(0, n // 2, 10)
    ]
    human = notes(h_on, dur, pitch, vel.astype(np.int64), pedal)
    return score, human


def test_a_performance_against_itself_scores_one():
    score, human = score_and_human()
    f = ne.note_features(score, human, np.arange(len(score)))
    out = ne.judge(f, [f])
    for k in ("velocity_r", "tempo_r", "articulation_r", "pedal_agreement"):
        assert out[k] == pytest.approx(1.0, abs=1e-9), k


def test_shuffled_velocities_lose_the_correlation():
    score, human = score_and_human(n=2000)
    ref = ne.note_features(score, human, np.arange(len(score)))
    perm = np.random.default_rng(1).permutation(len(score))
    shuffled = ne.NoteFeatures(
        ref.velocity[perm],
        ref.articulation[perm],
        ref.pedal[perm],
        ref.tempo[np.random.default_rng(2).permutation(len(ref.tempo))],
    )
    out = ne.judge(shuffled, [ref])
    assert abs(out["velocity_r"]) < 0.1
    assert abs(out["articulation_r"]) < 0.1
    assert abs(out["tempo_r"]) < 0.15
    assert out["pedal_agreement"] < 0.75  # about half the notes are pedalled


def test_deadpan_has_no_timing_information_and_never_pedals():
    score, human = score_and_human()
    f = ne.note_features(score, score, np.arange(len(score)))
    ref = ne.note_features(score, human, np.arange(len(score)))
    out = ne.judge(f, [ref])
    assert out["tempo_r"] == 0.0 and out["articulation_r"] == 0.0  # constant -> 0, not NaN
    majority_up = 1 - np.nanmean(ref.pedal)
    assert out["pedal_agreement"] == pytest.approx(majority_up)
    assert out["pedal_down"] == 0.0


def test_local_tempo_of_a_uniformly_slower_performance_is_its_ratio():
    score, _ = score_and_human(n=40)
    slow = notes(score.onset * 2, score.duration, score.pitch, score.velocity)
    tempo = ne.note_features(score, slow, np.arange(len(score))).tempo
    w = ne.TEMPO_HALF_SPAN
    assert np.all(np.isnan(tempo[:w])) and np.all(np.isnan(tempo[-w:]))
    assert np.allclose(tempo[w:-w], math.log(2))


def test_unpaired_notes_are_left_out_not_zero():
    score, human = score_and_human()
    idx = np.arange(len(score))
    idx[::3] = -1
    f = ne.note_features(score, human, idx)
    assert np.isnan(f.velocity[::3]).all() and np.isfinite(f.velocity[1::3]).all()
    full = ne.note_features(score, human, np.arange(len(score)))
    assert ne.judge(f, [full])["velocity_r"] == pytest.approx(1.0)


def test_pair_rendering_by_pitch_occurrence():
    score, human = score_and_human(n=60)
    assert np.array_equal(ne.pair_rendering(score, human), np.arange(len(score)))
    # same notes, a different performed order of two chord tones: pairing follows pitch
    flipped = notes(
        human.onset + np.where(np.arange(60) % 2, -5, 5) * (np.arange(60) < 2),
        human.duration,
        human.pitch,
        human.velocity,
    )
    order = np.lexsort((flipped.pitch, flipped.onset))
    reordered = notes(
        flipped.onset[order], flipped.duration[order], flipped.pitch[order], flipped.velocity[order]
    )
    idx = ne.pair_rendering(score, reordered)
    assert np.array_equal(reordered.pitch[idx], score.pitch)
    assert np.array_equal(reordered.velocity[idx], human.velocity)


def test_pair_rendering_of_the_first_notes_only():
    score, human = score_and_human(n=60)
    head = notes(human.onset[:25], human.duration[:25], human.pitch[:25], human.velocity[:25])
    idx = ne.pair_rendering(score, head)
    assert np.array_equal(idx[:25], np.arange(25)) and (idx[25:] == -1).all()


def test_pearson_edge_cases():
    assert ne.pearson(np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 8])) == pytest.approx(1)
    assert ne.pearson(np.array([1.0, 1, 1, 1]), np.array([2.0, 4, 6, 8])) == 0.0
    assert math.isnan(ne.pearson(np.array([1.0, np.nan]), np.array([2.0, 3.0])))


def test_evaluate_cli_reports_the_note_level_judge(tmp_path):
    score, human = score_and_human(n=300)
    for d in ("scores", "human", "pred"):
        (tmp_path / d).mkdir()
    midi.write_midi(score, tmp_path / "scores" / "piece.mid")
    midi.write_midi(human, tmp_path / "human" / "piece-1.mid")
    _, other = score_and_human(n=300, seed=5)
    midi.write_midi(other, tmp_path / "human" / "piece-2.mid")
    midi.write_midi(human, tmp_path / "pred" / "piece.mid")  # a "rendering" = human 1
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pianist_jax.evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--human",
            str(tmp_path / "human"),
            "--scores",
            str(tmp_path / "scores"),
            "--out",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "note level" in out.stdout and "human vs other humans" in out.stdout
    notes_ = json.loads((tmp_path / "eval" / "metrics.json").read_text())["notes"]
    assert notes_["n_pieces"] == 1 and notes_["n_ceiling_pieces"] == 1
    pred, ceiling = notes_["prediction"], notes_["human_ceiling"]
    # human 1 against the mean of humans 1 and 2 beats any human against the other alone
    for k in ("velocity_r", "articulation_r"):
        assert pred[k] > ceiling[k] and pred[k] > 0.5
    assert notes_["deadpan"]["articulation_r"] == 0.0


def test_an_unreadable_human_leaves_the_others(tmp_path):
    score, human = score_and_human(n=120)
    midi.write_midi(score, tmp_path / "s.mid")
    midi.write_midi(human, tmp_path / "h1.mid")
    (tmp_path / "h2.mid").write_bytes(b"not a midi file")
    piece = ne.load_piece("p", tmp_path / "s.mid", [tmp_path / "h1.mid", tmp_path / "h2.mid"])
    assert len(piece.humans) == 1
    with pytest.raises(ValueError, match="none of its human"):
        ne.load_piece("p", tmp_path / "s.mid", [tmp_path / "h2.mid"])
    out = ne.evaluate(
        [("p", tmp_path / "h1.mid", tmp_path / "s.mid", [tmp_path / "h2.mid"])], log=lambda _: None
    )
    assert out["n_pieces"] == 0 and "no piece" in ne.format_table(out, "x")
