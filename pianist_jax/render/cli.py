"""``python -m pianist_jax.render``: scores (MIDI, MusicXML, MEI, **kern) in; performance MIDI,
and on request audio and a picture, out.

A notation file first becomes the score MIDI the model was trained on (`midi.notation`). Every
output file is checked before any work starts; audio and pictures are made after the MIDI is
written, so a missing synthesizer never costs the rendering.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from pianist_jax import midi, tokenizer
from pianist_jax.midi import notation, tempo_map
from pianist_jax.render import audio, controls, decoding, plot
from pianist_jax.render.renderer import Renderer, RenderError
from pianist_jax.tokenizer import TOKENS_PER_NOTE

MIDI_SUFFIXES = (".mid", ".midi", ".kar", ".smf")
SCORE_SUFFIXES = (*MIDI_SUFFIXES, *sorted(notation.FORMATS))


@dataclasses.dataclass(frozen=True)
class Score:
    """One input: its notes as the model reads them, and its score MIDI file's bytes."""

    path: Path
    notes: midi.Notes
    ids: np.ndarray
    midi_bytes: bytes

    @functools.cached_property
    def beats_ms(self) -> np.ndarray:
        """The score's quarter-note beats in ms (the tempo panel's grid; once per score)."""
        tpb, ev = midi.read_events(self.path, self.midi_bytes)
        ticks = np.arange(0, ev.max_tick, tpb)
        return 1000.0 * midi.tick_to_seconds(ticks, ev.tempo_changes, tpb, ev.max_tick)


def read_score(path: Path, unfold: bool = True) -> Score:
    if not path.is_file():
        raise RenderError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    suffix = path.suffix.lower()
    try:
        if notation.is_notation(path):
            data = notation.score_midi_bytes(path, unfold=unfold)
        elif suffix in MIDI_SUFFIXES or not suffix:
            data = path.read_bytes()
        else:
            hint = " (MuseScore: File > Export > MusicXML)" if suffix in (".mscz", ".mscx") else ""
            raise RenderError(
                f"{path}: unsupported score format {suffix!r} "
                f"(use {', '.join(SCORE_SUFFIXES)}){hint}"
            )
        notes = midi.read_midi(path, data)
    except (midi.MidiError, notation.NotationError) as err:
        raise RenderError(str(err)) from err
    except OSError as err:
        raise RenderError(f"{path}: cannot read: {err.strerror or err}") from err
    if not len(notes):
        raise RenderError(f"{path}: the score has no notes")
    return Score(path, notes, tokenizer.encode_notes(notes), data)


def _companion(arg, outputs: list[Path], suffixes: dict, what: str) -> list[Path] | None:
    """Where --audio / --plot go: ARG as given for one output; else <output>.<format>."""
    if arg is None:
        return None
    default = next(iter(suffixes))
    if arg == "":
        return [o.with_suffix(default) for o in outputs]
    if arg.lower().lstrip(".") in {s.lstrip(".") for s in suffixes}:
        return [o.with_suffix("." + arg.lower().lstrip(".")) for o in outputs]
    path = Path(arg)
    if path.suffix.lower() in SCORE_SUFFIXES:
        raise RenderError(f"--{what} {arg}: that is a score; put --{what} after the scores")
    if path.suffix.lower() not in suffixes:
        raise RenderError(f"{path}: {what} must end in {', '.join(suffixes)}")
    if len(outputs) > 1:
        fmt = "|".join(s.lstrip(".") for s in suffixes)
        raise RenderError(
            f"--{what} {arg} names one file for {len(outputs)} outputs; use --{what} {fmt}"
        )
    if not path.parent.is_dir():
        raise RenderError(f"{path}: output directory {path.parent} does not exist")
    return [path]


def _outputs(args, scores: list[Path]) -> list[list[Path]]:
    """Output paths per score (one per variant), checked before any work is done."""
    if args.output and (len(scores) > 1):
        raise RenderError("-o/--output takes one score; use --out-dir for several")
    outs = []
    for score in scores:
        if args.output:
            base = Path(args.output)
        elif args.out_dir:
            base = Path(args.out_dir) / f"{score.stem}.mid"
        else:
            base = score.with_name(f"{score.stem}.performance.mid")
        names = (
            [base]
            if args.variants == 1
            else [
                base.with_name(f"{base.stem}-{k + 1}{base.suffix or '.mid'}")
                for k in range(args.variants)
            ]
        )
        for name in names:
            if not name.parent.is_dir():
                raise RenderError(f"{name}: output directory {name.parent} does not exist")
        outs.append(names)
    return outs


