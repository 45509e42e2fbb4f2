"""MIDI reading semantics, normalisation, the writer, and bad input."""

import struct
import warnings

import mido
import numpy as np
import pytest
from midi_fixtures import note_track, save, simple_file

from pianist_jax import midi


def msgs_track(*events):
    """events: (delta, Message) pairs."""
    return mido.MidiTrack([m.copy(time=d) for d, m in events])


def on(note, vel=64, ch=0):
    return mido.Message("note_on", note=note, velocity=vel, channel=ch)


def off(note, ch=0, zero_velocity_on=False):
    if zero_velocity_on:
        return mido.Message("note_on", note=note, velocity=0, channel=ch)
    return mido.Message("note_off", note=note, channel=ch)


def cc64(value, ch=0):
    return mido.Message("control_change", control=64, value=value, channel=ch)


def test_fifo_pairing_and_velocity_zero_is_note_off(tmp_path):
    # two overlapping note_ons of one pitch: the first note_off closes the first note_on
    tr = msgs_track(
        (0, on(60, 10)),
        (480, on(60, 20)),
        (480, off(60, zero_velocity_on=True)),
        (480, off(60)),
        (0, off(60)),
    )  # the last note_off is spurious: ignored
    notes = midi.read_midi(save(tmp_path / "a.mid", [tr]))
    # ms at 120 BPM default tempo, 480 tpb: 1 beat = 500 ms. Raw notes [0,1000] v10, [500,1500] v20;
    # the earlier one is cut at the next onset.
    assert notes.onset.tolist() == [0, 500]
    assert notes.offset.tolist() == [500, 1500]
    assert notes.velocity.tolist() == [10, 20]


def test_global_tempo_map_from_all_tracks(tmp_path):
    tempo = msgs_track(
        (0, mido.MetaMessage("set_tempo", tempo=1_000_000)),
        (960, mido.MetaMessage("set_tempo", tempo=250_000)),
    )
    notes = note_track([(0, 480, 60, 80), (960, 1440, 62, 80), (1440, 1920, 64, 80)])
    got = midi.read_midi(save(tmp_path / "t.mid", [tempo, notes]))
    # 60 BPM for 2 beats (2000 ms), then 240 BPM (250 ms per beat)
    assert got.onset.tolist() == [0, 2000, 2250]
    assert got.offset.tolist() == [1000, 2250, 2500]


def test_drums_dropped_pedal_from_all_tracks(tmp_path):
    piano = note_track([(0, 480, 60, 80)], channel=0, extra=[(100, cc64(127)), (400, cc64(0))])
    right = note_track([(480, 960, 72, 90)], channel=1, extra=[(600, cc64(100, ch=1))])
    drums = note_track([(0, 240, 36, 100)], channel=9, extra=[(50, cc64(127, ch=9))])
    got = midi.read_midi(save(tmp_path / "d.mid", [piano, right, drums]))
    assert got.pitch.tolist() == [60, 72]

    def t(ticks):
        return round(ticks * 500 / 480)

    assert got.pedal_ms.tolist() == [t(100), t(400), t(600)]
    assert got.pedal_value.tolist() == [127, 0, 100]


def test_zero_length_and_same_pitch_overlap(tmp_path):
    tr = note_track([(0, 0, 60, 80), (480, 2000, 62, 80), (960, 1200, 62, 90), (960, 1300, 64, 1)])
    got = midi.read_midi(save(tmp_path / "z.mid", [tr]))
    assert got.onset.tolist() == [0, 500, 1000, 1000]
    assert got.pitch.tolist() == [60, 62, 62, 64]
    # FIFO: the note_off at 1200 closes the 62 from 480, the one at 2000 the 62 from 960;
    # the first is then cut at the second's onset.
    assert (got.offset - got.onset).tolist() == [1, 500, 1083, 354]


def test_unclosed_note_closed_at_end_with_warning(tmp_path):
    tr = msgs_track(
        (0, on(60)), (480, on(64)), (480, off(64)), (960, mido.MetaMessage("end_of_track"))
    )
    with pytest.warns(midi.MidiWarning, match="without note_off"):
        got = midi.read_midi(save(tmp_path / "u.mid", [tr]))
    assert got.pitch.tolist() == [60, 64]
    assert got.offset.tolist() == [2000, 1000]  # closed at the last event of the file


def test_out_of_range_data_byte_clipped_with_warning(tmp_path):
    path = simple_file(tmp_path / "c.mid")
    data = bytearray(path.read_bytes())
    i = data.index(bytes([0x90, 60]))  # first note_on: status, pitch 60, velocity 64
    data[i + 2] = 0xC8  # velocity byte 200 (> 127)
    bad = tmp_path / "bad.mid"
    bad.write_bytes(bytes(data))
    with pytest.warns(midi.MidiWarning, match="clipped out-of-range data bytes"):
        got = midi.read_midi(bad)
    assert got.velocity[0] == 127


