"""From parsed mido tracks to paired notes and sustain events, the way the reference reads them.

The reference implementation reads MIDI with miditoolkit; token parity needs its exact
semantics, including two that are easy to miss:
  * notes are paired first-in-first-out per (track, channel, pitch) and a note_off with no open
    note is ignored; notes are listed per *instrument* (track, channel, program at the
    note_off) in order of note_off, and that order decides which of several same-pitch notes
    in the same millisecond survives normalisation;
  * control changes are kept only if they end up in an instrument's list: events before an
    instrument exists wait in a per-(track, channel) "straggler" list that the first
    instrument created on that channel adopts.  CC64 on a channel that never closes a note is
    therefore dropped.
One Python pass over the messages collects plain integers; everything else is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import mido
import numpy as np

DEFAULT_BPM = 120.0
PITCHWHEEL = -1  # `control` code for pitch-bend messages (they only matter for stragglers)


@dataclass
class Events:
    """Integer columns gathered in one pass over every track, in message order."""

    note: np.ndarray  # [n, 6]: tick, track, msg index, channel, pitch, velocity (0 = off)
    note_prog: np.ndarray  # [n]: program of the channel when the message came
    touch: np.ndarray  # [m, 7]: tick, track, msg index, channel, program, control, value
    track_len: np.ndarray  # messages per track
    final_prog: np.ndarray  # [tracks, 16] program per channel at the end of each track
    tempo_changes: list  # reference tempo list: [(tick, bpm)], in its (possibly unsorted) order
    max_tick: int | None  # last event tick over all tracks + 1 (None: no events at all)


def columns(flat: list, width: int) -> np.ndarray:
    """A flat list of ints (rows laid end to end) -> int64 array [rows, width]."""
    return np.fromiter(flat, dtype=np.int64, count=len(flat)).reshape(-1, width)


class Collector:
    """The column lists one pass over the messages fills (from mido objects or raw bytes).

    Hot loops bind `notes.extend` / `progs.append` / `touches.extend` locally and add rows
    laid end to end; tempo and track bookkeeping go through the methods.
    """

    def __init__(self):
        self.notes, self.progs, self.touches = [], [], []
        self.tempo = [(0, DEFAULT_BPM)]
        self.track_len, self.final_prog, self.last_ticks = [], [], []

    def set_tempo(self, tick: int, tempo_us: int) -> None:
        """The reference's tempo list: a change at tick 0 restarts it, repeats are skipped."""
        bpm = mido.tempo2bpm(tempo_us)
        if tick == 0:
            self.tempo = [(0, bpm)]
        elif bpm != self.tempo[-1][1]:
            self.tempo.append((tick, bpm))

    def end_track(self, n_msgs: int, tick: int, prog: list) -> None:
        self.track_len.append(n_msgs)
        self.final_prog.append(prog)
        if n_msgs:
            self.last_ticks.append(tick)

    def events(self) -> Events:
        return Events(
            note=columns(self.notes, 6),
            note_prog=np.array(self.progs, dtype=np.int64),
            touch=columns(self.touches, 7),
            track_len=np.array(self.track_len, dtype=np.int64),
            final_prog=np.array(self.final_prog, dtype=np.int64).reshape(-1, 16),
            tempo_changes=self.tempo,
            max_tick=(max(self.last_ticks) + 1) if self.last_ticks else None,
        )


def extract(mf: mido.MidiFile) -> Events:
    col = Collector()
    add_note, add_prog, add_touch = col.notes.extend, col.progs.append, col.touches.extend
    for ti, track in enumerate(mf.tracks):
        tick = 0
        prog = [0] * 16
        for i, msg in enumerate(track):
            tick += msg.time
            kind = msg.type
            if kind == "note_on" or kind == "note_off":
                ch = msg.channel
                vel = msg.velocity if kind == "note_on" else 0
                add_note((tick, ti, i, ch, msg.note, vel))
                add_prog(prog[ch])
            elif kind == "control_change":
                ch = msg.channel
                add_touch((tick, ti, i, ch, prog[ch], msg.control, msg.value))
            elif kind == "program_change":
                prog[msg.channel] = msg.program
            elif kind == "pitchwheel":
                ch = msg.channel
                add_touch((tick, ti, i, ch, prog[ch], PITCHWHEEL, 0))
            elif kind == "set_tempo":
                col.set_tempo(tick, msg.tempo)
        col.end_track(len(track), tick, prog)
    return col.events()


