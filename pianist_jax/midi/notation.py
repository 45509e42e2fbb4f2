"""Notation files (MusicXML, MEI, Humdrum **kern) -> the score MIDI the model was trained on.

The model learned from ASAP's ``midi_score.mid`` files: what a notation program's MIDI export
plays, quantized, on one timeline. So a notation file becomes exactly that: the notes a player
plays (repeats and da capo / dal segno unfolded, ties merged, grace notes given a short real
duration just before their principal note, every keyboard staff on one track), velocities
from the printed dynamics the way MuseScore plays them (ASAP's scores came from MuseScore),
tempo and time signatures from the score. Parsing is `partitura`'s; it is imported only when
a notation file is read (it costs about a second).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mido
import numpy as np

FORMATS = {".musicxml": "musicxml", ".xml": "musicxml", ".mxl": "musicxml", ".mei": "mei"}
FORMATS |= {".krn": "kern"}
TICKS_PER_QUARTER = 480
DEFAULT_QPM = 120.0  # ASAP's score MIDIs carry 120 BPM where the score gives no tempo
DEFAULT_VELOCITY = 80  # MuseScore's velocity before the first dynamic mark (mf)
GRACE_QUARTERS = 0.125  # each grace note sounds a 32nd before its principal note
HAIRPIN_STEP = 16  # a hairpin with no dynamic mark at its end moves one level (MuseScore)
# MuseScore's playback velocity of each dynamic mark
DYNAMIC_VELOCITY = {"pppp": 10, "ppp": 16, "pp": 33, "p": 49, "mp": 64, "mf": 80, "f": 96}
DYNAMIC_VELOCITY |= {"ff": 112, "fff": 126, "ffff": 127, "fp": 96, "sf": 112, "sfz": 112}
DYNAMIC_VELOCITY |= {"sffz": 126, "fz": 112, "rf": 112, "rfz": 112, "sfp": 112, "sfpp": 112}
KEYBOARD = re.compile(
    r"piano|klavier|clavier|keyboard|harpsichord|cembalo|clavecin|organ|orgel|clavichord|"
    r"celest|synth|pno|pf\b|kbd",
    re.IGNORECASE,
)


class NotationError(ValueError):
    """A notation file we cannot play; `str()` names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


class NotationWarning(UserWarning):
    """Something the reader decided for the user (a part skipped, a default tempo)."""


@dataclass(frozen=True)
class PlayedScore:
    """What a player plays, on one timeline in quarter notes from the start of the first bar."""

    onset: np.ndarray  # float64 [N] quarters
    duration: np.ndarray  # float64 [N] quarters
    pitch: np.ndarray  # int64 [N]
    velocity: np.ndarray  # int64 [N]
    tempos: list  # [(quarter, quarter notes per minute)], first at 0
    time_signatures: list  # [(quarter, numerator, denominator)]
    pedal: list  # [(quarter, CC64 value)] from the score's pedal marks
    parts: list = field(default_factory=list)  # names of the parts played
    skipped: list = field(default_factory=list)  # names of the parts left out


def is_notation(path) -> bool:
    return Path(path).suffix.lower() in FORMATS


