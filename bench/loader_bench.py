"""Input-pipeline throughput: per-host batches of masked-denoising examples per second.

Why: the loader must outrun a training step (paper: 64 x 4096 tokens per step); this measures
`pianist_jax.data.pipeline.make_train_iterator` alone on real shards, after a few warm-up
batches (the
first ones pay for opening shards and, with --workers, starting processes). Asserts nothing.

    python bench/loader_bench.py [--shards out/shards/pretrain] [--batch-size 64]
        [--block-size 4096] [--steps 200] [--workers 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pianist_jax.config import load_config
from pianist_jax.data import pipeline as data
from pianist_jax.data import records

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="out/shards/pretrain", help="directory of shard files")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (one host here)")
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200, help="batches timed")
    ap.add_argument("--warmup", type=int, default=5, help="batches before the clock starts")
    ap.add_argument("--workers", type=int, default=0, help="Grain worker processes")
    args = ap.parse_args(argv)

    shards = Path(args.shards)
    if not shards.is_dir() or not records.list_shards(shards):
        print(
            f"error: no shards in {shards}. Create them with\n"
            f"  bash {REPO / 'launch' / 'tokenize_shared.sh'} {shards}",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(
        None,
        [
            f"data.sources=[{{name: bench, path: '{shards}'}}]",
            f"data.block_size={args.block_size}",
            f"data.window_stride={args.block_size}",
            f"data.worker_count={args.workers}",
            f"train.batch_size={args.batch_size}",
        ],
    )
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    try:
        for _ in range(args.warmup):
            next(it)
        real = 0
        start = time.perf_counter()
        for _ in range(args.steps):
            batch = next(it)
            real += int((batch["targets"] != 0).sum())
        seconds = time.perf_counter() - start
    finally:
        it.close()
    tokens = args.steps * args.batch_size * args.block_size
    print(
        f"shards={shards} batch={args.batch_size} block={args.block_size} "
        f"workers={args.workers} steps={args.steps}"
    )
    print(
        f"{args.steps / seconds:.1f} batches/s  {tokens / seconds:,.0f} tokens/s  "
        f"({real / tokens:.1%} non-PAD)  {seconds:.2f} s"
    )
    return 0


if __name__ == "__main__":  # the guard matters: Grain workers are spawned, re-importing this
    sys.exit(main())
