"""Pre-training (and, with `configs/sft.yaml`, fine-tuning) loop and its command line.

    python -m pianist_jax.train --config configs/pretrain.yaml model=tiny train.steps=300

How a run starts (the restore order, see `pianist_jax.train.checkpoint`): 1) resume this run's
newest
good checkpoint in ``train.output_dir``; 2) else load params only from ``train.init_from``
(fresh optimiser); 3) else fresh, seeded parameters. A resumed run continues with exactly the
batches and updates an uninterrupted run would have made (model, optimiser, step and the Grain
iterator are checkpointed together), so its parameters and loss curve are bit-identical.

SIGTERM/SIGINT save a checkpoint and exit cleanly (exit code 0, "preempted" in the log); a
non-finite loss or gradient stops the run (exit code 3) naming the step, with the last good
parameters and checkpoint kept. Per-step metrics go to ``metrics.jsonl`` (every step, for exact
comparisons), stdout every ``train.log_every`` steps, and TensorBoard event files under ``tb/``.
The next batch is read and transferred while the device runs the current step
(`data.Prefetch`, whose checkpointed state excludes the batch held in hand).
Multi-process (TPU pods, GPU nodes): pass ``--distributed`` (or set the coordinator flags) and
every process runs the same command; each reads its own share of the records.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from pianist_jax.config import Config, config_from_cli, save_config, to_yaml
from pianist_jax.data import pipeline as data
from pianist_jax.data import sft as data_sft
from pianist_jax.train import checkpoint, sharding
from pianist_jax.train.step import StepFns

log = logging.getLogger("pianist_jax.train")
EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the params of the previous step are kept."""


@dataclass
class RunResult:
    """What a run did; returned by `run` (tests compare these)."""

    state: dict
    start_step: int
    end_step: int
    history: list[dict] = field(default_factory=list)  # per-step metrics of this process' run
    preempted: bool = False


Hook = Callable[[int, dict], None]  # called after every step with (step, metrics on host)


def total_steps(cfg: Config) -> int:
    """``train.steps``, or with ``train.steps: null`` ``epochs x examples / global batch``
    (rounded up) over the SFT index."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    if cfg.data.kind != "sft":
        raise ValueError("train.steps is null: epoch-based step counts need data.kind=sft")

    return math.ceil(cfg.train.epochs * data_sft.examples_per_epoch(cfg) / cfg.train.batch_size)


class MetricsLog:
    """``metrics.jsonl`` (one line per step), stdout summaries and TensorBoard scalars."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop steps logged after the checkpoint we resume from
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1)
        except ImportError:  # optional: metrics.jsonl and stdout still have everything
            log.warning("tensorboardX not installed: no TensorBoard event files")

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def evaluate(fns: StepFns, cfg: Config, params: dict, mesh) -> dict | None:
    """Loss / masked accuracy on ``train.eval_steps`` batches of the held-out sources."""
    if not cfg.data.eval_sources:
        return None
    it = data.make_train_iterator(cfg, split="eval")
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for _ in range(cfg.train.eval_steps):
        try:  # SFT validation is one finite pass; pre-training eval repeats
            local = next(it)
        except StopIteration:
            break
        batch = data.to_global_batch(local, mesh, fns.batch_sharding)
        sums = jax.device_get(fns.eval_step(params, batch))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}


def _start(cfg: Config, fns: StepFns, ckpt: checkpoint.Checkpointer, it) -> tuple[dict, int]:
    init_from = cfg.train.init_from and str(checkpoint.run_checkpoints(cfg.train.init_from))
    plan = checkpoint.resolve_start(ckpt.directory, init_from)
    if plan.kind == "resume":
        step, state = ckpt.restore(fns.abstract_state(), data_iter=it, config=cfg)
        log.info("resumed %s at step %d", plan.path, step)
        return state, int(step)
    if plan.kind == "init":
        abstract = fns.abstract_state()["params"]
        params = checkpoint.restore_params_only(plan.path, abstract)
        log.info("initialised params from %s (step %s), fresh optimiser", plan.path, plan.step)
        return fns.init_state(params), 0
    log.info("fresh start (seed %d)", cfg.train.seed)
    return fns.init_state(seed=cfg.train.seed), 0


