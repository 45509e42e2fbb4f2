"""The trainer end to end on 8 fake CPU devices: exact resume after SIGTERM, restore on another
mesh, export parity, the NaN guard, gradient accumulation, and loss falling on real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from pianist_jax import midi, tokenizer
from pianist_jax.artifacts.export import load_model
from pianist_jax.config import load_config
from pianist_jax.data import records
from pianist_jax.train import checkpoint, sharding
from pianist_jax.train import loop as train
from pianist_jax.train.step import StepFns, tree_equal

MESH = "mesh.shape=[2,4,1]"


def random_piece(rng, n):
    onset = np.cumsum(rng.integers(0, 300, n))
    pitch = 48 + (np.arange(n) * rng.integers(1, 5)) % 36  # patterned: learnable
    notes = midi.Notes(
        onset=onset,
        offset=onset + rng.integers(50, 800, n),
        pitch=pitch,
        velocity=rng.integers(40, 100, n),
        pedal_ms=np.zeros(0, np.int64),
        pedal_value=np.zeros(0, np.int64),
    )
    return tokenizer.encode_notes(notes)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_shards")
    rng = np.random.default_rng(0)
    for s in range(2):
        writer = ArrayRecordWriter(
            str(root / records.shard_filename(s, 2)), records.ARRAY_RECORD_OPTIONS
        )
        for i in range(12):
            ids = random_piece(rng, int(rng.integers(10, 60)))
            writer.write(
                records.encode_record(
                    ids,
                    source=f"{s}-{i}.mid",
                    corpus="syn",
                    kind="performance",
                    n_notes=len(ids) // 8,
                    content_hash=f"{s}{i:063x}",
                )
            )
        writer.close()
    return root


def make_cfg(shard_dir, out, *extra):
    return load_config(
        "configs/pretrain.yaml",
        [
            "model=tiny",
            MESH,
            f"train.output_dir={out}",
            f"data.sources=[{{name: syn, path: '{shard_dir}/shard-00000-of-00002.array_record'}}]",
            f"data.eval_sources=[{{name: held, path: '{shard_dir}/shard-00001-of-00002.array_record'}}]",  # noqa: E501
            "data.block_size=64",
            "train.batch_size=8",
            "train.steps=10",
            "train.warmup_steps=2",
            "train.lr=3e-3",
            "train.log_every=1",
            "train.checkpoint_every=4",
            "train.eval_every=5",
            "train.eval_steps=1",
            *extra,
        ],
    )


def losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["split"], m["loss"]) for m in lines]


@pytest.fixture(scope="module")
def uninterrupted(shard_dir, tmp_path_factory, repo_root):
    os.chdir(repo_root)
    out = tmp_path_factory.mktemp("run_a")
    cfg = make_cfg(shard_dir, out)
    return cfg, out, train.run(cfg, progress=False)


@pytest.mark.slow  # three training runs
def test_resume_after_sigterm_is_bit_identical(uninterrupted, shard_dir, tmp_path):
    cfg_a, out_a, result_a = uninterrupted
    assert result_a.end_step == 10 and not result_a.preempted
    out_b = tmp_path / "run_b"
    cfg_b = make_cfg(shard_dir, out_b)

    def sigterm_at_6(step, _metrics):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the guard

    first = train.run(cfg_b, hooks=(sigterm_at_6,), progress=False)
    assert first.preempted and first.end_step == 6
    assert checkpoint.committed_steps(out_b / "checkpoints") == [4, 6]
    second = train.run(cfg_b, progress=False)
    assert (second.start_step, second.end_step) == (6, 10)
    assert tree_equal(jax.device_get(result_a.state), jax.device_get(second.state))
    assert losses(out_a) == losses(out_b)  # train and eval curves, bit for bit
    assert [s for s, split, _ in losses(out_b) if split == "train"] == list(range(1, 11))
    assert first.history[0]["loss"] > result_a.history[-1]["loss"]


def test_restore_on_one_device_and_export(uninterrupted, tmp_path):
    cfg, out, result = uninterrupted
    one = jax.devices()[:1]
    cfg1 = load_config(None, ["model=tiny", "mesh.shape=[1,1,1]"])
    fns1 = StepFns(cfg1, sharding.make_mesh(cfg1.mesh, one), total_steps=10)
    ckpt = checkpoint.Checkpointer(out / "checkpoints")
    step, state = ckpt.restore(fns1.abstract_state())
    ckpt.close()
    assert step == 10
    assert all(leaf.sharding.device_set == set(one) for leaf in jax.tree.leaves(state))
    assert tree_equal(jax.device_get(state["params"]), jax.device_get(result.state["params"]))

    # the exported artifact gives the training model's logits
    assert (
        subprocess.run(
            [sys.executable, "-m", "pianist_jax.export", str(out), str(tmp_path / "export")],
            check=True,
        ).returncode
        == 0
    )
    model = load_model(tmp_path / "export")
    rng = np.random.default_rng(5)
    enc = random_piece(rng, 16)[None].astype(np.int32)
    dec = np.concatenate([[tokenizer.BOS], random_piece(rng, 16)[:-1]])[None].astype(np.int32)
    fns8 = StepFns(cfg, sharding.make_mesh(cfg.mesh), total_steps=10)
    trained = sharding.bind(fns8.graphdef, fns8.abstract, jax.device_get(result.state["params"]))
    np.testing.assert_allclose(
        np.asarray(model(enc, dec)), np.asarray(trained(enc, dec)), atol=1e-5, rtol=1e-5
    )


def test_init_from_loads_params_with_a_fresh_optimiser(uninterrupted, shard_dir, tmp_path):
    """Restore order step 2: a new run dir + train.init_from=<run> starts at step 0 from that
    run's params (a tiny lr keeps them), with a fresh optimiser state."""
    _, out_a, result_a = uninterrupted
    cfg = make_cfg(
        shard_dir,
        tmp_path / "init",
        f"train.init_from={out_a}",
        "train.steps=1",
        "train.warmup_steps=0",
        "train.lr=1e-12",
        "train.eval_every=1000",
    )
    result = train.run(cfg, progress=False)
    assert (result.start_step, result.end_step) == (0, 1)
    assert tree_equal(
        jax.device_get(result.state["params"]),
        jax.device_get(result_a.state["params"]),
        lambda a, b: np.allclose(a, b, atol=1e-8),
    )
    counts = [
        int(x)
        for x in jax.tree.leaves(jax.device_get(result.state["opt_state"]))
        if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)
    ]
    assert counts and set(counts) == {1}  # one update since a fresh optimiser


