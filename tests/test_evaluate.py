"""Objective evaluation (pianist_jax.evaluate): scores, features, pooling and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pytest

from pianist_jax import midi
from pianist_jax.evaluate import histograms as ev
from tests.midi_fixtures import note_track, save

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- scores


def test_identical_histograms_score_perfectly():
    h = np.array([3, 0, 5, 1, 0, 7])
    assert abs(ev.js_distance(h, h)) <= 1e-12
    assert abs(ev.intersection(h, h) - 1) <= 1e-12
    # normalisation: the same shape at another scale is still identical
    assert abs(ev.js_distance(h, 10 * h)) <= 1e-12
    assert abs(ev.intersection(h, 10 * h) - 1) <= 1e-12


def test_disjoint_histograms_score_worst():
    p, q = np.array([4, 1, 0, 0]), np.array([0, 0, 2, 9])
    assert abs(ev.js_distance(p, q) - 1) <= 1e-12
    assert abs(ev.intersection(p, q)) <= 1e-12


def test_partial_overlap_matches_hand_computation():
    # p = [1/2, 1/2, 0], q = [0, 1/2, 1/2], m = [1/4, 1/2, 1/4]:
    # KL(p||m) = 1/2 log2 2 + 1/2 log2 1 = 1/2 = KL(q||m); JS divergence 1/2, distance sqrt(1/2)
    p, q = np.array([1, 1, 0]), np.array([0, 2, 2])
    assert ev.js_distance(p, q) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert ev.intersection(p, q) == pytest.approx(0.5, abs=1e-12)
    # p = [1, 0], q = [1/2, 1/2], m = [3/4, 1/4]
    kl_p = math.log2(1 / 0.75)
    kl_q = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    assert ev.js_distance([2, 0], [1, 1]) == pytest.approx(math.sqrt((kl_p + kl_q) / 2), abs=1e-12)
    assert ev.intersection([2, 0], [1, 1]) == pytest.approx(0.5, abs=1e-12)


def test_compare_overall_is_mean_and_empty_side_is_nan():
    ref = {d: np.array([1, 1, 0, 0]) for d in ev.DIMENSIONS}
    pred = {
        "velocity": np.array([1, 1, 0, 0]),
        "duration": np.array([0, 0, 1, 1]),
        "ioi": np.array([1, 1, 0, 0]),
        "pedal": np.array([0, 0, 1, 1]),
    }
    s = ev.compare(pred, ref)
    assert s["overall"]["js"] == pytest.approx(0.5, abs=1e-12)
    assert s["overall"]["intersection"] == pytest.approx(0.5, abs=1e-12)
    pred["ioi"] = np.zeros(4, dtype=int)
    s = ev.compare(pred, ref)
    assert math.isnan(s["ioi"]["js"]) and math.isnan(s["overall"]["intersection"])


def test_histograms_half_open_ranges_and_weights():
    feats = {
        "velocity": np.array([0, 127, 127]),
        "duration": np.array([-1, 0, 1, 499, 500]),
        "ioi": np.array([0, 199, 200, 4990]),
        "pedal": np.array([0, 15, 6]),
    }
    h = ev.histograms([feats, feats], weights=[1, 2])
    assert h["velocity"][0] == 3 and h["velocity"][127] == 6 and h["velocity"].sum() == 9
    assert len(h["duration"]) == 250 and h["duration"][0] == 6 and h["duration"][249] == 3
    assert h["duration"].sum() == 9  # -1 and 500 dropped
    assert len(h["ioi"]) == 200 and h["ioi"][0] == 3 and h["ioi"][199] == 3
    assert h["ioi"].sum() == 6  # 200 and 4990 dropped
    assert h["pedal"].tolist() == [3] + [0] * 5 + [3] + [0] * 8 + [3]


# ----------------------------------------------------------------------------- features


def test_features_of_a_built_midi(tmp_path):
    # 500 ticks/beat at 120 BPM: 1 tick = 1 ms. (onset, offset, pitch, velocity)
    notes = [(100, 250, 60, 40), (300, 380, 64, 70), (300, 420, 67, 90), (450, 1050, 72, 110)]
    pedal = [(140, 127), (220, 0), (360, 100), (400, 50), (1000, 127), (2900, 0)]
    extra = [(0, mido.MetaMessage("set_tempo", tempo=500_000))] + [
        (t, mido.Message("control_change", control=64, value=v)) for t, v in pedal
    ]
    path = save(tmp_path / "x.mid", [note_track(notes, extra=extra)], ticks_per_beat=500)
    f = ev.features(path)
    assert f["velocity"].tolist() == [40, 70, 90, 110]
    assert f["duration"].tolist() == [150, 80, 120, 600]
    assert f["ioi"].tolist() == [200, 0, 150]  # the first note's offset from 0 is not an IOI
    # pedal sampled at onset + gap*k/4 (last note: gap 4990), >= 64 -> 1, P1 most significant:
    # note 1 at 100,150,200,250 -> 0110; note 2 (gap 0) at 300 x4 -> 0000;
    # note 3 at 300,337,375,412 -> 0,0,100,50 -> 0010; note 4 at 450,1697,2945,4192 -> 0100
    assert f["pedal"].tolist() == [0b0110, 0b0000, 0b0010, 0b0100]


def test_human_piece_splits_at_the_last_dash():
    assert ev.human_piece("Op-10-3-2") == ("Op-10-3", "2")
    assert ev.human_piece("etude-LeeSH06M") == ("etude", "LeeSH06M")
    assert ev.human_piece("nodash") is None
    assert ev.human_piece("piece-") is None
    assert ev.human_piece("piece-a b") is None


# ----------------------------------------------------------------------------- directories


def _write(path: Path, seed: int, n: int = 40, vel_shift: int = 0) -> None:
    rng = np.random.default_rng(seed)
    onset = np.cumsum(rng.integers(0, 250, n))
    dur = rng.integers(20, 700, n)
    pedal_ms = np.arange(0, int(onset[-1]), 400)
    notes = midi.Notes(
        onset=onset,
        offset=onset + dur,
        pitch=rng.integers(40, 90, n),
        velocity=np.clip(rng.integers(30, 100, n) + vel_shift, 1, 127),
        pedal_ms=pedal_ms,
        pedal_value=np.where(np.arange(len(pedal_ms)) % 2, 0, 127),
    )
    midi.write_midi(notes, path)


@pytest.fixture()
def dirs(tmp_path):
    pred, human = tmp_path / "pred", tmp_path / "human"
    pred.mkdir()
    human.mkdir()
    _write(pred / "Op-10.mid", 1, vel_shift=20)
    _write(pred / "etude.midi", 2)
    _write(pred / "orphan.mid", 3)  # no human performance
    _write(human / "Op-10-1.mid", 11)
    _write(human / "Op-10-2.mid", 12, n=30)
    _write(human / "Op-10-3.MIDI", 13)
    _write(human / "etude-a.mid", 21, n=50)
    _write(human / "etude-b.mid", 22)
    _write(human / "unplayed-1.mid", 31)  # no rendering
    return pred, human


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pianist_jax.evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_end_to_end(dirs, tmp_path):
    pred, human = dirs
    r = _cli("--pred", pred, "--human", human, "--label", "mymodel")
    assert r.returncode == 0, r.stderr
    assert "orphan" in r.stderr and "Traceback" not in r.stderr
    for row in ("velocity", "duration", "ioi", "pedal", "overall", "mymodel", "human baseline"):
        assert row in r.stdout
    out = pred / "eval"
    for dim in ev.DIMENSIONS:
        assert (out / f"{dim}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    assert m["pieces"] == ["Op-10", "etude"] and m["n_human_performances"] == 5
    assert m["human_pieces_without_prediction"] == ["unplayed"]
    assert m["n_notes"] == {"prediction": 80, "human": 40 + 30 + 40 + 50 + 40}
    vel = m["histograms"]["velocity"]
    assert sum(vel["prediction"]) == 80 and sum(vel["human"]) == 200
    # baseline: 3 leave-one-out rounds; human r mod n of each piece against the others
    b = m["human_baseline"]
    assert b["n_pieces"] == 2 and b["n_performances"] == 5 and len(b["rounds"]) == 3
    sizes = [
        (
            sum(rd["histograms"]["candidate"]["velocity"]),
            sum(rd["histograms"]["reference"]["velocity"]),
        )
        for rd in b["rounds"]
    ]
    assert sizes == [(40 + 50, 30 + 40 + 40), (30 + 40, 40 + 40 + 50), (40 + 50, 40 + 30 + 40)]
    h = {p.stem: ev.features(p) for p in human.iterdir()}
    r0 = ev.compare(
        ev.histograms([h["Op-10-1"], h["etude-a"]]),
        ev.histograms([h["Op-10-2"], h["Op-10-3"], h["etude-b"]]),
    )
    assert b["rounds"][0]["scores"]["overall"]["js"] == pytest.approx(r0["overall"]["js"])
    assert b["scores"]["ioi"]["intersection"] == pytest.approx(
        np.mean([rd["scores"]["ioi"]["intersection"] for rd in b["rounds"]])
    )
    assert 0 < b["scores"]["overall"]["js"] < 1
    # the CLI's numbers are the API's
    pf = [ev.features(pred / "Op-10.mid"), ev.features(pred / "etude.midi")]
    hf = [ev.features(p) for p in sorted(human.iterdir()) if not p.name.startswith("unplayed")]
    s = ev.compare(ev.histograms(pf), ev.histograms(hf))
    for dim in (*ev.DIMENSIONS, "overall"):
        assert m["prediction"][dim]["js"] == pytest.approx(s[dim]["js"], abs=1e-12)
        assert 0 < s[dim]["js"] < 1


def test_api_identical_rendering_scores_zero(tmp_path):
    pred, human = tmp_path / "p", tmp_path / "h"
    pred.mkdir()
    human.mkdir()
    _write(pred / "a.mid", 5)
    _write(human / "a-1.mid", 5)
    m = ev.evaluate_dirs(pred, human, out=tmp_path / "o", log=lambda s: None)
    assert m["human_baseline"] is None
    assert m["prediction"]["overall"]["js"] == pytest.approx(0, abs=1e-12)
    assert m["prediction"]["overall"]["intersection"] == pytest.approx(1, abs=1e-12)
    assert (tmp_path / "o" / "metrics.json").is_file()
    assert "no human baseline" in ev.format_table(m)


def test_weight_by_humans_repeats_the_rendering(dirs):
    pred, human = dirs
    m = ev.evaluate_dirs(pred, human, out=False, weight_by_humans=True, log=lambda s: None)
    assert m["n_notes"]["prediction"] == 80  # notes are counted once; histograms are weighted
    assert sum(m["histograms"]["velocity"]["prediction"]) == 3 * 40 + 2 * 40
    cand = m["human_baseline"]["rounds"][0]["histograms"]["candidate"]["velocity"]
    assert sum(cand) == 2 * 40 + 1 * 50


def _one_error_line(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0]


def test_cli_user_errors(tmp_path, dirs):
    pred, human = dirs
    _one_error_line(_cli("--pred", tmp_path / "missing", "--human", human), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error_line(_cli("--pred", empty, "--human", human), "no .mid/.midi files")
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "zzz-1.mid", 9)
    r = _cli("--pred", pred, "--human", other)
    assert r.returncode == 2 and "no pieces in common" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_cli_bad_midi_is_skipped_or_fatal(tmp_path, dirs):
    pred, human = dirs
    (human / "etude-c.mid").write_bytes(b"not a midi file at all")
    r = _cli("--pred", pred, "--human", human, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    bad = [ln for ln in r.stderr.splitlines() if "etude-c.mid" in ln]
    assert len(bad) == 1 and bad[0].startswith("warning: skipping")
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n_human_performances"] == 5 and m["skipped"][0]["file"].endswith("etude-c.mid")
    # nothing readable left -> exit 2
    p2, h2 = tmp_path / "p2", tmp_path / "h2"
    p2.mkdir()
    h2.mkdir()
    (p2 / "a.mid").write_bytes(b"MThd garbage")
    _write(h2 / "a-1.mid", 4)
    r = _cli("--pred", p2, "--human", h2)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: nothing left")


def test_per_piece_table_averages_the_seeds(tmp_path):
    """``evaluate.per_piece``: one row per piece, each figure the mean over the metrics files
    (seeds) that judged it; the ceiling column only where the piece has a ceiling."""
    import json

    from pianist_jax.evaluate import per_piece

    def row(piece, v, ceiling):
        figures = {"velocity_r": v, "tempo_r": 0.1, "articulation_r": 0.2}
        return {
            "piece": piece,
            "n_notes": 1234,
            "n_humans": 2 if ceiling else 1,
            "prediction": {**figures, "pedal_agreement": 0.5, "pedal_down": 0.4},
            "human_ceiling": {"velocity_r": 0.8} if ceiling else None,
            "human_pedal_down": 0.3,
        }

    paths = []
    for seed, v in enumerate((0.2, 0.4)):
        path = tmp_path / f"seed{seed}.json"
        path.write_text(
            json.dumps({"notes": {"per_piece": [row("B", v, True), row("A", v, False)]}})
        )
        paths.append(path)
    lines = per_piece.table(per_piece.load(paths)).splitlines()
    assert lines[2] == "| A | 1,234 | 1 | 0.30 | 0.10 | 0.20 | 0.50 | 0.40 | 0.30 | - |"
    assert lines[3] == "| B | 1,234 | 2 | 0.30 | 0.10 | 0.20 | 0.50 | 0.40 | 0.30 | 0.80 |"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a note-level metrics.json"):
        per_piece.load([bad])