def test_undecodable_meta_message_skipped(tmp_path):
    path = simple_file(tmp_path / "m.mid")
    mf = mido.MidiFile(path)
    mf.tracks[0].insert(0, mido.MetaMessage("key_signature", key="C"))
    mf.save(path)
    data = bytearray(path.read_bytes())
    i = data.index(bytes([0xFF, 0x59, 0x02]))
    data[i + 3] = 0x40  # 64 sharps: not a key
    path.write_bytes(bytes(data))
    with pytest.warns(midi.MidiWarning, match="skipped undecodable meta 0x59"):
        got = midi.read_midi(path)
    assert len(got) == 8


def _header(fmt, ntracks, division):
    return b"MThd" + struct.pack(">IhhH", 6, fmt, ntracks, division)


def bad_files(tmp_path):
    """name -> (path, expected error class, message fragment)."""
    good = simple_file(tmp_path / "good.mid").read_bytes()
    cases = {
        "truncated": (good[: len(good) // 2], midi.MidiParseError, "truncated"),
        "garbage": (bytes(range(256)) * 4, midi.MidiParseError, "not a MIDI file"),
        "wrong_header": (
            b"MThd" + b"\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0" + b"XXXX" + good[18:],
            midi.MidiParseError,
            "MTrk",
        ),
        "smpte": (_header(1, 1, 0xE728) + good[14:], midi.UnsupportedMidiError, "SMPTE"),
        "type2": (_header(2, 1, 480) + good[14:], midi.UnsupportedMidiError, "type-2"),
        "empty": (b"", midi.MidiParseError, "empty file"),
    }
    out = {}
    for name, (data, err, frag) in cases.items():
        p = tmp_path / f"{name}.mid"
        p.write_bytes(data)
        out[name] = (p, err, frag)
    out["no_notes"] = (
        save(tmp_path / "no_notes.mid", [msgs_track((0, cc64(127)))]),
        midi.EmptyMidiError,
        "no notes",
    )
    out["drums_only"] = (
        save(tmp_path / "drums.mid", [note_track([(0, 100, 36, 90)], channel=9)]),
        midi.DrumsOnlyMidiError,
        "drum",
    )
    return out


def test_bad_files_give_specific_errors(tmp_path):
    for name, (path, err, frag) in bad_files(tmp_path).items():
        with pytest.raises(err, match=frag) as info:
            midi.read_midi(path)
        assert isinstance(info.value, midi.MidiError)
        assert str(path) in str(info.value), name


def test_writer_round_trip_and_event_order(tmp_path):
    notes = midi.Notes(
        onset=np.array([0, 100, 100, 250]),
        offset=np.array([100, 200, 180, 400]),
        pitch=np.array([60, 60, 64, 67]),
        velocity=np.array([50, 60, 70, 0]),
        pedal_ms=np.array([0, 100, 300]),
        pedal_value=np.array([127, 0, 64]),
    )
    path = tmp_path / "w.mid"
    with pytest.warns(midi.MidiWarning, match="velocities"):
        midi.write_midi(notes, path)
    mf = mido.MidiFile(path)
    assert mf.ticks_per_beat == 500 and len(mf.tracks) == 2
    assert mf.tracks[0][0].type == "set_tempo" and mf.tracks[0][0].tempo == 500_000
    msgs, t = [], 0
    for m in mf.tracks[1]:
        t += m.time
        if m.type in ("note_on", "note_off", "control_change"):
            msgs.append((t, m.type, getattr(m, "note", None)))
    at_100 = [x for x in msgs if x[0] == 100]
    assert at_100[0] == (100, "note_off", 60)  # note_off before the re-strike
    assert at_100[-1][1] == "note_on"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = midi.read_midi(path)
    assert back.onset.tolist() == [0, 100, 100, 250]
    assert back.offset.tolist() == [100, 200, 180, 400]
    assert back.velocity.tolist() == [50, 60, 70, 1]
    assert back.pedal_ms.tolist() == [0, 100, 300]


def prog(p, ch=0):
    return mido.Message("program_change", program=p, channel=ch)


def test_pedal_follows_reference_instrument_lists(tmp_path):
    """miditoolkit semantics the reference ids depend on (see midi_events docstring)."""
    # Control changes before the first note wait in a straggler list that the first
    # instrument adopts, even after a program change; later ones under another program
    # land in the same list, which a second instrument adopts as well.
    adopted = msgs_track(
        (10, cc64(127)),
        (10, prog(5)),
        (10, on(60)),
        (10, off(60)),
        (10, cc64(0)),
        (10, prog(7)),
        (10, cc64(100)),
        (10, on(62)),
        (10, off(62)),
    )
    # A program change after the only note: the pedal goes to a new straggler list that no
    # instrument ever adopts, so it is dropped (as in the reference).
    lost = msgs_track(
        (0, on(40, ch=1)), (10, off(40, ch=1)), (10, prog(3, ch=1)), (10, cc64(127, ch=1))
    )
    # A channel with control changes but no notes: dropped.
    cc_only = msgs_track((0, cc64(127, ch=2)), (500, cc64(0, ch=2)))
    got = midi.read_midi(save(tmp_path / "lists.mid", [adopted, lost, cc_only], ticks_per_beat=500))

    def ms(tick):  # 500 tpb at 120 BPM: 1 tick = 1 ms
        return tick

    assert got.pedal_ms.tolist() == [ms(10), ms(10), ms(50), ms(50), ms(70), ms(70)]
    assert got.pedal_value.tolist() == [127, 127, 0, 0, 100, 100]


def test_vectorised_pedal_path_equals_emulation(shared_data, tmp_path):
    from pianist_jax.midi import events as midi_events

    files = sorted((shared_data / "asap").rglob("*.mid"))[::97]
    files += sorted((shared_data / "unlabeled" / "pop909").glob("*.mid"))[::101]
    checked = 0
    for f in files:
        _, ev = midi.read_events(f)
        pairs = midi_events.pair_notes(ev)
        if not len(ev.touch):
            continue
        fast = midi_events._sustain_one_program_per_channel(ev.touch, pairs.inst)
        slow = midi_events.sustain_emulated(ev.touch, pairs.inst)
        assert fast is not None, f
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])
        checked += 1
    assert checked > 5
    # a program change mid-channel: the vectorised path declines
    path = save(
        tmp_path / "p.mid", [msgs_track((0, on(60)), (10, off(60)), (0, prog(2)), (5, cc64(127)))]
    )
    _, ev = midi.read_events(path)
    assert (
        midi_events._sustain_one_program_per_channel(ev.touch, midi_events.pair_notes(ev).inst)
        is None
    )


