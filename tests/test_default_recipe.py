"""The default-model recipe: launch/train_default.sh (syntax, dry run, the configs it builds),
data_prep.pretrain_files (validation pieces left out), pianist_jax.artifacts.model_card (fields from
synthetic inputs) and the bundled example score.

The recipe itself is run end to end only by hand (`launch/train_default.sh --smoke`, a few
minutes): it trains twice and compiles the renderer, too slow for CI.
"""

import csv
import json
import math
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import mido
import numpy as np
import pytest
import yaml

from data_prep import pretrain_files
from pianist_jax.artifacts import model_card
from pianist_jax.config import config_from_cli, load_config
from tests.midi_fixtures import note_track, save

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "train_default.sh"
EXAMPLE = REPO / "pianist_jax" / "assets" / "examples" / "little_waltz.mid"
STAGES = [
    "data-sft",
    "pretrain-files",
    "tokenize",
    "pretrain",
    "sft",
    "export",
    "eval-set",
    "decoding",
]
MAX_BYTES = 30_000_000


# --------------------------------------------------------------------------- the script


def dry_run(*args, check=True):
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def stages_of(stdout):
    """[(stage, argv)] from the dry run's '[stage] command' lines."""
    out = []
    for line in stdout.splitlines():
        assert line.startswith("["), line
        name, _, cmd = line[1:].partition("] ")
        out.append((name, shlex.split(cmd, comments=True)))
    return out


def test_bash_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_prints_the_stages_in_order(tmp_path):
    work = tmp_path / "work"
    stages = stages_of(dry_run("--work-dir", str(work), "--install").stdout)
    seeds = [f"render-seed{k}" for k in range(3)] + [f"evaluate-seed{k}" for k in range(3)]
    assert [s for s, _ in stages] == STAGES + seeds + ["evaluate-deadpan", "card", "install"]
    assert not work.exists(), "--dry-run must not write anything"
    smoke = stages_of(dry_run("--smoke", "--work-dir", str(work)).stdout)
    assert [s for s, _ in smoke] == STAGES + [
        "render-seed0",
        "evaluate-seed0",
        "evaluate-deadpan",
        "card",
    ]
    cmds = dict(smoke)
    assert cmds["data-sft"][cmds["data-sft"].index("--limit") + 1] == "26"
    assert "--limit" in cmds["pretrain-files"]
    assert cmds["tokenize"][cmds["tokenize"].index("--num-shards") + 1] == "2"
    assert cmds["eval-set"][-2] == str(work / "eval_pieces.txt")
    assert cmds["card"][-1] == "--smoke"


def test_dry_run_stops_after(tmp_path):
    out = dry_run("--work-dir", str(tmp_path), "--stop-after", "tokenize").stdout
    assert [s for s, _ in stages_of(out)] == STAGES[:3]
    # a stage that --no-pretrain leaves out still ends the run when --stop-after names it
    out = dry_run("--work-dir", str(tmp_path), "--no-pretrain", "--stop-after", "tokenize").stdout
    assert [s for s, _ in stages_of(out)] == STAGES[:3]


def test_bad_arguments_are_refused(tmp_path):
    assert dry_run("--smoke", "--install", check=False).returncode == 2
    assert dry_run("--bogus", check=False).returncode == 2
    assert dry_run("--pretrain-steps", "many", check=False).returncode == 2
    assert dry_run("--export-dtype", "int8", check=False).returncode == 2
    assert dry_run("--profile", "tpu", check=False).returncode == 2


def _train_configs(stages):
    cfgs = {}
    for name in ("pretrain", "sft"):
        argv = dict(stages)[name]
        i = argv.index("--config")
        cfgs[name] = config_from_cli([argv[i + 1], *[a for a in argv[i + 2 :] if "=" in a]])
    return cfgs


