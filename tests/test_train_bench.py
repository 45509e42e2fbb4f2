"""bench/train_bench.py --vs-reference: both trainers run on the same batch and are compared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.reference
@pytest.mark.slow  # rounds of both train steps
def test_vs_reference_prints_rounds_and_the_ratio():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = subprocess.run(
        [
            sys.executable,
            "bench/train_bench.py",
            "--vs-reference",
            "--batch",
            "1",
            "--block",
            "64",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "model.hidden=64",
            "model.mlp=128",
            "model.head_dim=16",
            "model.encoder_layers=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "XLA_FLAGS": ""},
    )  # one CPU device, as a user runs it
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("round ") for line in lines) == 2
    assert lines[-1].startswith("median: pianist-jax") and lines[-1].endswith("x")
    assert "4-2 layers" not in out.stdout and "1-2 layers" in out.stdout  # overrides applied
