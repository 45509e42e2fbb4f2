"""Compile the real sharded train step for a TPU pod topology, ahead of time, on a CPU machine.

Why: a pod hour is expensive and a sharding or memory mistake found there wastes it. JAX can
lower and compile for a *described* TPU topology without owning one (``libtpu`` ships the
compiler; `jax.experimental.topologies` describes the slice), as MaxText's ``train_compile``
does. This module builds exactly what `pianist_jax.train` builds (model, AdamW state, mesh,
rule table, ``StepFns.train_step`` with its shardings and donation), compiles it for the target,
and prints per-chip memory, FLOPs per step and how the largest tensors are laid out. It exits
with status 3 when the step would not fit the chip's HBM, 2 on a bad config or topology.

    python -m pianist_jax.aot --config configs/pretrain_pod.yaml model=base --topology v5e:16x16

Needs ``libtpu`` (``pip install -r requirements-tpu.txt``); nothing here touches a real TPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Compile for a described TPU, run nothing: the local backend must stay the CPU, and libtpu
# should not go looking for TPU metadata servers, nor lock the (absent) chips, so several
# compiles can run side by side.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from pianist_jax.config import ConfigError, config_from_cli  # noqa: E402
from pianist_jax.config.schema import Config, mesh_axes  # noqa: E402
from pianist_jax.model import flops_per_token, param_count  # noqa: E402
from pianist_jax.model.params import flatten  # noqa: E402
from pianist_jax.train import sharding  # noqa: E402
from pianist_jax.train.step import BATCH_KEYS, StepFns  # noqa: E402

log = logging.getLogger("pianist_jax.aot")

GIB = 1 << 30
# HBM per chip (GiB) by the device_kind libtpu reports; --hbm-gib overrides.
HBM_GIB = {
    "TPU v2": 8,
    "TPU v3": 16,
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5": 95,
    "TPU v6 lite": 32,
    "TPU7x": 192,
}
TOPOLOGY = re.compile(r"^(v[2-7][a-z]*):(\d+(?:x\d+){1,2})$")
EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 2, 3


class AotError(ValueError):
    """A topology that cannot be described or a config that cannot be compiled for it."""


@dataclass(frozen=True)
class Report:
    """What one ahead-of-time compile measured (per chip unless named otherwise)."""

    topology: str
    chips: int
    hosts: int
    device_kind: str
    mesh: dict
    params: int
    global_batch: int
    block_size: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops_per_chip: float | None
    model_flops_per_step: float
    compile_seconds: float
    largest: list

    @property
    def peak_bytes(self) -> int:
        """Live bytes at the step's peak: inputs + outputs not aliased to inputs + scratch."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a described TPU slice, e.g. ``v5e:16x16`` (v5e-256) or ``v5p:4x4x4``."""
    if not TOPOLOGY.match(topology):
        raise AotError(
            f"--topology {topology!r}: expected GENERATION:AxB[xC], "
            "e.g. v5e:16x16, v5p:4x4x4, v4:2x2x2"
        )
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            topology_name=topology, platform="tpu", num_slices=num_slices
        )
    except Exception as err:  # noqa: BLE001 - libtpu missing or the name unknown to it
        raise AotError(
            f"cannot describe TPU topology {topology!r}: {err}. Ahead-of-time "
            "compilation needs libtpu: pip install -r requirements-tpu.txt"
        ) from err
    return list(desc.devices)


def abstract_batch(cfg: Config, fns: StepFns) -> dict:
    """Shapes of one global batch (what `host_batches.to_global_batch` builds), sharded."""
    shape = (cfg.train.batch_size, cfg.data.block_size)
    dtypes = {"loss_mask": jnp.float32}
    return {
        k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.int32), sharding=fns.batch_sharding)
        for k in BATCH_KEYS
    }


def largest_tensors(fns: StepFns, top: int) -> list[dict]:
    """The biggest parameters with their PartitionSpec and per-chip shard shape."""
    shapes = flatten(
        jax.tree.map(
            lambda s: s.shape,
            fns._abstract_params(),
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )
    )
    specs = flatten(fns.param_specs)
    rows = []
    for path, shape in shapes.items():
        spec = specs[path]
        shard = NamedSharding(fns.mesh, spec).shard_shape(shape)
        rows.append(
            {
                "name": path,
                "shape": list(shape),
                "spec": str(spec),
                "per_chip": list(shard),
                "size": math.prod(shape),
            }
        )
    rows.sort(key=lambda r: -r["size"])
    return rows[:top]


