"""Scaling-law sweeps: a grid of model sizes x data budgets, run (or printed), then fitted.

    python -m pianist_jax.sweep configs/sweeps/cpu.yaml                   # run every point here
    python -m pianist_jax.sweep configs/sweeps/paper.yaml --print-commands  # a command per point
    python -m pianist_jax.sweep configs/sweeps/paper.yaml --collect       # table, fit, plots only
    python -m pianist_jax.sweep configs/sweeps/cpu.yaml output_dir=/tmp/s budgets=[0.01]

A sweep YAML (configs/sweeps/) names a run config (`base`), dotted overrides for every point, the
sizes (name -> dotted overrides) and the budgets. **A budget is a fraction of the training
corpus's tokens**: the point trains on D = budget x corpus tokens, ``steps = ceil(D / (batch x
block))``, with its own warmup (``warmup_fraction``) and decay to its last step. With
``budget_unit: flops`` a budget is training FLOPs instead, and each size takes the steps that
spend it (an iso-FLOP sweep: a smaller model sees more tokens). The data is one
pass over the seeded piece shuffle, so each point sees a distinct-piece subset of size D (a
prefix of the larger budgets'), as L(D) assumes; cutting the corpus instead would repeat data
(a data-constrained regime). Corpus tokens come from the training shards' manifests (else
their records) unless the YAML gives ``corpus_tokens``.

Each point is its own ``python -m pianist_jax.train`` process (output in ``<point>/train.log``;
a crash is recorded as failed and the sweep goes on). A point is finished when
``<point>/result.json`` exists: a rerun skips it; an interrupted point resumes from its
checkpoint. Results (`pianist_jax.scaling.fit`): results.csv/json, fit.json (L(N), L(D)),
loss_vs_params.png, loss_vs_tokens.png and summary.md in ``output_dir``. FLOPs are
`model.flops_per_token` (training = 3x forward; encoder per note, attention, output projection)
x tokens; ``flops_6nd`` = 6 x params x tokens is listed too (it overstates the encoder 8x).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import functools
import json
import math
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from pianist_jax import model
from pianist_jax.artifacts import export
from pianist_jax.config import Config, ConfigError, load_config
from pianist_jax.data import pipeline as data
from pianist_jax.data import records
from pianist_jax.scaling.fit import last_step, read_final, write_json, write_report

RESULT = "result.json"


class SweepError(ValueError):
    """A bad sweep spec, or missing inputs; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    output_dir: str
    sizes: tuple[tuple[str, tuple[str, ...]], ...]  # (size name, dotted overrides)
    budgets: tuple[float, ...]  # fractions of the training corpus's tokens, or FLOPs
    budget_unit: Literal["corpus", "flops"] = "corpus"  # flops: an iso-FLOP sweep
    base: str = "configs/pretrain.yaml"
    overrides: tuple[str, ...] = ()  # dotted run-config overrides for every point
    warmup_fraction: float = 0.05  # train.warmup_steps = round(this x steps)
    corpus_tokens: int | None = None  # null: counted from the training shards
    params: Literal["non_embedding", "total"] = "non_embedding"  # the N of L(N) and the plot
    mode: Literal["local", "print"] = "local"  # run here, or print one command per point
    launcher: Literal["python", "tpu"] = "python"  # print: plain trainer or tpu_pretrain.sh
    train_flags: tuple[str, ...] = ()  # extra trainer flags (e.g. --distributed on a pod)
    prepare: str | None = None  # the command that makes the shards (shown when missing)


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    size: str
    budget: float
    steps: int
    output_dir: str
    overrides: tuple[str, ...]
    cfg: Config = dataclasses.field(compare=False, repr=False)

    @property
    def tokens(self) -> int:
        return self.steps * self.cfg.train.batch_size * self.cfg.data.block_size


