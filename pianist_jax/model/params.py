"""Parameter trees by flat dotted names (``"decoder.layers.0.mlp.up_proj"``): the names the
exported files, the sharding tables and the reference-weight mapping all use."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict (int keys for layer lists) -> ``{"a.0.b": leaf}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten`; all-digit keys become ints (NNX list indices)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