def test_nan_guard_stops_and_keeps_last_good_checkpoint(shard_dir, tmp_path, repo_root):
    out = tmp_path / "nan"
    code = train.main(
        [
            "--config",
            str(repo_root / "configs/pretrain.yaml"),
            "model=tiny",
            MESH,
            f"train.output_dir={out}",
            f"data.sources=[{{name: syn, path: '{shard_dir}'}}]",
            "data.eval_sources=[]",
            "data.block_size=64",
            "train.batch_size=8",
            "train.steps=6",
            "train.warmup_steps=0",
            "train.lr=1e30",
            "train.grad_clip=null",
            "train.checkpoint_every=1",
            "--no-progress",
        ]
    )
    assert code == train.EXIT_NONFINITE
    steps = checkpoint.committed_steps(out / "checkpoints")
    assert steps and max(steps) == 1  # step 2 went non-finite: nothing saved after step 1
    logged = [m for m in losses(out) if m[1] == "train"]
    assert np.isfinite(logged[0][2]) and not np.isfinite(logged[-1][2]) and logged[-1][0] == 2


def fixed_batch(seed=1):
    rng = np.random.default_rng(seed)
    ids = np.stack([random_piece(rng, 8) for _ in range(8)]).astype(np.int32)
    mask = rng.random(ids.shape) < 0.3
    return {
        "encoder_ids": np.where(mask, tokenizer.MASK, ids),
        "targets": ids,
        "decoder_input_ids": np.concatenate(
            [np.full((8, 1), tokenizer.BOS), ids[:, :-1]], axis=1
        ).astype(np.int32),
        "loss_mask": mask.astype(np.float32),
    }


def one_step(overrides, devices=None):
    cfg = load_config(
        None, ["model=tiny", "train.batch_size=8", "train.warmup_steps=0", *overrides]
    )
    fns = StepFns(cfg, sharding.make_mesh(cfg.mesh, devices), total_steps=10)
    state, metrics = fns.train_step(
        fns.init_state(seed=0), jax.device_put(fixed_batch(), fns.batch_sharding)
    )
    return jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.slow  # compiles the step for every mesh
def test_one_step_is_the_same_on_every_mesh(repo_root):
    """Data/FSDP (2, 4), FSDP/tensor (1, 2, 4) and a single device compute the same update."""
    os.chdir(repo_root)
    p_single, m_single = one_step(["mesh.shape=[1,1,1]"], jax.devices()[:1])
    for shape in ("[2,4,1]", "[1,2,4]"):
        params, metrics = one_step([f"mesh.shape={shape}"])
        np.testing.assert_allclose(metrics["loss"], m_single["loss"], rtol=1e-5)
        assert tree_equal(params, p_single, lambda a, b: np.allclose(a, b, atol=1e-5))


def test_gradient_accumulation_matches_one_big_batch(repo_root):
    os.chdir(repo_root)
    mask = fixed_batch()["loss_mask"]
    p1, m1 = one_step([MESH, "train.microbatches=1"])
    p4, m4 = one_step([MESH, "train.microbatches=4"])
    assert m1["loss_tokens"] == m4["loss_tokens"] == mask.sum()
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    assert tree_equal(p1, p4, lambda a, b: np.allclose(a, b, atol=1e-6))


@pytest.mark.slow
def test_pretraining_on_unlabeled_corpus_loss_falls(shared_data, tmp_path, repo_root):
    """Acceptance: tiny, mesh (data=2, fsdp=4), shards written by data_prep.tokenize."""
    os.chdir(repo_root)
    shards = tmp_path / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.tokenize",
            "--input",
            f"{shared_data}/unlabeled/pop909:pop909",
            "--output",
            str(shards),
            "--num-shards",
            "4",
            "--workers",
            "2",
            "--no-progress",
        ],
        check=True,
    )
    cfg = load_config(
        "configs/pretrain.yaml",
        [
            "model=tiny",
            MESH,
            f"train.output_dir={tmp_path / 'run'}",
            f"data.sources=[{{name: pop909, path: '{shards}/shard-0000[0-2]-of-00004.array_record'}}]",  # noqa: E501
            f"data.eval_sources=[{{name: held, path: '{shards}/shard-00003-of-00004.array_record'}}]",  # noqa: E501
            "data.block_size=256",
            "train.batch_size=8",
            "train.steps=150",
            "train.warmup_steps=15",
            "train.lr=3e-3",
            "train.log_every=50",
            "train.eval_every=150",
            "train.eval_steps=4",
            "train.checkpoint_every=150",
        ],
    )
    result = train.run(cfg, progress=False)
    curve = [m["loss"] for m in result.history]
    first, last = np.mean(curve[:10]), np.mean(curve[-10:])
    print(f"loss first 10 steps {first:.3f} -> last 10 steps {last:.3f}")
    evals = [m for m in losses(tmp_path / "run") if m[1] == "eval"]
    assert last < first - 3.0 and evals and evals[-1][2] < first - 3.0
