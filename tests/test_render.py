"""Renderer: exact to the score's notes, deterministic per seed, batch == one by one, greedy
decoding equal to the full model, seamless windows, and one-line errors for bad input.

A tiny random model is exported once; windows of 128 notes (shift 64) keep compiles short
while a 400-note score still spans 6 windows (the logic is the same as for 512/256).
"""

import dataclasses
import hashlib
import shutil

import jax
import jax.numpy as jnp
import mido
import numpy as np
import pytest
from flax import nnx

from pianist_jax import midi, tokenizer
from pianist_jax.artifacts import export
from pianist_jax.config import load_config
from pianist_jax.midi import tempo_map
from pianist_jax.model import PianistTransformer
from pianist_jax.render import cli, decoding
from pianist_jax.render import core as render_core
from pianist_jax.render import renderer as render
from pianist_jax.tokenizer import (
    BOS,
    RENDER_RANGES,
    SLOT_RANGES,
    VELOCITY,
    VELOCITY_START,
)

WINDOW, SHIFT = 128, 64


def export_tiny_model(out):
    """A random tiny model exported to `out`: (its directory, the model)."""
    cfg = load_config(None, ["model=tiny"]).model
    model = PianistTransformer(cfg, rngs=nnx.Rngs(3))
    export.write_export(out, nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    return out, model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def make_score(path, n_notes: int, seed: int = 0):
    """A score with chords, repeated notes and a pedal, written as ms-timed MIDI."""
    rng = np.random.default_rng(seed)
    step = rng.choice([0, 0, 125, 250, 500], size=n_notes)
    step[0] = 0
    onset = np.cumsum(step)
    pitch = rng.integers(40, 90, size=n_notes)
    onset, pitch = np.array(onset), np.array(pitch)
    notes = midi.Notes(
        onset=onset,
        offset=onset + 200,
        pitch=pitch,
        velocity=np.full(n_notes, 64),
        pedal_ms=np.array([0, 1000]),
        pedal_value=np.array([127, 0]),
    )
    midi.write_midi(notes, path)
    return path


def run_cli(tiny_model, *args):
    return cli.main(
        [
            *map(str, args),
            "--model",
            str(tiny_model[0]),
            "--no-progress",
            "--window-notes",
            str(WINDOW),
            "--shift-notes",
            str(SHIFT),
        ]
    )


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_windows_cover_every_note_once():
    for n in (1, 100, 512, 513, 3000):
        plan = render.plan_windows(n, 512, 256)
        owner = np.full(n, -1)
        for i, w in enumerate(plan):
            owner[w.start + w.prime : min(n, w.start + w.size)] = i
        assert (owner >= 0).all()
        assert all(w.prime == 154 for w in plan[1:])  # 256 overlap - 102 unstable tail
        assert plan[-1].start + plan[-1].size >= n


@pytest.mark.parametrize(
    "switch", ["plain", "note_conditioning", "unread_inputs", "value_embedding"]
)
def test_greedy_window_equals_full_forward(tiny_model, switch):
    """Every sampled slot of a greedy (temperature 0) window, primed and with padded rows, is
    the argmax of the full model over that slot's valid range, fed the rendered tokens."""
    _, model = tiny_model
    if switch != "plain":
        value = ("velocity", "pedal") if switch == "unread_inputs" else True
        cfg = dataclasses.replace(model.cfg, **{switch: value})
        model = PianistTransformer(cfg, rngs=nnx.Rngs(3))
        if switch == "value_embedding":  # it starts at zero: give it weight
            proj = model.decoder.value_proj
            proj[...] = jax.random.normal(jax.random.key(4), proj.shape)
    gd, params = nnx.split(model)
    rng = np.random.default_rng(0)
    b, notes, prime = 2, 128, 38
    enc = np.stack(
        [
            np.stack([rng.integers(lo, hi, notes) for lo, hi in SLOT_RANGES], 1).reshape(-1)
            for _ in range(b)
        ]
    ).astype(np.int32)
    n_notes = np.array([notes, 100], np.int32)
    enc[1, 8 * 100 :] = 0
    primed = np.stack(
        [
            np.stack([rng.integers(lo, hi, prime) for lo, hi in SLOT_RANGES], 1).reshape(-1)
            for _ in range(b)
        ]
    ).astype(np.int32)
    fn = jax.jit(render_core.make_window_fn(gd, notes, prime))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(b))
    out = np.asarray(
        fn(
            params,
            enc,
            primed,
            n_notes,
            keys,
            jnp.zeros(b, jnp.int32),
            jnp.zeros((b, 8)),
            jnp.full((b, 8), 0.95),
        )
    )
    dec_in = np.concatenate([np.full((b, 1), BOS), out[:, :-1]], 1)
    logits = np.asarray(model(jnp.asarray(enc), jnp.asarray(dec_in)))
    for r in range(b):
        np.testing.assert_array_equal(out[r, : 8 * prime], primed[r])
        for j in range(prime, n_notes[r]):
            assert out[r, 8 * j] == enc[r, 8 * j]
            for s in range(1, 8):
                lo, hi = RENDER_RANGES[s]
                assert out[r, 8 * j + s] == lo + np.argmax(logits[r, 8 * j + s, lo:hi])