def test_instrument_order_is_creation_order(tmp_path):
    """An instrument is created by its first note-off, whatever its pitches: channel 0 closes
    62 before channel 1 closes anything, so channel 0's list comes first, and at a shared
    time channel 1's pedal value is listed last (the one a reader sees)."""
    tr = msgs_track(
        (0, on(60, ch=0)),
        (0, on(62, ch=0)),
        (10, off(62, ch=0)),
        (0, on(70, ch=1)),
        (5, off(70, ch=1)),
        (5, off(60, ch=0)),
        (10, cc64(100, ch=0)),
        (0, cc64(20, ch=1)),
    )
    got = midi.read_midi(save(tmp_path / "order.mid", [tr], ticks_per_beat=500))
    assert got.pedal_ms.tolist() == [30, 30]
    assert got.pedal_value.tolist() == [100, 20]


def test_writer_refuses_negative_times(tmp_path):
    notes = midi.Notes(
        onset=np.array([-5]),
        offset=np.array([10]),
        pitch=np.array([60]),
        velocity=np.array([60]),
        pedal_ms=np.zeros(0, np.int64),
        pedal_value=np.zeros(0, np.int64),
    )
    with pytest.raises(ValueError, match="negative event times"):
        midi.write_midi(notes, tmp_path / "neg.mid")
    assert not (tmp_path / "neg.mid").exists()


def reference_table(tempo_changes, ticks_per_beat, max_tick):
    """The reference's cumulative tick -> seconds table, written out literally."""
    table = np.zeros(max_tick + 1)
    acc = 0.0
    for k, (start, bpm) in enumerate(tempo_changes):
        spt = (60 / bpm) / float(ticks_per_beat)
        end = tempo_changes[k + 1][0] if k + 1 < len(tempo_changes) else max_tick
        table[start : end + 1] = acc + spt * np.arange(end - start + 1)
        acc = table[end]
    return table


def test_tick_to_seconds_matches_reference_table_sorted_and_unsorted():
    rng = np.random.default_rng(7)
    for trial in range(200):
        max_tick = int(rng.integers(50, 3000))
        n = int(rng.integers(1, 6))
        starts = [0] + sorted(int(t) for t in rng.integers(1, max_tick, n))
        if trial % 2:  # unsorted, as when a later track's tempo events come earlier in time
            starts = [0] + [int(t) for t in rng.permutation(starts[1:])]
        changes = [(t, float(rng.choice([60.0, 90.5, 120.0, 133.3333, 200.0]))) for t in starts]
        tpb = int(rng.choice([96, 384, 480, 1024]))
        ticks = np.arange(max_tick + 1)
        got = midi.tick_to_seconds(ticks, changes, tpb, max_tick)
        np.testing.assert_array_equal(got, reference_table(changes, tpb, max_tick))


def test_corrupt_huge_tick_with_unsorted_tempo_does_not_allocate_a_table(tmp_path):
    # Track 2 sets a tempo before track 1's last change; a note sits at tick ~2**27.
    t1 = msgs_track(
        (0, mido.MetaMessage("set_tempo", tempo=500_000)),
        (1000, mido.MetaMessage("set_tempo", tempo=400_000)),
    )
    t2 = msgs_track(
        (500, mido.MetaMessage("set_tempo", tempo=600_000)), (0, on(60)), (2**27, off(60))
    )
    got = midi.read_midi(save(tmp_path / "huge.mid", [t1, t2]))
    assert len(got) == 1 and got.offset[0] > 10**7