# --------------------------------------------------------------------------- spec + plan


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep YAML; `overrides` are top-level ``key=value`` (value parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: top level must be a mapping")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise SweepError(f"sweep override {item!r} is not key=value")
        raw[key.strip()] = yaml.safe_load(text)
    fields = {f.name: f for f in dataclasses.fields(SweepSpec)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=2)
            raise SweepError(
                f"{path}: unknown sweep key {key!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
    try:
        sizes = tuple(
            (str(name), _dotted(ovr or {}, f"sizes.{name}"))
            for name, ovr in (raw.get("sizes") or {}).items()
        )
        budgets = tuple(float(b) for b in raw.get("budgets") or ())
        numbers = {
            k: float(raw[k]) for k in ("warmup_fraction", "corpus_tokens") if raw.get(k) is not None
        }  # PyYAML reads 1e10 as a string
    except (AttributeError, TypeError, ValueError) as err:
        raise SweepError(
            f"{path}: sizes must map names to overrides; budgets, warmup_fraction "
            f"and corpus_tokens must be numbers ({err})"
        ) from None
    if "corpus_tokens" in numbers:
        numbers["corpus_tokens"] = int(numbers["corpus_tokens"])
    kwargs = dict(
        raw,
        **numbers,
        sizes=sizes,
        budgets=budgets,
        overrides=_dotted(raw.get("overrides") or {}, "overrides"),
        train_flags=tuple(str(f) for f in raw.get("train_flags") or ()),
    )
    hints = typing.get_type_hints(SweepSpec)
    for key in ("mode", "launcher", "params", "budget_unit"):
        if key in kwargs and kwargs[key] not in typing.get_args(hints[key]):
            raise SweepError(f"{path}: {key} must be one of {typing.get_args(hints[key])}")
    if "name" not in raw or "output_dir" not in raw:
        raise SweepError(f"{path}: name and output_dir are required")
    spec = SweepSpec(**kwargs)
    if not spec.sizes or not spec.budgets or any(not b > 0 for b in spec.budgets):
        raise SweepError(f"{path}: needs >= 1 size and >= 1 budget, budgets > 0")
    if not 0 <= spec.warmup_fraction < 1:
        raise SweepError(f"{path}: warmup_fraction must be in [0, 1)")
    return spec


def _dotted(mapping: Any, where: str) -> tuple[str, ...]:
    """{dotted.key: value} -> ("dotted.key=value", ...) in order (values as flow YAML)."""
    if not isinstance(mapping, dict):
        raise SweepError(f"{where}: expected a mapping of dotted.key: value, got {mapping!r}")
    return tuple(f"{k}={_yaml_value(v)}" for k, v in mapping.items())


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def plan(spec: SweepSpec, corpus_tokens: int) -> list[Point]:
    """Every (size, budget) point with its steps, output dir and validated Config."""
    points = []
    for size, size_ovr in spec.sizes:
        try:
            cfg = load_config(spec.base, (*spec.overrides, *size_ovr))
        except ConfigError as err:
            raise SweepError(f"size {size}: {err}") from None
        per_step = cfg.train.batch_size * cfg.data.block_size
        for budget in spec.budgets:
            if spec.budget_unit == "flops":  # every size spends the same compute
                flops_per_step = model.flops_per_token(cfg.model, cfg.data.block_size) * per_step
                steps = max(1, math.ceil(budget / flops_per_step))
                name = f"{size}-c{budget:.3g}"
            else:
                steps = max(1, math.ceil(budget * corpus_tokens / per_step))
                name = f"{size}-d{budget:g}"
            out = f"{spec.output_dir.rstrip('/')}/{name}"
            ovr = (
                *spec.overrides,
                *size_ovr,
                f"train.steps={steps}",
                f"train.warmup_steps={round(spec.warmup_fraction * steps)}",
                f"train.output_dir={out}",
            )
            try:
                points.append(
                    Point(name, size, budget, steps, out, ovr, load_config(spec.base, ovr))
                )
            except ConfigError as err:
                raise SweepError(f"point {name}: {err}") from None
    return points


def count_corpus_tokens(cfg: Config) -> int:
    """Tokens in the training sources' shards: from `<shard>.manifest.json` where present, else
    by reading the records."""
    total = 0
    for source in cfg.data.sources:
        for shard in data.shard_paths(source):
            manifest = Path(shard[: -len(records.SHARD_SUFFIX)] + ".manifest.json")
            try:
                total += int(json.loads(manifest.read_text())["totals"]["tokens"])
                continue
            except (OSError, KeyError, ValueError, TypeError):
                pass
            import grain

            src = grain.sources.ArrayRecordDataSource([shard])
            total += sum(records.decode_record(src[i]).n_tokens for i in range(len(src)))
    return total


def check_shards(cfg: Config, spec: SweepSpec) -> None:
    """One clear SweepError (with the command that makes them) when shards are missing."""
    for source in (*cfg.data.sources, *cfg.data.eval_sources):
        try:
            data.shard_paths(source)
        except ValueError as err:
            if spec.prepare:
                raise SweepError(
                    f"no shards for data source {source.name!r} at {source.path} "
                    f"(from {Path.cwd()}); make them with: {spec.prepare}"
                ) from None
            raise SweepError(str(err)) from None


def size_info(cfg: Config) -> dict:
    """Parameters (total, non-embedding) and training FLOPs per token of a point's model."""
    return _size_info(cfg.model, cfg.data.block_size)


@functools.lru_cache(maxsize=None)
def _size_info(model_cfg, block_size: int) -> dict:

    total = embed = 0
    for name, shape in export.param_shapes(model_cfg).items():  # "encoder.word_embeddings", ...
        n = math.prod(shape)
        total += n
        if set(name.split(".")) & {"word_embeddings", "embed_tokens"}:
            embed += n
    return {
        "params": total,
        "params_non_embedding": total - embed,
        "flops_per_token": model.flops_per_token(model_cfg, block_size),
    }


# --------------------------------------------------------------------------- commands + running


def train_argv(spec: SweepSpec, point: Point) -> list[str]:
    """The trainer command of one point (``python`` first: the runner swaps in sys.executable)."""
    return [
        "python",
        "-m",
        "pianist_jax.train",
        "--config",
        spec.base,
        *point.overrides,
        *spec.train_flags,
    ]


def launch_line(spec: SweepSpec, point: Point) -> str:
    """The shell line that trains one point (plain trainer, or launch/tpu_pretrain.sh)."""
    if spec.launcher == "tpu":  # the script takes OUT / CONFIG from the environment
        env = [f"OUT={shlex.quote(point.output_dir)}"]
        if spec.base != "configs/pretrain.yaml":
            env.append(f"CONFIG={shlex.quote(spec.base)}")
        ovr = [o for o in point.overrides if not o.startswith("train.output_dir=")]
        return " ".join([*env, "launch/tpu_pretrain.sh", *map(shlex.quote, ovr)])
    return " ".join(map(shlex.quote, train_argv(spec, point)))


Runner = Callable[[SweepSpec, Point, Path], int]


def subprocess_runner(
    spec: SweepSpec,
    point: Point,
    log_path: Path,
    out: typing.TextIO = sys.stdout,
    poll_s: float = 2.0,
) -> int:
    """Train one point in a child process (output -> log_path); progress from metrics.jsonl."""
    argv = [sys.executable, *train_argv(spec, point)[1:], "--no-progress"]
    metrics = Path(point.output_dir) / "metrics.jsonl"
    tty, start, last_print = out.isatty(), time.time(), 0.0
    with log_path.open("a") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        def stop(signum, frame):  # `kill <sweep pid>`: stop the child too (it checkpoints)
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                now = time.time()
                if tty or now - last_print >= 60:
                    step, loss = last_step(metrics)
                    text = (
                        f"    {point.name}: step {step}/{point.steps} loss {loss:.3f}"
                        if step
                        else f"    {point.name}: starting"
                    ) + f" ({now - start:.0f} s)"
                    out.write(("\r" + text + "   ") if tty else text + "\n")
                    out.flush()
                    last_print = now
        except KeyboardInterrupt:  # SIGTERM makes the trainer save a checkpoint and exit 0
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            if tty:
                out.write("\r" + " " * 79 + "\r")
    return proc.returncode


def make_row(
    point: Point,
    status: str,
    final: dict | None = None,
    wall_s: float | None = None,
    message: str = "",
) -> dict:
    info = size_info(point.cfg)
    tokens = point.tokens
    return {
        "name": point.name,
        "size": point.size,
        "budget": point.budget,
        "status": status,
        "steps": point.steps,
        "batch_size": point.cfg.train.batch_size,
        "block_size": point.cfg.data.block_size,
        "tokens": tokens,
        **info,
        "flops": info["flops_per_token"] * tokens,
        "flops_6nd": 6.0 * info["params"] * tokens,
        **(final or {"eval_loss": None, "eval_accuracy": None, "train_loss": None}),
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "output_dir": point.output_dir,
        "message": message,
    }


def load_result(point: Point, out: typing.TextIO = sys.stdout) -> dict | None:
    path = Path(point.output_dir) / RESULT
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    if row.get("steps") != point.steps:
        out.write(
            f"warning: {point.name} finished with {row.get('steps')} steps, the plan now "
            f"says {point.steps}; its result is kept (delete {point.output_dir} to redo)\n"
        )
    return row


def run_points(
    spec: SweepSpec,
    points: Sequence[Point],
    runner: Runner | None = None,
    out: typing.TextIO = sys.stdout,
    collect_only: bool = False,
) -> list[dict]:
    """Run (or, with collect_only, just gather) every point; finished points are skipped."""
    runner = runner or (lambda s, p, log: subprocess_runner(s, p, log, out))
    rows, t0 = [], time.time()
    for i, point in enumerate(points, 1):
        head = f"[{i}/{len(points)}] {point.name}"
        row = load_result(point, out)
        if row is None and collect_only:
            final = read_final(point.output_dir, point.steps)
            row = (
                make_row(point, "ok", final)
                if final
                else make_row(point, "missing", message="no final eval in metrics.jsonl")
            )
            if final:
                write_json(Path(point.output_dir) / RESULT, row)
        elif row is not None:
            out.write(f"{head}: finished earlier (eval loss {row['eval_loss']:.4f}), skipped\n")
        else:
            info = size_info(point.cfg)
            out.write(
                f"{head}: {info['params']:,} params ({info['params_non_embedding']:,} "
                f"non-embedding), {point.steps} steps, {point.tokens:,} tokens "
                f"-> {point.output_dir}   [sweep {_clock(time.time() - t0)}]\n"
            )
            out.flush()
            Path(point.output_dir).mkdir(parents=True, exist_ok=True)
            log_path = Path(point.output_dir) / "train.log"
            start = time.time()
            rc = runner(spec, point, log_path)
            wall, final = time.time() - start, read_final(point.output_dir, point.steps)
            if rc == 0 and final:
                row = make_row(point, "ok", final, wall)
                write_json(Path(point.output_dir) / RESULT, row)
                out.write(f"{head}: eval loss {final['eval_loss']:.4f} in {wall:.0f} s\n")
            else:
                why = f"exit code {rc}" if rc else "no final eval at the last step"
                row = make_row(point, "failed", None, wall, f"{why}; see {log_path}")
                out.write(f"{head}: FAILED ({why}); log: {log_path}\n")
        out.flush()
        rows.append(row)
    if not collect_only:
        out.write(f"sweep: {len(points)} points in {_clock(time.time() - t0)}\n")
    return rows


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# --------------------------------------------------------------------------- CLI


def main(
    argv: Sequence[str] | None = None, runner: Runner | None = None, out: typing.TextIO = sys.stdout
) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pianist_jax.sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="top-level sweep key=value overrides")
    parser.add_argument(
        "--print-commands",
        action="store_true",
        help="print one launch command per point instead of running (mode=print)",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: gather finished points, write table, fit and plots",
    )
    parser.add_argument("--only", metavar="GLOB", help="only the points whose name matches")
    args = parser.parse_intermixed_args(argv)  # overrides may follow flags
    try:
        spec = load_sweep(args.sweep, args.overrides)
        mode = "print" if args.print_commands else spec.mode
        first = load_config(spec.base, (*spec.overrides, *spec.sizes[0][1]))
        if mode == "local" and not args.collect:
            check_shards(first, spec)
        corpus = spec.corpus_tokens
        if corpus is None:
            try:
                check_shards(first, spec)
            except SweepError as err:
                raise SweepError(f"{err} (or give the count: corpus_tokens=N)") from None
            corpus = count_corpus_tokens(first)
        points = [
            p for p in plan(spec, corpus) if not args.only or fnmatch.fnmatch(p.name, args.only)
        ]
    except (SweepError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.write(
        f"# sweep {spec.name}: {len(points)} points ({len(spec.sizes)} sizes x "
        f"{len(spec.budgets)} budgets), corpus {corpus:,} tokens, output {spec.output_dir}\n"
    )
    if mode == "print" and not args.collect:
        how = (
            "launch/tpu_pretrain.sh takes TPU_NAME, ZONE and SHARDS from the environment"
            if spec.launcher == "tpu"
            else "on a pod, on every host"
        )
        out.write(
            f"# run each command ({how}); copy the point directories to {spec.output_dir} "
            f"if they are elsewhere, then: python -m pianist_jax.sweep {args.sweep} "
            f"--collect\n"
        )
        for point in points:
            info = size_info(point.cfg)
            done = (Path(point.output_dir) / RESULT).is_file()
            out.write(
                f"# {point.name}: {info['params']:,} params, {point.steps} steps, "
                f"{point.tokens:,} tokens{' (finished)' if done else ''}\n"
            )
            out.write(("# " if done else "") + launch_line(spec, point) + "\n")
        return 0
    try:
        rows = run_points(spec, points, runner, out, collect_only=args.collect)
    except KeyboardInterrupt:
        print(
            "interrupted: rerun the same command to continue (finished points are skipped)",
            file=sys.stderr,
        )
        return 130
    write_report(
        rows,
        spec.output_dir,
        name=spec.name,
        params=spec.params,
        budget_unit=spec.budget_unit,
        out=out,
    )
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
