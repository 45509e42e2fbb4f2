"""A picture of a rendered performance, for `--plot out.png`.

Listening to a rendering tells you whether it sounds right; a picture shows *why*: where the
dynamics swell, where the pedal goes down, and where the tempo pushes or holds back against the
notation.  One figure, three panels on the performance clock: a piano roll coloured by velocity,
the sustain pedal lane, and the performed tempo against the notated tempo.  It stays readable for
a five-minute piece (thousands of notes are drawn as one collection, short notes get a minimum
visible width).  Matplotlib is imported only when plotting, and only through `Figure` (no pyplot
global state is touched).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pianist_jax import midi
from pianist_jax.render import controls

FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
DEFAULT_BEAT_MS = 500  # no beat map: a beat every 500 ms of score time (quarter = 120 BPM)
SMOOTH_BEATS = 3  # the bold tempo line averages this many beats (the raw one is drawn faintly)
PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def _beat_map(
    performance: midi.Notes, score: midi.Notes, beats_ms: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Score beats inside the score's onset range and their performance times (ms)."""
    score_on = np.unique(np.asarray(score.onset))
    if len(score_on) < 2:
        return np.zeros(0), np.zeros(0)
    if beats_ms is None:
        beats = np.arange(score_on[0], score_on[-1] + 1, DEFAULT_BEAT_MS, dtype=np.float64)
    else:
        beats = np.unique(np.asarray(beats_ms, dtype=np.float64))
        beats = beats[(beats >= score_on[0]) & (beats <= score_on[-1])]
    return beats, controls.performance_times(performance, score, beats)


def performed_beat_bpm(
    performance: midi.Notes, score: midi.Notes, beats_ms: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Performed tempo per beat: (times_s, bpm, notated_bpm), one entry per beat interval.

    Each score beat is mapped to performance time piecewise-linearly through the (score onset,
    performance onset) pairs of the first note of every distinct score onset (kept monotone);
    the performed BPM of a beat is 60 / its mapped duration.  `times_s` is the middle of the beat
    in performance seconds.  Beats played in zero time (a clamped backwards step) are dropped.
    """
    if len(performance) != len(score):
        raise ValueError(f"performance has {len(performance)} notes but score has {len(score)}")
    beats, mapped = _beat_map(performance, score, beats_ms)
    if len(beats) < 2:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    played, notated = np.diff(mapped), np.diff(beats)
    keep = (played > 0) & (notated > 0)
    times_s = (mapped[:-1] + played / 2)[keep] / 1000.0
    return times_s, 60_000.0 / played[keep], 60_000.0 / notated[keep]


def _smoothed_bpm(bpm: np.ndarray, k: int = SMOOTH_BEATS) -> np.ndarray:
    """BPM over a centred window of `k` beats (total beats / total time, not mean of BPMs)."""
    if len(bpm) < k:
        return bpm
    seconds = np.convolve(60.0 / bpm, np.ones(k), mode="same")
    counts = np.convolve(np.ones(len(bpm)), np.ones(k), mode="same")
    return 60.0 * counts / seconds


def _pitch_name(p: int) -> str:
    return f"{PITCH_NAMES[p % 12]}{p // 12 - 1}"


def _time_axis(ax, total_s: float) -> None:
    """Ticks every 1/2/5/10/15/30/60/120 s (about 10-20 of them), labelled m:ss past 90 s."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    steps = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300)
    step = next((s for s in steps if total_s / s <= 20), 600)
    ax.xaxis.set_major_locator(MultipleLocator(step))
    if total_s < 90:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("performance time (s)")
    else:
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda x, _: f"{int(x // 60)}:{int(x % 60):02d}")
        )
        ax.set_xlabel("performance time (m:ss)")


def _draw_roll(fig, ax, cax, perf: midi.Notes, total_s: float) -> None:
    from matplotlib import colormaps
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import ListedColormap, Normalize

    on = perf.onset / 1000.0
    # Short notes (staccato, grace notes) stay visible: at least ~1.5 px of the roll's width.
    min_w = 1.5 * total_s / (ax.get_position().width * fig.get_figwidth() * fig.dpi)
    off = np.maximum(perf.offset / 1000.0, on + min_w)
    lo, hi = perf.pitch - 0.42, perf.pitch + 0.42
    verts = np.stack([np.c_[on, lo], np.c_[on, hi], np.c_[off, hi], np.c_[off, lo]], axis=1)
    # viridis without its palest yellow, which vanishes on white
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.88, 256)))
    vel = perf.velocity.astype(np.float64)
    norm = Normalize(vmin=min(vel.min(), 126.0), vmax=max(vel.max(), vel.min() + 1.0))
    bars = PolyCollection(verts, array=vel, cmap=cmap, norm=norm, linewidths=0)
    ax.add_collection(bars)
    fig.colorbar(bars, cax=cax).set_label("velocity")
    p_lo, p_hi = int(perf.pitch.min()), int(perf.pitch.max())
    ax.set_ylim(p_lo - 1.5, p_hi + 1.5)
    cs = [p for p in range(p_lo - 1, p_hi + 2) if p % 12 == 0]
    ticks = cs if p_hi - p_lo > 14 else list(range(p_lo, p_hi + 1))  # narrow: name every key
    ax.set_yticks(ticks, [_pitch_name(p) for p in ticks])
    for p in cs:
        ax.axhline(p - 0.5, color="0.85", linewidth=0.6, zorder=0)
    ax.set_ylabel("pitch")


