"""Training throughput: tokens/s and model FLOPs utilisation (MFU) of the jitted train step.

    python bench/train_bench.py --model small                 # this machine (CPU)
    python bench/train_bench.py --model base --dtype bfloat16 --batch 16   # a GPU / TPU
    python bench/train_bench.py --model tiny --block 1024 --batch 8 --slot-logits \
        model.hidden=128 model.mlp=512 model.head_dim=32   # any config overrides after the flags
    python bench/train_bench.py --vs-reference   # ours vs the PyTorch reference, same CPU

``--vs-reference`` times the PyTorch reference (`transformers` T5Gemma with the note
compression, `tests/reference_t5gemma.py`; `pip install -r requirements-reference.txt`) on the
same synthetic batches: float32, full-vocabulary cross-entropy on the masked positions,
``torch.optim.AdamW``, all CPU threads. The two alternate for ``--rounds`` rounds so that load
from elsewhere on the machine hits both; the ratio of the medians is printed. Defaults for it:
the reference's small configuration (hidden 256, 4 encoder / 2 decoder layers, MLP 1024, 4
heads / 2 KV of 64), batch 4 x 1024, float32, full vocabulary. Without torch it says so and
exits 0.

MFU = flops_per_token(model, block) * tokens/s / peak FLOP/s, where `flops_per_token` is
`pianist_jax.model.flops_per_token` (training = 3x forward matmul FLOPs, attention included,
see its docstring). Peak: `--peak-tflops`, else a table of known accelerators (dense bf16), else
on CPU a measured float32 matmul rate (so CPU "MFU" is relative to what this CPU's BLAS reaches).
Batches are synthetic (random valid tokens, 30% masked): this measures the step, not the loader
(`bench/loader_bench.py` measures that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pianist_jax import tokenizer
from pianist_jax.config import load_config
from pianist_jax.data import pipeline as data
from pianist_jax.model import flops_per_token, param_count
from pianist_jax.train import sharding
from pianist_jax.train.step import StepFns

PEAK_TFLOPS = {  # dense bf16 per chip
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6": 918.0,
}


def peak_flops(device, dtype: str) -> tuple[float, str]:
    kind = device.device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            scale = 1.0 if dtype != "float32" else 0.5  # fp32 runs as TF32 at half rate
            return tflops * 1e12 * scale, f"{kind} spec sheet"
    n = 2048  # best of 5 timings of a 2048^2 matmul: the rate this BLAS really reaches
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    rate = 2 * n**3 / best
    return rate * len(jax.devices()), f"measured fp32 matmul on {kind} x{len(jax.devices())}"


def synthetic_batch(batch: int, block: int, seed: int = 0) -> dict:
    """Random in-range ids per slot, masked exactly as the loader masks them (30%)."""
    rng = np.random.default_rng(seed)
    lo, hi = tokenizer.SLOT_RANGES[:, 0], tokenizer.SLOT_RANGES[:, 1]
    slots = np.arange(block) % 8
    blocks = rng.integers(lo[slots], hi[slots], (batch, block)).astype(np.uint16)
    examples = [data.mask_block(b, rng, 0.3) for b in blocks]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# with --model small (the default): the reference's small configuration
REFERENCE_SMALL = ["model.encoder_layers=4", "model.dtype=float32", "model.slot_logits=false"]


def time_steps(step, state, batch, steps: int):
    """Seconds per step of ``state = step(state, batch)`` over ``steps`` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, state


