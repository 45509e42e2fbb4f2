"""The device mesh, the logical-axis -> mesh-axis rule table, and parameters born sharded.

Why one rule table: layers only say what a dimension *means* (``embed``, ``mlp``, ``heads``,
``kv``, ``vocab``, ...); the config's ``mesh.rules`` says where each meaning lives on the mesh
``('data', 'fsdp', 'tensor')``. Changing parallelism is then a config edit, never a model edit,
and `tests/test_sharding.py` pins the resulting PartitionSpecs (a golden test).

Parameters travel as plain nested dicts of arrays (``nnx.to_pure_dict``), so optimiser state and
checkpoints do not depend on NNX class layout; `bind` turns them back into a model inside jit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pianist_jax.config.schema import ConfigError, MeshConfig, ModelConfig, mesh_axes
from pianist_jax.model import PianistTransformer
from pianist_jax.model.layers import activation_sharding
from pianist_jax.model.params import flatten

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Any]]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all, every process) shaped by ``mesh.shape``."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_cfg.resolved_shape(len(devices))
    try:  # topology-aware order on TPU/GPU; falls back to the plain order (CPU, odd shapes)
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - any failure here just means "no better layout"
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, tuple(mesh_cfg.axes))


def logical_to_spec(
    logical: Sequence[str | None],
    rules: Rules,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> P:
    """PartitionSpec for a tensor whose dimensions carry these logical names.

    A mesh axis is used at most once per tensor (first dimension wins); with ``mesh`` and
    ``shape`` a dimension that does not divide evenly over its mesh axes stays replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical):
        if name is not None and name not in table:
            raise ConfigError(f"mesh.rules has no entry for logical axis {name!r}")
        axes = tuple(a for a in mesh_axes(None if name is None else table[name]) if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if shape is not None and shape[dim] % size:
                log.info(
                    "dimension %d (%s, size %d) does not divide over %s: replicated",
                    dim,
                    name,
                    shape[dim],
                    axes,
                )
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """GraphDef and abstract (shape-only) parameter state: nothing is allocated."""
    model = nnx.eval_shape(lambda: PianistTransformer(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def param_specs(model_cfg: ModelConfig, rules: Rules, mesh: Mesh | None = None) -> dict:
    """Pure dict of PartitionSpecs for the params under ``rules`` (and ``mesh`` if given)."""
    _, state = abstract_model(model_cfg)
    specs = jax.tree.map(
        lambda v: logical_to_spec(v.get_metadata()["out_sharding"], rules, mesh, v.shape),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.to_pure_dict(specs)


def named(tree: Any, mesh: Mesh) -> Any:
    """PartitionSpec tree -> NamedSharding tree on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, P))


def param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> dict:
    return named(param_specs(model_cfg, rules, mesh), mesh)


def init_params(model_cfg: ModelConfig, mesh: Mesh, rules: Rules, seed: int) -> dict:
    """Freshly initialised params, born sharded: each device only ever holds its own slice."""
    shardings = param_shardings(model_cfg, mesh, rules)

    def init():
        model = PianistTransformer(model_cfg, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def bind(graphdef: nnx.GraphDef, abstract_state: nnx.State, params: Mapping) -> nnx.Module:
    """A model whose parameters are ``params`` (a pure dict); cheap, use inside jit."""
    state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def activation_rules(mesh: Mesh, rules: Rules) -> contextlib.AbstractContextManager:
    """Context for tracing a model on ``mesh``: activations follow the same rule table."""
    return activation_sharding(
        lambda names, shape: NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))
    )


def batch_spec(rules: Rules, mesh: Mesh | None = None, rank: int = 2) -> P:
    """Spec of a ``[batch, length, ...]`` input: the batch over the rule for ``batch``."""
    return logical_to_spec(("batch",) + (None,) * (rank - 1), rules, mesh)


def describe_specs(specs: Mapping) -> list[str]:
    """``path: PartitionSpec`` lines sorted by path, for logs and the golden test."""
    return [f"{path}: {spec}" for path, spec in sorted(flatten(specs).items())]
