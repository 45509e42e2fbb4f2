"""The vectorised reader agrees with a plain sequential model on random multi-track,
multi-channel, multi-program files (program changes between notes and pedal, spurious
note-offs, zero-velocity note-ons, drums, tempo changes)."""

import mido
import numpy as np
from sequential_reader import read_sequential

from pianist_jax import midi, tokenizer

KINDS = ["on", "on", "on", "on", "off", "off", "cc64", "cc64", "cc7", "prog", "bend", "tempo"]


def random_tracks(rng: np.random.Generator):
    """3 tracks of 40 events: few pitches and channels, many zero deltas, so same-pitch and
    same-time collisions across instruments are common (that is where order matters)."""
    return [
        [
            (
                int(rng.choice([0, 0, 0, 1, 7, 30])),
                str(rng.choice(KINDS)),
                int(rng.choice([0, 0, 1, 2, 9])),
                int(rng.integers(58, 64)),
                int(rng.integers(0, 128)),
            )
            for _ in range(40)
        ]
        for _ in range(3)
    ]


def build(tracks, tpb):
    mf = mido.MidiFile(type=1, ticks_per_beat=tpb)
    for events in tracks:
        track, still_open = mido.MidiTrack(), []
        for delta, kind, ch, pitch, value in events:
            if kind == "on":
                vel = value % 3 * 40  # 0 = a note-off in disguise
                track.append(
                    mido.Message("note_on", note=pitch, velocity=vel, channel=ch, time=delta)
                )
                if vel:
                    still_open.append((ch, pitch))
            elif kind == "off":
                track.append(mido.Message("note_off", note=pitch, channel=ch, time=delta))
            elif kind in ("cc64", "cc7"):
                track.append(
                    mido.Message(
                        "control_change", control=int(kind[2:]), value=value, channel=ch, time=delta
                    )
                )
            elif kind == "prog":
                track.append(
                    mido.Message("program_change", program=value % 3, channel=ch, time=delta)
                )
            elif kind == "bend":
                track.append(mido.Message("pitchwheel", pitch=value, channel=ch, time=delta))
            else:
                track.append(
                    mido.MetaMessage("set_tempo", tempo=300_000 + value * 5000, time=delta)
                )
        for ch, pitch in still_open:  # close everything, so no repair warning is involved
            track.append(mido.Message("note_off", note=pitch, channel=ch, time=3))
        mf.tracks.append(track)
    return mf


def expected_ids(mf: mido.MidiFile, ev) -> np.ndarray:
    notes, ccs = read_sequential(mf)
    n = len(notes)
    ticks = np.array(
        [s for s, *_ in notes] + [e for _, e, *_ in notes] + [t for t, _ in ccs], dtype=np.int64
    )
    ms = np.rint(
        midi.tick_to_seconds(ticks, ev.tempo_changes, mf.ticks_per_beat, ev.max_tick) * 1000.0
    ).astype(np.int64)
    norm = midi.normalise(
        ms[:n],
        ms[n : 2 * n],
        np.array([p for *_, p, _ in notes], dtype=np.int64),
        np.array([v for *_, v in notes], dtype=np.int64),
        np.arange(n),
        ms[2 * n :],
        np.array([v for _, v in ccs], dtype=np.int64),
    )
    return tokenizer.encode_notes(norm)


def test_reader_matches_sequential_model(tmp_path):
    rng = np.random.default_rng(20261128)
    path = tmp_path / "r.mid"
    for _ in range(300):
        mf = build(random_tracks(rng), int(rng.choice([96, 480, 500])))
        mf.save(path)
        mf = mido.MidiFile(path)
        if not read_sequential(mf)[0]:
            continue
        _, ev = midi.read_events(path)
        np.testing.assert_array_equal(tokenizer.encode_file(path), expected_ids(mf, ev))