@dataclass
class Pairs:
    """Paired notes (drum channel included; the caller drops it)."""

    start: np.ndarray
    end: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    channel: np.ndarray
    order: np.ndarray  # position in the reference's note list (instrument rank, then close)
    inst: np.ndarray  # [k, 4] instruments in creation order: track, close msg index, ch, prog
    n_open: int  # note_ons never closed (closed at the end of the file)


def _running_open_count(step: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Open notes after each event: c = max(0, c_prev + step), restarting at each group.

    Closed form (reflection at zero): c_t = S_t - min(0, min_{s<=t} S_s) with S the
    within-group prefix sum; groups are kept apart by a decreasing offset.
    """
    total = np.cumsum(step)
    gid = np.cumsum(group_start) - 1
    first = np.flatnonzero(group_start)
    base = (total - step)[first]  # prefix sum just before each group
    s = total - base[gid]
    big = 2 * (np.abs(s).max(initial=0) + 1)
    running_min = np.minimum.accumulate(s - gid * big) + gid * big
    return s - np.minimum(running_min, 0)


def pair_notes(ev: Events) -> Pairs:
    note = ev.note
    n = len(note)
    # Group by (track, channel, pitch), message order inside each group.
    key = (note[:, 1] * 16 + note[:, 3]) * 128 + note[:, 4]
    idx = np.lexsort((note[:, 2], key))
    srt, prog = note[idx], ev.note_prog[idx]
    k = key[idx]
    is_on = srt[:, 5] > 0
    group_start = np.ones(n, dtype=bool)
    group_start[1:] = k[1:] != k[:-1]
    step = np.where(is_on, 1, -1)
    count = _running_open_count(step, group_start) if n else np.zeros(0, np.int64)
    before = np.where(group_start, 0, np.roll(count, 1))
    valid_off = ~is_on & (before > 0)

    # FIFO: within a group the j-th valid note_off closes the j-th note_on.
    gid = np.cumsum(group_start) - 1
    n_groups = int(gid[-1]) + 1 if n else 0
    offs_per_group = np.bincount(gid[valid_off], minlength=n_groups)
    on_pos = np.flatnonzero(is_on)
    on_rank = (
        np.arange(len(on_pos)) - np.searchsorted(on_pos, np.flatnonzero(group_start))[gid[on_pos]]
    )
    closed = on_rank < offs_per_group[gid[on_pos]]
    ons_closed, ons_open = on_pos[closed], on_pos[~closed]
    offs = np.flatnonzero(valid_off)

    # Notes left open close at the end of the file, "after" every message of their track.
    end_tick = ev.max_tick - 1 if ev.max_tick is not None else 0
    open_tr = srt[ons_open, 1]
    open_order = np.argsort(srt[ons_open, 2], kind="stable")
    open_close_idx = np.empty(len(ons_open), dtype=np.int64)
    open_close_idx[open_order] = ev.track_len[open_tr[open_order]] + np.arange(len(ons_open))
    on_rows = np.concatenate([ons_closed, ons_open])
    close_tick = np.concatenate([srt[offs, 0], np.full(len(ons_open), end_tick)])
    close_track = srt[on_rows, 1]
    close_idx = np.concatenate([srt[offs, 2], open_close_idx])
    channel = srt[on_rows, 3]
    close_prog = np.concatenate([prog[offs], ev.final_prog[open_tr, srt[ons_open, 3]]])

    # Instruments (track, channel, program at close), ranked by when they were created.
    inst_key = (close_track * 16 + channel) * 128 + close_prog
    created_at = close_track * (ev.track_len.max(initial=0) + len(ons_open) + 1) + close_idx
    by_time = np.argsort(created_at, kind="stable")  # an instrument is born at its first close
    uniq, first = np.unique(inst_key[by_time], return_index=True)
    first = by_time[first]
    creation_order = np.argsort(created_at[first], kind="stable")
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[creation_order] = np.arange(len(uniq))
    note_rank = rank[np.searchsorted(uniq, inst_key)]
    firsts = first[creation_order]
    inst = np.stack(
        [close_track[firsts], close_idx[firsts], channel[firsts], close_prog[firsts]], 1
    )
    order = np.empty(len(on_rows), dtype=np.int64)  # rank by (instrument, close position)
    order[np.lexsort((created_at, note_rank))] = np.arange(len(on_rows))
    return Pairs(
        start=srt[on_rows, 0],
        end=close_tick,
        pitch=srt[on_rows, 4],
        velocity=srt[on_rows, 5],
        channel=channel,
        order=order,
        inst=inst.reshape(-1, 4),
        n_open=len(ons_open),
    )


def _sustain_one_program_per_channel(touch: np.ndarray, inst: np.ndarray):
    """The common case, vectorised: every (track, channel) is only ever seen with one program.

    Then a (track, channel) has at most one instrument, which ends up owning every control
    change of that channel (earlier ones through the adopted straggler list), and channels
    without an instrument lose theirs.  Returns None when the case does not apply.
    """
    tc_touch = touch[:, 1] * 16 + touch[:, 3]
    tc_inst = inst[:, 0] * 16 + inst[:, 2]
    tc = np.concatenate([tc_touch, tc_inst])
    pairs = np.unique(tc * 128 + np.concatenate([touch[:, 4], inst[:, 3]]))
    if len(pairs) != len(np.unique(tc)):
        return None
    rank = np.full(int(tc.max()) + 1, -1)
    keep_inst = inst[:, 2] != 9
    rank[tc_inst[keep_inst]] = np.flatnonzero(keep_inst)
    r = rank[tc_touch]
    sel = np.flatnonzero((touch[:, 5] == 64) & (r >= 0))
    sel = sel[np.argsort(r[sel], kind="stable")]  # touches are already in (track, msg) order
    return touch[sel, 0], touch[sel, 6]


def sustain_events(ev: Events, pairs: Pairs):
    """CC64 (tick, value) in the reference's order: instrument by instrument, message order.

    Emulates miditoolkit's instrument / straggler lists exactly (see module docstring).
    """
    touch = ev.touch
    if not len(touch) or not len(pairs.inst):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    fast = _sustain_one_program_per_channel(touch, pairs.inst)
    return fast if fast is not None else sustain_emulated(touch, pairs.inst)


def sustain_emulated(touch: np.ndarray, inst: np.ndarray):
    """The general case: replay miditoolkit's instrument and straggler lists event by event."""
    # Merge instrument creations and touches in (track, msg index) order; a creation sorts
    # before a touch at the same index (it cannot happen: one message is one or the other).
    rows = [(int(t), int(i), 0, int(c), int(p), 0) for t, i, c, p in inst.tolist()]
    rows += [(t, i, 1, c, p, j) for j, (_, t, i, c, p, _, _) in enumerate(touch.tolist())]
    rows.sort()
    lists: list[list[int]] = []
    inst_list: dict = {}
    straggler: dict = {}
    for track, _, is_touch, ch, prog, j in rows:
        if not is_touch:
            if (track, ch) in straggler:
                inst_list[(track, ch, prog)] = straggler[(track, ch)]
            else:
                lists.append([])
                inst_list[(track, ch, prog)] = len(lists) - 1
            continue
        target = inst_list.get((track, ch, prog))
        if target is None:
            target = straggler.get((track, ch))
            if target is None:
                lists.append([])
                target = straggler[(track, ch)] = len(lists) - 1
        if touch[j, 5] == 64:
            lists[target].append(j)
    picked = []
    for track, _, ch, prog in inst.tolist():  # creation order
        if ch != 9:
            picked.extend(lists[inst_list[(track, ch, prog)]])
    picked = np.array(picked, dtype=np.int64)
    return touch[picked, 0], touch[picked, 6]
