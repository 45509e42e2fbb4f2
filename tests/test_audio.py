"""pianist_jax.render.audio: performance MIDI -> WAV/FLAC with the fluidsynth program.

Rendering tests skip where `fluidsynth` or a SoundFont is missing (.ci/run installs both); the
error-path tests run everywhere. Fixtures are written with `midi.write_midi` in tmp_path.
"""

import os
import shutil
import subprocess
import sys
import wave

import mido
import numpy as np
import pytest

from pianist_jax import midi
from pianist_jax.render import audio


def _soundfont():
    try:
        return audio.find_soundfont()
    except audio.AudioError:
        return None


# The small TimGM6mb (CI) renders faster than FluidR3 when both are installed.
_TIMGM = "/usr/share/sounds/sf2/TimGM6mb.sf2"
SOUNDFONT = _TIMGM if os.path.isfile(_TIMGM) else _soundfont()
needs_fluidsynth = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or SOUNDFONT is None,
    reason="needs the fluidsynth program and a SoundFont (apt-get install fluidsynth "
    "timgm6mb-soundfont)",
)
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="fake fluidsynth is a sh script")

# Well separated notes (450-650 ms apart), various pitches, velocity 90.
ONSETS = np.array([300, 850, 1300, 1950, 2450, 3100], np.int64)
OFFSETS = ONSETS + np.array([250, 200, 300, 220, 260, 280])
PITCHES = np.array([60, 72, 55, 67, 48, 79], np.int64)
FRAME_MS = 5


def _write(path, onset=ONSETS, offset=OFFSETS, pitch=PITCHES, pedal_ms=(), pedal_value=()):
    notes = midi.Notes(
        onset=np.asarray(onset, np.int64),
        offset=np.asarray(offset, np.int64),
        pitch=np.asarray(pitch, np.int64),
        velocity=np.full(len(onset), 90, np.int64),
        pedal_ms=np.asarray(pedal_ms, np.int64),
        pedal_value=np.asarray(pedal_value, np.int64),
    )
    midi.write_midi(notes, path)
    return path


