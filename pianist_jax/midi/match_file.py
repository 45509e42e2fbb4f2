"""Readers for alignment inputs: CPJKU match files (v1.0.0 and the older 5.0 layout of (n)ASAP)
and ASAP beat annotation files.  Every failure is an `AlignError` naming the file and the reason.

No JAX: this runs in data-prep worker processes.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_STEP = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ALTER = {"n": 0, "#": 1, "##": 2, "x": 2, "b": -1, "bb": -2}
_ARGS = re.compile(r",(?![^\[]*\])")  # commas outside [...] lists


class AlignError(ValueError):
    """A match or annotation file we cannot use; `str()` names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class Match:
    """A parsed match file: score notes (in file order) and performed notes (ms)."""

    snote_pitch: np.ndarray  # int64 [S]
    snote_beat: np.ndarray  # float64 [S] onset in beats (the file's own beat unit)
    snote_perf: np.ndarray  # int64 [S] index into the perf_* arrays, -1 for a deletion
    perf_pitch: np.ndarray  # int64 [P] paired notes and insertions
    perf_onset: np.ndarray  # float64 [P] ms


def _spelled(step: str, alter: str, octave: str) -> int:
    if step not in _STEP or alter not in _ALTER:
        raise ValueError(f"unknown pitch spelling [{step},{alter}]")
    return 12 * (int(octave) + 1) + _STEP[step] + _ALTER[alter]


def _perf_note(args: list[str], ms_per_tick: float) -> tuple[int, float]:
    """(midi pitch, onset ms) of a note(...) term in either match layout."""
    if args[1].startswith("["):  # 5.0: note(id,[Step,Alter],Octave,on,off,adjoff,vel)
        step, alter = args[1][1:-1].split(",")
        return _spelled(step, alter, args[2]), float(args[3]) * ms_per_tick
    return int(args[1]), float(args[2]) * ms_per_tick  # 1.0.0: note(id,pitch,on,off,vel,..)


def parse_match(text: str, path="<match>") -> Match:
    """Parse match-file text (v1.0.0 or 5.0); sustain, meta and score-property lines are skipped."""
    info: dict[str, str] = {}
    snotes: list[tuple[int, float, str | None]] = []
    inserted: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        try:
            if line.startswith("info("):
                key, _, value = line[5:].rstrip(".").rstrip(")").partition(",")
                info[key] = value
            elif line.startswith("snote("):
                head, sep, tail = line.partition(")-")
                a = _ARGS.split(head[6:])
                step, alter = a[1][1:-1].split(",")
                note = tail[5:].rstrip(".").rstrip(")") if tail.startswith("note(") else None
                if note is None and not tail.startswith("deletion"):
                    raise ValueError(f"unknown pairing {tail[:30]!r}")
                snotes.append((_spelled(step, alter, a[2]), float(a[6]), note))
            elif line.startswith("insertion-note("):
                inserted.append(line[15:].rstrip(".").rstrip(")"))
        except (ValueError, IndexError, KeyError) as err:
            raise AlignError(path, f"line {lineno}: cannot parse {line[:80]!r} ({err})") from err
    try:
        ms_per_tick = float(info["midiClockRate"]) / float(info["midiClockUnits"]) / 1000.0
    except (KeyError, ValueError) as err:
        raise AlignError(path, "no usable info(midiClockUnits/midiClockRate)") from err
    if not snotes:
        raise AlignError(path, "no snote(...) lines")
    perf, snote_perf = [], []
    for _, _, note in snotes:
        snote_perf.append(len(perf) if note is not None else -1)
        if note is not None:
            perf.append(_perf_note(_ARGS.split(note), ms_per_tick))
    perf += [_perf_note(_ARGS.split(n), ms_per_tick) for n in inserted]
    pp = np.array([p for p, _ in perf], dtype=np.int64).reshape(-1)
    po = np.array([o for _, o in perf], dtype=np.float64).reshape(-1)
    return Match(
        np.array([s[0] for s in snotes], dtype=np.int64),
        np.array([s[1] for s in snotes], dtype=np.float64),
        np.array(snote_perf, dtype=np.int64),
        pp,
        po,
    )


def read_match(path) -> Match:
    """Read a (gzip'd or plain) match file."""
    try:
        raw = Path(path).read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        raise AlignError(path, f"cannot read match file: {err}") from err
    return parse_match(text, path)


def read_beats(path) -> np.ndarray:
    """Beat times (ms, float) of an ASAP annotation file (first tab-separated column)."""
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        beats = np.array([float(ln.split("\t")[0]) * 1000.0 for ln in lines])
    except (OSError, ValueError) as err:
        raise AlignError(path, f"cannot read beat annotations: {err}") from err
    if len(beats) < 2 or np.any(np.diff(beats) < 0):
        raise AlignError(path, "need >= 2 non-decreasing beat times")
    return beats