def test_dry_run_train_commands_build_valid_configs(tmp_path):
    work = tmp_path / "w"
    stages = stages_of(
        dry_run(
            "--work-dir",
            str(work),
            "--seed",
            "3",
            "--sft-steps",
            "40",
            "--pretrain-set",
            "train.lr=2e-3",
        ).stdout
    )
    cfgs = _train_configs(stages)
    pre, sft = cfgs["pretrain"], cfgs["sft"]
    assert pre.model == sft.model == load_config("configs/default/model.yaml").model
    assert pre.train.seed == sft.train.seed == pre.data.seed == 3
    assert pre.train.lr == 2e-3 and (sft.train.steps, sft.train.warmup_steps) == (40, 4)
    assert pre.train.output_dir == str(work / "runs" / "pretrain")
    assert sft.train.init_from == pre.train.output_dir
    # every attention distance of the renderer's 4096-token windows is seen in training
    assert sft.data.block_size >= sft.model.sliding_window
    assert pre.data.block_size >= pre.model.sliding_window
    assert sft.model.slot_logits  # the loss over each slot's valid range (what is sampled)
    assert sft.data.sources[0].path == str(work / "sft_data" / "train")
    # Pre-training reads shards 0-6 of 8; shard 7 is the held-out eval shard.
    names = [f"shard-{i:05d}-of-00008.array_record" for i in range(8)]
    pattern = Path(pre.data.sources[0].path)
    assert pattern.parent == work / "shards" / "pretrain"
    assert [n for n in names if fnmatch(n, pattern.name)] == names[:7]
    assert Path(pre.data.eval_sources[0].path).name == names[7]
    smoke = _train_configs(stages_of(dry_run("--smoke", "--work-dir", str(work)).stdout))
    assert smoke["pretrain"].model.hidden == 64 and smoke["sft"].train.steps <= 10


def test_gpu_profile_trains_the_wider_model_with_the_same_chain(tmp_path):
    """``--profile gpu``: the same stages and data, configs/default_gpu (a wider model, larger
    batches, the CPU model's switches), which exports under the size limit in bfloat16."""
    from pianist_jax.artifacts import export

    work = tmp_path / "g"
    cpu = stages_of(dry_run("--work-dir", str(work)).stdout)
    gpu = stages_of(dry_run("--profile", "gpu", "--work-dir", str(work)).stdout)
    assert [s for s, _ in gpu] == [s for s, _ in cpu]
    cfgs, base = _train_configs(gpu), _train_configs(cpu)
    for name in ("pretrain", "sft"):
        got, ref = cfgs[name], base[name]
        assert got.model == load_config("configs/default_gpu/model.yaml").model
        assert got.model.hidden > ref.model.hidden and got.train.batch_size > ref.train.batch_size
        assert got.data == ref.data and got.train.output_dir == ref.train.output_dir
        for switch in ("note_conditioning", "value_embedding", "slot_logits", "sliding_window"):
            assert getattr(got.model, switch) == getattr(ref.model, switch)
    n = sum(math.prod(s) for s in export.param_shapes(cfgs["sft"].model).values())
    assert n * 2 <= MAX_BYTES < n * 4  # bfloat16 export
    out = dry_run("--profile", "gpu", "--stop-after", "pretrain").stdout
    assert "out/default-gpu/runs/pretrain" in out


def test_default_model_fits_the_size_limit():
    from pianist_jax.artifacts import export

    cfg = load_config("configs/default/model.yaml").model
    n = sum(math.prod(s) for s in export.param_shapes(cfg).values())
    assert n * 4 <= MAX_BYTES, f"{n} params: {n * 4 / 1e6:.1f} MB in float32"
    assert cfg.param_dtype == "float32"  # exported as stored: float32 weights


# --------------------------------------------------------------------------- pretrain_files


def _melody(path, seed, n=80, jitter=0):
    rng = np.random.default_rng(seed)
    pitches = rng.integers(40, 90, n)
    notes = []
    for i, p in enumerate(pitches):
        t = i * 240 + (int(rng.integers(-jitter, jitter + 1)) if jitter else 0)
        notes.append((max(t, 0), max(t, 0) + 200, int(p), 70))
    return save(path, [note_track(notes)])