@contextlib.contextmanager
def _quiet():
    """partitura's chatter (prints, parser and unfolding warnings) stays out of the user's way."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _import_partitura():
    """partitura, imported on first use (it takes a second). With the pyfluidsynth bindings
    installed, partitura 1.9.0 downloads a SoundFont over FTP while it is imported (offline:
    a crash); hiding the bindings for that moment keeps the import offline and quiet."""
    hide = "fluidsynth" not in sys.modules
    if hide:
        sys.modules["fluidsynth"] = None  # `import fluidsynth` now raises ImportError
    try:
        with _quiet():
            import partitura
    finally:
        if hide:
            del sys.modules["fluidsynth"]
    return partitura


def _load(path: Path):
    """partitura and its Score of the file."""
    try:
        partitura = _import_partitura()
    except Exception as err:  # noqa: BLE001 - a broken install: one line, not a traceback
        raise NotationError(path, f"cannot import partitura: {err}") from err

    loaders = {
        "musicxml": lambda p: partitura.load_musicxml(p, force_note_ids=True),
        "mei": partitura.load_mei,
        "kern": lambda p: partitura.load_kern(p, force_note_ids=True),
    }
    kind = FORMATS[path.suffix.lower()]
    try:
        with _quiet():
            return partitura, loaders[kind](str(path))
    except Exception as err:  # noqa: BLE001 - lxml, zipfile and partitura raise many types
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NotationError(path, f"cannot read {kind}: {text}") from err


def _is_keyboard(part) -> bool:
    name = (part.part_name or "").strip()
    return not name or bool(KEYBOARD.search(name)) or part.number_of_staves >= 2


def _name(part) -> str:
    return f"'{part.part_name}' ({part.id})" if part.part_name else str(part.id)


def _velocities(pt, part, onset_q: np.ndarray) -> np.ndarray:
    """Dynamic marks as MuseScore plays them: a level per mark, hairpins ramp to the next."""
    qmap = part.quarter_map
    by_time = {  # printed marks, then the notation program's own <sound dynamics> over them
        float(qmap(d.start.t)): DYNAMIC_VELOCITY[d.text]
        for d in part.iter_all(pt.score.LoudnessDirection, include_subclasses=True)
        if d.text in DYNAMIC_VELOCITY
    }
    sounded = part.iter_all(pt.score.Dynamic)  # velocity: % of forte (90)
    by_time |= {float(qmap(d.start.t)): round(d.velocity * 0.9) for d in sounded}
    marks = sorted(by_time.items())
    times = np.array([t for t, _ in marks] or [0.0])
    levels = np.array([v for _, v in marks] or [DEFAULT_VELOCITY], dtype=np.float64)
    idx = np.searchsorted(times, onset_q, side="right") - 1
    vel = np.where(idx >= 0, levels[np.maximum(idx, 0)], DEFAULT_VELOCITY)
    ramps = [(d, +1) for d in part.iter_all(pt.score.IncreasingLoudnessDirection)]
    ramps += [(d, -1) for d in part.iter_all(pt.score.DecreasingLoudnessDirection)]
    for d, sign in ramps:
        if d.end is None:
            continue
        a, b = float(qmap(d.start.t)), float(qmap(d.end.t))
        if b <= a:
            continue
        k = np.searchsorted(times, a, side="right") - 1
        start = levels[k] if k >= 0 else DEFAULT_VELOCITY
        nxt = np.flatnonzero((times > a) & (times <= b + 1.0))  # a mark at (or just after) the end
        end = levels[nxt[0]] if len(nxt) else start + sign * HAIRPIN_STEP
        inside = (onset_q >= a) & (onset_q < b)
        vel = np.where(inside, start + (end - start) * (onset_q - a) / (b - a), vel)
    return np.clip(np.rint(vel), 1, 127).astype(np.int64)


def _grace_onsets(notes) -> tuple[np.ndarray, np.ndarray]:
    """Grace notes sound one after another (in partitura's per-staff order) just before their
    principal note; a grace chord sounds together."""
    onset = notes["onset_quarter"].astype(np.float64)
    duration = notes["duration_quarter"].astype(np.float64)
    grace = np.flatnonzero(notes["is_grace"].astype(bool))
    order = notes["local_grace_order"][grace]
    group = [(onset[i], notes["voice"][i]) for i in grace]
    last = {}
    for g, o in zip(group, order.tolist()):
        last[g] = max(last.get(g, 0), o)
    for i, g, o in zip(grace.tolist(), group, order.tolist()):
        onset[i] -= (last[g] + 1 - o) * GRACE_QUARTERS
        duration[i] = GRACE_QUARTERS
    return onset, duration


def _played_part(pt, part, unfold: bool) -> tuple[PlayedScore, float]:
    """One part on its own timeline (quarters) and where its first bar starts."""
    if unfold:
        part = pt.score.unfold_part_maximal(part, update_ids=True, ignore_leaps=False)
    notes = part.note_array(include_grace_notes=True)
    onset, duration = _grace_onsets(notes)
    qmap = part.quarter_map
    tempos = [
        (float(qmap(t.start.t)), 60e6 / t.microseconds_per_quarter)
        for t in part.iter_all(pt.score.Tempo)
    ]
    sigs = [
        (float(qmap(s.start.t)), int(s.beats), int(s.beat_type))
        for s in part.iter_all(pt.score.TimeSignature)
    ]
    pedal = []
    for p in part.iter_all(pt.score.SustainPedalDirection):
        pedal.append((float(qmap(p.start.t)), 127))
        if p.end is not None:
            pedal.append((float(qmap(p.end.t)), 0))
    vel = _velocities(pt, part, notes["onset_quarter"].astype(np.float64))
    measures = list(part.iter_all(pt.score.Measure))
    first_bar = float(qmap(measures[0].start.t)) if measures else 0.0
    played = PlayedScore(
        onset, duration, notes["pitch"].astype(np.int64), vel, tempos, sigs, pedal, [_name(part)]
    )
    return played, first_bar


def read_notation(path, *, unfold: bool = True) -> PlayedScore:
    """The notes a player plays from a notation file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise NotationError(path, "no such file" if not path.exists() else "not a file")
    if not is_notation(path):
        raise NotationError(path, f"not a notation file (expected {', '.join(sorted(FORMATS))})")
    pt, score = _load(path)
    parts = list(pt.score.iter_parts(score.parts))
    played = [p for p in parts if _is_keyboard(p)] if len(parts) > 1 else parts
    if len(parts) == 1 and not _is_keyboard(parts[0]):
        warnings.warn(
            f"{path}: playing part {_name(parts[0])} on the piano: it is not a keyboard part",
            NotationWarning,
        )
    if not played:
        names = ", ".join(_name(p) for p in parts)
        raise NotationError(path, f"no keyboard part to play (parts: {names})")
    skipped = [_name(p) for p in parts if p not in played]
    for name in skipped:
        warnings.warn(f"{path}: skipped part {name}: not a keyboard part", NotationWarning)
    got = []
    for part in played:
        try:
            with _quiet():
                got.append(_played_part(pt, part, unfold))
        except Exception as err:  # noqa: BLE001 - partitura raises many types on odd scores
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise NotationError(path, f"cannot read part {_name(part)}: {text}") from err
    each = [p for p, _ in got]
    onset = np.concatenate([p.onset for p in each])
    if not len(onset):
        raise NotationError(path, "the score has no notes")
    # time 0 is where the first bar starts (leading rests kept, as in ASAP's score MIDIs); grace
    # notes before it are played from it, on the beat
    origin = min(bar for _, bar in got)
    early = onset < origin
    if early.any():
        onset[early] += origin - onset[early].min()

    def shifted(events) -> list:
        return sorted({(max(e[0] - origin, 0.0), *e[1:]) for e in events})

    tempos = shifted(t for p in each for t in p.tempos)
    if not tempos:
        warnings.warn(
            f"{path}: the score gives no tempo; reading it at {DEFAULT_QPM:g} quarter notes "
            "per minute (add a metronome mark, or scale the result with --tempo)",
            NotationWarning,
        )
    if not tempos or tempos[0][0] > 0:
        tempos.insert(0, (0.0, tempos[0][1] if tempos else DEFAULT_QPM))
    return PlayedScore(
        onset=onset - origin,
        duration=np.maximum(np.concatenate([p.duration for p in each]), 0.0),
        pitch=np.concatenate([p.pitch for p in each]),
        velocity=np.concatenate([p.velocity for p in each]),
        tempos=tempos,
        time_signatures=shifted(s for p in each for s in p.time_signatures),
        pedal=shifted(e for p in each for e in p.pedal),
        parts=[_name(p) for p in played],
        skipped=skipped,
    )


def _ticks(quarters) -> np.ndarray:
    return np.rint(np.asarray(quarters, np.float64) * TICKS_PER_QUARTER).astype(np.int64)


def _track(events: list) -> mido.MidiTrack:
    """(tick, order, message) -> a track with delta times; at one tick, lower order first."""
    track, last = mido.MidiTrack(), 0
    for tick, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(msg.copy(time=int(tick) - last))
        last = int(tick)
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def to_midi(score: PlayedScore) -> mido.MidiFile:
    """A type-1 score MIDI: tempo and time signatures, then one piano track of notes."""
    meta = [
        (t, 0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(q)))
        for t, q in zip(_ticks([t for t, _ in score.tempos]), [q for _, q in score.tempos])
    ]
    for (_, num, den), t in zip(
        score.time_signatures, _ticks([s[0] for s in score.time_signatures])
    ):
        meta.append((t, 1, mido.MetaMessage("time_signature", numerator=num, denominator=den)))
    on = _ticks(score.onset)
    # MuseScore (which wrote ASAP's score MIDIs) releases each note one tick early
    off = np.maximum(_ticks(score.onset + score.duration) - 1, on + 1)
    notes = [(0, 0, mido.Message("program_change", program=0))]
    for a, b, p, v in zip(on.tolist(), off.tolist(), score.pitch.tolist(), score.velocity.tolist()):
        notes.append((a, 3, mido.Message("note_on", note=p, velocity=v)))
        notes.append((b, 1, mido.Message("note_off", note=p, velocity=0)))
    for t, value in zip(_ticks([t for t, _ in score.pedal]), [v for _, v in score.pedal]):
        notes.append((t, 2, mido.Message("control_change", control=64, value=value)))
    mf = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_QUARTER)
    mf.tracks += [_track(meta), _track(notes)]
    mf.tracks[1].insert(0, mido.MetaMessage("track_name", name="Piano"))
    return mf


def score_midi_bytes(path, *, unfold: bool = True) -> bytes:
    """The score MIDI file of a notation file, as bytes (`midi.read_midi(path, data)` reads it)."""
    played = read_notation(path, unfold=unfold)
    buf = io.BytesIO()
    try:
        to_midi(played).save(file=buf)
    except (ValueError, TypeError) as err:  # e.g. a time signature MIDI cannot hold
        raise NotationError(path, f"cannot write its score MIDI: {err}") from err
    return buf.getvalue()