def _draw_pedal(ax, perf: midi.Notes, total_s: float) -> None:
    t = np.r_[0.0, perf.pedal_ms / 1000.0, total_s]
    v = np.r_[0, perf.pedal_value, perf.pedal_value[-1] if len(perf.pedal_value) else 0]
    down = (v >= 64).astype(np.float64)
    ax.fill_between(t, 0, down, step="post", color="tab:blue", alpha=0.45, lw=0)
    ax.step(t, v / 127.0, where="post", color="tab:blue", linewidth=0.5)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([])
    ax.set_ylabel("pedal")


def _draw_tempo(ax, performance, score, beats_ms) -> None:
    times, bpm, notated = performed_beat_bpm(performance, score, beats_ms)
    ax.set_ylabel("tempo (beats/min)")
    beat = "" if beats_ms is not None else " (no beat map: beat = 500 ms of score)"
    if len(times) == 0:
        ax.text(
            0.5,
            0.5,
            "no tempo curve: fewer than two beats between notes",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
        ax.set_yticks([])
        return
    smooth = _smoothed_bpm(bpm)
    ax.plot(times, bpm, color="tab:orange", linewidth=0.6, alpha=0.45, label="performed, per beat")
    ax.plot(
        times,
        smooth,
        color="tab:red",
        linewidth=1.4,
        label=f"performed, {SMOOTH_BEATS}-beat average",
    )
    ax.step(
        times,
        notated,
        where="mid",
        color="0.2",
        linestyle="--",
        linewidth=1.0,
        label=f"notated{beat}",
    )
    # The smoothed curve sets the range, so a ritardando stays in view; beyond 1/4 or 3 times the
    # notated tempo it is a glitch (a beat crushed to a few ms) and may leave the panel.
    lo = max(min(smooth.min(), notated.min()), notated.min() / 4)
    hi = min(max(smooth.max(), notated.max()), notated.max() * 3)
    ax.set_ylim(max(0.0, lo * 0.85), hi * 1.15 + 1e-6)
    ax.legend(loc="best", fontsize=7, ncol=3, framealpha=0.8)
    ax.grid(axis="y", color="0.9", linewidth=0.6)


def plot_performance(
    performance: midi.Notes,
    score: midi.Notes,
    out_path,
    *,
    title: str | None = None,
    score_beats_ms: np.ndarray | None = None,
) -> Path:
    """Draw piano roll, pedal lane and tempo curve of `performance` into `out_path` (atomically).

    `performance` and `score` are note-aligned (note i renders score note i); `score_beats_ms`
    are the score's beat times in ms (default: one every 500 ms).  Returns the written path.
    """
    out = Path(out_path)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot plot to {out.name!r}: the file must end in .png, .pdf or .svg")
    if len(performance) != len(score):
        raise ValueError(f"performance has {len(performance)} notes but score has {len(score)}")
    if len(performance) == 0:
        raise ValueError("nothing to plot: the performance has no notes")

    from matplotlib.figure import Figure

    end_ms = max(int(performance.offset.max()), int(performance.pedal_ms.max(initial=0)))
    total_s = max(end_ms / 1000.0, 1e-3)
    width = float(np.clip(8.0 + total_s / 20.0, 10.0, 24.0))  # 5 min -> 23 in = 3450 px
    fig = Figure(figsize=(width, 8.0), dpi=150)
    grid = fig.add_gridspec(
        3,
        2,
        height_ratios=[6.0, 0.7, 2.3],
        width_ratios=[1.0, 0.012],
        hspace=0.08,
        wspace=0.012,
        left=0.07,
        right=0.95,
        top=0.93,
        bottom=0.08,
    )
    ax_roll = fig.add_subplot(grid[0, 0])
    ax_pedal = fig.add_subplot(grid[1, 0], sharex=ax_roll)
    ax_tempo = fig.add_subplot(grid[2, 0], sharex=ax_roll)
    _draw_roll(fig, ax_roll, fig.add_subplot(grid[0, 1]), performance, total_s)
    _draw_pedal(ax_pedal, performance, total_s)
    _draw_tempo(ax_tempo, performance, score, score_beats_ms)
    _time_axis(ax_tempo, total_s)
    ax_roll.set_xlim(0.0, total_s * 1.005)
    for ax in (ax_roll, ax_pedal):
        ax.tick_params(labelbottom=False)
    for ax in (ax_roll, ax_pedal, ax_tempo):
        ax.grid(axis="x", color="0.92", linewidth=0.6)
        ax.set_axisbelow(True)
    fig.align_ylabels([ax_roll, ax_pedal, ax_tempo])
    minutes, seconds = divmod(round(total_s), 60)
    name = title if title else out.stem
    fig.suptitle(f"{name} - {len(performance):,} notes, {minutes}:{seconds:02d}", fontsize=12)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")  # the user's umask, like the MIDI
    try:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