def reference_trainer(cfg, batch: dict, lr: float):
    """(step function, state) of the PyTorch reference on ``batch``, or None without torch."""
    try:
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests import reference_t5gemma as ref
    except ImportError as err:
        print(
            f"--vs-reference: PyTorch reference unavailable ({err}); "
            "pip install -r requirements-reference.txt"
        )
        return None
    import dataclasses

    torch.set_num_threads(os.cpu_count() or 1)  # the test helper pins one thread
    model_cfg = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k in ref.MODEL_CFG_KEYS}
    model_cfg["rms_norm_eps"] = ref.RMS_NORM_EPS
    module = ref.build_reference(model_cfg, seed=0).train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    enc = torch.as_tensor(batch["encoder_ids"].astype(np.int64))
    dec = torch.as_tensor(batch["decoder_input_ids"].astype(np.int64))
    labels = torch.as_tensor(
        np.where(batch["loss_mask"] > 0, batch["targets"], -100).astype(np.int64)
    )
    mask = ref.note_mask(enc)

    def step(state, _):
        opt.zero_grad(set_to_none=True)
        out = module(
            inputs_embeds=module.model.encoder.embeddings(enc),
            attention_mask=mask,
            decoder_input_ids=dec,
            use_cache=False,
            return_dict=True,
        )
        loss = torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
        opt.step()
        return state, jnp.zeros(())

    return step, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="configs/model/<name>.yaml")
    parser.add_argument("--batch", type=int, default=2, help="global batch (examples)")
    parser.add_argument("--block", type=int, default=4096, help="tokens per example")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the model's)")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--mesh", default="[1,-1,1]", help="mesh.shape (data, fsdp, tensor)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile)")
    parser.add_argument("--peak-tflops", type=float, help="override the peak FLOP/s (TFLOP/s)")
    parser.add_argument(
        "--slot-logits",
        action="store_true",
        help="loss from per-slot logits (model.slot_logits=true)",
    )
    parser.add_argument(
        "--vs-reference",
        action="store_true",
        help="alternate with the PyTorch reference (module docstring)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="--vs-reference rounds")
    parser.add_argument("overrides", nargs="*", help="more config overrides (key=value)")
    args = parser.parse_args()
    if args.vs_reference:
        if args.model == "small" and args.batch == 2 and args.block == 4096:  # no sizes given
            args.batch, args.block = 4, 1024
        args.overrides = REFERENCE_SMALL + args.overrides

    overrides = [
        f"model={args.model}",
        f"mesh.shape={args.mesh}",
        f"data.block_size={args.block}",
        f"train.batch_size={args.batch}",
        f"train.microbatches={args.microbatches}",
        "train.warmup_steps=0",
        "train.steps=1000",
    ]
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    if args.slot_logits:
        overrides.append("model.slot_logits=true")
    overrides += args.overrides
    cfg = load_config(None, overrides)
    mesh = sharding.make_mesh(cfg.mesh)
    fns = StepFns(cfg, mesh, total_steps=1000)
    state = fns.init_state(seed=0)
    batch = jax.device_put(synthetic_batch(args.batch, args.block), fns.batch_sharding)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        state, metrics = fns.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    if args.vs_reference:
        return compare_with_reference(args, cfg, fns, state, batch)
    step_s, state = time_steps(fns.train_step, state, batch, args.steps)
    tokens_per_s = args.batch * args.block / step_s
    fpt = flops_per_token(cfg.model, args.block)
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12 * len(jax.devices()), "--peak-tflops"
    else:
        peak, source = peak_flops(jax.devices()[0], cfg.model.dtype)
    print(
        f"model {args.model}: {param_count(cfg.model) / 1e6:.2f} M params, dtype "
        f"{cfg.model.dtype}, {'per-slot' if cfg.model.slot_logits else 'full-vocab'} "
        f"logits, batch {args.batch} x {args.block} tokens, mesh "
        f"{dict(mesh.shape)}, {len(jax.devices())} x {jax.devices()[0].device_kind}"
    )
    print(
        f"warmup (compile + {args.warmup} steps): {compile_s:.1f} s; "
        f"step {step_s * 1e3:.1f} ms; loss {float(metrics['loss']):.3f}"
    )
    print(f"tokens/s: {tokens_per_s:,.0f}")
    print(
        f"MFU: {fpt / 1e6:.1f} MFLOP/token x {tokens_per_s:,.0f} tokens/s / "
        f"{peak / 1e12:.2f} TFLOP/s peak ({source}) = {100 * fpt * tokens_per_s / peak:.1f}%"
    )


def compare_with_reference(args, cfg, fns, state, batch) -> None:
    """Alternate timed rounds of our step and the reference's on the same batch."""
    host = synthetic_batch(args.batch, args.block)
    trainer = reference_trainer(cfg, host, cfg.train.lr)
    if trainer is None:
        return
    ref_step, ref_state = trainer
    for _ in range(args.warmup):
        ref_state, _ = ref_step(ref_state, None)
    tokens = args.batch * args.block
    ours, theirs = [], []
    print(
        f"batch {args.batch} x {args.block} tokens, {cfg.model.hidden} hidden, "
        f"{cfg.model.encoder_layers}-{cfg.model.decoder_layers} layers, {cfg.model.dtype}, "
        f"{'per-slot' if cfg.model.slot_logits else 'full-vocab'} logits, "
        f"{os.cpu_count()} CPU threads, {args.steps} steps per round"
    )
    for r in range(args.rounds):
        s, state = time_steps(fns.train_step, state, batch, args.steps)
        ours.append(tokens / s)
        s, ref_state = time_steps(ref_step, ref_state, None, args.steps)
        theirs.append(tokens / s)
        print(
            f"round {r + 1}: pianist-jax {ours[-1]:,.0f} tokens/s, PyTorch reference "
            f"{theirs[-1]:,.0f} tokens/s ({ours[-1] / theirs[-1]:.2f}x)"
        )
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(
        f"median: pianist-jax {mo:,.0f} tokens/s, PyTorch reference {mt:,.0f} tokens/s: "
        f"{mo / mt:.2f}x"
    )


if __name__ == "__main__":
    main()
