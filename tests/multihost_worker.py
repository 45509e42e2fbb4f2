"""One process of a multi-process CPU run, launched by tests/test_multihost.py.

    python tests/multihost_worker.py probe COORDINATOR NUM_PROCESSES PROCESS_ID
    python tests/multihost_worker.py train [pianist_jax.train arguments ...]

Each process sees exactly one CPU device (the test's conftest forces 8 fake devices through
XLA_FLAGS, which is removed here before JAX is imported) and CPU collectives go over gloo.
`probe`: jax.distributed.initialize + one process_allgather, prints "probe ok"; the test skips
when this fails (a JAX build without CPU multi-process support). `train`: `pianist_jax.train`'s
command line, which initialises jax.distributed itself from --coordinator/--process-id.
"""

from __future__ import annotations

import logging
import os
import re
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = re.sub(
    r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")
).strip()


def probe(coordinator: str, num_processes: int, process_id: int) -> int:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.local_device_count() == 1, jax.local_devices()
    assert jax.device_count() == num_processes, jax.devices()
    gathered = multihost_utils.process_allgather(np.asarray([jax.process_index()], np.int32))
    assert np.asarray(gathered).ravel().tolist() == list(range(num_processes)), gathered
    print("probe ok", flush=True)
    jax.distributed.shutdown()
    return 0


def main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "probe":
        coordinator, num_processes, process_id = rest
        return probe(coordinator, int(num_processes), int(process_id))
    if mode == "train":
        from pianist_jax.train import loop as train

        # Importing grain/orbax installs a root log handler (a module-level logging call), so
        # train.main's logging.basicConfig(...) is a no-op and its INFO lines ("resumed ... at
        # step N", "done: ...") would be dropped; the test reads them: configure logging first.
        # (root at WARNING: Orbax's absl INFO lines would drown the log)
        logging.basicConfig(
            level=logging.WARNING,
            force=True,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        logging.getLogger("pianist_jax").setLevel(logging.INFO)
        return train.main(rest)
    raise SystemExit(f"unknown mode {mode!r} (probe or train)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
