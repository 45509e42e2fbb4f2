"""MIDI files <-> normalised note arrays (mido only; no JAX, safe in worker processes).

Reading follows PAPER_NOTES §1 and reproduces the reference implementation (which reads with
miditoolkit) id for id: one global tempo map from every track, first-in-first-out note pairing
per (track, channel, pitch), drum channel dropped, ticks -> ms at 120 BPM / 500 tpb, zero-length
notes -> 1 ms, same-pitch overlaps cut at the next onset.  The few places where we deliberately
differ from the reference are listed in docs/DATA_FORMATS.md ("Differences from the reference").

Bad input raises a `MidiError` subclass naming the file and the reason; repairs that keep a file
usable (lenient re-parse, notes left open) emit a `MidiWarning`.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass

import mido
import numpy as np

from pianist_jax.midi import events as midi_events
from pianist_jax.midi import scan as midi_scan

MS_PER_SECOND = 1000.0  # 500 ticks/beat at 120 BPM: one output tick is one millisecond
OUT_TICKS_PER_BEAT = 500
OUT_TEMPO_US = 500_000  # 120 BPM
SUSTAIN_CC = 64


class MidiError(ValueError):
    """A MIDI file we cannot use; `str()` names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MidiParseError(MidiError):
    """Not decodable as MIDI even leniently (truncated, garbage, wrong header)."""


class UnsupportedMidiError(MidiError):
    """Valid MIDI that we do not convert (SMPTE time division, type-2 files)."""


class EmptyMidiError(MidiError):
    """Parsed fine but holds no pitched notes."""


class DrumsOnlyMidiError(EmptyMidiError):
    """Every note is on the drum channel (channel 10), which we drop."""


class MidiWarning(UserWarning):
    """A file was repaired while reading (lenient parse, notes closed at the end)."""


@dataclass(frozen=True)
class Notes:
    """A normalised piece: notes sorted by (onset, pitch) and sustain-pedal CC64 events.

    All times are integer milliseconds.  `pedal_ms` is non-decreasing; at equal times the last
    event wins (it is the one a reader sees).
    """

    onset: np.ndarray  # int64 [N]
    offset: np.ndarray  # int64 [N]
    pitch: np.ndarray  # int64 [N]
    velocity: np.ndarray  # int64 [N]
    pedal_ms: np.ndarray  # int64 [P]
    pedal_value: np.ndarray  # int64 [P]

    def __len__(self) -> int:
        return int(self.onset.shape[0])

    @property
    def duration(self) -> np.ndarray:
        return self.offset - self.onset


# ----------------------------------------------------------------------------- parsing


@contextlib.contextmanager
def _skip_undecodable_meta(skipped: list):
    """Temporarily make mido turn meta messages it cannot decode into UnknownMetaMessage."""
    from mido.midifiles import meta, midifiles

    original = midifiles.build_meta_message

    def lenient(meta_type, data, delta=0):
        try:
            return original(meta_type, data, delta)
        except Exception as err:  # noqa: BLE001 - any decode failure of one meta message
            skipped.append(f"meta 0x{meta_type:02x}: {err}")
            return meta.UnknownMetaMessage(meta_type, data, time=delta)

    midifiles.build_meta_message = lenient
    try:
        yield
    finally:
        midifiles.build_meta_message = original


def _parse_error(path, err: Exception) -> MidiError:
    if isinstance(err, EOFError):
        return MidiParseError(path, "truncated file (unexpected end of data)")
    text = str(err) or type(err).__name__
    if "MThd" in text:
        return MidiParseError(path, "not a MIDI file (no MThd header)")
    return MidiParseError(path, f"cannot parse MIDI: {text}")


def read_bytes(path, data: bytes | None = None) -> bytes:
    """The file's bytes, with the errors that need no parser (unreadable, empty, not MIDI)."""
    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise MidiParseError(path, f"cannot read file: {err.strerror or err}") from err
    if len(data) == 0:
        raise MidiParseError(path, "empty file (0 bytes)")
    if data[:4] != b"MThd":
        raise MidiParseError(path, "not a MIDI file (no MThd header)")
    return data


def parse_midi(path, data: bytes | None = None) -> mido.MidiFile:
    """Parse with mido strictly; on failure retry leniently (clip data bytes, skip bad metas)."""
    data = read_bytes(path, data)
    try:
        mf = mido.MidiFile(file=io.BytesIO(data))
    except Exception as strict_err:  # noqa: BLE001 - mido raises many types
        if isinstance(strict_err, EOFError):
            raise _parse_error(path, strict_err) from strict_err
        skipped: list = []
        try:
            with _skip_undecodable_meta(skipped):
                mf = mido.MidiFile(file=io.BytesIO(data), clip=True)
        except Exception as lenient_err:  # noqa: BLE001
            raise _parse_error(path, lenient_err) from lenient_err
        repairs = ["clipped out-of-range data bytes"] + [
            f"skipped undecodable {s}" for s in skipped
        ]
        warnings.warn(
            f"{path}: strict parse failed ({strict_err}); read leniently: {'; '.join(repairs)}",
            MidiWarning,
            stacklevel=3,
        )
    return mf


