"""Checkpointing: sharded save -> restore on other meshes, keep-N, async, corrupt fallback, Grain
iterator position, config, restore order and the preemption guard."""

import json
import os
import signal
import socket
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pianist_jax.config import Config, TrainConfig
from pianist_jax.train import checkpoint as ckpt

AXES = ("data", "fsdp", "tensor")
SPECS = {  # leaf -> PartitionSpec on the saving mesh: sharded dims and None mixed
    "params": {"w": P("fsdp", None), "b": P(None), "emb": P(None, ("data", "fsdp"))},
    "opt_state": {"mu": {"w": P("fsdp", "data")}, "count": P()},
    "step": P(),
    "rng": P(),
}


def make_mesh(shape, devices=None):
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices).reshape(shape), AXES)


def make_state(mesh, scale=1.0):
    values = {
        "params": {
            "w": jnp.arange(64.0).reshape(8, 8) * scale,
            "b": jnp.arange(8.0) * scale,
            "emb": jnp.arange(128, dtype=jnp.bfloat16).reshape(2, 64) * scale,
        },
        "opt_state": {"mu": {"w": -jnp.arange(64.0).reshape(8, 8) * scale}, "count": jnp.int32(7)},
        "step": jnp.int32(3),
        "rng": jax.random.key_data(jax.random.key(42)),
    }
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), values, SPECS)


def abstract(state, mesh, specs=None):
    """What the trainer builds from its current mesh: shapes + the shardings it wants."""
    specs = jax.tree.map(lambda _: P(), state) if specs is None else specs
    return jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        state,
        specs,
    )


def assert_same(restored, expected):
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, expected
    )


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh((2, 4, 1))


