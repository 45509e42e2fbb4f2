"""Scaling-law sweeps: the power-law fit, every configs/sweeps/*.yaml, print mode, resumable runs
(with a fake trainer), the missing-shards message, and one tiny sweep end to end."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from pianist_jax import midi, tokenizer
from pianist_jax.config import CONFIG_ROOT, config_from_cli, load_config
from pianist_jax.data import records
from pianist_jax.scaling import sweep
from pianist_jax.scaling.fit import fit_power_law, fit_rows, summary_table, write_report

SWEEPS = sorted((CONFIG_ROOT / "sweeps").glob("*.yaml"))
CORPUS = 36_830_040  # tokens in shards 0-6 of launch/tokenize_shared.sh (no shards needed here)


# --------------------------------------------------------------------------- fit


@pytest.mark.parametrize(
    "e, a, alpha, xs",
    [
        (1.5, 40.0, 0.3, [1e4, 1e5, 1e6, 1e7]),  # params-like x
        (2.0, 300.0, 0.5, [1e5, 2e5, 4e5]),  # 3 budgets: exactly determined
        (0.7, 5e9, 1.2, [3e7, 1e8, 3e8, 1e9]),  # steep, big x (tokens-like)
    ],
)
def test_fit_recovers_known_parameters(e, a, alpha, xs):
    fit = fit_power_law(xs, e + a * np.power(xs, -alpha))
    assert fit["ok"], fit
    assert fit["E"] == pytest.approx(e, rel=1e-3)
    assert fit["A"] == pytest.approx(a, rel=1e-2)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-3)


def test_fit_with_noise():
    xs = np.geomspace(1e4, 1e7, 6)
    ys = 1.5 + 40 * xs**-0.3 + np.random.default_rng(0).normal(0, 0.005, len(xs))
    fit = fit_power_law(xs, ys)
    assert fit["ok"] and abs(fit["alpha"] - 0.3) < 0.05 and abs(fit["E"] - 1.5) < 0.1
    assert fit["rmse"] < 0.01


@pytest.mark.parametrize(
    "xs, ys, why",
    [
        ([1e4, 1e5], [3.0, 2.0], "need >= 3"),
        ([1e4, 1e5, 1e6], [2.0, 2.5, 3.0], "does not fall"),
        ([1e4, 1e4, 1e4], [3.0, 2.5, 2.0], "need >= 3"),
        ([1e4, np.nan, 1e6], [3.0, 2.5, 2.0], "need >= 3"),
    ],
)
def test_fit_failures_are_reported_not_raised(xs, ys, why):
    fit = fit_power_law(xs, ys)
    assert not fit["ok"] and why in fit["message"]


# --------------------------------------------------------------------------- sweep YAMLs


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_yaml_loads_and_plans(path):
    """Every configs/sweeps/*.yaml loads as a SweepSpec and every point's run config builds."""
    spec = sweep.load_sweep(path)
    points = sweep.plan(spec, spec.corpus_tokens or CORPUS)
    assert len(points) == len(spec.sizes) * len(spec.budgets)
    assert len({p.name for p in points}) == len(points)
    for point in points:
        assert point.cfg.train.steps == point.steps >= 1
        assert point.cfg.train.output_dir == point.output_dir
        assert point.cfg.train.warmup_steps <= point.steps
        if spec.budget_unit == "flops":
            flops = sweep.size_info(point.cfg)["flops_per_token"] * point.tokens
            assert flops >= point.budget
        else:
            assert point.tokens >= point.budget * (spec.corpus_tokens or CORPUS)
    assert {"cpu.yaml", "paper.yaml", "recipe.yaml"} <= {p.name for p in SWEEPS}


def test_cpu_sweep_is_cpu_sized():
    spec = sweep.load_sweep(CONFIG_ROOT / "sweeps" / "cpu.yaml")
    assert len(spec.sizes) >= 4 and len(spec.budgets) >= 3 and spec.mode == "local"
    points = sweep.plan(spec, CORPUS)
    assert all(p.cfg.model.dtype == "float32" and p.cfg.model.hidden <= 128 for p in points)
    sizes = [sweep.size_info(points[i * len(spec.budgets)].cfg) for i in range(len(spec.sizes))]
    assert all(
        a["params_non_embedding"] < b["params_non_embedding"] for a, b in itertools.pairwise(sizes)
    )
    assert sum(p.tokens for p in points) < 3e6  # ~20 min on 2 cores (see docs/SCALING.md)


def test_paper_sweep_sizes():
    spec = sweep.load_sweep(CONFIG_ROOT / "sweeps" / "paper.yaml")
    points = sweep.plan(spec, spec.corpus_tokens)
    by_size = {p.size: p for p in points}
    params = {k: sweep.size_info(p.cfg)["params"] / 1e6 for k, p in by_size.items()}
    assert params["small"] == pytest.approx(15, abs=1) and params["mid"] == pytest.approx(65, abs=2)
    assert params["base"] == pytest.approx(127, abs=1)  # + 8.3M unused reference tables = 135M
    sym = by_size["sym66"].cfg.model
    assert (sym.encoder_layers, sym.decoder_layers) == (6, 6)
    assert max(p.steps for p in points) == 40_000  # budget 1.0 = the paper's full run


def test_recipe_sweep_is_iso_flop_around_the_default_model():
    """Each width trains for the default recipe's pre-training compute (to within one step), and
    the default width's point is that stage exactly: the sweep compares widths at its budget."""
    spec = sweep.load_sweep(CONFIG_ROOT / "sweeps" / "recipe.yaml")
    assert spec.budget_unit == "flops" and len(spec.budgets) == 1
    points = sweep.plan(spec, CORPUS)
    recipe = load_config(CONFIG_ROOT / "default" / "pretrain.yaml")
    widths = {p.cfg.model.hidden: p for p in points}
    assert min(widths) < recipe.model.hidden < max(widths)
    assert widths[recipe.model.hidden].steps == recipe.train.steps
    assert widths[recipe.model.hidden].cfg.model == recipe.model
    for point in points:
        per_step = sweep.size_info(point.cfg)["flops_per_token"] * point.tokens / point.steps
        assert 0 <= per_step * point.steps - spec.budgets[0] < per_step
        assert point.cfg.data == recipe.data and point.cfg.train.lr == recipe.train.lr


def test_summary_names_the_lowest_loss_per_budget():
    rows = [
        dict(name=s, size=s, budget=1e13, eval_loss=loss, tokens=t, params=n, status="ok")
        for s, loss, n, t in (("h96", 2.6, 2, 3e6), ("h128", 2.5, 3, 2e6), ("h192", 2.7, 6, 1e6))
    ]
    text = summary_table(rows, "t", "params", fit_rows(rows, "params"), budget_unit="flops")
    assert "training FLOPs" in text and "lowest loss at budget 1e+13: h128 (2.5000)" in text


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "name: x\noutput_dir: o\nsizes: {a: {}}\nbudgets: [0.1]\nbugdets: [1]\n",
            "did you mean budgets",
        ),
        (
            "name: x\noutput_dir: o\nsizes: {a: {model.hiden: 3}}\nbudgets: [0.1]\n",
            "size a.*model.hiden",
        ),
        ("name: x\noutput_dir: o\nsizes: {a: {}}\nbudgets: [0]\n", "budgets > 0"),
        ("name: x\noutput_dir: o\nsizes: {a: {}}\nbudgets: [0.1]\nmode: run\n", "mode must be"),
        (
            "name: x\noutput_dir: o\nsizes: {a: {}}\nbudgets: [1e12]\nbudget_unit: flop\n",
            "budget_unit must be",
        ),
    ],
)
def test_bad_sweep_specs(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(sweep.SweepError, match=match):
        sweep.plan(sweep.load_sweep(path), CORPUS)


# --------------------------------------------------------------------------- print mode


@pytest.mark.parametrize("launcher", ["python", "tpu"])
def test_print_commands(launcher, tmp_path):
    path = CONFIG_ROOT / "sweeps" / "paper.yaml"
    out = io.StringIO()
    assert (
        sweep.main(
            [str(path), "--print-commands", f"output_dir={tmp_path}", f"launcher={launcher}"],
            out=out,
        )
        == 0
    )
    lines = [x for x in out.getvalue().splitlines() if not x.startswith("#")]
    spec = sweep.load_sweep(path, [f"output_dir={tmp_path}"])
    points = sweep.plan(spec, spec.corpus_tokens)
    assert len(lines) == len(points) == 12
    for line, point in zip(lines, points):
        argv = shlex.split(line)
        if launcher == "python":
            assert (
                argv[:5]
                == ["python", "-m", "pianist_jax.train", "--config", "configs/pretrain.yaml"]
                and argv[-1] == "--distributed"
            )
            # the printed command builds exactly the point's run config
            assert config_from_cli([argv[4], *argv[5:-1]]) == point.cfg
        else:
            assert argv[0] == f"OUT={point.output_dir}" and argv[1] == "launch/tpu_pretrain.sh"
            assert f"train.steps={point.steps}" in argv
            assert not any(a.startswith("train.output_dir=") for a in argv)


# --------------------------------------------------------------------------- running (fake trainer)


def fake_loss(point) -> float:
    """Falls with parameters and with tokens, like a real sweep should."""
    info = sweep.size_info(point.cfg)
    return 2.0 + 30 * info["params_non_embedding"] ** -0.3 + 50 * point.tokens**-0.3


class FakeTrainer:
    """Writes the metrics.jsonl a finished run would; `fail` names points that crash."""

    def __init__(self, fail=(), no_eval=()):
        self.calls, self.fail, self.no_eval = [], set(fail), set(no_eval)

    def __call__(self, spec, point, log_path):
        self.calls.append(point.name)
        assert log_path.parent.is_dir()
        if point.name in self.fail:
            return 1
        loss = fake_loss(point)
        lines = [
            {"step": s, "split": "train", "loss": loss + 0.1} for s in range(1, point.steps + 1)
        ]
        if point.name not in self.no_eval:
            lines.append({"step": point.steps, "split": "eval", "loss": loss, "accuracy": 0.5})
        (Path(point.output_dir) / "metrics.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in lines)
        )
        return 0


def test_resumable_runs_skip_finished_points(tmp_path):
    spec = sweep.load_sweep(CONFIG_ROOT / "sweeps" / "cpu.yaml", [f"output_dir={tmp_path}"])
    points = sweep.plan(spec, CORPUS)
    names = [p.name for p in points]
    crash, preempted = names[1], names[5]
    trainer = FakeTrainer(fail=[crash], no_eval=[preempted])
    rows = sweep.run_points(spec, points, trainer, out=io.StringIO())
    assert trainer.calls == names
    status = {r["name"]: r["status"] for r in rows}
    assert status[crash] == status[preempted] == "failed"
    assert sum(s == "ok" for s in status.values()) == len(points) - 2
    assert "exit code 1" in next(r for r in rows if r["name"] == crash)["message"]

    trainer = FakeTrainer()  # rerun: only the two unfinished points run
    rows = sweep.run_points(spec, points, trainer, out=io.StringIO())
    assert trainer.calls == [crash, preempted] and all(r["status"] == "ok" for r in rows)
    (Path(points[0].output_dir) / sweep.RESULT).unlink()
    trainer = FakeTrainer()
    sweep.run_points(spec, points, trainer, out=io.StringIO())
    assert trainer.calls == [names[0]]

    out = io.StringIO()
    fits = write_report(rows, tmp_path, name="cpu", out=out)
    for name in (
        "results.csv",
        "results.json",
        "fit.json",
        "loss_vs_params.png",
        "loss_vs_tokens.png",
        "summary.md",
    ):
        assert (tmp_path / name).stat().st_size > 0
    assert fits["L_N"]["ok"] and fits["L_D"]["ok"]
    assert fits["L_D"]["beta"] == pytest.approx(0.3, abs=0.05)
    assert all(fits["loss_falls_with_size"].values()) and all(fits["loss_falls_with_data"].values())
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(points) and float(table[0]["flops"]) > 0
    assert "| h128 |" in out.getvalue()


def test_collect_reads_finished_runs(tmp_path):
    spec = sweep.load_sweep(CONFIG_ROOT / "sweeps" / "cpu.yaml", [f"output_dir={tmp_path}"])
    points = sweep.plan(spec, CORPUS)
    for point in points[:-1]:  # e.g. copied back from a pod: metrics.jsonl, no result.json
        Path(point.output_dir).mkdir(parents=True)
        FakeTrainer()(spec, point, Path(point.output_dir) / "train.log")
    rows = sweep.run_points(
        spec, points, lambda *a: pytest.fail("ran"), io.StringIO(), collect_only=True
    )
    assert [r["status"] for r in rows] == ["ok"] * (len(points) - 1) + ["missing"]
    assert (Path(points[0].output_dir) / sweep.RESULT).is_file()


def test_missing_shards_fail_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/shards/pretrain here
    rc = sweep.main([str(CONFIG_ROOT / "sweeps" / "cpu.yaml")], runner=lambda *a: pytest.fail())
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "launch/tokenize_shared.sh out/shards/pretrain" in err and "pretrain" in err


# --------------------------------------------------------------------------- end to end


def write_shards(root: Path, num: int = 2, pieces: int = 10) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for s in range(num):
        writer = ArrayRecordWriter(
            str(root / records.shard_filename(s, num)), records.ARRAY_RECORD_OPTIONS
        )
        for i in range(pieces):
            n = int(rng.integers(20, 60))
            onset = np.cumsum(rng.integers(0, 300, n))
            notes = midi.Notes(
                onset=onset,
                offset=onset + 200,
                pitch=48 + np.arange(n) % 24,
                velocity=np.full(n, 64),
                pedal_ms=np.zeros(0, np.int64),
                pedal_value=np.zeros(0, np.int64),
            )
            ids = tokenizer.encode_notes(notes)
            writer.write(
                records.encode_record(
                    ids,
                    source=f"{s}-{i}.mid",
                    corpus="syn",
                    kind="performance",
                    n_notes=n,
                    content_hash=f"{s}{i:063x}",
                )
            )
        writer.close()


@pytest.mark.slow  # trains every point of a sweep
def test_tiny_sweep_end_to_end(tmp_path, monkeypatch, repo_root):
    """1 size x 2 budgets through real trainer subprocesses, then a rerun that skips both.

    One size only: a cold XLA compile of even the smallest model's train + eval step takes
    ~30 s on 2 cores; a constant lr schedule makes both budgets compile the same train step,
    so the second point hits the persistent compilation cache. 2 sizes x 2 budgets of the
    bookkeeping run in the fake-trainer tests above."""
    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    shards = tmp_path / "shards"
    write_shards(shards)
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(f"""
name: tiny
output_dir: {tmp_path}/sweep
prepare: write the synthetic shards
overrides:
  model: tiny
  model.encoder_layers: 1
  data.sources: [{{name: syn, path: '{shards}/shard-00000-of-00002.array_record'}}]
  data.eval_sources: [{{name: held, path: '{shards}/shard-00001-of-00002.array_record'}}]
  data.block_size: 64
  train.batch_size: 2
  train.schedule: constant
  train.eval_steps: 1
  train.log_every: 1
  mesh.shape: [1, -1, 1]
sizes:
  h16: {{model.hidden: 16, model.mlp: 32, model.num_heads: 2, model.num_kv_heads: 1,
        model.head_dim: 8}}
budgets: [0.05, 0.1]
warmup_fraction: 0
""")
    out = io.StringIO()
    rc = sweep.main([str(spec_path)], out=out)
    text = out.getvalue()
    assert rc == 0, text
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok"] * 2, text
    corpus = sum(len(records.decode_record(r).ids) for r in _read(shards, 0))  # no manifest
    assert rows[1]["steps"] == math.ceil(0.1 * corpus / 128) and rows[1]["tokens"] >= 0.1 * corpus
    assert all(np.isfinite(r["eval_loss"]) and r["flops"] > 0 for r in rows)
    train_log = (tmp_path / "sweep" / "h16-d0.1" / "train.log").read_text()
    assert f"step {rows[1]['steps']}/{rows[1]['steps']} eval_loss=" in train_log
    fits = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert not fits["L_D"]["ok"] and "need >= 3" in fits["L_D"]["message"]  # 2 budgets: no fit
    for name in ("results.csv", "loss_vs_params.png", "loss_vs_tokens.png", "summary.md"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    out = io.StringIO()
    assert sweep.main([str(spec_path)], runner=lambda *a: pytest.fail("reran"), out=out) == 0
    assert out.getvalue().count("skipped") == 2


def _read(shards: Path, index: int):
    import grain

    src = grain.sources.ArrayRecordDataSource([str(shards / records.shard_filename(index, 2))])
    return [src[i] for i in range(len(src))]