def _check_supported(path, fmt: int, division: int, ntracks: int) -> None:
    if division < 0:
        raise UnsupportedMidiError(
            path,
            "SMPTE time division (frames per second) is not supported; "
            "re-save the file with metrical (ticks per beat) timing",
        )
    if division == 0:
        raise UnsupportedMidiError(path, "time division of 0 ticks per beat")
    if fmt == 2:
        raise UnsupportedMidiError(
            path,
            "type-2 MIDI (independent sequential patterns) is not supported; "
            "convert it to type 0 or 1",
        )
    if fmt not in (0, 1):
        raise UnsupportedMidiError(path, f"unknown MIDI file format {fmt} (expected 0 or 1)")
    if ntracks <= 0:
        raise EmptyMidiError(path, "file has no tracks")


def read_events(path, data: bytes | None = None) -> tuple[int, midi_events.Events]:
    """(ticks_per_beat, events): the fast scanner when it vouches for the file, else mido."""
    data = read_bytes(path, data)
    fast = midi_scan.scan(data)
    if fast is not None:
        fmt, division, ev = fast
        _check_supported(path, fmt, division, len(ev.track_len))
        return division, ev
    mf = parse_midi(path, data)
    _check_supported(path, mf.type, mf.ticks_per_beat, len(mf.tracks))
    return mf.ticks_per_beat, midi_events.extract(mf)


# ----------------------------------------------------------------------------- reading


def tick_to_seconds(ticks: np.ndarray, tempo_changes, ticks_per_beat: int, max_tick: int):
    """Seconds at each tick, bit-identical to the reference's cumulative tick->time table.

    `tempo_changes` is the reference's list of (tick, bpm).  In the usual sorted case this is a
    piecewise-linear lookup; the reference's quirk for unsorted change lists (tempo events of a
    later track earlier in time) is reproduced by replaying its table writes.
    """
    starts = np.array([t for t, _ in tempo_changes], dtype=np.int64)
    spt = np.array([(60 / bpm) / float(ticks_per_beat) for _, bpm in tempo_changes])
    ticks = np.asarray(ticks, dtype=np.int64)
    if np.all(np.diff(starts) >= 0):
        ends = np.append(starts[1:], max_tick)
        acc = np.zeros(len(starts))
        for k in range(1, len(starts)):
            acc[k] = acc[k - 1] + spt[k - 1] * float(ends[k - 1] - starts[k - 1])
        seg = np.searchsorted(starts, ticks, side="right") - 1
        return acc[seg] + spt[seg] * (ticks - starts[seg]).astype(np.float64)
    # Unsorted: replay the table writes segment by segment on the queried ticks only (the
    # table itself can be huge for a corrupt file); later writes win, unwritten ticks are 0.
    out = np.zeros(len(ticks))
    written: list = []  # (start, end, acc, spt) of segments written so far, in order

    def value_at(tick: int) -> float:
        for start, end, acc, sp in reversed(written):
            if start <= tick <= end:
                return acc + sp * float(tick - start)
        return 0.0

    acc_time = 0.0
    for k in range(len(starts)):
        end = int(starts[k + 1]) if k + 1 < len(starts) else max_tick
        start = int(starts[k])
        if start <= end:
            written.append((start, end, acc_time, spt[k]))
            hit = (ticks >= start) & (ticks <= end)
            out[hit] = acc_time + spt[k] * (ticks[hit] - start).astype(np.float64)
        acc_time = value_at(end)
    return out


def _to_ms(seconds: np.ndarray) -> np.ndarray:
    # np.rint rounds half to even, exactly like the reference's Python round().
    return np.rint(seconds * MS_PER_SECOND).astype(np.int64)


def normalise(onset, offset, pitch, velocity, order, pedal_ms, pedal_value) -> Notes:
    """PAPER_NOTES §1 normalisation on ms times.

    `order` is each note's position in the reference's note list; it decides which of several
    same-pitch notes starting in the same millisecond survives (the last one).
    """
    offset = np.where(offset <= onset, onset + 1, offset)
    idx = np.lexsort((order, onset, pitch))  # by pitch, then onset, then original order
    on, off, pi, ve = onset[idx], offset[idx], pitch[idx], velocity[idx]
    same_next = np.zeros(len(on), dtype=bool)
    same_next[:-1] = pi[:-1] == pi[1:]
    next_on = np.append(on[1:], 0)
    cut = same_next & (off >= next_on)
    off = np.where(cut, next_on, off)
    keep = on < off
    on, off, pi, ve = on[keep], off[keep], pi[keep], ve[keep]
    final = np.lexsort((pi, on))
    pedal_order = np.argsort(pedal_ms, kind="stable")
    return Notes(
        on[final], off[final], pi[final], ve[final], pedal_ms[pedal_order], pedal_value[pedal_order]
    )