def _read_wav(path):
    """(samples float [frames, channels] in -1..1, sample rate); 16-bit PCM only."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        raw = w.readframes(w.getnframes())
        x = np.frombuffer(raw, np.int16).reshape(-1, w.getnchannels()) / 32768.0
        return x, w.getframerate()


def _envelope_db(x, sr):
    """(energy per ~FRAME_MS frame in dB below the loudest frame, frame start times in ms)."""
    hop = sr * FRAME_MS // 1000
    e = (x[: len(x) // hop * hop] ** 2).mean(axis=1).reshape(-1, hop).mean(axis=1)
    db = 10 * np.log10(e + 1e-12)
    return db - db.max(), np.arange(len(e)) * hop * 1000 / sr


def _detect_onsets(db, t_ms):
    """Times (ms) where energy rises 12 dB above its minimum over the previous 4 frames to
    within 40 dB of the peak; rising frames less than 10 frames apart are one onset (the first)."""
    floor = np.array([db[max(0, i - 4) : i].min() if i else -120.0 for i in range(len(db))])
    frames = np.nonzero((db - floor > 12) & (db > -40))[0]
    starts = [f for k, f in enumerate(frames) if k == 0 or f - frames[k - 1] > 10]
    return t_ms[starts]


def _matches(detected, expected, tol_ms=25):
    """Every expected onset has a detected one within tol_ms, and vice versa."""
    if len(detected) == 0:
        return False
    d = np.abs(np.asarray(detected)[:, None] - np.asarray(expected)[None, :])
    return bool((d.min(axis=0) <= tol_ms).all() and (d.min(axis=1) <= tol_ms).all())


@needs_fluidsynth
def test_wav_length_rate_and_onsets(tmp_path):
    mid = _write(tmp_path / "perf.mid")
    out = audio.synthesize(mid, tmp_path / "perf.wav", soundfont=SOUNDFONT, sample_rate=22050)
    assert out == tmp_path / "perf.wav"
    with wave.open(str(out), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 2, 2)
    x, sr = _read_wav(out)
    seconds, last = len(x) / sr, OFFSETS.max() / 1000
    assert last + audio.TAIL_SECONDS <= seconds <= last + 5.0, seconds

    db, t_ms = _envelope_db(x, sr)
    onsets = _detect_onsets(db, t_ms)
    assert _matches(onsets, ONSETS), f"detected {onsets.round().tolist()}, notes at {ONSETS}"
    # The check can tell: notes 100 ms off, or one missing, do not match.
    assert not _matches(onsets, ONSETS + 100) and not _matches(onsets, ONSETS - 100)
    assert not _matches(onsets, ONSETS[:-1])
    # The release is rendered: the audio fades out instead of being cut.
    assert db[-20:].max() < -45, db[-20:].max()
    # Same input, same bytes.
    again = audio.synthesize(mid, tmp_path / "again.wav", soundfont=SOUNDFONT, sample_rate=22050)
    assert again.read_bytes() == out.read_bytes()


@needs_fluidsynth
def test_pedal_held_past_last_note_is_rendered_to_the_end(tmp_path):
    # Pedal down from the start, up 1.2 s after the last key is released.
    up = int(OFFSETS.max()) + 1200
    mid = _write(tmp_path / "pedal.mid", pedal_ms=[0, up], pedal_value=[127, 0])
    x, sr = _read_wav(audio.synthesize(mid, tmp_path / "pedal.wav", soundfont=SOUNDFONT))
    assert sr == 44100
    assert up / 1000 + audio.TAIL_SECONDS <= len(x) / sr <= up / 1000 + 5.0
    db, t_ms = _envelope_db(x, sr)
    # Still sounding (sustained) until the pedal goes up, then fading out to near silence.
    assert db[(t_ms > OFFSETS.max() + 100) & (t_ms < up - 50)].min() > -40
    assert db[-20:].max() < -45


def test_padded_copy_lets_go_at_the_last_event_and_ends_after_the_tail(tmp_path):
    # Why every fluidsynth version renders the release (those before 2.3.1 stop at the end).
    src = _write(tmp_path / "perf.mid", pedal_ms=[0, 4000], pedal_value=[127, 127])
    dst = tmp_path / "padded.mid"
    seconds = audio._write_padded(src, dst)
    original, padded = mido.MidiFile(src), mido.MidiFile(dst)
    assert seconds == pytest.approx(4.0 + audio.TAIL_SECONDS)
    assert padded.length == pytest.approx(original.length + audio.TAIL_SECONDS)
    assert padded.tracks[:-1] == original.tracks
    last = padded.tracks[-1]
    assert last[0].time == 4000 and last[-1].type == "end_of_track"
    lets_go = {(m.channel, m.control, m.value) for m in last if m.type == "control_change"}
    assert lets_go == {(c, cc, 0) for c in range(16) for cc in (64, 123)}


@needs_fluidsynth
def test_flac(tmp_path):
    types = subprocess.run(["fluidsynth", "-T", "help"], capture_output=True, text=True).stdout
    if "'flac'" not in types:
        pytest.skip("this fluidsynth build cannot write FLAC")
    mid = _write(tmp_path / "perf.mid")
    out = audio.synthesize(mid, tmp_path / "perf.flac", soundfont=SOUNDFONT)
    assert out.read_bytes()[:4] == b"fLaC"
    assert sorted(os.listdir(tmp_path)) == ["perf.flac", "perf.mid"]  # no temporary left


def test_fluidsynth_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(audio.AudioError) as e:
        audio.synthesize(_write(tmp_path / "perf.mid"), tmp_path / "perf.wav")
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install fluidsynth" in msg and "brew install" in msg
    assert not (tmp_path / "perf.wav").exists()


def test_bad_suffix(tmp_path):
    with pytest.raises(audio.AudioError, match=r"\.wav, \.flac"):
        audio.synthesize(_write(tmp_path / "perf.mid"), tmp_path / "perf.mp3")


def test_find_soundfont_order_and_errors(tmp_path, monkeypatch):
    a, b = tmp_path / "a.sf2", tmp_path / "b.sf2"
    a.touch()
    b.touch()
    monkeypatch.setattr(
        audio, "SOUNDFONT_SEARCH", (str(tmp_path / "none.sf2"), str(tmp_path / "*.sf2"))
    )
    monkeypatch.delenv(audio.SOUNDFONT_ENV, raising=False)
    assert audio.find_soundfont() == a  # first match of the search list
    monkeypatch.setenv(audio.SOUNDFONT_ENV, str(b))
    assert audio.find_soundfont() == b  # the environment variable beats the search list
    assert audio.find_soundfont(a) == a  # --soundfont beats both
    with pytest.raises(audio.AudioError, match="missing.sf2"):
        audio.find_soundfont(tmp_path / "missing.sf2")
    monkeypatch.setenv(audio.SOUNDFONT_ENV, str(tmp_path / "gone.sf2"))
    with pytest.raises(audio.AudioError, match=audio.SOUNDFONT_ENV):
        audio.find_soundfont()

    monkeypatch.delenv(audio.SOUNDFONT_ENV)
    monkeypatch.setattr(audio, "SOUNDFONT_SEARCH", (str(tmp_path / "nothing" / "*.sf2"),))
    with pytest.raises(audio.AudioError) as e:
        audio.find_soundfont()
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install fluid-soundfont-gm" in msg
    assert "--soundfont" in msg and audio.SOUNDFONT_ENV in msg


@needs_fluidsynth
def test_not_a_soundfont_or_not_midi(tmp_path):
    junk = tmp_path / "junk.sf2"
    junk.write_bytes(b"not a soundfont at all")
    mid = _write(tmp_path / "perf.mid")
    with pytest.raises(audio.AudioError, match="not a SoundFont"):
        audio.synthesize(mid, tmp_path / "perf.wav", soundfont=junk)
    bad = tmp_path / "bad.mid"
    bad.write_bytes(mid.read_bytes()[:60])  # truncated
    with pytest.raises(audio.AudioError, match="not a readable MIDI file"):
        audio.synthesize(bad, tmp_path / "perf.wav", soundfont=SOUNDFONT)
    assert sorted(os.listdir(tmp_path)) == ["bad.mid", "junk.sf2", "perf.mid"]


FAKE = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = -F ] && out=$2; shift; done
printf 'RIFF half a file' > "$out"
echo "fluidsynth: error: first problem" >&2
echo "fluidsynth: error: {why}" >&2
exit {rc}
"""


@posix_only
@pytest.mark.parametrize("rc", [1, 0])  # fluidsynth exits 0 after many errors
def test_failed_synthesis_leaves_no_file(tmp_path, monkeypatch, rc):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fluidsynth"
    fake.write_text(FAKE.format(why="out of cheese", rc=rc))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    sf2 = tmp_path / "fake.sf2"
    sf2.write_bytes(b"RIFF\0\0\0\0sfbk")
    mid = _write(tmp_path / "perf.mid")
    out = tmp_path / "perf.wav"
    out.write_bytes(b"previous render")
    with pytest.raises(audio.AudioError, match="out of cheese") as e:
        audio.synthesize(mid, out, soundfont=sf2)
    assert "\n" not in str(e.value)
    assert out.read_bytes() == b"previous render"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["bin", "fake.sf2", "perf.mid", "perf.wav"]