def run(
    cfg: Config, *, hooks: tuple[Hook, ...] = (), progress: bool = True, devices=None
) -> RunResult:
    """Train until ``train.steps`` (or a stop signal); returns the final state and history."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    steps = total_steps(cfg)
    fns = StepFns(cfg, mesh, steps)
    out_dir = Path(cfg.train.output_dir)
    lead = jax.process_index() == 0
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    it = data.Prefetch(
        data.make_train_iterator(cfg), lambda b: data.to_global_batch(b, mesh, fns.batch_sharding)
    )
    ckpt = checkpoint.Checkpointer(out_dir / checkpoint.RUN_SUBDIR, keep=cfg.train.keep_checkpoints)
    state, start = _start(cfg, fns, ckpt, it)
    metrics_log = MetricsLog(out_dir, lead, start)
    result = RunResult(state=state, start_step=start, end_step=start)
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    bar = _progress(progress and lead, steps, start)
    step, window, t0 = start, [], time.perf_counter()
    try:
        with checkpoint.PreemptionGuard() as guard:
            while step < steps:
                if guard.should_stop(step):
                    ckpt.save(step, state, it, cfg, force=True)
                    ckpt.wait()
                    log.warning(
                        "preempted (signal %s): saved step %d to %s; rerun the same "
                        "command to resume",
                        guard.signum,
                        step,
                        ckpt.directory,
                    )
                    result.preempted = True
                    break
                state, metrics = fns.train_step(state, next(it))  # async dispatch
                step += 1
                if step < steps:
                    it.prefetch()  # the next batch loads while the device computes
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                window.append(host)
                result.history.append({"step": step, **host})
                metrics_log.write(step, host)
                for hook in hooks:
                    hook(step, host)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{host['loss']:.3f}", refresh=False)
                if not np.isfinite(host["loss"]) or not np.isfinite(host["grad_norm"]):
                    raise NonFiniteError(
                        f"non-finite loss/grad norm at step {step} (loss={host['loss']}, "
                        f"grad_norm={host['grad_norm']}); params kept from step {step - 1}; "
                        f"last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}"
                    )
                if step % cfg.train.log_every == 0 or step == steps:
                    elapsed = time.perf_counter() - t0
                    summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                    summary["tokens_per_s"] = len(window) * tokens_per_step / max(elapsed, 1e-9)
                    if lead:
                        _print(step, steps, summary, bar)
                    window, t0 = [], time.perf_counter()
                if step % cfg.train.eval_every == 0 or step == steps:
                    scores = evaluate(fns, cfg, state["params"], mesh)
                    if scores is not None and lead:
                        metrics_log.write(step, scores, prefix="eval")
                        _print(step, steps, {f"eval_{k}": v for k, v in scores.items()}, bar)
                if step % cfg.train.checkpoint_every == 0 or step == steps:
                    ckpt.save(step, state, it, cfg)
    finally:
        ckpt.wait()
        ckpt.close()
        it.close()
        metrics_log.close()
        if bar is not None:
            bar.close()
    result.state, result.end_step = state, step
    return result


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


def _print(step: int, total: int, values: dict[str, Any], bar) -> None:
    text = f"step {step}/{total} " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def initialize_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` before any JAX use when running multi-process."""
    if not (args.distributed or args.coordinator):
        return
    kwargs = {}
    if args.coordinator:
        kwargs = dict(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    jax.distributed.initialize(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pianist_jax.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: dotted keys, e.g. model=tiny train.steps=300 mesh.shape=[2,4,1]",
    )
    parser.add_argument("--config", required=True, help="run config YAML (configs/pretrain.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument(
        "--compilation-cache",
        metavar="DIR",
        default=os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/pianist-jax/xla"),
        help="persistent XLA compilation cache ('' disables; default %(default)s)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detects TPU pods, SLURM)",
    )
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-process by hand)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument(
        "--cpu-collectives",
        choices=("gloo", "mpi"),
        help="CPU collectives for multi-process CPU runs (gloo)",
    )
    args = parser.parse_intermixed_args(argv)  # overrides may follow flags
    logging.basicConfig(
        level=os.environ.get("PIANIST_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )  # absl (imported by orbax) already configured the root
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes
    if args.compilation_cache:  # restarts and resumed runs skip recompiling the step
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compilation_cache))
    cfg = config_from_cli([args.config, *args.overrides])
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    initialize_distributed(args)
    try:
        result = run(cfg, progress=not args.no_progress)
    except NonFiniteError as err:
        log.error("%s", err)
        return EXIT_NONFINITE
    except (ValueError, checkpoint.CheckpointError) as err:  # bad config, data or checkpoint
        log.debug("details", exc_info=True)
        log.error("%s (PIANIST_LOG=DEBUG shows the traceback)", err)
        return 2
    last = result.history[-1] if result.history else {}
    log.info(
        "done: steps %d -> %d%s, last loss %s",
        result.start_step,
        result.end_step,
        " (preempted)" if result.preempted else "",
        last.get("loss"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
