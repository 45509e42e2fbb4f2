"""The fastest a render can possibly be on this machine: a lower bound next to `render_bench`.

    python bench/render_floor.py                        # base + small, fp32 + bf16, batch 1 + 8
    python bench/render_floor.py --models base --dtypes bfloat16 --batches 8

Why: the render speed targets are met on some CPUs and not on others, and the question on a
given machine is whether the renderer or the machine is the limit. This script measures two
figures of the machine and counts the work of one render of `render_bench`'s score:

- ``stream``: GB/s of reading memory (XLA's sum over a 64 MiB float32 array);
- ``compute``: GFLOP/s of the best dense float32 product (XLA, ``[4096, hidden] x
  [hidden, mlp]``).

Work, counted from the model config the way `pianist_jax.render.core` runs one window (7 decoder
steps per note, the first with two tokens; the last layer of that step continues with one):
the encoder's products and attention, the decoder's products and output logits (FLOPs), and
the bytes every decoder step must read: the weights, and the visible part of the self- and
cross-attention caches. The floor of each part is its FLOPs / compute or its bytes / stream,
whichever is larger; the weights are read once per step for all rows of the batch. Everything
else (norms, rotary, sampling, cache writes, the overheads of ~4,000 kernel calls) counts as
zero, so a real render is always slower. Scores up to one window (512 notes) only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 7  # decoder steps per note (`pianist_jax.render.core`: the Pitch step fused with the next)


def _best(fn, *args, repeats: int = 5, inner: int = 10) -> float:
    """Best seconds per call of the jitted ``fn`` (after one warm-up)."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_machine(hidden: int, mlp: int, rounds: int = 6) -> dict:
    """Stream GB/s and dense GFLOP/s (float32 arithmetic) of this machine: the best of
    ``rounds`` interleaved rounds, because shared machines drift by 10-30% from one second
    to the next and a lower bound needs the machine's best."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((4096, hidden), jnp.float32), jnp.ones((hidden, mlp), jnp.float32)
    computes = [(2 * a.shape[0] * hidden * mlp, jax.jit(jnp.matmul), (a, b), 2)]
    w = jnp.ones((16 << 20,), jnp.float32)
    streams = [(w.nbytes, jax.jit(jnp.sum), (w,), 3)]
    best = {"stream": 0.0, "compute": 0.0}
    for _ in range(rounds):
        for key, cases in (("stream", streams), ("compute", computes)):
            for work, fn, args, inner in cases:
                best[key] = max(best[key], work / _best(fn, *args, repeats=3, inner=inner))
    return best


def layer_macs(cfg) -> dict:
    """Multiply-adds per token of one decoder layer's products (q/k/v, o, cross q, cross o,
    the MLP's gate/up and down)."""
    h, d = cfg.hidden, cfg.head_dim
    n, k = cfg.num_heads * d, cfg.num_kv_heads * d
    return {
        "qkv": h * (n + 2 * k),
        "o": n * h,
        "cross_q": h * n,
        "cross_o": n * h,
        "gate_up": 2 * h * cfg.mlp,
        "down": cfg.mlp * h,
    }


def count_work(cfg, notes: int, batch: int, weight_bytes: int, cache_bytes: int) -> dict:
    """FLOPs and bytes of rendering ``notes`` notes (one window) for ``batch`` rows."""
    from pianist_jax.tokenizer import TOKENS_PER_NOTE

    per_layer = layer_macs(cfg)
    layer = sum(per_layer.values())
    last_fused = layer + per_layer["qkv"]  # last layer, fused step: both tokens' keys/values
    dec_macs_note = (
        (STEPS - 1) * cfg.decoder_layers * layer  # one token per step
        + (cfg.decoder_layers - 1) * 2 * layer
        + last_fused
    )
    logits_macs_note = cfg.hidden * (2 * 5000 + 128 + 4 * 128)  # IOI, duration; vel., pedals
    kv = cfg.num_kv_heads * cfg.head_dim
    cross_kv_macs = cfg.decoder_layers * notes * cfg.hidden * 2 * kv  # per row, once
    h, d, heads = cfg.hidden, cfg.head_dim, cfg.num_heads
    enc_layer = notes * (h * (heads * d + 2 * kv) + heads * d * h + 3 * h * cfg.mlp)
    enc_attn = 2 * notes * notes * heads * d  # logits and weighted values
    enc_macs = cfg.encoder_layers * (enc_layer + enc_attn) + notes * h * h  # + slot merge
    # cache bytes each step reads (K and V, every layer): the step at token position p sees
    # p + 1 positions; note j's steps end at 8j + 2 (fused) and 8j + s + 1, s = 2..7
    token_bytes = 2 * kv * cache_bytes * cfg.decoder_layers
    visible = sum(STEPS * TOKENS_PER_NOTE * j + 35 for j in range(notes))
    weights = (cfg.decoder_layers * layer + logits_macs_note // STEPS) * weight_bytes
    return {
        "encoder_flops": 2 * batch * (enc_macs + cross_kv_macs),
        "decoder_flops": 2 * batch * notes * (dec_macs_note + logits_macs_note),
        "weight_bytes": notes * STEPS * weights,  # read once per step for the whole batch
        "self_cache_bytes": batch * visible * token_bytes,
        "cross_cache_bytes": batch * notes * STEPS * notes * token_bytes,
        "attn_flops": 2
        * batch
        * 2
        * heads
        * d
        * (visible + notes * STEPS * notes)
        * cfg.decoder_layers,
    }


def floor(work: dict, machine: dict) -> dict:
    """Lower-bound seconds per part (max of its compute and memory time)."""
    c, s = machine["compute"], machine["stream"]
    products = max(work["decoder_flops"] / c, work["weight_bytes"] / s)
    attention = max(
        work["attn_flops"] / c, (work["self_cache_bytes"] + work["cross_cache_bytes"]) / s
    )
    return {"encoder": work["encoder_flops"] / c, "products": products, "attention": attention}


def main() -> None:
    from render_bench import add_case_args, cpu_name

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_case_args(p)
    args = p.parse_args()
    if not 0 < args.notes <= 512:
        p.error("--notes must be 1..512 (one window)")

    from pianist_jax.config import load_config

    print(f"CPU: {cpu_name()}")
    cfgs = {name: load_config(None, [f"model={name}"]).model for name in args.models}
    machine = measure_machine(
        max(c.hidden for c in cfgs.values()), max(c.mlp for c in cfgs.values())
    )
    print(
        f"measured: stream {machine['stream'] / 1e9:.1f} GB/s, "
        f"compute {machine['compute'] / 1e9:.1f} GFLOP/s (float32)"
    )
    print(
        f"{'model':>6} {'dtype':>9} {'batch':>5} {'encoder s':>9} {'products s':>10} "
        f"{'attention s':>11} {'floor s':>8} {'max notes/s':>11}"
    )
    for name, cfg in cfgs.items():
        for dtype in args.dtypes:
            size = 2 if dtype == "bfloat16" else 4  # weights and caches as the renderer keeps them
            for batch in args.batches:
                parts = floor(count_work(cfg, args.notes, batch, size, size), machine)
                total = sum(parts.values())
                print(
                    f"{name:>6} {dtype:>9} {batch:>5} {parts['encoder']:9.2f} "
                    f"{parts['products']:10.2f} {parts['attention']:11.2f} {total:8.2f} "
                    f"{batch * args.notes / total:11.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
