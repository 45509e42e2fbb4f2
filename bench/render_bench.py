"""Rendering speed: notes/s of `pianist_jax.render.renderer.Renderer` at batch 1 and batch 8.

    python bench/render_bench.py                       # base + small, float32 + bfloat16
    python bench/render_bench.py --models base --dtypes float32 --batches 1

Random weights (speed does not depend on quality), a fixed ~500-note score (one 512-note
window, the renderer's full-size bucket), sampling at the defaults (temperature 1, top-p 0.95).
Compilation is done first and reported separately; each figure is the best of ``--repeats``
timed renders. `bench/render_vs_reference.py` compares with the PyTorch reference renderer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fixed_score(n_notes: int = 500, seed: int = 0) -> np.ndarray:
    """Score ids of a deterministic piece: chords and runs, 8 tokens per note."""
    from pianist_jax import midi, tokenizer

    rng = np.random.default_rng(seed)
    step = rng.choice([0, 0, 120, 240, 480], size=n_notes)
    onset = np.cumsum(step)
    pitch = 36 + (np.arange(n_notes) * 7 + rng.integers(0, 5, n_notes)) % 60
    notes = midi.Notes(
        onset=onset,
        offset=onset + 300,
        pitch=pitch,
        velocity=np.full(n_notes, 64),
        pedal_ms=np.zeros(0, np.int64),
        pedal_value=np.zeros(0, np.int64),
    )
    return tokenizer.encode_notes(midi.resolve_same_pitch_overlaps(notes))


def random_export(name: str, out: Path) -> Path:
    from flax import nnx

    from pianist_jax.artifacts import export
    from pianist_jax.config import load_config
    from pianist_jax.model import PianistTransformer

    cfg = load_config(
        None, [f"model={name}", "model.dtype=float32", "model.param_dtype=float32"]
    ).model
    model = PianistTransformer(cfg, rngs=nnx.Rngs(0))
    return export.write_export(out / name, nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)


def bench_one(model_dir: Path, dtype: str, batch: int, score: np.ndarray, repeats: int) -> dict:
    from pianist_jax.render.renderer import Renderer

    renderer = Renderer(model_dir, dtype=dtype)
    rows, seeds = [score] * batch, list(range(batch))
    t0 = time.perf_counter()
    renderer.render_ids(rows, seeds)  # compiles, then renders once (warm-up)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        renderer.render_ids(rows, seeds)
        best = min(best, time.perf_counter() - t0)
    notes = batch * (len(score) // 8)
    return {
        "notes": notes,
        "seconds": best,
        "notes_per_s": notes / best,
        "compile_s": renderer.compile_seconds,
        "first_call_s": first,
    }


def cpu_name() -> str:
    """The CPU's model name (figures differ several-fold between the machines we run on)."""
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first CPU's lines
        if "model name" in info:  # VMs often say only "AMD EPYC": family/model tell Zen 3/4
            return (
                f"{info['model name']} (family {info.get('cpu family', '?')}, "
                f"model {info.get('model', '?')})"
            )
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def add_case_args(p: argparse.ArgumentParser) -> None:
    """The cases a render bench covers (also `render_floor`'s, so the two tables line up)."""
    p.add_argument("--models", nargs="+", default=["base", "small"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--notes", type=int, default=500)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_case_args(p)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import jax

    score = fixed_score(args.notes)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPU threads; "
        f"score {len(score) // 8} notes"
    )
    print(f"CPU: {cpu_name()}")
    print(f"{'model':>6} {'dtype':>9} {'batch':>5} {'notes/s':>9} {'s/render':>9} {'compile s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = random_export(name, Path(tmp))
            for dtype in args.dtypes:
                for batch in args.batches:
                    r = bench_one(model_dir, dtype, batch, score, args.repeats)
                    print(
                        f"{name:>6} {dtype:>9} {batch:>5} {r['notes_per_s']:9.1f} "
                        f"{r['seconds']:9.2f} {r['compile_s']:9.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
