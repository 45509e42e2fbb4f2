"""Decoding settings: temperature and top-p per token slot (IOI, velocity, duration, pedal),
and the loudness contrast the rendered velocities are scaled by.

The paper samples every slot at temperature 1.0 and top-p 0.95. One setting for all slots is a
poor fit: top-p 0.95 on the pedal's near-binary choice removes a lift whenever the model gives
it under 5%, so a pedal once down tends to stay down. An exported model may therefore carry
its own defaults, chosen on validation pieces, in ``decoding.json`` next to its weights:

    {"temperature": {"ioi": 1.0, "velocity": 0.0, "duration": 1.0, "pedal": 1.0},
     "top_p": {"ioi": 0.95, "velocity": 0.95, "duration": 0.95, "pedal": 1.0},
     "dynamics": 1.75, "chosen_by": "..."}

``dynamics`` (default 1.0) is `render --dynamics`'s default for the model. A model's most
likely velocity per note (temperature 0) follows the score best, but it is a mode-seeking
choice with a narrower spread than any pianist's; scaling each piece's velocities around their
mean restores the contrast without moving any note relative to another.

Command-line values override them: a number for every slot (``--top-p 0.9``) or
``kind=value`` pairs for some (``--top-p pedal=1.0,velocity=0.9``); ``--dynamics X``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pianist_jax.render.controls import RANGES
from pianist_jax.tokenizer import SLOT_KIND

KINDS = ("ioi", "velocity", "duration", "pedal")
PAPER = {"temperature": dict.fromkeys(KINDS, 1.0), "top_p": dict.fromkeys(KINDS, 0.95)}
FILE = "decoding.json"


class DecodingError(ValueError):
    """A bad setting (value out of range, unknown slot kind): one line for the user."""


def check(settings: dict) -> dict:
    """``{"temperature": {kind: v}, "top_p": {kind: v}, "dynamics": d}`` with every kind,
    values in range."""
    dynamics, (lo, hi) = settings.get("dynamics", 1.0), RANGES["dynamics"]
    if not isinstance(dynamics, (int, float)) or not lo <= dynamics <= hi:
        raise DecodingError(f"dynamics must be a number in [{lo}, {hi}], got {dynamics!r}")
    out = {"dynamics": float(dynamics)}
    for name, lo_ok in (("temperature", lambda v: v >= 0), ("top_p", lambda v: 0 < v <= 1)):
        values = settings.get(name, {})
        if not isinstance(values, dict):
            raise DecodingError(f"{name}: expected {{kind: value}}, got {values!r}")
        if unknown := set(values) - set(KINDS):
            raise DecodingError(
                f"{name}: unknown slot kind(s) {sorted(unknown)}; kinds are {', '.join(KINDS)}"
            )
        merged = {**PAPER[name], **{k: float(v) for k, v in values.items()}}
        for kind, v in merged.items():
            if not lo_ok(v):
                raise DecodingError(
                    f"{name} for {kind} must be "
                    f"{'>= 0' if name == 'temperature' else 'in (0, 1]'}, "
                    f"got {v}"
                )
        out[name] = merged
    return out


def load(model_dir: Path) -> dict:
    """The model's defaults (``decoding.json``), else the paper's."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return check({})
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DecodingError(f"{path}: unreadable: {err}") from err
    return {**check(data), "chosen_by": data.get("chosen_by")}


def save(model_dir: Path, settings: dict, chosen_by: str) -> Path:
    path = Path(model_dir) / FILE
    path.write_text(json.dumps({**check(settings), "chosen_by": chosen_by}, indent=1) + "\n")
    return path


def parse(text: str | None) -> dict[str, float]:
    """A command-line value: ``"0.9"`` (every kind) or ``"pedal=1,velocity=0.9"``."""
    if text is None:
        return {}
    try:
        if "=" not in text:
            return dict.fromkeys(KINDS, float(text))
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError as err:
        raise DecodingError(
            f"cannot read {text!r}: give a number or kind=value pairs (kinds: {', '.join(KINDS)})"
        ) from err


def override(
    defaults: dict,
    temperature: dict | None = None,
    top_p: dict | None = None,
    dynamics: float | None = None,
) -> dict:
    """Defaults with some kinds (and the dynamics, unless None) replaced (checked)."""
    return check(
        {
            "temperature": {**defaults["temperature"], **(temperature or {})},
            "top_p": {**defaults["top_p"], **(top_p or {})},
            "dynamics": defaults.get("dynamics", 1.0) if dynamics is None else dynamics,
        }
    )


def per_slot(values: dict[str, float]) -> np.ndarray:
    """``{kind: value}`` -> float32 ``[8]`` by token slot (the pitch slot gets 1.0, unused)."""
    return np.array([1.0 if k is None else values[k] for k in SLOT_KIND], np.float32)


def describe(settings: dict) -> str:
    text = "; ".join(
        f"{name} " + ", ".join(f"{k} {settings[name][k]:g}" for k in KINDS)
        for name in ("temperature", "top_p")
    )
    dynamics = settings.get("dynamics", 1.0)
    return text if dynamics == 1 else f"{text}; dynamics {dynamics:g}"
