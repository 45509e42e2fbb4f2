"""The test environment itself: conftest must give jax 8 CPU devices, or sharding tests mean
nothing."""

import os

import jax
import pytest


def test_jax_sees_eight_cpu_devices():
    devices = jax.devices()
    assert jax.default_backend() == "cpu"
    assert len(devices) == 8, f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} gave {devices}"
    assert all(d.platform == "cpu" for d in devices)


def test_fixtures_resolve_outside_repo(repo_root, request):
    # The shared data fixture points next to the repository, never inside it.
    try:
        path = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:  # absent on this machine
        return
    assert repo_root not in path.parents