@pytest.fixture
def fake_asap(tmp_path):
    """ASAP-shaped tree: A/P1 (train, 2 performances), B/P2 (validation), C/P3 (in no split);
    an extra corpus with a jittered copy of the validation score and an unrelated piece."""
    asap = tmp_path / "asap"
    rows = []
    for folder, seed, perfs in (
        ("A/P1", 1, ["X01", "Y02"]),
        ("B/P2", 2, ["Z03"]),
        ("C/P3", 3, ["W04"]),
    ):
        (asap / folder).mkdir(parents=True)
        _melody(asap / folder / "midi_score.mid", seed)
        for perf in perfs:
            _melody(asap / folder / f"{perf}.mid", seed, jitter=5)
            rows.append(
                {
                    "composer": folder[0],
                    "title": folder,
                    "folder": folder,
                    "midi_score": f"{folder}/midi_score.mid",
                    "midi_performance": f"{folder}/{perf}.mid",
                    "performance_annotations": "",
                    "midi_score_annotations": "",
                    "match_file": "",
                }
            )
    with open(asap / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train_folders": ["A/P1"], "val_folders": ["B/P2"]}))
    extra = tmp_path / "extra"
    (extra / "sub").mkdir(parents=True)
    _melody(extra / "copy_of_val.mid", 2, jitter=8)
    _melody(extra / "sub" / "unrelated.mid", 4)
    _melody(extra / "copy_of_train.mid", 1)
    return asap, split, extra


def test_pretrain_files_leave_out_validation_pieces(fake_asap, tmp_path):
    asap, split, extra = fake_asap
    out = tmp_path / "lists"
    assert (
        pretrain_files.main(
            [
                "--split",
                str(split),
                "--asap",
                str(asap),
                "--corpus",
                f"extra={extra}",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    listed = {
        name: [
            line
            for line in (out / f"{name}.txt").read_text().splitlines()
            if not line.startswith("#")
        ]
        for name in ("asap", "extra")
    }
    assert listed["asap"] == [str(asap / "A/P1/X01.mid"), str(asap / "A/P1/Y02.mid")]
    assert listed["extra"] == [str(extra / "copy_of_train.mid"), str(extra / "sub/unrelated.mid")]
    excluded = [json.loads(line) for line in (out / "excluded.jsonl").read_text().splitlines()]
    reasons = {Path(e["path"]).name: e["reason"] for e in excluded}
    assert reasons == {
        "Z03.mid": "validation piece",
        "W04.mid": "not in split",
        "copy_of_val.mid": "overlaps validation",
    }
    hit = next(e for e in excluded if e["reason"] == "overlaps validation")
    assert hit["matches"] == "B/P2" and hit["overlap"] > 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == {"asap": 2, "extra": 2}
    # tokenize reads the lists as they are written
    from data_prep.sources import collect_sources

    srcs = collect_sources([], [f"{out}/asap.txt:asap", f"{out}/extra.txt:extra"])
    assert sorted(Path(s.path).name for s in srcs) == [
        "X01.mid",
        "Y02.mid",
        "copy_of_train.mid",
        "unrelated.mid",
    ]
    assert {s.kind for s in srcs} == {"performance"}


def test_pretrain_files_options(fake_asap, tmp_path):
    asap, split, extra = fake_asap
    lists, _, summary = pretrain_files.build_lists(
        split, asap, {"extra": extra}, limit=1, check_overlap=False, include_scores=True
    )
    assert [p.name for p in lists["asap"]] == ["X01.mid"] and len(lists["extra"]) == 1
    assert not summary["overlap"]["checked"]
    full, _, _ = pretrain_files.build_lists(split, asap, {}, include_scores=True)
    assert str(asap / "A/P1/midi_score.mid") in map(str, full["asap"])
    assert str(asap / "B/P2/midi_score.mid") not in map(str, full["asap"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_folders": ["B/P2"], "val_folders": ["B/P2"]}))
    with pytest.raises(SystemExit):
        pretrain_files.build_lists(bad, asap, {})


def test_pretrain_files_catch_giantmidi_copies_of_validation_pieces(shared_data):
    """Real data: GiantMIDI's sequenced scores of validation pieces are found by content."""
    from data_prep.build_sft import make_split, read_metadata

    asap = shared_data / "asap"
    split = make_split(read_metadata(asap), 0.05, 0)
    refs = pretrain_files.val_references(asap, split)
    gt = sorted((shared_data / "unlabeled" / "giantmidi" / "ground_truth").glob("*.mid"))
    hits = {p.name: pretrain_files.best_overlap(p, refs) for p in gt}
    flagged = {n: h for n, h in hits.items() if h[0] > pretrain_files.DEFAULT_THRESHOLD}
    if "Beethoven/Piano_Sonatas/16-1" in split["val_folders"]:
        assert "beethoven_sonata_no_16_hisamori_cut_mov_1.mid" in flagged
    # everything else stays well below the threshold
    rest = [h[0] for n, h in hits.items() if n not in flagged]
    assert max(rest) < 0.2


# --------------------------------------------------------------------------- model card


def _prediction(js):
    dims = {
        d: {"js": js + i / 100, "intersection": 1 - js}
        for i, d in enumerate(("velocity", "duration", "ioi", "pedal"))
    }
    dims["overall"] = {
        "js": float(np.mean([v["js"] for v in dims.values()])),
        "intersection": 1 - js,
    }
    return dims


def _synthetic_work(work: Path):
    def put(rel, obj):
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))

    put(
        "sft_data/summary.json",
        {
            "performances": 10,
            "aligned": 9,
            "quarantined": 1,
            "records": {"train": 20, "val": 3},
            "tokens": 5000,
        },
    )
    put(
        "sft_data/split.json",
        {
            "seed": 0,
            "val_fraction": 0.05,
            "unit": "composer/title",
            "val_pieces": ["B/P2"],
            "train_pieces": ["A/P1", "C/P3"],
        },
    )
    put(
        "pretrain_files/summary.json",
        {
            "files": {"asap": 2, "pop909": 5},
            "excluded": {"asap": {"validation piece": 1}},
            "overlap": {"threshold": 0.3},
            "limit": None,
        },
    )
    put(
        "shards/pretrain/manifest.json",
        {
            "num_shards": 8,
            "totals": {"files": 7, "notes": 700, "tokens": 5600},
            "corpora": {
                "asap": {"files": 2, "notes": 200, "tokens": 1600},
                "pop909": {"files": 5, "notes": 500, "tokens": 4000},
            },
        },
    )
    for name, steps, batch, block in (("pretrain", 10, 8, 1024), ("sft", 5, 4, 4096)):
        put(
            f"runs/{name}/config.yaml",
            yaml.safe_dump(
                {
                    "name": f"default-{name}",
                    "data": {"kind": name, "block_size": block, "sources": [{"path": "x"}]},
                    "train": {"steps": steps, "batch_size": batch, "lr": 1e-3, "seed": 0},
                }
            ),
        )
        lines = [{"step": s, "split": "train", "loss": 5.0 - s / 10} for s in range(1, steps + 1)]
        lines.append({"step": steps, "split": "eval", "loss": 4.0, "accuracy": 0.25})
        put(f"runs/{name}/metrics.jsonl", "".join(json.dumps(m) + "\n" for m in lines))
    put(
        "export/model.yaml",
        yaml.safe_dump({"hidden": 128, "encoder_layers": 4, "decoder_layers": 2}),
    )
    put(
        "export/export.json",
        {
            "format": "pianist-jax-export/1",
            "num_params": 2972800,
            "dtype": "float32",
            "tokenizer_version": "t/1",
            "source": {"step": 5},
        },
    )
    put("export/model.safetensors", "x" * 1000)
    common = {"pieces": ["B_P2"], "n_pieces": 1, "n_human_performances": 3}

    def figures(v):
        return {
            k: v
            for k in ("velocity_r", "tempo_r", "articulation_r", "pedal_agreement", "pedal_down")
        }

    for seed, js in ((0, 0.20), (1, 0.22), (2, 0.24)):
        notes = {
            "prediction": figures(js),
            "deadpan": figures(0.05),
            "human_ceiling": figures(0.8),
            "human_pedal_down": 0.4,
            "n_pieces": 1,
            "n_ceiling_pieces": 1,
        }
        put(
            f"eval/metrics/seed{seed}/metrics.json",
            {**common, "prediction": _prediction(js), "notes": notes},
        )
    put(
        "eval/metrics/deadpan/metrics.json",
        {
            **common,
            "prediction": _prediction(0.5),
            "human_baseline": {"scores": _prediction(0.1), "n_pieces": 1},
        },
    )
    for stage, secs in (("data-sft", 400.0), ("pretrain", 1800.0), ("sft", 1200.0)):
        model_card.record_time(work / "times.json", stage, secs)


def test_model_card_fields(tmp_path):
    work = tmp_path / "work"
    _synthetic_work(work)
    card = model_card.write_card(
        work, work / "export", [0, 1, 2], command="launch/x --smoke", smoke=True
    )
    assert json.loads((work / "export" / "card.json").read_text()) == card
    tr = card["training"]
    assert tr["pretrain"]["tokens_seen"] == 10 * 8 * 1024
    assert tr["sft"]["tokens_seen"] == 5 * 4 * 4096
    assert tr["tokens_seen_total"] == 10 * 8 * 1024 + 5 * 4 * 4096
    assert tr["pretrain"]["eval"] == {"step": 10, "loss": 4.0, "accuracy": 0.25}
    sft_losses = [5 - s / 10 for s in range(1, 6)]
    assert tr["sft"]["train_loss_last50"] == pytest.approx(np.mean(sft_losses))
    ev = card["evaluation"]
    overall = ev["model"]["overall"]["js"]
    per_seed = [_prediction(js)["overall"]["js"] for js in (0.20, 0.22, 0.24)]
    assert overall["mean"] == pytest.approx(np.mean(per_seed))
    assert overall["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert (overall["n"], ev["seeds"]) == (3, [0, 1, 2])
    assert ev["deadpan"]["overall"]["js"] == pytest.approx(_prediction(0.5)["overall"]["js"])
    assert ev["human"]["velocity"]["js"] == pytest.approx(0.1)
    assert ev["meets_target"] is False  # 0.235 > 0.20
    notes = ev["notes"]
    assert notes["model"]["velocity_r"]["mean"] == pytest.approx(0.22)
    assert notes["deadpan"]["tempo_r"] == 0.05 and notes["human"]["pedal_down"] == 0.4
    assert card["model"]["num_params"] == 2972800 and card["model"]["weights_bytes"] == 1000
    assert card["data"]["pretrain_shards"]["corpora"]["pop909"]["tokens"] == 4000
    assert card["data"]["split"]["val_pieces"] == ["B/P2"]
    assert card["wall_time"]["total_seconds"] == pytest.approx(3400.0)
    assert card["smoke"] and card["command"] == "launch/x --smoke" and card["date"]
    assert set(card["git"]) == {"commit", "dirty"}
    md = (work / "export" / "MODEL_CARD.md").read_text()
    for text in (
        "Smoke run",
        "| deadpan score |",
        "| this model |",
        "| human vs human |",
        "| seed 2 |",
        "| pretrain | 10 | 8 x 1024 | 81,920 |",
        "0:56:40",
        "met",
        "B/P2",
        "| pop909 | 5 |",
        "| velocity r |",
        "| human vs other humans | 0.800",
    ):
        assert text in md, text


def test_model_card_partial_run(tmp_path):
    """A card for a run that stopped early: missing inputs are null, nothing raises."""
    card = model_card.write_card(tmp_path / "w", tmp_path / "w" / "export", [0])
    assert card["evaluation"]["model"] is None and card["training"]["pretrain"] is None
    assert "pianist-jax default model" in (tmp_path / "w" / "export" / "MODEL_CARD.md").read_text()


def test_record_time(tmp_path):
    path = tmp_path / "times.json"
    model_card.record_time(path, "a", 10.0)
    model_card.record_time(path, "b", 3.0, "failed")
    model_card.record_time(path, "b", 4.0, "failed")
    t = model_card.record_time(path, "b", 20.0)
    assert t["stages"]["b"]["seconds"] == 20.0
    assert t["stages"]["b"]["earlier_attempts_seconds"] == 7.0
    t = model_card.record_time(path, "a", 0.0, "skipped")
    assert t["stages"]["a"]["seconds"] == 10.0 and t["total_seconds"] == 30.0
    assert list(t["stages"]) == ["a", "b"]
    assert model_card.main(["record-time", str(path), "c", "1.5"]) == 0
    assert json.loads(path.read_text())["total_seconds"] == 31.5


# --------------------------------------------------------------------------- example score


def test_example_score():
    from pianist_jax import midi

    notes = midi.read_midi(EXAMPLE)
    assert len(notes.pitch) == 136
    assert 36 <= notes.pitch.min() and notes.pitch.max() <= 96
    assert not len(notes.pedal_value)  # pedalling is the model's job
    mf = mido.MidiFile(str(EXAMPLE))
    meta = {m.type: m for m in mf.tracks[0] if m.is_meta}
    assert (meta["time_signature"].numerator, meta["time_signature"].denominator) == (3, 4)
    assert round(mido.tempo2bpm(meta["set_tempo"].tempo)) == 108
    hands = [sum(m.type == "note_on" and m.velocity > 0 for m in t) for t in mf.tracks[1:]]
    assert hands == [46, 90]  # right hand, left hand
    last_tick = max(sum(m.time for m in t) for t in mf.tracks)
    assert 15 * 3 * mf.ticks_per_beat < last_tick <= 16 * 3 * mf.ticks_per_beat  # 16 bars of 3/4


def test_example_score_is_reproducible(tmp_path):
    script = EXAMPLE.with_name("make_example.py")
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "x.mid")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert (tmp_path / "x.mid").read_bytes() == EXAMPLE.read_bytes()


# --------------------------------------------------------------------------- bundled model

DEFAULT_MODEL = REPO / "pianist_jax" / "assets" / "default"


def check_renders_example(model_dir, out_path):
    """Render the example score with `model_dir` (None: the bundled default) and check that the
    output has exactly the score's notes and some expression."""
    from pianist_jax import midi
    from pianist_jax.render import cli

    argv = [str(EXAMPLE), "-o", str(out_path), "--no-progress"]
    assert cli.main(argv + (["--model", str(model_dir)] if model_dir else [])) == 0
    score, perf = midi.read_midi(EXAMPLE), midi.read_midi(out_path)
    assert len(perf.pitch) == len(score.pitch)
    assert sorted(perf.pitch.tolist()) == sorted(score.pitch.tolist())
    assert len(np.unique(perf.velocity)) > 4  # dynamics beyond the score's few levels
    assert not np.array_equal(np.sort(perf.onset), np.sort(score.onset))  # timing moved
    return perf


@pytest.mark.slow  # ~25 s on 2 cores: compiling the renderer's window function dominates
@pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.safetensors").is_file(),
    reason="no bundled model in pianist_jax/assets/default yet",
)
def test_bundled_model_renders_the_example(tmp_path):
    from pianist_jax.artifacts import export

    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert size <= MAX_BYTES
    assert (DEFAULT_MODEL / "MODEL_CARD.md").is_file()
    card = json.loads((DEFAULT_MODEL / "card.json").read_text())
    assert not card["smoke"]
    export.read_export(DEFAULT_MODEL)  # format and tokenizer version
    perf = check_renders_example(None, tmp_path / "waltz.mid")
    assert (perf.pedal_value >= 64).any()  # a waltz gets sustain pedal (CC64)
    assert card["evaluation"]["model"]["overall"]["js"]["mean"] <= 0.30  # well below deadpan


@pytest.mark.slow  # ~40 s: builds a wheel (offline, no build isolation), renders from it
def test_wheel_renders_and_resolves_configs_outside_the_repository(tmp_path):
    """A wheel in a fresh virtual environment (its dependencies borrowed from this one, not
    the checkout) renders the example with the bundled model and resolves the shipped configs
    and presets by name, run from a directory outside the repository."""
    import site
    import sysconfig
    import zipfile

    def run(cmd, **kw):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)
        assert res.returncode == 0, " ".join(map(str, cmd)) + "\n" + res.stdout + res.stderr
        return res

    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("pianist_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pianist_jax/assets/examples/little_waltz.mid" in names
    assert "pianist_jax/configs/pretrain.yaml" in names
    assert "pianist_jax/configs/model/tiny.yaml" in names
    bundled = {
        f"pianist_jax/assets/default/{p.name}" for p in DEFAULT_MODEL.glob("*") if p.is_file()
    }
    assert bundled <= names, sorted(bundled - names)

    env_dir = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / "bin" / "python"
    purelib = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    # this environment's packages, but not its editable pianist_jax (a path line in a .pth
    # file does not run the .pth files of the directory it adds)
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (purelib / "borrowed.pth").write_text("\n".join(sorted(ours)) + "\n")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(
        [str(python), "-c", "import pianist_jax; print(pianist_jax.__file__)"], cwd=elsewhere
    ).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    example = purelib / "pianist_jax" / "assets" / "examples" / "little_waltz.mid"
    run(
        [
            str(python),
            "-m",
            "pianist_jax.render",
            str(example),
            "-o",
            "x.mid",
            "--no-progress",
            "--compilation-cache",
            "",
        ],
        cwd=elsewhere,
    )
    assert (elsewhere / "x.mid").stat().st_size > 0
    shown = run(
        [
            str(python),
            "-m",
            "pianist_jax.train",
            "--config",
            "pretrain",
            "--print-config",
            "model=tiny",
        ],
        cwd=elsewhere,
    ).stdout
    assert "hidden: 64" in shown  # the tiny preset, found by name


# --------------------------------------------------------------------------- the stage runner

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python: model_card, -c and - snippets run for real; every other command is
# recorded in $CALLS and fakes its outputs. FAIL=<module> fails it, PREEMPT=1 fakes a trainer
# stopped by a signal (exit 0, "(preempted)" in its log); --print-config prints $CONFIG.
case "$1" in -c | -) exec "$REAL_PY" "$@" ;; esac
[[ "$2" == pianist_jax.artifacts.model_card ]] && exec "$REAL_PY" "$@"
[[ " $* " == *" --print-config "* ]] && { cat "$CONFIG"; exit 0; }
module="$2"; shift 2
echo "$module $*" >> "$CALLS"
prev=""
for a in "$@"; do
  case "$prev:$a" in
    --out:* | --out-dir:* | --output:*) out="$a" ;;
  esac
  case "$a" in train.output_dir=*) out="${a#train.output_dir=}" ;; esac
  prev="$a"
