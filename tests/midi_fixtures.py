"""Synthetic MIDI files built in code (no binary fixtures in the repo)."""

from __future__ import annotations

import mido


def note_track(notes, channel=0, ticks_per_beat=480, extra=()):
    """notes: [(start_tick, end_tick, pitch, velocity)] -> a MidiTrack with absolute-time sort."""
    events = []
    for s, e, p, v in notes:
        # at equal ticks: note_offs, then note_ons, then the offs of zero-length notes
        events.append((s, 1, mido.Message("note_on", note=p, velocity=v, channel=channel)))
        events.append(
            (e, 2 if e == s else 0, mido.Message("note_off", note=p, velocity=0, channel=channel))
        )
    for t, msg in extra:
        events.append((t, 0, msg))
    events.sort(key=lambda x: (x[0], x[1]))
    track, last = mido.MidiTrack(), 0
    for t, _, msg in events:
        track.append(msg.copy(time=t - last))
        last = t
    return track


def save(path, tracks, ticks_per_beat=480, type=1):
    mf = mido.MidiFile(type=type, ticks_per_beat=ticks_per_beat)
    mf.tracks.extend(tracks)
    mf.save(path)
    return path


def simple_file(path, n=8, channel=0):
    notes = [(i * 240, i * 240 + 200, 60 + i % 12, 64 + i) for i in range(n)]
    return save(path, [note_track(notes, channel=channel)])
