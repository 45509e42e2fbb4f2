"""The musician's path end to end: MusicXML in; MIDI, audio and a picture out; the controls."""

from __future__ import annotations

import dataclasses
import shutil
import wave

import numpy as np
import pytest

from pianist_jax import midi, tokenizer
from pianist_jax.midi import notation
from pianist_jax.render import audio, controls
from tests.test_notation import partitura_pitches, repeat_piece, write
from tests.test_render import export_tiny_model, make_score, run_cli

pytest.importorskip("partitura")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def has_synth() -> bool:
    try:
        audio.find_soundfont()
    except audio.AudioError:
        return False
    return shutil.which("fluidsynth") is not None


def test_musicxml_renders_exactly_the_notes_a_player_plays(tiny_model, tmp_path):
    path = write(tmp_path, "piece.musicxml", ("Piano", repeat_piece()))
    out = tmp_path / "perf.mid"
    assert run_cli(tiny_model, path, "-o", out, "--save-score-midi") == 0
    rendered = midi.read_midi(out)
    assert len(rendered) == 19
    assert sorted(rendered.pitch.tolist()) == partitura_pitches(path)
    assert (tmp_path / "perf.score.mid").read_bytes() == notation.score_midi_bytes(path)


def test_expressiveness_zero_is_the_score_and_one_is_the_rendering(tiny_model, tmp_path):
    score = make_score(tmp_path / "s.mid", 60)
    plain, one, zero = (tmp_path / f"{n}.mid" for n in ("plain", "one", "zero"))
    assert run_cli(tiny_model, score, "-o", plain, "--seed", "3") == 0
    assert run_cli(tiny_model, score, "-o", one, "--seed", "3", "--expressiveness", "1") == 0
    assert one.read_bytes() == plain.read_bytes()
    assert run_cli(tiny_model, score, "-o", zero, "--expressiveness", "0") == 0
    want, got = midi.read_midi(score), midi.read_midi(zero)
    for name in ("onset", "offset", "pitch", "velocity", "pedal_ms", "pedal_value"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


def aligned_pair(n=40, seed=0):
    """A score and a 'performance' of it: slower, with rubato, louder, pedalled."""
    rng = np.random.default_rng(seed)
    s_on = np.cumsum(rng.choice([0, 250, 500], n))
    s_on -= s_on[0]
    pitch = rng.integers(40, 90, n)
    order = np.lexsort((pitch, s_on))
    s_on, pitch = s_on[order], pitch[order]
    score = midi.Notes(s_on, s_on + 400, pitch, np.full(n, 64), np.zeros(0, int), np.zeros(0, int))
    ids = tokenizer.encode_notes(score)
    perf_ids = ids.reshape(-1, 8).copy()
    perf_ids[:, 1] = np.where(
        perf_ids[:, 1] > 261, perf_ids[:, 1] * 1.3 + rng.integers(0, 40, n), perf_ids[:, 1]
    )
    perf_ids[:, 2] = tokenizer.VELOCITY_START + rng.integers(40, 120, n)
    perf_ids[:, 4:] = tokenizer.PEDAL_START + np.where(np.arange(n)[:, None] % 8 < 4, 127, 0)
    return tokenizer.decode_ids(perf_ids.reshape(-1), ids), score


def test_blend_interpolates_note_by_note():
    perf, score = aligned_pair()
    half = controls.blend(perf, score, 0.5)
    assert np.array_equal(half.pitch, score.pitch)
    v = half.velocity
    assert np.all(np.abs(v - (score.velocity + perf.velocity) / 2) <= 0.5)
    assert score.onset[-1] < half.onset[-1] < perf.onset[-1]  # between the two clocks
    loud = controls.blend(perf, score, 2.0)  # exaggerated, within MIDI's range
    assert loud.velocity.min() >= 1 and loud.velocity.max() <= 127
    assert (
        np.abs(loud.velocity - score.velocity).mean()
        > np.abs(perf.velocity - score.velocity).mean()
    )
    assert controls.blend(perf, score, 1.0) is perf and controls.blend(perf, score, 0.0) is score


def test_tempo_dynamics_and_pedal_controls():
    perf, score = aligned_pair()
    fast = controls.apply(perf, score, controls.Controls(tempo=2.0))
    np.testing.assert_allclose(fast.onset, perf.onset / 2, atol=0.5)
    np.testing.assert_allclose(fast.pedal_ms, perf.pedal_ms / 2, atol=0.5)
    flat = controls.apply(perf, score, controls.Controls(dynamics=0.0))
    assert len(set(flat.velocity.tolist())) == 1
    assert abs(flat.velocity[0] - perf.velocity.mean()) <= 0.5
    assert not len(controls.apply(perf, score, controls.Controls(pedal="none")).pedal_ms)
    marked = dataclasses.replace(
        score, pedal_ms=np.array([score.onset[5], score.onset[20]]), pedal_value=np.array([127, 0])
    )
    moved = controls.apply(perf, marked, controls.Controls(pedal="score"))
    assert moved.pedal_ms.tolist() == [perf.onset[5], perf.onset[20]]
    assert moved.pedal_value.tolist() == [127, 0]
    with pytest.raises(ValueError, match="tempo must be between 0.25 and 4"):
        controls.Controls(tempo=0)
    with pytest.raises(ValueError, match="note-aligned"):
        controls.apply(perf, dataclasses.replace(score, pitch=score.pitch + 1), controls.Controls())


def test_more_dynamics_keeps_every_note_in_order_and_leaves_no_gaps():
    """Scaling integer velocities by 2 alone would give only every other value; the fill
    keeps the histogram smooth without moving any note past one that was louder."""
    velocity = np.random.default_rng(0).integers(50, 80, 5000)
    for d in (1.5, 1.75, 2.0, 3.0):
        out = controls.scale_dynamics(velocity, d)
        assert abs(out.mean() - velocity.mean()) < 0.5
        assert abs(out.std() / velocity.std() - d) < 0.05 * d
        loud, soft = velocity[:, None] > velocity[None, :], out[:, None] > out[None, :]
        assert soft[loud].all()  # a louder note stays louder
        lo, hi = np.percentile(out, [5, 95]).astype(int)
        assert set(range(lo, hi + 1)) <= set(out.tolist()), d  # no gaps
    assert controls.scale_dynamics(velocity, 1.0).tolist() == velocity.tolist()
    assert controls.scale_dynamics(np.array([120, 10]), 4.0).tolist() == [127, 1]


@pytest.mark.skipif(not has_synth(), reason="needs fluidsynth and a General MIDI SoundFont")
def test_audio_and_plot_with_variants(tiny_model, tmp_path):
    path = write(tmp_path, "piece.musicxml", ("Piano", repeat_piece()))
    out = tmp_path / "perf.mid"
    code = run_cli(
        tiny_model, path, "-o", out, "--variants", "2", "--audio", "--plot", "--tempo", "1.5"
    )
    assert code == 0
    for k in (1, 2):
        perf = midi.read_midi(tmp_path / f"perf-{k}.mid")
        with wave.open(str(tmp_path / f"perf-{k}.wav")) as w:
            seconds = w.getnframes() / w.getframerate()
        last = max(perf.offset.max(), perf.pedal_ms.max(initial=0)) / 1000
        assert last + 1 <= seconds <= last + 6
        assert (tmp_path / f"perf-{k}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_fluidsynth_one_error_line_and_the_midi_is_written(
    tiny_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    score = make_score(tmp_path / "s.mid", 30)
    out = tmp_path / "perf.mid"
    code = run_cli(tiny_model, score, "-o", out, "--audio", str(tmp_path / "perf.wav"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and "apt-get install" in errors[0], errors
    assert len(midi.read_midi(out)) and not (tmp_path / "perf.wav").exists()


def test_tempo_map_and_controls_compose_with_musicxml(tiny_model, tmp_path):
    path = write(tmp_path, "piece.musicxml", ("Piano", repeat_piece()))
    out = tmp_path / "mapped.mid"
    args = ("--tempo-map", "--expressiveness", "0.5", "--dynamics", "1.5", "--pedal", "score")
    assert run_cli(tiny_model, path, "-o", out, *args) == 0
    assert sorted(midi.read_midi(out).pitch.tolist()) == partitura_pitches(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--audio", "x.mp3"], "audio must end in .wav, .flac"),
        (["--plot", "x.jpg"], "plot must end in .png"),
        (["--expressiveness", "-1"], "expressiveness must be between 0 and 4"),
        (["--variants", "2", "--audio", "one.wav"], "names one file for 2 outputs"),
    ],
)
def test_bad_musician_options_fail_before_rendering(tiny_model, tmp_path, capsys, args, message):
    score = make_score(tmp_path / "s.mid", 10)
    assert run_cli(tiny_model, score, "-o", tmp_path / "o.mid", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.mid").exists()


def test_exaggerated_expressiveness_keeps_every_repeated_note(tmp_path):
    """Gaps the score has stay >= the renderer's floor however far they are exaggerated."""
    n = 8
    s_on = np.arange(n) * 100
    none = np.zeros(0, int)
    score = midi.Notes(s_on, s_on + 90, np.full(n, 60), np.full(n, 64), none, none)
    p_on = np.cumsum([0] + [180, 20] * 3 + [180])
    perf = dataclasses.replace(score, onset=p_on, offset=p_on + 15)
    loud = controls.apply(perf, score, controls.Controls(expressiveness=4.0))
    assert np.all(np.diff(loud.onset) >= tokenizer.MIN_RENDER_IOI_MS)
    midi.write_midi(loud, tmp_path / "x.mid")
    assert len(midi.read_midi(tmp_path / "x.mid")) == n


def test_unread_inputs_from_an_exported_yaml_list_is_a_tuple():
    from pianist_jax.config.schema import ModelConfig

    cfg = ModelConfig(unread_inputs=["velocity", "pedal"])
    assert cfg.unread_inputs == ("velocity", "pedal") and hash(cfg)
