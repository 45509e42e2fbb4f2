"""A slow, event-by-event model of how the reference reads MIDI, for cross-checking.

Written from the semantics documented in pianist_jax/midi/events.py (FIFO pairing per
(track, channel, pitch); notes listed per instrument (track, channel, program at the note-off)
in order of note-off; control changes collected in per-instrument lists, with per-(track,
channel) straggler lists adopted by the first instrument created afterwards). It is plain
Python with no vectorisation, so a disagreement points at the fast code.
"""

from __future__ import annotations

import mido


def read_sequential(mf: mido.MidiFile):
    """-> (notes [(start, end, pitch, velocity)] in instrument order, cc64 [(tick, value)])."""
    instruments = {}  # (track, channel, program) -> {"notes": [...], "ccs": list, "drum": bool}
    stragglers = {}  # (track, channel) -> shared list of control changes
    for ti, track in enumerate(mf.tracks):
        tick, program, open_notes = 0, [0] * 16, {}
        for msg in track:
            tick += msg.time
            if msg.type == "program_change":
                program[msg.channel] = msg.program
            elif msg.type == "note_on" and msg.velocity > 0:
                open_notes.setdefault((msg.channel, msg.note), []).append((tick, msg.velocity))
            elif msg.type in ("note_on", "note_off"):
                queue = open_notes.get((msg.channel, msg.note))
                if not queue:
                    continue  # spurious note-off
                start, vel = queue.pop(0)
                key = (ti, msg.channel, program[msg.channel])
                if key not in instruments:
                    ccs = stragglers.get((ti, msg.channel), [])
                    instruments[key] = {"notes": [], "ccs": ccs, "drum": msg.channel == 9}
                instruments[key]["notes"].append((start, tick, msg.note, vel))
            elif msg.type in ("control_change", "pitchwheel"):
                key = (ti, msg.channel, program[msg.channel])
                if key in instruments:
                    target = instruments[key]["ccs"]
                else:
                    target = stragglers.setdefault((ti, msg.channel), [])
                if msg.type == "control_change" and msg.control == 64:
                    target.append((tick, msg.value))
    notes, ccs = [], []
    for inst in instruments.values():  # insertion order = creation order
        if not inst["drum"]:
            notes += inst["notes"]
            ccs += inst["ccs"]
    return notes, ccs