def test_hot_sampling_never_draws_velocity_zero(tiny_model):
    """At a temperature that makes every velocity about equally likely, 1,024 draws cover the
    range but never velocity 0 (a MIDI note_off): the renderer samples `RENDER_RANGES`."""
    _, model = tiny_model
    gd, params = nnx.split(model)
    rng = np.random.default_rng(1)
    b, notes = 4, 256
    enc = np.stack(
        [
            np.stack([rng.integers(lo, hi, notes) for lo, hi in SLOT_RANGES], 1).reshape(-1)
            for _ in range(b)
        ]
    ).astype(np.int32)
    fn = jax.jit(render_core.make_window_fn(gd, notes, 0))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(b))
    out = np.asarray(
        fn(
            params,
            enc,
            np.zeros((b, 0), np.int32),
            np.full(b, notes, np.int32),
            keys,
            jnp.zeros(b, jnp.int32),
            jnp.full((b, 8), 50.0),
            jnp.ones((b, 8)),
        )
    )
    velocity = out.reshape(b, notes, 8)[:, :, VELOCITY] - VELOCITY_START
    assert velocity.min() >= 1 and len(np.unique(velocity)) > 100


def test_sample_respects_top_p_and_temperature():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    u = jax.random.uniform(jax.random.PRNGKey(0), (4000,))
    got = np.asarray(render_core.sample(logits, u, jnp.ones(4000), jnp.full(4000, 0.7)))
    counts = np.bincount(got, minlength=4) / 4000
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reaches 0.7: ids 2, 3 are cut
    assert abs(counts[0] - 0.5 / 0.8) < 0.03
    greedy = render_core.sample(logits[:2], u[:2], jnp.zeros(2), jnp.full(2, 0.7))
    assert list(np.asarray(greedy)) == [0, 0]


@pytest.mark.parametrize("n_notes", [37, 400])  # one window; 6 windows of 128 (shift 64)
def test_output_has_exactly_the_score_notes(tiny_model, tmp_path, n_notes):
    score = make_score(tmp_path / "score.mid", n_notes)
    out = tmp_path / "out.mid"
    assert run_cli(tiny_model, score, "-o", out, "--seed", "1") == 0
    want, got = midi.read_midi(score), midi.read_midi(out)
    assert len(got) == len(want) > 0.9 * n_notes  # (a random chord may repeat a pitch)
    np.testing.assert_array_equal(got.pitch, want.pitch)
    assert len(np.unique(got.velocity)) > 1  # random weights still sample varied velocities


def test_progress_bar_and_summary_line(tiny_model, tmp_path, capsys):
    """With the bar on (the default) the file is the same as without it; the bar's rate leaves
    compiling out, like the summary line."""
    score = make_score(tmp_path / "s.mid", 37)
    a, b = tmp_path / "a.mid", tmp_path / "b.mid"
    assert run_cli(tiny_model, score, "-o", a) == 0
    assert (
        cli.main(
            [
                str(score),
                "-o",
                str(b),
                "--model",
                str(tiny_model[0]),
                "--window-notes",
                str(WINDOW),
                "--shift-notes",
                str(SHIFT),
            ]
        )
        == 0
    )
    err, n = capsys.readouterr().err, len(midi.read_midi(score))
    assert digest(a) == digest(b)
    assert f"{n}/{n} notes" in err and "notes/s without compiling" in err
    assert err.rstrip().splitlines()[-1].startswith(f"rendered {n} notes in ")


