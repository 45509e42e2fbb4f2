"""``python -m pianist_jax.export``: a training checkpoint (any mesh) -> an export directory.

Kept apart from `pianist_jax.artifacts.export`, which the renderer imports, so that reading
an export never loads Orbax or the training stack.

    python -m pianist_jax.export runs/pretrain OUT_DIR [--dtype bfloat16] [--step N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pianist_jax.artifacts import export
from pianist_jax.train import checkpoint, sharding


def export_checkpoint(
    ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32", step: int | None = None
) -> Path:
    """Read the params of a training checkpoint (any mesh) onto one device and export them."""
    ckpt_dir = Path(ckpt_dir)
    run_dir = checkpoint.run_checkpoints(ckpt_dir)
    cfg = checkpoint.load_config_from_checkpoint(run_dir, step)
    _, abstract = sharding.abstract_model(cfg.model)
    one = NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",)), P())
    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one), nnx.to_pure_dict(abstract)
    )
    params = checkpoint.restore_params_only(run_dir, target, step)
    steps = checkpoint.committed_steps(run_dir)
    source = {
        "checkpoint": str(ckpt_dir.resolve()),
        "run": cfg.name,
        "step": step if step is not None else (steps[-1] if steps else None),
    }
    return export.write_export(
        out_dir, jax.device_get(params), cfg.model, dtype=dtype, source=source
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pianist_jax.export",
        description="Training checkpoint -> params-only artifact.",
    )
    parser.add_argument("checkpoint", help="run directory (train.output_dir) or its checkpoints/")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--dtype", choices=export.DTYPES, default="float32")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest good one)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, step=args.step)
    info = json.loads((out / export.INFO).read_text())
    print(f"wrote {out} ({info['num_params'] / 1e6:.2f} M params, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
