"""The fast scanner returns exactly what mido + midi_events.extract return, or declines."""

import io

import mido
import numpy as np
import pytest
from midi_fixtures import note_track, save

from pianist_jax import midi
from pianist_jax.midi import events as midi_events
from pianist_jax.midi import scan as midi_scan


def same_events(data: bytes) -> bool:
    fast = midi_scan.scan(data)
    assert fast is not None, "scanner declined a well-formed file"
    fmt, division, ev = fast
    mf = mido.MidiFile(file=io.BytesIO(data))
    ref = midi_events.extract(mf)
    assert (fmt, division) == (mf.type, mf.ticks_per_beat)
    assert ev.max_tick == ref.max_tick and ev.tempo_changes == ref.tempo_changes
    for name in ("note", "note_prog", "touch", "track_len", "final_prog"):
        np.testing.assert_array_equal(getattr(ev, name), getattr(ref, name), err_msg=name)
    return True


def rich_file(path):
    """Several tracks, running status (mido writes it), program changes, pitch bends,
    sysex, text metas, tempo changes at 0 and later, drums, a spurious note_off."""
    meta = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name="conductor"),
            mido.MetaMessage("set_tempo", tempo=400_000),
            mido.MetaMessage("time_signature", numerator=3, denominator=8),
            mido.MetaMessage("key_signature", key="Eb"),
            mido.MetaMessage("set_tempo", tempo=650_000, time=700),
            mido.MetaMessage("marker", text="B section", time=10),
        ]
    )
    extra = [
        (0, mido.Message("sysex", data=[0x7E, 0x7F, 0x09, 0x01])),
        (0, mido.Message("program_change", program=5)),
        (30, mido.Message("pitchwheel", pitch=300)),
        (40, mido.Message("control_change", control=7, value=90)),
        (50, mido.Message("control_change", control=64, value=127)),
        (600, mido.Message("program_change", program=1)),
        (650, mido.Message("control_change", control=64, value=0)),
        (660, mido.Message("note_off", note=99)),
        (700, mido.Message("aftertouch", value=3)),
        (710, mido.Message("polytouch", note=60, value=3)),
    ]
    piano = note_track([(i * 100, i * 100 + 150, 48 + i, 30 + i) for i in range(12)], extra=extra)
    drums = note_track([(0, 50, 36, 100), (200, 250, 38, 90)], channel=9)
    return save(path, [meta, piano, drums, mido.MidiTrack()])


def test_scanner_matches_mido_on_rich_file(tmp_path):
    data = rich_file(tmp_path / "rich.mid").read_bytes()
    assert same_events(data)


def test_scanner_matches_mido_on_real_files(shared_data):
    files = sorted((shared_data / "asap").rglob("*.mid"))[::60]
    files += sorted((shared_data / "unlabeled").rglob("*.mid"))[::60]
    assert len(files) > 30
    for f in files:
        assert same_events(f.read_bytes()), f


@pytest.mark.parametrize("mutate", ["high_data_byte", "bad_meta", "truncated", "realtime_byte"])
def test_scanner_declines_irregular_files(tmp_path, mutate):
    data = bytearray(rich_file(tmp_path / "r.mid").read_bytes())
    if mutate == "high_data_byte":
        i = data.index(bytes([0x90, 48]))
        data[i + 2] = 0xF0
    elif mutate == "bad_meta":
        i = data.index(bytes([0xFF, 0x59, 0x02]))
        data[i + 3] = 0x40
    elif mutate == "truncated":
        data = data[:-20]
    else:
        i = data.index(bytes([0x90, 48]))
        data[i] = 0xF8  # timing clock inside a track
    assert midi_scan.scan(bytes(data)) is None


def test_read_midi_same_result_through_either_path(tmp_path, monkeypatch):
    path = rich_file(tmp_path / "r.mid")
    fast = midi.read_midi(path)
    monkeypatch.setattr(midi_scan, "scan", lambda data: None)
    slow = midi.read_midi(path)
    for name in ("onset", "offset", "pitch", "velocity", "pedal_ms", "pedal_value"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))


def test_mutated_files_give_notes_or_midi_error_never_a_crash(tmp_path):
    """Random byte flips, cuts and insertions: every outcome is Notes or a MidiError."""
    import warnings

    from pianist_jax import tokenizer

    good = rich_file(tmp_path / "r.mid").read_bytes()
    rng = np.random.default_rng(11)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(data)))
            mode = int(rng.integers(0, 3))
            if mode == 0:
                data[i] = int(rng.integers(0, 256))
            elif mode == 1:
                del data[i : i + int(rng.integers(1, 8))]
            else:
                data[i:i] = bytes(rng.integers(0, 256, 3).astype(np.uint8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", midi.MidiWarning)
            try:
                ids = tokenizer.encode_notes(midi.read_midi("fuzz.mid", bytes(data)))
            except midi.MidiError as err:
                assert "fuzz.mid" in str(err)
                outcomes["error"] += 1
            else:
                assert ids.min() >= 0 and ids.max() < tokenizer.VOCAB_SIZE
                outcomes["ok"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 20