def test_same_seed_same_bytes_and_greedy(tiny_model, tmp_path):
    score = make_score(tmp_path / "s.mid", 150)
    a, b, c = tmp_path / "a.mid", tmp_path / "b.mid", tmp_path / "c.mid"
    assert run_cli(tiny_model, score, "-o", a, "--seed", "7") == 0
    assert run_cli(tiny_model, score, "-o", b, "--seed", "7") == 0
    assert run_cli(tiny_model, score, "-o", c, "--seed", "8") == 0
    assert digest(a) == digest(b) != digest(c)
    g1, g2 = tmp_path / "g1.mid", tmp_path / "g2.mid"
    assert run_cli(tiny_model, score, "-o", g1, "--temperature", "0", "--seed", "1") == 0
    assert run_cli(tiny_model, score, "-o", g2, "--temperature", "0", "--seed", "2") == 0
    assert digest(g1) == digest(g2)  # greedy ignores the seed
    assert len(midi.read_midi(g1)) == len(midi.read_midi(score))


def test_batch_equals_one_by_one(tiny_model, tmp_path):
    scores = [make_score(tmp_path / f"p{i}.mid", n, seed=i) for i, n in enumerate((30, 200, 90))]
    batch_dir = tmp_path / "batch"
    batch_dir.mkdir()
    assert run_cli(tiny_model, *scores, "--out-dir", batch_dir, "--seed", "5") == 0
    for score in scores:
        single = tmp_path / f"single-{score.name}"
        assert run_cli(tiny_model, score, "-o", single, "--seed", "5") == 0
        assert digest(single) == digest(batch_dir / score.name)


def test_variants_and_tempo_map(tiny_model, tmp_path):
    score = make_score(tmp_path / "v.mid", 60)
    out = tmp_path / "v-out.mid"
    assert run_cli(tiny_model, score, "-o", out, "--variants", "2", "--tempo-map") == 0
    files = [tmp_path / "v-out-1.mid", tmp_path / "v-out-2.mid"]
    assert digest(files[0]) != digest(files[1])
    for f in files:
        mf = mido.MidiFile(f)
        assert any(m.type == "set_tempo" for m in mf.tracks[0])
        assert not any(m.type == "set_tempo" for t in mf.tracks[1:] for m in t)
        np.testing.assert_array_equal(midi.read_midi(f).pitch, midi.read_midi(score).pitch)


