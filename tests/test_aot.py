"""Ahead-of-time compilation of the real sharded train step for a described TPU slice.

Runs `python -m pianist_jax.aot` in a subprocess with libtpu visible only there: either the
current interpreter has it, or `.ci/run` put it in `<repo>/.libtpu` (pip --target), which keeps
it away from every other test's JAX. Skips with the reason when libtpu is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pianist_jax.config import load_config
from pianist_jax.train import aot

REPO = Path(__file__).resolve().parents[1]
LIBTPU_TARGET = REPO / ".libtpu"


def _aot_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake CPU devices
    env["JAX_PLATFORMS"] = "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return env
    if (LIBTPU_TARGET / "libtpu").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(LIBTPU_TARGET), env.get("PYTHONPATH")])
        )
        return env
    pytest.skip(
        "libtpu is not installed (pip install -r requirements-tpu.txt, or "
        "pip install --target .libtpu -r requirements-tpu.txt as .ci/run does)"
    )


def _run(args: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pianist_jax.aot", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # compiles the step for a TPU topology
def test_tiny_compiles_for_v5e_2x2(tmp_path):
    env = _aot_env()
    out = tmp_path / "report.json"
    proc = _run(
        [
            "--config",
            "configs/pretrain.yaml",
            "model=tiny",
            "train.batch_size=8",
            "data.block_size=256",
            "mesh.shape=[2,2,1]",
            "--topology",
            "v5e:2x2",
            "--json",
            str(out),
        ],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "per-chip memory" in proc.stdout and "fits" in proc.stdout
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["fits"] and 0 < report["peak_bytes"] < report["hbm_bytes"]
    assert report["argument_bytes"] > 0 and report["temp_bytes"] > 0
    # the step's FLOPs split over 4 chips: XLA's count is near the analytic model FLOPs / 4
    assert report["flops_per_chip"] == pytest.approx(report["model_flops_per_step"] / 4, rel=0.5)
    # parameters really are sharded over fsdp
    embed = next(r for r in report["largest"] if r["name"] == "decoder.embed_tokens")
    assert "fsdp" in embed["spec"] and embed["per_chip"][1] == embed["shape"][1] // 2

    # a chip with too little HBM: exit 3 and say so
    proc = _run(
        [
            "--config",
            "configs/pretrain.yaml",
            "model=tiny",
            "train.batch_size=8",
            "data.block_size=256",
            "mesh.shape=[2,2,1]",
            "--topology",
            "v5e:2x2",
            "--hbm-gib",
            "0.001",
        ],
        tmp_path,
        env,
    )
    assert proc.returncode == aot.EXIT_DOES_NOT_FIT, proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stdout


def test_bad_topology_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pianist_jax.aot",
            "--config",
            "configs/pretrain.yaml",
            "--topology",
            "v5e-256",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == aot.EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --topology 'v5e-256'")


def test_batch_that_cannot_split_is_rejected_before_compiling():
    """64 sequences over 256 batch shards cannot work: say so instead of replicating."""
    cfg = load_config("configs/pretrain.yaml", ["model=tiny", "mesh.shape=[4,-1,1]"])
    assert cfg.train.batch_size == 64
    with pytest.raises(aot.AotError, match="does not split"):
        aot.check_batch_split(cfg, {"data": 4, "fsdp": 64, "tensor": 1})


def test_pod_config_shards_sequences_over_data():
    cfg = load_config("configs/pretrain_pod.yaml")
    rules = dict(cfg.mesh.rules)
    assert rules["batch"] == "fsdp" and rules["length"] == "data" and rules["notes"] == "data"
    aot.check_batch_split(cfg, {"data": 4, "fsdp": 64, "tensor": 1})  # 64 / 64: fine
