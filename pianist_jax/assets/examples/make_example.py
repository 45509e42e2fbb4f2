"""Write ``little_waltz.mid``: the example score the README renders (regenerate with this script).

    python pianist_jax/assets/examples/make_example.py [OUT.mid]

"Little Waltz in G" is an original 16-bar piece written for this project (two 8-bar phrases,
3/4 at 108 BPM, G major): right hand melody in track 1, left hand waltz accompaniment (bass on
beat 1, chord on beats 2 and 3) in track 2, with held chords at the half cadence (bar 8) and at
the end (bar 16) where a pianist would pedal. Score velocities mark the dynamics (phrase 1 p,
phrase 2 mf), as ASAP's score MIDI does. No pedal and no timing nuance: that is the model's job.

The piece and this file are dedicated to the public domain (CC0 1.0).

Only mido is needed; the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mido

TPB = 480  # ticks per quarter note
BPM = 108
NAME = "little_waltz.mid"
BAR = 3  # quarters per bar

_STEPS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def pitch(name: str) -> int:
    """'F#4' -> 66 (C4 = 60)."""
    step, accidental, octave = name[0], name[1:-1], int(name[-1])
    return 12 * (octave + 1) + _STEPS[step] + {"": 0, "#": 1, "b": -1}[accidental]


# Right hand, one list per bar: (note, quarters). Bars 1-8 end on the dominant (half cadence),
# bars 9-16 on the tonic.
MELODY = [
    [("B4", 1), ("D5", 1), ("G5", 1)],  # 1  G
    [("E5", 1.5), ("D5", 0.5), ("C5", 1)],  # 2  C
    [("B4", 1), ("A4", 0.5), ("B4", 0.5), ("D5", 1)],  # 3  G
    [("A4", 2), ("D5", 1)],  # 4  D
    [("G5", 1.5), ("F#5", 0.5), ("E5", 1)],  # 5  Em
    [("E5", 1), ("D5", 0.5), ("C5", 0.5), ("E5", 1)],  # 6  C
    [("D5", 1), ("C5", 1), ("A4", 1)],  # 7  D7
    [("A4", 3)],  # 8  D (held)
    [("B4", 1), ("D5", 1), ("G5", 1)],  # 9  G
    [("E5", 1.5), ("D5", 0.5), ("C5", 1)],  # 10 C
    [("B4", 0.5), ("C5", 0.5), ("D5", 1), ("B4", 1)],  # 11 G
    [("E5", 1), ("G5", 1), ("E5", 1)],  # 12 Em
    [("G5", 1.5), ("E5", 0.5), ("C5", 1)],  # 13 C
    [("A5", 1), ("E5", 1), ("C5", 1)],  # 14 Am
    [("A4", 1.5), ("C5", 0.5), ("F#4", 1)],  # 15 D7
    [("G4", 3)],  # 16 G (held)
]

# Left hand per bar: (bass, chord tones, held). held=False: bass on beat 1, chord on beats 2
# and 3; held=True: bass and chord together for the whole bar.
HARMONY = [
    ("G2", ("B3", "D4"), False),
    ("C3", ("G3", "C4", "E4"), False),
    ("G2", ("B3", "D4"), False),
    ("D3", ("F#3", "A3"), False),
    ("E3", ("G3", "B3"), False),
    ("C3", ("G3", "C4", "E4"), False),
    ("D3", ("F#3", "C4"), False),
    ("D2", ("D3", "F#3", "A3"), True),
    ("G2", ("B3", "D4"), False),
    ("C3", ("G3", "C4", "E4"), False),
    ("B2", ("G3", "D4"), False),
    ("E3", ("G3", "B3"), False),
    ("C3", ("G3", "C4", "E4"), False),
    ("A2", ("A3", "C4", "E4"), False),
    ("D3", ("F#3", "A3", "C4"), False),
    ("G2", ("G3", "B3", "D4"), True),
]

# (right hand, left hand) velocity per phrase: p, then mf.
DYNAMICS = [(72, 58), (84, 68)]
LEGATO = 0.95  # sounding fraction of a written value (score MIDI convention: slightly detached)


def score_notes() -> tuple[list, list]:
    """([(tick on, tick off, pitch, velocity)] right hand, same for the left hand)."""
    assert len(MELODY) == len(HARMONY) == 16
    rh, lh = [], []
    for bar, (melody, (bass, chord, held)) in enumerate(zip(MELODY, HARMONY)):
        start = bar * BAR * TPB
        vel_r, vel_l = DYNAMICS[bar // 8]
        t = start
        assert sum(q for _, q in melody) == BAR, f"bar {bar + 1} does not fill 3/4"
        for name, quarters in melody:
            length = round(quarters * TPB)
            rh.append((t, t + round(length * LEGATO), pitch(name), vel_r))
            t += length
        if held:
            for name in (bass, *chord):
                lh.append((start, start + round(BAR * TPB * LEGATO), pitch(name), vel_l))
        else:
            lh.append((start, start + round(TPB * LEGATO), pitch(bass), vel_l))
            for beat in (1, 2):
                for name in chord:
                    on = start + beat * TPB
                    lh.append((on, on + round(TPB * LEGATO), pitch(name), vel_l - 6))
    return rh, lh


def _track(name: str, notes: list, channel: int = 0) -> mido.MidiTrack:
    events = []
    for on, off, p, v in notes:
        events.append((off, 0, mido.Message("note_off", note=p, velocity=0, channel=channel)))
        events.append((on, 1, mido.Message("note_on", note=p, velocity=v, channel=channel)))
    events.sort(key=lambda e: (e[0], e[1], e[2].note))  # offs before ons at the same tick
    track = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name=name, time=0),
            mido.Message("program_change", program=0, channel=channel, time=0),
        ]
    )
    now = 0
    for tick, _, msg in events:
        track.append(msg.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def make_midi() -> mido.MidiFile:
    rh, lh = score_notes()
    meta = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name="Little Waltz in G (pianist-jax example, CC0)"),
            mido.MetaMessage("time_signature", numerator=3, denominator=4),
            mido.MetaMessage("key_signature", key="G"),
            mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(BPM)),
            mido.MetaMessage("end_of_track", time=0),
        ]
    )
    return mido.MidiFile(
        type=1, ticks_per_beat=TPB, tracks=[meta, _track("Right hand", rh), _track("Left hand", lh)]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / NAME
    make_midi().save(str(out))
    rh, lh = score_notes()
    print(
        f"wrote {out}: {len(rh) + len(lh)} notes ({len(rh)} right hand, {len(lh)} left hand), "
        f"{len(MELODY)} bars of 3/4 at {BPM} BPM"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