def _empty_midi(path):
    mf = mido.MidiFile()
    mf.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)]))
    mf.save(path)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "corrupt",
        "zero_bytes",
        "no_notes",
        "missing",
        "directory",
        "out_dir_missing",
        "model_missing",
    ],
)
def test_bad_input_one_line_no_traceback(tiny_model, tmp_path, capsys, case):
    good = make_score(tmp_path / "good.mid", 20)
    args = [good, "-o", tmp_path / "o.mid"]
    if case == "corrupt":
        (tmp_path / "bad.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage" * 3)
        args[0] = tmp_path / "bad.mid"
    elif case == "zero_bytes":
        (tmp_path / "empty.mid").write_bytes(b"")
        args[0] = tmp_path / "empty.mid"
    elif case == "no_notes":
        args[0] = _empty_midi(tmp_path / "nonotes.mid")
    elif case == "missing":
        args[0] = tmp_path / "nope.mid"
    elif case == "directory":
        args[0] = tmp_path
    elif case == "out_dir_missing":
        args[2] = tmp_path / "no" / "such" / "o.mid"
    if case == "model_missing":
        code = cli.main(
            [str(a) for a in args] + ["--model", str(tmp_path / "nomodel"), "--no-progress"]
        )
    else:
        code = run_cli(tiny_model, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not (tmp_path / "o.mid").exists()


def test_warnings_are_one_line_each(tmp_path, capsys, monkeypatch):
    """A warning during a render prints as one ``warning:`` line (no file:line, no source
    echo), and the caller's warning settings are back afterwards."""
    import warnings

    def fake_render(args):
        warnings.warn(
            "score.mid: 3 negative rendered times clamped to 0 ms", tempo_map.TempoMapWarning
        )
        return "rendered 0 notes", []

    monkeypatch.setattr(cli, "render_files", fake_render)
    before = warnings.showwarning
    assert cli.main([str(tmp_path / "score.mid"), "--compilation-cache", ""]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: score.mid: 3 negative rendered times clamped to 0 ms",
        "rendered 0 notes",
    ]
    assert warnings.showwarning is before


def test_decoding_keeps_score_structure(tiny_model):
    """decode_ids with the score keeps IOI >= 5 ms where the score has a gap (renderer path)."""
    score = np.array([60, 0, 64, 100, 0, 0, 0, 0, 64, 250, 64, 100, 0, 0, 0, 0]).reshape(2, 8)
    ids = (score + tokenizer._SLOT_OFFSET).reshape(-1)
    perf = ids.copy()
    perf[9] = tokenizer.TIME_START  # the model put the second note at IOI 0
    notes = tokenizer.decode_ids(perf, ids)
    assert notes.onset[1] - notes.onset[0] == tokenizer.MIN_RENDER_IOI_MS


def test_each_score_gets_its_own_random_stream():
    """The row key folds the seed with the score: the same score and seed give the same key,
    another score (one velocity changed) or another seed a different one."""
    ids = np.arange(80, dtype=np.int32) % 128 + VELOCITY_START
    other = ids.copy()
    other[2] += 1
    key = render.row_key(ids, 0)
    assert key.shape == (2,) and np.array_equal(key, render.row_key(ids.copy(), 0))
    assert not np.array_equal(key, render.row_key(other, 0))
    assert not np.array_equal(key, render.row_key(ids, 1))


def test_decoding_defaults_per_slot_and_overrides(tiny_model, tmp_path, capsys):
    """An export's decoding.json sets the defaults per slot kind; flags override them (a
    number for all kinds or kind=value pairs); bad values are one error line."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model[0], model_dir)
    score = make_score(tmp_path / "s.mid", 40)
    greedy = {"temperature": dict.fromkeys(decoding.KINDS, 0.0)}
    decoding.save(model_dir, greedy, chosen_by="test")
    outs = {}
    for name, flags in (
        ("default", []),
        ("all0", ["--temperature", "0"]),
        ("hot", ["--temperature", "1", "--seed", "3"]),
        ("vel", ["--temperature", "velocity=1", "--seed", "3"]),
    ):
        outs[name] = tmp_path / f"{name}.mid"
        assert (
            cli.main(
                [
                    str(score),
                    "-o",
                    str(outs[name]),
                    "--model",
                    str(model_dir),
                    "--no-progress",
                    *flags,
                ]
            )
            == 0
        )
    assert digest(outs["default"]) == digest(outs["all0"]) != digest(outs["hot"])
    assert digest(outs["vel"]) not in (digest(outs["default"]), digest(outs["hot"]))
    assert decoding.per_slot({"ioi": 1, "velocity": 2, "duration": 3, "pedal": 4}).tolist() == [
        1,
        1,
        2,
        3,
        4,
        4,
        4,
        4,
    ]
    assert decoding.parse("velocity=0.5, pedal=1") == {"velocity": 0.5, "pedal": 1.0}
    capsys.readouterr()
    assert (
        cli.main(
            [
                str(score),
                "-o",
                str(tmp_path / "x.mid"),
                "--model",
                str(model_dir),
                "--top-p",
                "pedl=0.5",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown slot kind" in err[0]
    with pytest.raises(decoding.DecodingError, match="top_p for pedal"):
        decoding.check({"top_p": {"pedal": 0}})
    with pytest.raises(decoding.DecodingError, match="dynamics must be"):
        decoding.check({"dynamics": 5})


def test_the_models_dynamics_default_and_its_override(tiny_model, tmp_path):
    """decoding.json's dynamics is --dynamics's default for that model; the flag overrides."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model[0], model_dir)
    score = make_score(tmp_path / "s.mid", 40)
    greedy = {"temperature": dict.fromkeys(decoding.KINDS, 0.0)}
    outs = {}
    for name, dynamics, flags in (
        ("plain", 1.0, []),
        ("model", 2.0, []),
        ("flag", 1.0, ["--dynamics", "2"]),
        ("back", 2.0, ["--dynamics", "1"]),
    ):
        decoding.save(model_dir, {**greedy, "dynamics": dynamics}, chosen_by="test")
        out = tmp_path / f"{name}.mid"
        assert run_cli((model_dir, None), score, "-o", out, *flags) == 0
        outs[name] = midi.read_midi(out)
    assert np.array_equal(outs["model"].velocity, outs["flag"].velocity)
    assert np.array_equal(outs["plain"].velocity, outs["back"].velocity)
    assert outs["model"].velocity.std() > 1.5 * outs["plain"].velocity.std()
    assert "dynamics 2" in decoding.describe(decoding.load(model_dir))
