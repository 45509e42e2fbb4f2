"""Orbax checkpoints: model state, data-iterator position, config and meta saved as one step.

Why: a resumed run must continue exactly where it stopped, so the iterator position is saved in
the same Orbax step as the weights, and every step carries the config that produced it.

Restore order (`resolve_start`), first match wins:
  1. resume - `output_dir` already holds a committed checkpoint: restore the full state and the
     iterator from its newest restorable step (`init_from` is ignored: a preempted fine-tune
     must not restart from the pretrain weights).
  2. init   - else `init_from` names a run directory (its newest step) or one step directory:
     restore params only (`restore_params_only`); optimizer, step and iterator start fresh.
  3. fresh  - else initialise from scratch.

Layout: `<dir>/<step>/{state,data_iter,config,meta}/` + Orbax's `commit_success.txt`. A step
without that marker, or whose arrays fail to read, is skipped with a warning for the next older
one; newer unrestorable steps are renamed `<step>.corrupt-<time>` so they can be saved again.

Trainer use (state: a nested dict of jax.Arrays; PRNG keys stored as `jax.random.key_data`):
    plan = resolve_start(cfg.train.output_dir, cfg.train.init_from)
    ckpt = Checkpointer(cfg.train.output_dir, keep=cfg.train.keep_checkpoints)
    if plan.kind == "resume": step, state = ckpt.restore(abstract_state, it, config=cfg)
    with PreemptionGuard() as guard:  # per step: stop = guard.should_stop(step)
        if step % cfg.train.checkpoint_every == 0 or stop: ckpt.save(step, state, it, cfg)
    ckpt.close()  # waits for the last async save; exit only after this
Multi-host: every process makes the same calls on a shared directory; Orbax coordinates the
array writes and Grain's handler writes one iterator file per process.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

import grain.checkpoint  # also binds `grain`
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from pianist_jax import config as config_lib
from pianist_jax.tokenizer import TOKENIZER_VERSION

log = logging.getLogger(__name__)

STATE, DATA_ITER, CONFIG, META = "state", "data_iter", "config", "meta"
RUN_SUBDIR = "checkpoints"  # where a training run keeps its checkpoints, under train.output_dir
COMMIT_MARKER = "commit_success.txt"  # written by Orbax 0.12 last, on local disks and GCS alike
_VERSIONS = {p: importlib.metadata.version(p) for p in ("jax", "flax", "orbax-checkpoint", "grain")}


class CheckpointError(RuntimeError):
    """No restorable checkpoint, or a checkpoint that does not fit this run."""


class CheckpointWarning(UserWarning):
    """A checkpoint step was skipped (corrupt or uncommitted); an older one is used."""


class Checkpointer:
    """One run directory of checkpoints; a thin wrapper over `ocp.CheckpointManager`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = _path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, DATA_ITER, CONFIG, META)
        )

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any = None,
        config: config_lib.Config | None = None,
        *,
        force: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Save `state` (+ iterator, config, meta) as `step`; False if that step already exists.

        Async: device arrays are copied before this returns and written in the background; the
        iterator state is captured synchronously, so keep iterating right away. `metadata` is
        extra JSON merged into `meta` (e.g. tokens seen).
        """
        step = int(step)
        if step in self._manager.all_steps():  # e.g. the final save lands on a periodic one
            return False
        _reject_typed_keys(state)
        meta = {
            "step": step,
            "saved_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_time": time.time(),
            "tokenizer_version": TOKENIZER_VERSION,
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "has_data_iter": data_iter is not None,
            "versions": _VERSIONS,
            **(metadata or {}),
        }
        items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(_as_grain(data_iter))
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config_lib.to_dict(config))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    def restore(
        self,
        abstract_state: Any,
        data_iter: Any = None,
        step: int | None = None,
        *,
        config: config_lib.Config | None = None,
        allow_remap: bool = False,
    ) -> tuple:
        """Restore into the shardings of `abstract_state`; returns `(step, state)`.

        `abstract_state`: the saved structure with `jax.ShapeDtypeStruct(shape, dtype, sharding=)`
        leaves from the *current* mesh (any device count). `step=None`: newest restorable step.
        `data_iter` is restored too unless the process count (or `config`'s batch size) changed:
        then `CheckpointError`, or with `allow_remap=True` a warning and a fresh iterator.
        """
        _require_shardings(abstract_state)
        steps = [int(step)] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        tried: list[str] = []
        for candidate in steps:
            state, error = None, _commit_error(self.step_dir(candidate))
            if _everyone(error is None):  # agree first: Orbax's restore has barriers inside
                try:
                    items = {STATE: ocp.args.StandardRestore(abstract_state)}
                    if data_iter is not None and self._iter_ok(candidate, config, allow_remap):
                        items[DATA_ITER] = grain.checkpoint.CheckpointRestore(_as_grain(data_iter))
                    state = self._manager.restore(candidate, args=ocp.args.Composite(**items))
                except CheckpointError:
                    raise
                except Exception as err:  # noqa: BLE001 - any read failure: try an older step
                    error = err
            if _everyone(error is None):
                self._set_aside([s for s in steps if s > candidate])
                return candidate, state[STATE]
            tried.append(
                _skip(
                    str(self.step_dir(candidate)),
                    error or RuntimeError("failed on another process"),
                )
            )
        raise CheckpointError(
            f"no restorable checkpoint in {self.directory}; tried:\n  "
            + "\n  ".join(tried or ["(no checkpoint steps)"])
        )

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The `meta` JSON of `step` (default: newest); {} where a step has none."""
        item = self.directory / str(self.latest_step() if step is None else step) / META
        return _read_json(item) if item.exists() else {}

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until background (async) saves are written and committed; call before exit."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _iter_ok(self, step: int, config: config_lib.Config | None, allow_remap: bool) -> bool:
        """Whether the saved iterator position means the same thing in this run."""
        if not (self.step_dir(step) / DATA_ITER).exists():
            warnings.warn(
                f"step {step} has no data iterator state: it starts afresh", CheckpointWarning
            )
            return False
        meta, problems = self.read_meta(step), []
        if meta.get("process_count", jax.process_count()) != jax.process_count():
            problems.append(f"process count {meta['process_count']} -> {jax.process_count()}")
        if config is not None and (self.step_dir(step) / CONFIG).exists():
            saved = _read_json(self.step_dir(step) / CONFIG).get("train", {}).get("batch_size")
            if saved is not None and saved != config.train.batch_size:
                problems.append(f"train.batch_size {saved} -> {config.train.batch_size}")
        if not problems:
            return True
        message = f"checkpoint step {step} was saved with a different layout: {', '.join(problems)}"
        if not allow_remap:
            raise CheckpointError(
                f"{message}; pass allow_remap=True to restore the model and "
                "restart the data iterator"
            )
        warnings.warn(f"{message}; restoring the model only (allow_remap)", CheckpointWarning)
        return False

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unrestorable newer steps so this run can save those step numbers again."""
        if jax.process_index() == 0:
            for step in steps:
                if self.step_dir(step).exists():
                    target = self.directory / f"{step}.corrupt-{int(time.time())}"
                    self.step_dir(step).rename(target)
                    log.warning("set aside unrestorable %s as %s", self.step_dir(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("pianist_checkpoint_set_aside")
        self._manager.reload()


# --------------------------------------------------------------------------- restore order


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """How a run begins: resume its own checkpoint, init params from another, or fresh."""

    kind: Literal["resume", "init", "fresh"]
    path: str | None = None  # resume: the run dir; init: the init_from path
    step: int | None = None  # newest committed step found there


def run_checkpoints(path: str | Path) -> Path:
    """The checkpoint directory of a run: ``PATH/checkpoints`` where a training run wrote one
    (`pianist_jax.train`), else ``PATH`` itself (already a checkpoint or step directory)."""
    path = Path(path)
    return path / RUN_SUBDIR if (path / RUN_SUBDIR).is_dir() else path


def resolve_start(output_dir: str | Path, init_from: str | Path | None) -> StartPlan:
    """Apply the restore order of the module docstring (resume > init_from > fresh)."""
    steps = committed_steps(output_dir)
    if steps:
        return StartPlan("resume", str(_path(output_dir)), steps[-1])
    if init_from:
        newest = _candidates(init_from)[0].name  # raises if there is nothing to start from
        return StartPlan("init", str(_path(init_from)), int(newest) if newest.isdigit() else None)
    return StartPlan("fresh")


def committed_steps(directory: str | Path) -> list[int]:
    """Step numbers under `directory` whose commit marker exists, ascending."""
    directory = _path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and (p / COMMIT_MARKER).exists()
    )


def restore_params_only(path: str | Path, abstract_params: Any, step: int | None = None) -> Any:
    """`state["params"]` of a run directory (newest restorable step) or of one step directory.

    For `init_from`: the optimizer state in the checkpoint is not read at all.
    """
    _require_shardings(abstract_params)
    target = {"params": abstract_params}

    def load(step_dir: epath.Path) -> Any:
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            return ckptr.restore(step_dir / STATE, args=args)["params"]

    return _first_restorable(_candidates(path, step), load)


def load_config_from_checkpoint(
    directory: str | Path, step: int | None = None
) -> config_lib.Config:
    """The Config saved with a checkpoint (run directory: newest step; or a step directory)."""
    return config_lib.from_dict(
        _first_restorable(_candidates(directory, step), lambda d: _read_json(d / CONFIG))
    )


# --------------------------------------------------------------------------- preemption


class PreemptionGuard:
    """SIGTERM/SIGINT only set a flag; the loop polls `should_stop(step)`, saves and exits.

    Nothing is saved in the handler (Orbax is not async-signal-safe). A second SIGINT while a
    stop is pending raises KeyboardInterrupt. Multi-process: all processes call
    `should_stop(step)` with the same steps; the flag is OR-ed across them (an all-gather)
    every `sync_every` steps, and JAX's own preemption notice (`reached_preemption_sync_point`)
    is honoured every step, so all stop at the same step. One process: no collective.
    """

    def __init__(
        self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), sync_every: int = 10
    ):
        self.signals, self.sync_every = signals, max(1, int(sync_every))
        self.requested, self.signum = False, None  # set by the handler: this process got a signal
        self._previous: dict[int, Any] = {}

    def install(self) -> Self:
        """Replace the handlers (main thread only: Python delivers signals there)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def should_stop(self, step: int) -> bool:
        """True when this run should save (force=True), `wait()` and exit at `step`."""
        if jax.process_count() == 1:
            return self.requested
        try:
            stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        except RuntimeError:  # JAX's preemption service disabled: rely on our own flag
            stop = False
        if int(step) % self.sync_every == 0:  # the same steps on every process: lockstep
            stop = not _everyone(not self.requested) or stop  # any process signalled
        return stop


# --------------------------------------------------------------------------- helpers


class _JsonState:
    """Grain's handler wants bytes from a non-Grain iterator: wrap a JSON-able get_state()."""

    def __init__(self, inner: Any):
        self.get_state = lambda: json.dumps(inner.get_state()).encode()
        self.set_state = lambda state: inner.set_state(json.loads(state))
        self.start_prefetch = getattr(inner, "start_prefetch", lambda: None)  # called on restore


def _as_grain(data_iter: Any) -> Any:
    if isinstance(data_iter, (grain.DatasetIterator, grain.DataLoaderIterator)):
        return data_iter
    return _JsonState(data_iter)


def _path(directory: str | Path) -> epath.Path:
    """Absolute for local paths (Orbax needs them); URLs such as gs:// stay as they are."""
    text = str(directory)
    return epath.Path(text if "://" in text else Path(text).absolute())


def _candidates(path: str | Path, step: int | None = None) -> list[epath.Path]:
    """Step directories to try, newest first: `path` itself if it is one, else its steps."""
    path = _path(path)
    if (path / STATE).is_dir() or (path / CONFIG).is_dir():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    steps = sorted(
        (int(p.name) for p in path.iterdir() if p.name.isdigit() and step in (None, int(p.name))),
        reverse=True,
    )
    if not steps:
        raise CheckpointError(
            f"{path} holds no checkpoint step directories"
            + (f" for step {step}" if step is not None else "")
        )
    return [path / str(s) for s in steps]


def _first_restorable(step_dirs: list[epath.Path], load: Callable[[epath.Path], Any]) -> Any:
    tried = []
    for step_dir in step_dirs:
        try:
            if (error := _commit_error(step_dir)) is not None:
                raise error
            result = load(step_dir)
        except Exception as err:  # noqa: BLE001 - try the next older step
            tried.append(_skip(str(step_dir), err))
            continue
        log.info("restored from %s", step_dir)
        return result
    raise CheckpointError("no restorable checkpoint; tried:\n  " + "\n  ".join(tried))


def _skip(where: str, err: Exception) -> str:
    text = f"{where}: {type(err).__name__}: {str(err)[:400]}"
    warnings.warn(f"skipping checkpoint {text}", CheckpointWarning, stacklevel=3)
    return text


def _commit_error(step_dir: epath.Path) -> Exception | None:
    if not (step_dir / COMMIT_MARKER).exists():
        return FileNotFoundError(f"no {COMMIT_MARKER} (save never finished)")
    return None


def _read_json(item_dir: epath.Path) -> Any:
    """An `ocp.args.JsonSave` item, read directly: `ocp.Checkpointer` would add a barrier."""
    return json.loads((item_dir / "metadata").read_text())


def _everyone(flag: bool) -> bool:
    """`flag` AND-ed over processes (no collective on one process)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _reject_typed_keys(state: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"state{jax.tree_util.keystr(path)} is a typed PRNG key; save "
                "jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data"
            )


def _require_shardings(abstract: Any) -> None:
    """Without a sharding Orbax silently restores numpy arrays on the host; refuse that."""
    missing = [
        jax.tree_util.keystr(p)
        for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)
        if getattr(leaf, "sharding", None) is None
    ]
    if missing:
        raise ValueError(f"abstract leaves need a .sharding from the current mesh: {missing[:5]}")