def _progress_bar(renderer: Renderer, total: int, disabled: bool):
    """A tqdm bar showing the rendering rate without compile time, and its update function."""
    if disabled:
        return None, lambda n: None
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="note",
        desc="rendering",
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} notes [{elapsed}{postfix}]",
    )
    t0, compiled_before = time.perf_counter(), renderer.compile_seconds

    def update(n):
        busy = time.perf_counter() - t0 - (renderer.compile_seconds - compiled_before)
        if busy > 0:
            bar.set_postfix_str(f"{n / busy:.1f} notes/s without compiling", refresh=False)
        bar.update(n - bar.n)

    return bar, update


def _write(args, score: Score, notes: midi.Notes, out: Path, workdir: Path) -> None:
    if not args.tempo_map:
        midi.write_midi(notes, out)
        return
    grid = score.path
    if notation.is_notation(score.path):  # the tempo map reads the score MIDI from a file
        grid = workdir / f"{score.path.stem}.score.mid"
        grid.write_bytes(score.midi_bytes)
    tempo_map.write_tempo_mapped(grid, notes, out)


def render_files(args) -> tuple[str, list[str]]:
    """Render, write every output; returns the summary and the errors of optional outputs."""
    paths = [Path(p) for p in args.scores]
    outputs = _outputs(args, paths)
    flat = [o for per_score in outputs for o in per_score]
    audio_paths = _companion(args.audio, flat, audio.FORMATS, "audio")
    plot_paths = _companion(args.plot, flat, plot.FORMATS, "plot")
    try:
        dynamics = 1.0 if args.dynamics is None else args.dynamics
        ctrl = controls.Controls(args.expressiveness, args.tempo, dynamics, args.pedal)
    except ValueError as err:
        raise RenderError(str(err)) from err
    scores = [read_score(p, unfold=not args.no_unfold) for p in paths]
    t0 = time.perf_counter()
    renderer = Renderer(
        args.model, dtype=args.dtype, window=args.window_notes, shift=args.shift_notes
    )
    load = time.perf_counter() - t0
    if args.dynamics is None:  # the model's own default (its decoding.json)
        ctrl = dataclasses.replace(ctrl, dynamics=renderer.decoding["dynamics"])
    try:
        temperature, top_p = decoding.parse(args.temperature), decoding.parse(args.top_p)
    except decoding.DecodingError as err:
        raise RenderError(str(err)) from err
    rows = [(i, k) for i in range(len(scores)) for k in range(args.variants)]
    total = sum(len(scores[i].ids) // TOKENS_PER_NOTE for i, _ in rows)
    bar, update = _progress_bar(renderer, total, args.no_progress)
    done, seconds, results = 0, 0.0, []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        before, t1 = renderer.compile_seconds, time.perf_counter()
        results += renderer.render_ids(
            [scores[i].ids for i, _ in chunk],
            [args.seed + k for _, k in chunk],
            temperature=temperature,
            top_p=top_p,
            progress=lambda n, base=done: update(base + n),
        )
        seconds += time.perf_counter() - t1 - (renderer.compile_seconds - before)
        done = sum(len(r) // TOKENS_PER_NOTE for r in results)
    if bar is not None:
        bar.close()
    errors: list[str] = []
    no_synth = False
    with tempfile.TemporaryDirectory() as workdir:
        for n, (perf, (i, k)) in enumerate(zip(results, rows)):
            score, out = scores[i], outputs[i][k]
            notes = controls.apply(tokenizer.decode_ids(perf, score.ids), score.notes, ctrl)
            _write(args, score, notes, out, Path(workdir))
            if args.save_score_midi and k == 0:
                out.with_suffix(".score.mid").write_bytes(score.midi_bytes)
            if plot_paths:
                plot.plot_performance(
                    notes, score.notes, plot_paths[n], score_beats_ms=score.beats_ms
                )
            if audio_paths and not no_synth:
                try:
                    audio.synthesize(out, audio_paths[n], soundfont=args.soundfont)
                except audio.AudioError as err:
                    errors.append(f"{audio_paths[n]}: {err} (the MIDI file was written)")
                    no_synth = isinstance(err, audio.SetupError)  # one line, not one per file
    rate = done / seconds if seconds > 0 else float("inf")
    summary = (
        f"rendered {done} notes in {seconds:.2f} s ({rate:.1f} notes/s), "
        f"load+compile {load + renderer.compile_seconds:.1f} s"
    )
    return summary, errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pianist_jax.render",
        description=(
            "Render scores (MIDI, MusicXML .musicxml/.xml/.mxl, MEI, Humdrum .krn) into "
            "expressive performance MIDI (timing, dynamics, articulation, sustain pedal); the "
            "output plays exactly the score's notes. Optionally also audio and a picture."
        ),
    )
    p.add_argument("scores", nargs="+", metavar="SCORE", help="score file(s)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="OUT.mid", help="output file (one score)")
    out.add_argument("--out-dir", metavar="DIR", help="write DIR/<score name>.mid")
    p.add_argument(
        "--model", metavar="EXPORTED_DIR", help="exported model directory (default: bundled)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--variants",
        type=int,
        default=1,
        help="N different renderings of each score (seeds seed..seed+N-1)",
    )
    hear = p.add_argument_group("listen and look")
    hear.add_argument(
        "--audio",
        nargs="?",
        const="",
        metavar="OUT.wav|OUT.flac|wav|flac",
        help="also synthesize audio with FluidSynth (alone: <output>.wav next to each MIDI)",
    )
    hear.add_argument(
        "--soundfont",
        metavar="SF2",
        help=f"General MIDI SoundFont for --audio (default: ${audio.SOUNDFONT_ENV}, "
        "else the system's usual locations)",
    )
    hear.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="OUT.png",
        help="also draw the performance: piano roll (colour = velocity), pedal, tempo curve "
        "(alone: <output>.png next to each MIDI; .pdf and .svg also work)",
    )
    shape = p.add_argument_group("shape the performance")
    shape.add_argument(
        "--expressiveness",
        type=float,
        default=1.0,
        metavar="X",
        help="0 = the score exactly as notated, 1 = the model's performance (default), in "
        "between = timing, velocity, duration and pedal blended note by note, up to 4 = "
        "exaggerated",
    )
    shape.add_argument(
        "--tempo",
        type=float,
        default=1.0,
        metavar="X",
        help="play X times as fast (0.25-4; rubato kept)",
    )
    shape.add_argument(
        "--dynamics",
        type=float,
        default=None,
        metavar="X",
        help="scale loudness contrasts (velocity around the piece's mean) by X (0-4; default: "
        "the model's decoding.json, else 1)",
    )
    shape.add_argument(
        "--pedal",
        choices=controls.PEDAL_CHOICES,
        default="model",
        help="sustain pedal: the model's (default), none, or the score's own marks",
    )
    shape.add_argument(
        "--tempo-map",
        action="store_true",
        help="DAW-friendly output on the score's beat grid (Expressive Tempo Mapping)",
    )
    notation_args = p.add_argument_group("notation files")
    notation_args.add_argument(
        "--no-unfold",
        action="store_true",
        help="play the score as printed: no repeats, da capo or dal segno",
    )
    notation_args.add_argument(
        "--save-score-midi",
        action="store_true",
        help="also write the score MIDI the model read, as <output>.score.mid",
    )
    sampling = p.add_argument_group("sampling and speed")
    sampling.add_argument(
        "--temperature",
        metavar="T",
        help="sampling temperature, 0 = greedy: a number for every slot or kind=value pairs, "
        "e.g. velocity=0.8,pedal=1 (kinds: ioi, velocity, duration, pedal; default: the "
        "model's decoding.json, else 1.0)",
    )
    sampling.add_argument(
        "--top-p",
        metavar="P",
        help="nucleus size, the same forms (default: the model's decoding.json, else 0.95)",
    )
    sampling.add_argument("--batch-size", type=int, default=8, help="rows rendered together")
    sampling.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: parameters, activations and caches in bfloat16 (the fast choice on "
        "GPUs and TPUs)",
    )
    sampling.add_argument("--window-notes", type=int, default=512, help=argparse.SUPPRESS)
    sampling.add_argument("--shift-notes", type=int, default=256, help=argparse.SUPPRESS)
    sampling.add_argument("--no-progress", action="store_true", help="no progress bar")
    sampling.add_argument(
        "--compilation-cache",
        metavar="DIR",
        default=os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/pianist-jax/xla"),
        help="persistent XLA compilation cache ('' disables; default %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.variants < 1 or args.batch_size < 1:
        print("error: --variants and --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    with warnings.catch_warnings():  # restored afterwards (main is also called in-process)
        warnings.simplefilter("ignore", midi.MidiWarning)
        # one line per warning, like the error lines (not Python's file:line + source echo)
        warnings.showwarning = lambda message, *_, **__: print(
            f"warning: {message}", file=sys.stderr
        )
        try:
            summary, errors = render_files(args)
        except RenderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # e.g. the output became unwritable mid-run
            print(
                f"error: {getattr(err, 'filename', '') or ''}: {err.strerror or err}",
                file=sys.stderr,
            )
            return 2
    print(summary, file=sys.stderr)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 2 if errors else 0