def read_midi(path, data: bytes | None = None) -> Notes:
    """Read and normalise one MIDI file (see module docstring)."""
    ticks_per_beat, ev = read_events(path, data)
    if ev.max_tick is None:
        raise EmptyMidiError(path, "file holds no events")
    pairs = midi_events.pair_notes(ev)
    if pairs.n_open:
        warnings.warn(
            f"{path}: {pairs.n_open} note_on message(s) without note_off; "
            f"closed at the end of the file (tick {ev.max_tick - 1})",
            MidiWarning,
            stacklevel=2,
        )
    pitched = pairs.channel != 9
    if not pitched.any():
        if len(pairs.channel):
            raise DrumsOnlyMidiError(path, "only drum-channel (channel 10) notes; nothing to play")
        raise EmptyMidiError(path, "no notes")
    cc_tick, cc_value = midi_events.sustain_events(ev, pairs)
    ticks = np.concatenate([pairs.start[pitched], pairs.end[pitched], cc_tick])
    ms = _to_ms(tick_to_seconds(ticks, ev.tempo_changes, ticks_per_beat, ev.max_tick))
    n = int(pitched.sum())
    return normalise(
        ms[:n],
        ms[n : 2 * n],
        pairs.pitch[pitched],
        pairs.velocity[pitched],
        pairs.order[pitched],
        ms[2 * n :],
        cc_value,
    )


# ----------------------------------------------------------------------------- writing


def resolve_same_pitch_overlaps(notes: Notes) -> Notes:
    """Cut a note where the next note of the same pitch starts (drop it if nothing is left).

    A MIDI file cannot hold two sounding notes of one pitch and channel unambiguously; doing
    this before writing makes every file we write read back to exactly the notes we wrote.
    """
    order = np.arange(len(notes))
    return normalise(
        notes.onset,
        notes.offset,
        notes.pitch,
        notes.velocity,
        order,
        notes.pedal_ms,
        notes.pedal_value,
    )


def write_midi(notes: Notes, path, track_name: str = "Piano") -> None:
    """Write ms-timed MIDI (500 tpb, 120 BPM, so 1 tick = 1 ms): tempo track + piano track.

    At equal ticks note_offs come first, then pedal changes, then note_ons, so a repeated
    note is re-struck after the previous one ends. Velocity 0 (a note_off in MIDI) is
    written as 1 so the note is not lost.
    """
    if len(notes) and (notes.onset.min() < 0 or (len(notes.pedal_ms) and notes.pedal_ms.min() < 0)):
        raise ValueError(f"{path}: negative event times cannot be written to MIDI")
    notes = resolve_same_pitch_overlaps(notes)
    n = len(notes)
    if np.any(notes.velocity < 1) or np.any(notes.velocity > 127):
        warnings.warn(f"{path}: velocities outside 1..127 clipped", MidiWarning, stacklevel=2)
    vel = np.clip(notes.velocity, 1, 127)
    times = np.concatenate([notes.offset, notes.pedal_ms, notes.onset])
    kind = np.concatenate([np.zeros(n), np.ones(len(notes.pedal_ms)), np.full(n, 2)]).astype(int)
    a = np.concatenate([notes.pitch, np.full(len(notes.pedal_ms), SUSTAIN_CC), notes.pitch])
    b = np.concatenate([np.zeros(n, dtype=np.int64), np.clip(notes.pedal_value, 0, 127), vel])
    seq = np.arange(len(times))
    order = np.lexsort((seq, kind, times))
    track = mido.MidiTrack(
        [
            mido.MetaMessage("track_name", name=track_name, time=0),
            mido.Message("program_change", program=0, channel=0, time=0),
        ]
    )
    last = 0
    types = ("note_off", "control_change", "note_on")
    for i in order.tolist():
        t = int(times[i])
        k = kind[i]
        delta, last = t - last, t
        if k == 1:
            track.append(
                mido.Message(
                    "control_change", control=int(a[i]), value=int(b[i]), channel=0, time=delta
                )
            )
        else:
            track.append(
                mido.Message(
                    types[k], note=int(a[i]), velocity=int(b[i]) if k else 0, channel=0, time=delta
                )
            )
    track.append(mido.MetaMessage("end_of_track", time=0))
    tempo = mido.MidiTrack(
        [
            mido.MetaMessage("set_tempo", tempo=OUT_TEMPO_US, time=0),
            mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0),
            mido.MetaMessage("end_of_track", time=0),
        ]
    )
    mf = mido.MidiFile(type=1, ticks_per_beat=OUT_TICKS_PER_BEAT, tracks=[tempo, track])
    tmp = f"{path}.tmp{os.getpid()}"
    mf.save(tmp)
    os.replace(tmp, path)
