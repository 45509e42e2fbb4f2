"""Multi-process training on CPU: 2 processes (jax.distributed on localhost, gloo collectives),
one CPU device each, train 6 steps checkpointing every 2; then a fresh pair of processes resumes
a copy of that run directory cut back to its step-4 checkpoint and trains to step 6 again.

The resumed run must be exactly the uninterrupted one: the same per-step metrics (bit for bit)
and the same final parameters, which checks that the global batch (each host reading its own
records) and each host's Grain iterator position survive a checkpoint/restore across processes.
(Both runs have train.steps=6: the lr schedule depends on it, so a run *to* step 4 would differ.)
Workers are `tests/multihost_worker.py` subprocesses; the test skips only when a 2-process
`jax.distributed` + gloo all-gather probe fails (a JAX build without CPU multi-process support).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from pianist_jax import tokenizer as tok
from pianist_jax.artifacts import checkpoint_export, export
from pianist_jax.data import records
from pianist_jax.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
NUM_PROCESSES = 2
TOTAL, EVERY, RESUME = 6, 2, 4  # train 6 steps, checkpoint every 2; resume from step 4
TIMEOUT_S = 240  # per launch of 2 processes (~25-45 s each on 2 cores, mostly compiling)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- data


def piece_ids(record: int, n_notes: int) -> np.ndarray:
    """A valid piece: record number in the IOI slot, so each record's tokens differ."""
    notes = np.empty((n_notes, tok.TOKENS_PER_NOTE), np.int64)
    notes[:, tok.PITCH] = tok.PITCH_START + 60 + np.arange(n_notes) % 12
    notes[:, tok.IOI] = tok.TIME_START + record
    notes[:, tok.VELOCITY] = tok.VELOCITY_START + 40 + record % 40
    notes[:, tok.DURATION] = tok.TIME_START + 100 + 10 * (np.arange(n_notes) % 7)
    notes[:, 4:] = tok.PEDAL_START
    return notes.reshape(-1)


def write_shards(directory: Path, n_records: int = 24, num_shards: int = 2) -> None:
    directory.mkdir(parents=True)
    pieces = [piece_ids(r, 3 + (r * 7) % 20) for r in range(n_records)]
    for s in range(num_shards):
        writer = ArrayRecordWriter(
            str(directory / records.shard_filename(s, num_shards)), records.ARRAY_RECORD_OPTIONS
        )
        for i in range(s, n_records, num_shards):
            writer.write(
                records.encode_record(
                    pieces[i],
                    source=f"piece{i}.mid",
                    corpus="synthetic",
                    kind="performance",
                    n_notes=len(pieces[i]) // tok.TOKENS_PER_NOTE,
                    content_hash=f"{i:064x}",
                )
            )
        writer.close()


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(cache_dir: Path) -> dict[str, str]:
    """The test's environment minus conftest's 8 fake devices: one CPU device per process.

    Compile time dominates these runs (2 processes on 2 cores), so: XLA's CPU backend at -O0
    (3-4x faster compiles of the tiny model) and a persistent compilation cache shared by the
    launches (both run the same programs). All runs of the test use the same flags, so the
    bit-exact comparisons are unaffected.
    """
    env = dict(os.environ)
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S*|--xla_backend_optimization_level"
        r"=\S*",
        "",
        env.get("XLA_FLAGS", ""),
    ).split()
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_backend_optimization_level=0"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def launch(
    jobs: dict[str, list[list[str]]], logs: Path, timeout: float = TIMEOUT_S
) -> dict[str, list[str]]:
    """Start every worker of every job (job name -> one argument list per process) at once,
    wait for all; returns each job's per-process output.

    A timeout or any non-zero exit kills every worker still alive (a failed worker leaves its
    peers blocked in a collective) and fails the test with the output tails; no process
    outlives this call.
    """
    logs.mkdir(parents=True, exist_ok=True)
    env = worker_env(logs.parent / "jax_cache")
    procs: list[tuple[str, Path, subprocess.Popen]] = []
    try:
        for name, args_of in jobs.items():
            for i, args in enumerate(args_of):
                out = logs / f"{name}.{i}.log"
                with out.open("wb") as f:
                    procs.append(
                        (
                            f"{name} process {i}",
                            out,
                            subprocess.Popen(
                                [sys.executable, str(WORKER), *args],
                                cwd=REPO,
                                env=env,
                                stdout=f,
                                stderr=subprocess.STDOUT,
                            ),
                        )
                    )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for _, _, p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for _, _, p in procs):
                break
            time.sleep(0.1)
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
        for _, _, p in procs:
            p.wait()
    codes = [p.returncode for _, _, p in procs]
    if any(codes):
        report = "\n".join(
            f"--- {what} (exit {p.returncode}):\n{tail(out)}" for what, out, p in procs
        )
        pytest.fail(
            f"worker exit codes {codes} (timeout {timeout:.0f} s; negative: killed)\n{report}"
        )
    return {
        name: [
            out.read_text(errors="replace") for what, out, _ in procs if what.startswith(f"{name} ")
        ]
        for name in jobs
    }


