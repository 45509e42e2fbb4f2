"""Test setup: 8 fake CPU devices (so sharding is exercised without accelerators) and data fixtures.

The environment variables must be set before anything imports jax, which is why they sit at the
top of conftest.py (pytest imports it before any test module).
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

_DEVICES = "--xla_force_host_platform_device_count=8"
_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags.strip()} {_DEVICES}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Several tests compile the same tiny train step (fresh run, resumed run, ...): a persistent
# compilation cache for the test run turns the repeats into cache hits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pianist-jax-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if "jax" in sys.modules:  # imported early (e.g. by a plugin): the platform must still be CPU
    sys.modules["jax"].config.update("jax_platforms", "cpu")

from hypothesis import settings  # noqa: E402

# jit compiles make first calls slow and CI has 2 cores: no per-example deadline.
settings.register_profile("pianist", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pianist"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`<repo>/../shared/data` (ASAP, unlabeled corpora); tests using it skip where it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not present")
    return path


@pytest.fixture(scope="session")
def golden_tokens() -> dict:
    """`../shared/golden/reference_tokens.json` (reference tokenizer output), parsed; skip if
    absent."""
    path = SHARED / "golden" / "reference_tokens.json"
    if not path.is_file():
        pytest.skip("../shared/golden/reference_tokens.json not present")
    return json.loads(path.read_text())
