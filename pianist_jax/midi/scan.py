"""A fast, strict scanner for well-formed Standard MIDI Files; mido handles everything else.

Why: mido builds and validates a Python object per message, which is ~90% of tokenizing
time.  The tokenizer only needs a few integers per message, so this reads them straight
from the bytes and returns the same `midi_events.Events` that `midi_events.extract` builds
from a mido parse (a test checks they are identical on real corpora).  Meta messages are
still decoded by mido's own decoder, so what mido rejects, we reject.

Anything unusual - running status after sysex, system common/real-time bytes, a data byte
above 127, a message running past its chunk, a truncated file, a meta message mido cannot
decode - returns None, and the caller falls back to mido's strict-then-lenient parse, so
behaviour (errors, warnings, repairs) is mido's wherever the fast path is not sure.
"""

from __future__ import annotations

import struct

from mido.midifiles.meta import build_meta_message

from pianist_jax.midi.events import PITCHWHEEL, Collector, Events

# Data bytes after the status byte, per channel-message kind (status >> 4).
_DATA_LEN = {0x8: 2, 0x9: 2, 0xA: 2, 0xB: 2, 0xC: 1, 0xD: 1, 0xE: 2}


class _Bail(Exception):
    """Not something the fast path vouches for; use mido."""


def read_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(format, n_tracks, division, offset of the first chunk), or None if mido should judge."""
    if len(data) < 14 or data[:4] != b"MThd":
        return None
    size = int.from_bytes(data[4:8], "big")
    if size < 6 or 8 + size > len(data):
        return None
    fmt, ntracks, division = struct.unpack(">hhh", data[8:14])
    return fmt, ntracks, division, 8 + size


def scan(data: bytes) -> tuple[int, int, Events] | None:
    """(format, ticks_per_beat, events) of a well-formed file, or None (see module docstring)."""
    header = read_header(data)
    if header is None or header[1] < 0:
        return None
    fmt, ntracks, division, pos = header
    col = Collector()
    try:
        for ti in range(ntracks):
            if data[pos : pos + 4] != b"MTrk" or pos + 8 > len(data):
                return None
            end = pos + 8 + int.from_bytes(data[pos + 4 : pos + 8], "big")
            if end > len(data):
                return None
            _scan_track(data, pos + 8, end, ti, col)
            pos = end
    except (_Bail, IndexError):
        return None
    return fmt, division, col.events()


def _scan_track(data: bytes, i: int, end: int, ti: int, col: Collector) -> None:
    """One MTrk chunk body [i, end) into the collector."""
    add_note, add_prog, add_touch = col.notes.extend, col.progs.append, col.touches.extend
    prog = [0] * 16
    tick = 0
    idx = 0
    last_status = -1
    while i < end:
        b = data[i]
        i += 1
        delta = b & 0x7F
        while b & 0x80:
            b = data[i]
            i += 1
            delta = (delta << 7) | (b & 0x7F)
        tick += delta  # (the delta varint is read inline: this loop is the hot path)
        status = data[i]
        if status < 0x80:  # running status: this byte is the first data byte
            if last_status < 0x80 or last_status >= 0xF0:
                raise _Bail
            status = last_status
        else:
            i += 1
            if status != 0xFF:
                last_status = status
        kind = status >> 4
        if kind < 0xF:
            ch = status & 0x0F
            d1 = data[i]
            if _DATA_LEN[kind] == 2:
                d2 = data[i + 1]
                i += 2
                if d1 > 127 or d2 > 127:
                    raise _Bail
            else:
                i += 1
                if d1 > 127:
                    raise _Bail
            if kind == 0x9:
                add_note((tick, ti, idx, ch, d1, d2))
                add_prog(prog[ch])
            elif kind == 0x8:
                add_note((tick, ti, idx, ch, d1, 0))
                add_prog(prog[ch])
            elif kind == 0xB:
                add_touch((tick, ti, idx, ch, prog[ch], d1, d2))
            elif kind == 0xC:
                prog[ch] = d1
            elif kind == 0xE:
                add_touch((tick, ti, idx, ch, prog[ch], PITCHWHEEL, 0))
        elif status == 0xFF:
            meta_type = data[i]
            i += 1
            length, i = _varint(data, i)
            payload = data[i : i + length]
            if len(payload) != length:
                raise _Bail
            i += length
            try:  # mido's own decoder: it decides what a valid meta message is
                msg = build_meta_message(meta_type, payload, tick)
            except Exception as err:  # noqa: BLE001 - any decode failure
                raise _Bail from err
            if meta_type == 0x51:
                col.set_tempo(tick, msg.tempo)
        elif status in (0xF0, 0xF7):
            length, i = _varint(data, i)
            body = data[i : i + length]
            i += length
            if len(body) != length or any(x > 127 for x in _sysex_payload(body)):
                raise _Bail
        else:  # system common / real-time bytes inside a file: leave them to mido
            raise _Bail
        idx += 1
    if i != end:
        raise _Bail
    col.end_track(idx, tick, prog)


def _sysex_payload(body: bytes) -> bytes:
    """The bytes mido keeps of a sysex event (it drops one leading F0 and one trailing F7)."""
    if body[:1] == b"\xf0":
        body = body[1:]
    if body[-1:] == b"\xf7":
        body = body[:-1]
    return body


def _varint(data: bytes, i: int) -> tuple[int, int]:
    b = data[i]
    i += 1
    value = b & 0x7F
    while b & 0x80:
        b = data[i]
        i += 1
        value = (value << 7) | (b & 0x7F)
    return value, i