done
case "$module" in
  data_prep.build_sft)
    mkdir -p "$out"; echo '{"records": {"train": 3, "val": 1}}' > "$out/summary.json"
    printf '# asap_root\t/x\nA/midi_score.mid\tA/p.mid\nB/midi_score.mid\tB/q.mid\n' \
      > "$out/val_pieces.txt" ;;
  pianist_jax.train)
    mkdir -p "$out"; echo run >> "$out/attempts"
    [[ "${PREEMPT:-}" == 1 ]] && echo "done: steps 0 -> 3 (preempted), last loss 1" ;;
  pianist_jax.export)
    mkdir -p "$2"; head -c "${EXPORT_BYTES:-1000}" /dev/zero > "$2/model.safetensors" ;;
  *) [[ -n "${out:-}" ]] && mkdir -p "$out" ;;
esac
[[ "${FAIL:-}" == "$module" ]] && { echo "failing $module" >&2; exit 1; }
exit 0
"""


@pytest.fixture
def fake_run(tmp_path):
    data = tmp_path / "data"
    for d in ("asap", "unlabeled/pop909", "unlabeled/giantmidi"):
        (data / d).mkdir(parents=True)
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    work, calls, config = tmp_path / "work", tmp_path / "calls", tmp_path / "config.yaml"
    config.write_text("model: {hidden: 128}\n")

    def run(*args, env=None, check=True):
        calls.unlink(missing_ok=True)
        res = subprocess.run(
            ["bash", str(SCRIPT), "--work-dir", str(work), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "DATA": str(data),
                "PYTHON": str(fake),
                "REAL_PY": sys.executable,
                "CALLS": str(calls),
                "CONFIG": str(config),
                **(env or {}),
            },
        )
        if check:
            assert res.returncode == 0, res.stdout + res.stderr
        lines = calls.read_text().splitlines() if calls.exists() else []
        return res, [line.split()[0] for line in lines], lines

    return run, work


def test_stage_runner_skips_resumes_and_redoes(fake_run):
    run, work = fake_run
    _, modules, _ = run("--eval-seeds", "0")
    assert modules == [
        "data_prep.build_sft",
        "data_prep.pretrain_files",
        "data_prep.tokenize",
        "pianist_jax.train",
        "pianist_jax.train",
        "pianist_jax.export",
        "pianist_jax.evaluate.eval_set",
        "pianist_jax.evaluate.choose_decoding",
        "pianist_jax.render",
        "pianist_jax.evaluate",
        "pianist_jax.evaluate",
    ]
    times = json.loads((work / "times.json").read_text())
    assert list(times["stages"])[:3] == ["data-sft", "pretrain-files", "tokenize"]
    assert all(e["status"] == "ran" for e in times["stages"].values())
    assert (work / "export" / "MODEL_CARD.md").is_file() and (work / "logs" / "sft.log").is_file()
    # everything done: nothing runs again
    res, modules, _ = run("--eval-seeds", "0", "--stop-after", "sft")
    assert modules == [] and "skipped" in res.stdout
    # new fine-tuning steps: sft starts over (empty run dir) and everything after it is redone
    _, modules, lines = run("--eval-seeds", "0", "--sft-steps", "7", "--stop-after", "eval-set")
    assert modules == ["pianist_jax.train", "pianist_jax.export", "pianist_jax.evaluate.eval_set"]
    assert "train.steps=7" in lines[0]
    assert (work / "runs" / "sft" / "attempts").read_text() == "run\n"
    assert (work / "runs" / "pretrain" / "attempts").read_text() == "run\n"
    # an edited config file (the same command) redoes both trainings
    (work.parent / "config.yaml").write_text("model: {hidden: 96}\n")
    _, modules, _ = run("--eval-seeds", "0", "--sft-steps", "7", "--stop-after", "sft")
    assert modules == ["pianist_jax.train", "pianist_jax.train"]


def test_stage_runner_failure_and_preemption(fake_run):
    run, work = fake_run
    res, modules, _ = run(
        "--stop-after", "pretrain", env={"FAIL": "pianist_jax.train"}, check=False
    )
    assert res.returncode == 1 and modules[-1] == "pianist_jax.train"
    assert json.loads((work / "times.json").read_text())["stages"]["pretrain"]["status"] == "failed"
    # a signal-stopped trainer exits 0 but the stage is not done ...
    res, modules, _ = run("--stop-after", "pretrain", env={"PREEMPT": "1"}, check=False)
    assert res.returncode == 1 and modules == ["pianist_jax.train"]
    # ... and the rerun resumes in the same run directory (not wiped)
    _, modules, _ = run("--stop-after", "pretrain")
    assert modules == ["pianist_jax.train"]
    assert (work / "runs" / "pretrain" / "attempts").read_text() == "run\n" * 3
    t = json.loads((work / "times.json").read_text())["stages"]["pretrain"]
    assert t["status"] == "ran" and t["earlier_attempts_seconds"] >= 0


def test_stage_runner_export_size_and_eval_subset(fake_run):
    run, work = fake_run
    res, _, lines = run("--stop-after", "export", env={"EXPORT_BYTES": "40000000"}, check=False)
    # float32 over the limit: exported again as bfloat16 (the fake stays too big: refused)
    exports = [line for line in lines if line.startswith("pianist_jax.export")]
    assert [e.split()[-1] for e in exports] == ["float32", "bfloat16"]
    assert res.returncode == 1 and "exceeds" in res.stdout + res.stderr
    _, _, lines = run("--eval-pieces", "1", "--eval-seeds", "4", "--stop-after", "render")
    assert (work / "eval_pieces.txt").read_text().splitlines()[1:] == ["A/midi_score.mid\tA/p.mid"]
    assert lines[-1].startswith("pianist_jax.render") and "--seed 4" in lines[-1]


def test_stage_runner_no_pretrain_with_existing_sft_data(fake_run, tmp_path):
    """The ablation: fine-tune from random parameters on another run's SFT data."""
    run, work = fake_run
    sft_data = tmp_path / "other" / "sft_data"
    sft_data.mkdir(parents=True)
    (sft_data / "summary.json").write_text('{"records": {"train": 3, "val": 1}}')
    (sft_data / "val_pieces.txt").write_text("# asap_root\t/x\nA/midi_score.mid\tA/p.mid\n")
    res, modules, lines = run("--no-pretrain", "--sft-data", str(sft_data), "--eval-seeds", "0")
    assert modules == [
        "pianist_jax.train",
        "pianist_jax.export",
        "pianist_jax.evaluate.eval_set",
        "pianist_jax.evaluate.choose_decoding",
        "pianist_jax.render",
        "pianist_jax.evaluate",
        "pianist_jax.evaluate",
    ]
    assert "train.init_from=null" in lines[0]
    assert (work / "sft_data").resolve() == sft_data.resolve()
    stages = json.loads((work / "times.json").read_text())["stages"]
    assert [
        stages[k]["status"] for k in ("data-sft", "pretrain-files", "tokenize", "pretrain")
    ] == ["skipped"] * 4
    # not a build_sft output: refused before anything runs
    res, modules, _ = run("--sft-data", str(tmp_path), check=False)
    assert res.returncode == 2 and modules == [] and "summary.json" in res.stderr