def train_args(run_dir: Path, steps: int, overrides: list[str]) -> list[list[str]]:
    coordinator = f"127.0.0.1:{free_port()}"
    args = [
        "train",
        "--config",
        str(REPO / "configs/pretrain.yaml"),
        *overrides,
        f"train.steps={steps}",
        f"train.output_dir={run_dir}",
        "--no-progress",
        "--coordinator",
        coordinator,
        "--num-processes",
        str(NUM_PROCESSES),
        "--cpu-collectives",
        "gloo",
    ]
    return [[*args, "--process-id", str(i)] for i in range(NUM_PROCESSES)]


@pytest.fixture(scope="module")
def gloo(tmp_path_factory) -> None:
    """Skip the module when this JAX cannot run 2 CPU processes with gloo collectives."""
    logs = tmp_path_factory.mktemp("probe") / "logs"
    coordinator = f"127.0.0.1:{free_port()}"
    try:
        launch(
            {
                "probe": [
                    ["probe", coordinator, str(NUM_PROCESSES), str(i)] for i in range(NUM_PROCESSES)
                ]
            },
            logs,
            timeout=90,
        )
    except pytest.fail.Exception as err:
        pytest.skip(
            f"installed jax cannot do CPU multi-process (jax.distributed on localhost "
            f"+ gloo process_allgather failed):\n{str(err)[-1500:]}"
        )


def metrics(run_dir: Path) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]


def iterator_states(run_dir: Path, step: int) -> dict[str, dict]:
    item = run_dir / "checkpoints" / str(step) / "data_iter"
    return {p.name: json.loads(p.read_text()) for p in sorted(item.glob("process_*.json"))}


# --------------------------------------------------------------------------- test


def test_two_process_train_checkpoint_resume(gloo, tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards)
    overrides = [
        "model=tiny",
        "data.block_size=64",
        "train.batch_size=4",
        "train.microbatches=1",
        "train.warmup_steps=1",
        f"train.checkpoint_every={EVERY}",
        "train.keep_checkpoints=5",
        "train.log_every=1",
        "train.eval_every=1000",
        "data.worker_count=0",
        "mesh.shape=[1,-1,1]",
        f"data.sources=[{{name: syn, path: {shards}}}]",
        "data.eval_sources=[]",
    ]
    straight, resumed, logs = tmp_path / "straight", tmp_path / "resumed", tmp_path / "logs"
    steps = [*range(EVERY, TOTAL + 1, EVERY)]

    # 1) two processes train 0 -> 6 uninterrupted, checkpointing every 2 steps
    for text in launch({"straight": train_args(straight, TOTAL, overrides)}, logs)["straight"]:
        assert "fresh start" in text and f"done: steps 0 -> {TOTAL}," in text, text[-3000:]
    assert checkpoint.committed_steps(straight / "checkpoints") == steps
    want = metrics(straight)
    assert [m["step"] for m in want] == list(range(1, TOTAL + 1))
    assert all(np.isfinite(m["loss"]) and m["loss_tokens"] > 0 for m in want)
    meta = checkpoint.Checkpointer(straight / "checkpoints").read_meta(TOTAL)
    assert (meta["process_count"], meta["device_count"]) == (NUM_PROCESSES, NUM_PROCESSES)

    # 2) the same run stopped after its step-4 checkpoint (a copy without the later steps;
    #    its metrics.jsonl still lists steps 5-6) is resumed by a fresh pair of processes
    shutil.copytree(straight, resumed)
    for step in steps:
        if step > RESUME:
            shutil.rmtree(resumed / "checkpoints" / str(step))
    for text in launch({"resumed": train_args(resumed, TOTAL, overrides)}, logs)["resumed"]:
        assert re.search(rf"resumed \S+ at step {RESUME}\n", text), text[-3000:]
        assert f"done: steps {RESUME} -> {TOTAL}," in text, text[-3000:]
    assert checkpoint.committed_steps(resumed / "checkpoints") == steps

    # metrics: steps 1..6 once each, equal bit for bit to the uninterrupted run's
    got = metrics(resumed)
    assert [m["step"] for m in got] == list(range(1, TOTAL + 1))
    assert got == want

    # each process saved its own Grain iterator position, the same as in the uninterrupted run
    states = iterator_states(straight, TOTAL)
    assert sorted(states) == [
        f"process_{i}-of-{NUM_PROCESSES}.json" for i in range(NUM_PROCESSES)
    ], states
    assert iterator_states(resumed, TOTAL) == states

    # and the final parameters (read back from the 2-process checkpoints) are identical
    a = export.read_export(
        checkpoint_export.export_checkpoint(straight, tmp_path / "export_straight")
    )[1]
    b = export.read_export(
        checkpoint_export.export_checkpoint(resumed, tmp_path / "export_resumed")
    )[1]
    fa, fb = export.flatten(a), export.flatten(b)
    assert fa and fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