def check_batch_split(cfg: Config, mesh_shape: dict[str, int]) -> None:
    """The global batch must split evenly over the mesh axes the ``batch`` rule names.

    `sharding.logical_to_spec` would silently replicate an uneven batch (every chip computing
    every sequence); on a pod that is a silent 100x waste, so it is an error here.
    """
    axes = mesh_axes(dict(cfg.mesh.rules).get("batch"))
    ways = math.prod(mesh_shape[a] for a in axes)
    if cfg.train.batch_size % ways:
        raise AotError(
            f"train.batch_size {cfg.train.batch_size} does not split over the batch "
            f"axes {axes} ({ways} ways) of mesh {mesh_shape}; shard sequences over "
            "another axis (see configs/pretrain_pod.yaml) or change the batch"
        )


def compile_for(
    cfg: Config, topology: str, *, num_slices: int = 1, hbm_gib: float | None = None, top: int = 6
) -> Report:
    """Build and compile ``StepFns.train_step`` for ``topology``; nothing is allocated."""
    devices = topology_devices(topology, num_slices)
    kind = devices[0].device_kind
    if hbm_gib is None and kind not in HBM_GIB:
        raise AotError(f"unknown HBM size for {kind!r}: pass --hbm-gib")
    hbm = int((hbm_gib if hbm_gib is not None else HBM_GIB[kind]) * GIB)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    check_batch_split(cfg, dict(mesh.shape))
    fns = StepFns(cfg, mesh, total_steps=max(cfg.train.steps or 1, 1))
    t0 = time.perf_counter()
    lowered = fns.train_step.lower(fns.abstract_state(), abstract_batch(cfg, fns))
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    n_params = param_count(cfg.model)
    tokens = cfg.train.batch_size * cfg.data.block_size
    return Report(
        topology=topology,
        chips=len(devices),
        hosts=len({d.process_index for d in devices}),
        device_kind=kind,
        mesh=dict(mesh.shape),
        params=n_params,
        global_batch=cfg.train.batch_size,
        block_size=cfg.data.block_size,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(getattr(mem, "generated_code_size_in_bytes", 0)),
        hbm_bytes=hbm,
        flops_per_chip=flops,
        model_flops_per_step=flops_per_token(cfg.model, cfg.data.block_size) * tokens,
        compile_seconds=seconds,
        largest=largest_tensors(fns, top),
    )


def format_report(r: Report) -> str:
    gib = lambda b: f"{b / GIB:8.3f} GiB"  # noqa: E731
    lines = [
        f"topology {r.topology}: {r.chips} x {r.device_kind} on {r.hosts} hosts, mesh {r.mesh}",
        f"model {r.params / 1e6:.1f} M params; global batch {r.global_batch} x {r.block_size} "
        f"tokens; compiled in {r.compile_seconds:.1f} s",
        "per-chip memory:",
        f"  arguments    {gib(r.argument_bytes)}  (params + optimiser state + batch shard)",
        f"  outputs      {gib(r.output_bytes)}  (aliased to arguments: {gib(r.alias_bytes)})",
        f"  temporaries  {gib(r.temp_bytes)}  (activations, gradients, collectives)",
        f"  code         {gib(r.code_bytes)}",
        f"  peak         {gib(r.peak_bytes)}  of {gib(r.hbm_bytes)} HBM "
        f"({100 * r.peak_bytes / r.hbm_bytes:.1f}%)",
    ]
    if r.flops_per_chip is not None:
        lines.append(
            f"FLOPs per step: {r.flops_per_chip:.3e} per chip (XLA), "
            f"{r.flops_per_chip * r.chips:.3e} all chips; model FLOPs (analytic) "
            f"{r.model_flops_per_step:.3e}"
        )
    lines.append("largest parameters (spec -> per-chip shard):")
    for row in r.largest:
        lines.append(
            f"  {row['name']:<40} {str(row['shape']):<18} {row['spec']:<32} {row['per_chip']}"
        )
    lines.append("fits" if r.fits else "DOES NOT FIT in HBM")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pianist_jax.aot",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m pianist_jax.aot --config configs/pretrain_pod.yaml "
        "model=base --topology v5e:16x16",
    )
    parser.add_argument("--config", required=True, help="run config YAML (configs/pretrain.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument(
        "--topology",
        required=True,
        help="TPU slice as GENERATION:AxB[xC], e.g. v5e:16x16 (v5e-256)",
    )
    parser.add_argument("--num-slices", type=int, default=1, help="multislice: slices (DCN)")
    parser.add_argument("--hbm-gib", type=float, help="HBM per chip (default: by chip kind)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(
        level=os.environ.get("PIANIST_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_from_cli([args.config, *args.overrides])
        report = compile_for(cfg, args.topology, num_slices=args.num_slices, hbm_gib=args.hbm_gib)
    except (AotError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_report(report))
    if args.json:
        payload = {**report.__dict__, "peak_bytes": report.peak_bytes, "fits": report.fits}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    return 0 if report.fits else EXIT_DOES_NOT_FIT


def _plain(x):
    return x.item() if isinstance(x, np.generic) else str(x)


if __name__ == "__main__":
    sys.exit(main())
