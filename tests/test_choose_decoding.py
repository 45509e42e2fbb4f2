"""pianist_jax.evaluate.choose_decoding: a coordinate search over per-slot settings, judged
both ways."""

from __future__ import annotations

import json

import numpy as np
from flax import nnx

from pianist_jax import midi
from pianist_jax.artifacts import export
from pianist_jax.config import load_config
from pianist_jax.evaluate import choose_decoding
from pianist_jax.model import PianistTransformer
from pianist_jax.render import decoding


def _piece(path, n, seed, jitter):
    rng = np.random.default_rng(seed)
    onset = np.cumsum(rng.choice([0, 125, 250], n)) + (rng.integers(0, 40, n) if jitter else 0)
    onset = np.sort(onset)
    pitch = 48 + (np.arange(n) * 5) % 30
    notes = midi.Notes(
        onset=onset,
        offset=onset + 150,
        pitch=pitch,
        velocity=rng.integers(30, 100, n) if jitter else np.full(n, 64),
        pedal_ms=np.array([0, 500]),
        pedal_value=np.array([127, 0]),
    )
    midi.write_midi(notes, path)


def test_choose_writes_the_best_setting(tmp_path, monkeypatch):
    cfg = load_config(None, ["model=tiny"]).model
    model = PianistTransformer(cfg, rngs=nnx.Rngs(0))
    model_dir = tmp_path / "model"
    export.write_export(model_dir, nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    ev = tmp_path / "eval"
    for d in ("scores", "human"):
        (ev / d).mkdir(parents=True)
    _piece(ev / "scores" / "p.mid", 60, 0, jitter=False)
    for k in (1, 2):
        _piece(ev / "human" / f"p-{k}.mid", 60, k, jitter=True)
    candidates = (("pedal", ((1.0, 1.0, None),)), ("velocity", ((0.0, 1.0, 2.0),)))
    monkeypatch.setattr(choose_decoding, "CANDIDATES", candidates)
    assert choose_decoding.main([str(model_dir), str(ev), "--write", "--max-notes", "40"]) == 0
    choices = json.loads((ev / "decoding" / "choices.json").read_text())
    assert [t["label"] for t in choices["tried"]] == [
        "paper (1.0 / 0.95)",
        "pedal 1 / 1",
        "velocity 0 / 1, dynamics 2",
    ]
    best = max(choices["tried"], key=lambda t: t["objective"])
    saved = decoding.load(model_dir)
    assert saved["top_p"] == best["settings"]["top_p"] and "choose_decoding" in saved["chosen_by"]
    assert saved["dynamics"] == best["settings"]["dynamics"]