def test_sharded_save_restores_on_one_device_and_other_layout(tmp_path, mesh8):
    state = make_state(mesh8)
    with ckpt.Checkpointer(tmp_path, async_save=False) as saver:
        assert saver.save(3, state)
        assert not saver.save(3, state)  # same step again: a no-op, not an error

    one = make_mesh((1, 1, 1), jax.devices()[:1])
    with ckpt.Checkpointer(tmp_path) as loader:
        step, restored = loader.restore(abstract(state, one))
    assert step == 3
    assert_same(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == NamedSharding(one, P())

    other = make_mesh((1, 8, 1), jax.devices()[::-1])
    specs = jax.tree.map(lambda _: P(), state)
    specs["params"]["w"] = P(None, "fsdp")
    with ckpt.Checkpointer(tmp_path) as loader:
        _, restored = loader.restore(abstract(state, other, specs))
    assert_same(restored, state)
    assert restored["params"]["w"].sharding == NamedSharding(other, P(None, "fsdp"))


def test_keep_n_and_async_save_then_wait(tmp_path, mesh8):
    saver = ckpt.Checkpointer(tmp_path, keep=2, async_save=True)
    for step in (1, 2, 3, 4):
        assert saver.save(step, make_state(mesh8, scale=step))
    saver.wait()
    assert saver.all_steps() == [3, 4] == ckpt.committed_steps(tmp_path)
    step, restored = saver.restore(abstract(make_state(mesh8), mesh8, SPECS))
    saver.close()
    assert step == 4
    assert_same(restored, make_state(mesh8, scale=4))
    assert restored["params"]["w"].sharding == NamedSharding(mesh8, SPECS["params"]["w"])


# tensorstore callbacks of the failed read land after Orbax closed its event loop: stderr noise
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete_array_files", "truncate_array_files", "no_marker"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, mesh8, damage):
    with ckpt.Checkpointer(tmp_path, keep=3, async_save=False) as saver:
        saver.save(1, make_state(mesh8, scale=1))
        saver.save(2, make_state(mesh8, scale=2))
    latest = tmp_path / "2"
    if damage == "no_marker":
        (latest / ckpt.COMMIT_MARKER).unlink()
    else:
        files = [p for p in (latest / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files
        for path in files:
            path.unlink() if damage == "delete_array_files" else path.write_bytes(b"\0" * 7)

    with ckpt.Checkpointer(tmp_path, keep=3) as loader:
        with pytest.warns(ckpt.CheckpointWarning, match=str(latest)):
            step, restored = loader.restore(abstract(make_state(mesh8), mesh8))
        assert step == 1
        assert_same(restored, make_state(mesh8, scale=1))
        # the bad step is set aside (kept for inspection) so step 2 can be saved again
        assert loader.all_steps() == [1]
        assert [p.name.split(".")[0] for p in tmp_path.glob("2.corrupt-*")] == ["2"]
        assert loader.save(2, make_state(mesh8, scale=5))


def test_nothing_restorable_lists_what_was_tried(tmp_path, mesh8):
    with ckpt.Checkpointer(tmp_path, async_save=False) as saver:
        saver.save(1, make_state(mesh8))
    (tmp_path / "1" / ckpt.COMMIT_MARKER).unlink()
    target = abstract(make_state(mesh8), mesh8)
    with ckpt.Checkpointer(tmp_path) as loader:
        with (
            pytest.warns(ckpt.CheckpointWarning),
            pytest.raises(ckpt.CheckpointError, match=r"tried:\n.*1: FileNotFoundError"),
        ):
            loader.restore(target)
        with pytest.raises(ValueError, match="sharding"):
            loader.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with (
        ckpt.Checkpointer(tmp_path / "empty") as empty,
        pytest.raises(ckpt.CheckpointError, match="no checkpoint steps"),
    ):
        empty.restore(target)


def test_typed_prng_keys_are_refused(tmp_path):
    with ckpt.Checkpointer(tmp_path) as saver, pytest.raises(TypeError, match="key_data"):
        saver.save(1, {"rng": jax.random.key(0)})


def make_iter():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).map(lambda x: x * 3).to_iter_dataset())


def test_grain_iterator_resumes_after_the_save_point(tmp_path, mesh8):
    state, it = make_state(mesh8), make_iter()
    seen = [next(it) for _ in range(11)]
    with ckpt.Checkpointer(tmp_path, async_save=True) as saver:
        saver.save(11, state, data_iter=it, config=Config())
        expected = [next(it) for _ in range(6)]  # iterating on while the save runs is fine
    assert len(set(seen + expected)) == 17  # distinct elements: matching them below means something

    fresh = make_iter()
    with ckpt.Checkpointer(tmp_path) as loader:
        step, _ = loader.restore(abstract(state, mesh8), data_iter=fresh, config=Config())
        assert loader.read_meta()["process_count"] == 1
    assert step == 11
    assert [next(fresh) for _ in range(6)] == expected
    assert list((tmp_path / "11" / "data_iter").glob("process_0-of-1.json"))

    # a resume whose batch size changed is refused unless remapping is asked for
    bigger = Config(train=TrainConfig(batch_size=128))
    with ckpt.Checkpointer(tmp_path) as loader:
        with pytest.raises(ckpt.CheckpointError, match="batch_size 64 -> 128"):
            loader.restore(abstract(state, mesh8), data_iter=make_iter(), config=bigger)
        untouched = make_iter()
        with pytest.warns(ckpt.CheckpointWarning, match="allow_remap"):
            loader.restore(
                abstract(state, mesh8), data_iter=untouched, config=bigger, allow_remap=True
            )
    assert next(untouched) == next(make_iter())


class CountingIter:
    """A non-Grain iterator with a JSON-able state (e.g. a wrapper the trainer writes)."""

    def __init__(self):
        self.i = 0

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_plain_iterator_with_json_state(tmp_path):
    it = CountingIter()
    it.i = 5
    with ckpt.Checkpointer(tmp_path, async_save=False) as saver:
        saver.save(1, {"x": jnp.zeros(2)}, data_iter=it)
    fresh = CountingIter()
    one = make_mesh((1, 1, 1), jax.devices()[:1])
    with ckpt.Checkpointer(tmp_path) as loader:
        loader.restore(abstract({"x": jnp.zeros(2)}, one), data_iter=fresh)
    assert fresh.i == 5


def test_config_round_trip_and_params_only(tmp_path, mesh8):
    cfg = Config()
    state = make_state(mesh8)
    with ckpt.Checkpointer(tmp_path, async_save=False) as saver:
        saver.save(5, state, config=cfg, metadata={"tokens_seen": 1234})
        saver.save(6, make_state(mesh8, scale=2), config=cfg)
    assert ckpt.load_config_from_checkpoint(tmp_path) == cfg
    assert ckpt.load_config_from_checkpoint(tmp_path / "5") == cfg
    assert ckpt.Checkpointer(tmp_path).read_meta(5)["tokens_seen"] == 1234

    one = make_mesh((1, 1, 1), jax.devices()[:1])
    target = abstract(state["params"], one)
    assert_same(ckpt.restore_params_only(tmp_path, target), make_state(mesh8, 2)["params"])
    params = ckpt.restore_params_only(tmp_path / "5", target)
    assert_same(params, state["params"])
    assert params["w"].sharding == NamedSharding(one, P())


def test_resolve_start_order(tmp_path, mesh8):
    run, pretrain = tmp_path / "run", tmp_path / "pretrain"
    assert ckpt.resolve_start(run, None).kind == "fresh"
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_start(run, pretrain)

    with ckpt.Checkpointer(pretrain, async_save=False) as saver:
        saver.save(40, make_state(mesh8))
    plan = ckpt.resolve_start(run, pretrain)
    assert (plan.kind, plan.step) == ("init", 40)
    assert ckpt.resolve_start(run, pretrain / "40").kind == "init"

    with ckpt.Checkpointer(run, async_save=False) as saver:
        saver.save(7, make_state(mesh8))
    plan = ckpt.resolve_start(run, pretrain)
    assert (plan.kind, plan.step, plan.path) == ("resume", 7, str(run))


def test_preemption_guard_sets_flag_and_restores_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with ckpt.PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the test process without the guard
        assert guard.should_stop(1) and guard.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts for real
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


WORKER = r"""
import json, os, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import grain, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pianist_jax.train import checkpoint as ckpt

mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 1), ("data", "fsdp", "tensor"))
full = np.arange(12.0).reshape(4, 3)
w = jax.make_array_from_callback((4, 3), NamedSharding(mesh, P("fsdp")), lambda i: full[i])
state = {"w": w}
make_iter = lambda: iter(grain.MapDataset.range(50).shuffle(seed=pid).to_iter_dataset())
it = make_iter()
[next(it) for _ in range(3 + pid)]  # each process has its own position
saver = ckpt.Checkpointer(directory)
saver.save(1, state, data_iter=it)
saver.wait()
expected = next(it)
saver.save(2, state, data_iter=it)
saver.wait()
if pid == 0:  # damage the newest step on the shared disk: both processes must fall back
    os.remove(os.path.join(directory, "2", ckpt.COMMIT_MARKER))
multihost_utils.sync_global_devices("damaged")
abstract = {"w": jax.ShapeDtypeStruct((4, 3), w.dtype, sharding=NamedSharding(mesh, P()))}
fresh = make_iter()
step, restored = saver.restore(abstract, data_iter=fresh)
with ckpt.PreemptionGuard(sync_every=4) as guard:  # only process 0 is signalled, at step 5
    for s in range(1, 50):
        if pid == 0 and s == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        if guard.should_stop(s):
            break
saver.save(s, state, data_iter=fresh, force=True)
saver.close()
print("RESULT", json.dumps({"step": step, "iter_ok": next(fresh) == expected,
      "values_ok": bool((np.asarray(restored["w"]) == full).all()), "stopped_at": s}))
"""


def test_two_processes_share_one_checkpoint(tmp_path):
    """2 processes x 1 CPU device (gloo): per-process iterator files, lockstep fallback + stop."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), port, str(tmp_path / "run")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]
    assert (
        results[0] == results[1] == {"step": 1, "iter_ok": True, "values_ok": True, "stopped_at": 8}
    )
    files = sorted(p.name for p in (tmp_path / "run" / "8" / "data_iter").glob("*.json"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
