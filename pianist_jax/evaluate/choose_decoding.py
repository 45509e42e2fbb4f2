"""Choose an exported model's sampling settings per slot on validation pieces.

    python -m pianist_jax.evaluate.choose_decoding EXPORT EVAL_DIR [--seeds 0] [--work DIR] \
        [--write]

``EVAL_DIR`` is laid out by `pianist_jax.evaluate.eval_set` (``scores/<piece>.mid``,
``human/<piece>-<k>.mid``). Starting from the paper's setting (temperature 1.0, top-p 0.95 for
every slot), a coordinate search tries the candidates of `CANDIDATES` one slot kind at a time
(pedal first: its drift is the largest), renders every validation score with each (the same
compiled renderer: the settings are runtime inputs), judges them with both judges and keeps a
candidate only if it raises

    objective = mean(velocity r, local-tempo r, articulation r, pedal agreement) - overall JS

(the note-level judge's four figures against the histograms' overall Jensen-Shannon distance,
each in [0, 1]). To keep the search affordable on a CPU each trial renders the first
``--max-notes`` notes of every score (default 512: one window) and judges those notes; the
histograms then compare those openings with the humans' whole performances, the same for
every candidate. ``--write`` stores the winner as ``EXPORT/decoding.json``, the renderer's
defaults for that model; every candidate's figures go to ``WORK/choices.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from pianist_jax import midi, tokenizer
from pianist_jax.evaluate import histograms as evaluate
from pianist_jax.render import controls, decoding
from pianist_jax.render import renderer as render

# (slot kind, [(temperature, top_p, dynamics or None to keep it), ...]) in search order. The
# most likely velocity (temperature 0) is tried with its contrast scaled back up
# (`pianist_jax.render.controls.scale_dynamics`).
CANDIDATES = (
    ("pedal", ((1.0, 1.0, None), (0.7, 1.0, None))),
    ("velocity", ((0.8, 0.95, 1.0), (0.6, 0.95, 1.0), (0.0, 1.0, 1.5), (0.0, 1.0, 1.75))),
    ("ioi", ((0.8, 0.95, None),)),
    ("duration", ((0.8, 0.95, None),)),
)


def objective(metrics: dict) -> float:
    """Mean of the note-level figures it has, minus the overall JS (1, the worst, where a
    side had no value in a histogram's range)."""
    notes = metrics["notes"]["prediction"]
    figures = [
        notes[k]
        for k in ("velocity_r", "tempo_r", "articulation_r", "pedal_agreement")
        if notes[k] is not None
    ]
    js = metrics["prediction"]["overall"]["js"]
    return float(np.mean(figures) if figures else 0.0) - (1.0 if js is None else js)


def summary(metrics: dict) -> dict:
    notes = metrics["notes"]["prediction"]
    return {
        "objective": objective(metrics),
        "overall_js": metrics["prediction"]["overall"]["js"],
        "pedal_js": metrics["prediction"]["pedal"]["js"],
        **{
            k: notes[k]
            for k in ("velocity_r", "tempo_r", "articulation_r", "pedal_agreement", "pedal_down")
        },
    }


def trial(
    renderer, scores: dict, eval_dir: Path, out: Path, settings: dict, seeds: list[int], batch: int
) -> dict:
    """Render every score with ``settings`` for each seed; judge; mean figures over seeds."""
    rows = []
    names = sorted(scores)
    for seed in seeds:
        pred = out / f"seed{seed}"
        pred.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(names), batch):
            chunk = names[i : i + batch]
            ids = renderer.render_ids(
                [scores[n] for n in chunk],
                [seed] * len(chunk),
                temperature=settings["temperature"],
                top_p=settings["top_p"],
            )
            for name, perf in zip(chunk, ids):
                notes = tokenizer.decode_ids(perf, scores[name])
                velocity = controls.scale_dynamics(notes.velocity, settings["dynamics"])
                notes = dataclasses.replace(notes, velocity=velocity)
                midi.write_midi(notes, pred / f"{name}.mid")
        metrics = evaluate.evaluate_dirs(
            pred, eval_dir / "human", out=False, scores=eval_dir / "scores", log=lambda _: None
        )
        if not metrics["notes"]["n_pieces"]:
            raise ValueError(
                "the note-level judge could not judge any piece "
                f"(run python -m pianist_jax.evaluate on {pred} to see why)"
            )
        rows.append(summary(metrics))
    return {k: float(np.mean([np.nan if r[k] is None else r[k] for r in rows])) for k in rows[0]}


def choose(
    export: Path,
    eval_dir: Path,
    work: Path,
    seeds: list[int],
    batch: int = 8,
    max_notes: int | None = 512,
    log=print,
) -> tuple[dict, list[dict]]:
    renderer = render.Renderer(export)
    cut = None if not max_notes else max_notes * tokenizer.TOKENS_PER_NOTE
    scores = {
        p.stem: tokenizer.encode_file(p)[:cut] for p in sorted((eval_dir / "scores").glob("*.mid"))
    }
    if not scores:
        raise ValueError(f"no scores in {eval_dir / 'scores'}")
    best = decoding.check({})
    tried = []

    def run(settings: dict, label: str) -> dict:
        t0 = time.perf_counter()
        res = trial(renderer, scores, eval_dir, work / f"trial{len(tried)}", settings, seeds, batch)
        tried.append({"label": label, "settings": settings, **res})
        log(
            f"{label:<28} objective {res['objective']:.4f}  overall JS {res['overall_js']:.3f}"
            f"  velocity r {res['velocity_r']:.3f}  tempo r {res['tempo_r']:.3f}  "
            f"pedal agreement {res['pedal_agreement']:.3f} (down {res['pedal_down']:.2f})  "
            f"[{time.perf_counter() - t0:.0f} s]"
        )
        return res

    best_res = run(best, "paper (1.0 / 0.95)")
    for kind, options in CANDIDATES:
        for temperature, top_p, dynamics in options:
            settings = decoding.override(best, {kind: temperature}, {kind: top_p}, dynamics)
            label = f"{kind} {temperature:g} / {top_p:g}"
            res = run(settings, label if dynamics is None else f"{label}, dynamics {dynamics:g}")
            if res["objective"] > best_res["objective"]:
                best, best_res = settings, res
    return best, tried


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pianist_jax.evaluate.choose_decoding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("export", type=Path, help="exported model directory")
    ap.add_argument(
        "eval_dir", type=Path, help="pianist_jax.evaluate.eval_set output (scores/, human/)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="rendering seeds (0)")
    ap.add_argument(
        "--work", type=Path, help="renderings and choices.json (default EVAL_DIR/decoding)"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--max-notes",
        type=int,
        default=512,
        help="render and judge each score's first N notes (0: all; default 512)",
    )
    ap.add_argument("--write", action="store_true", help="write EXPORT/decoding.json")
    args = ap.parse_args(argv)
    work = args.work or args.eval_dir / "decoding"
    try:
        best, tried = choose(
            args.export, args.eval_dir, work, args.seeds, args.batch_size, args.max_notes
        )
    except (render.RenderError, evaluate.EvaluationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    (work / "choices.json").write_text(
        json.dumps({"seeds": args.seeds, "chosen": best, "tried": tried}, indent=1) + "\n"
    )
    print(f"chosen: {decoding.describe(best)}")
    if args.write:
        how = (
            f"pianist_jax.evaluate.choose_decoding on {len(tried)} settings, seeds {args.seeds}, "
            f"first {args.max_notes or 'all'} notes of the validation pieces of "
            f"{args.eval_dir}"
        )
        print(f"wrote {decoding.save(args.export, best, how)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
