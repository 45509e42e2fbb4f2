"""How much the score says about its performance, and how much a model listens to it.

    python -m pianist_jax.evaluate.score_signal SFT_DIR [--split train|val] [--model EXPORTED_DIR]
        [--windows N] [--notes 128]

Data (every record of ``SFT_DIR/<split>``, written by `data_prep.build_sft`): per record,
Pearson r of the target velocity with the score's velocity (records whose score has more than
one velocity: printed dynamics) and of log target IOI with log score IOI (notes with both
IOIs > 0), then the mean over records; and the share of notes whose first pedal sample is
down (>= 64).

Model (``--model``): the mean cross-entropy per token slot over ``--windows`` windows of the
records, with the true score as encoder input and with the score of *another* window (rolled
by one in the batch). A model that performs its score loses much more with the wrong one;
one that has learned only the marginal distributions loses almost nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_prep.inspect import iter_records
from pianist_jax.artifacts.export import load_model
from pianist_jax.data.sft import binarize_pedal
from pianist_jax.tokenizer import (
    BOS,
    IOI,
    PEDAL_START,
    SLOT_RANGES,
    TIME_START,
    TOKENS_PER_NOTE,
    VELOCITY,
    VELOCITY_START,
)

SLOT_NAMES = ("pitch", "ioi", "velocity", "duration", "pedal1", "pedal2", "pedal3", "pedal4")


def _r(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r, or None with < 3 values or a side without variation."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def record_signal(score: np.ndarray, target: np.ndarray) -> dict:
    """Velocity and log-IOI r of one (score, performance) record, and its pedal-down share."""
    s, t = score.reshape(-1, TOKENS_PER_NOTE), target.reshape(-1, TOKENS_PER_NOTE)
    s_ioi, t_ioi = s[:, IOI] - TIME_START, t[:, IOI] - TIME_START
    both = (s_ioi > 0) & (t_ioi > 0)
    return {
        "velocity_r": _r(s[:, VELOCITY] - VELOCITY_START, t[:, VELOCITY] - VELOCITY_START),
        "log_ioi_r": _r(np.log(s_ioi[both].astype(np.float64)), np.log(t_ioi[both])),
        "pedal_down": float(((t[:, 4] - PEDAL_START) >= 64).mean()),
    }


def data_signal(shards: list[Path]) -> dict:
    rows = [
        record_signal(rec.ids, rec.extras["performance"])
        for path in shards
        for rec in iter_records(path)
    ]
    out = {"records": len(rows)}
    for k in ("velocity_r", "log_ioi_r", "pedal_down"):
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = float(np.mean(vals)) if vals else None
        out[f"{k}_records"] = len(vals)
    return out


def windows(shards: list[Path], n_windows: int, notes: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n_windows`` full windows of ``notes`` notes: (score ids, target ids)."""
    enc, tgt = [], []
    for path in shards:
        for rec in iter_records(path):
            perf = rec.extras["performance"]
            for start in range(0, len(rec.ids) // TOKENS_PER_NOTE - notes + 1, notes):
                lo, hi = start * TOKENS_PER_NOTE, (start + notes) * TOKENS_PER_NOTE
                enc.append(rec.ids[lo:hi])
                tgt.append(perf[lo:hi])
                if len(enc) == n_windows:
                    return np.stack(enc).astype(np.int32), np.stack(tgt).astype(np.int32)
    if not enc:
        raise ValueError(f"no record holds {notes} notes")
    return np.stack(enc).astype(np.int32), np.stack(tgt).astype(np.int32)


def slot_losses(
    model, enc: np.ndarray, tgt: np.ndarray, batch: int = 8
) -> tuple[np.ndarray, float, float]:
    """Mean cross-entropy per slot (softmax over the slot's valid ids), pedal binarised; under
    teacher forcing, the model's mean probability of a first pedal sample >= 64 and the mean
    per-window r of its expected velocity with the target's (to set beside what it does when
    it renders, fed its own samples: a gap there is drift, not the model's belief)."""
    import jax
    import jax.numpy as jnp

    tgt = np.stack([binarize_pedal(t) for t in tgt])
    forward = jax.jit(lambda e, d: model(e, d))
    total, p_down, vel_r = np.zeros(TOKENS_PER_NOTE), 0.0, []
    for i in range(0, len(enc), batch):
        e, t = enc[i : i + batch], tgt[i : i + batch]
        d = np.concatenate([np.full((len(t), 1), BOS, np.int32), t[:, :-1]], axis=1)
        logits = np.asarray(forward(jnp.asarray(e), jnp.asarray(d)))
        for s, (lo, hi) in enumerate(SLOT_RANGES.tolist()):
            part = logits[:, s::TOKENS_PER_NOTE, lo:hi]
            part = part - part.max(-1, keepdims=True)
            logp = part - np.log(np.exp(part).sum(-1, keepdims=True))
            ids = t[:, s::TOKENS_PER_NOTE] - lo
            total[s] += -np.take_along_axis(logp, ids[..., None], -1).sum()
            if s == 4:
                p_down += np.exp(logp[..., 64:]).sum()
            if s == VELOCITY:
                expected = (np.exp(logp) * np.arange(hi - lo)).sum(-1)
                vel_r += [r for r in map(_r, expected, ids) if r is not None]
    n = len(enc) * enc.shape[1] // TOKENS_PER_NOTE
    return total / n, p_down / n, float(np.mean(vel_r)) if vel_r else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pianist_jax.evaluate.score_signal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("sft_dir", type=Path, help="a data_prep.build_sft output directory")
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument(
        "--model",
        type=Path,
        help="exported model: also compare its losses with the true and a wrong score",
    )
    ap.add_argument("--windows", type=int, default=64, help="windows for --model (64)")
    ap.add_argument("--notes", type=int, default=128, help="notes per window (128)")
    args = ap.parse_args(argv)
    shards = sorted((args.sft_dir / args.split).glob("*.array_record"))
    if not shards:
        print(f"error: no *.array_record shards in {args.sft_dir / args.split}", file=sys.stderr)
        return 2
    sig = data_signal(shards)
    print(
        f"{sig['records']} records: target vs score velocity r {sig['velocity_r']:.3f} "
        f"({sig['velocity_r_records']} records with printed dynamics), log IOI r "
        f"{sig['log_ioi_r']:.3f}, pedal down at {sig['pedal_down']:.2f} of notes"
    )
    if args.model:
        model = load_model(args.model, dtype="float32")
        enc, tgt = windows(shards, args.windows, args.notes)
        true, p_down, vel_r = slot_losses(model, enc, tgt)
        wrong, _, _ = slot_losses(model, np.roll(enc, 1, axis=0), tgt)
        print(f"{'slot':<10}{'true score':>12}{'wrong score':>13}{'difference':>12}")
        for name, a, b in zip(SLOT_NAMES, true, wrong):
            print(f"{name:<10}{a:12.4f}{b:13.4f}{b - a:12.4f}")
        down = float(((tgt.reshape(-1, TOKENS_PER_NOTE)[:, 4] - PEDAL_START) >= 64).mean())
        print(
            f"{len(enc)} windows of {args.notes} notes; first pedal sample down: "
            f"{down:.2f} of the targets, mean model probability {p_down:.2f}; expected "
            f"velocity vs the target's, teacher-forced: r {vel_r:.3f} per window"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
