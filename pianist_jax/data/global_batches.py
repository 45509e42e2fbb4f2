"""Host batches -> the step: global sharded arrays, and one batch of prefetch with a
checkpoint-consistent iterator state (used by `pianist_jax.train`; re-exported by
`pianist_jax.data.pipeline`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

Example = dict[str, np.ndarray]


def to_global_batch(local_batch: Example, mesh, partition_spec=None) -> dict[str, Any]:
    """Per-host numpy batch -> global jax.Arrays sharded over the batch dimension.

    `partition_spec`: a PartitionSpec for `mesh` or a NamedSharding; default shards the batch
    over the mesh's `data` and `fsdp` axes (the config's "batch" rule). The global batch is
    process_count x the local one, in process order.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(partition_spec, NamedSharding):
        sharding = partition_spec
    else:
        if partition_spec is None:
            partition_spec = PartitionSpec(
                tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
            )
        sharding = NamedSharding(mesh, partition_spec)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


class Prefetch:
    """One batch ahead of the train step, with a checkpoint-consistent state.

    Why: the loop fetches (and transfers) batch k+1 while the device still runs step k, so the
    accelerator never waits on the host; but a checkpoint taken after step k must record the
    iterator *before* the batch held in hand, or a resumed run would skip it. `get_state`
    therefore returns the state from before the held batch. `transform` (e.g. numpy ->
    global jax arrays) runs at prefetch time.
    """

    def __init__(self, it: Any, transform: Callable[[Example], Any] = lambda b: b):
        self._it, self._transform = it, transform
        self._held: Any = None
        self._state_before: Any = None

    def prefetch(self) -> None:
        if self._held is None:
            self._state_before = copy.deepcopy(self._it.get_state())
            self._held = self._transform(next(self._it))

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> Any:
        self.prefetch()
        batch, self._held = self._held, None
        return batch

    def get_state(self) -> Any:
        return self._state_before if self._held is not None else self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._it.set_state(state)
        self._held = None

    def close(self) -> None:
        """Stop the wrapped iterator's worker processes (if any)."""
        getattr(self._it, "close", lambda: None)()

    def start_prefetch(self) -> None:  # Grain's restore hook, forwarded
        getattr(self._it, "start_prefetch", lambda: None)()
