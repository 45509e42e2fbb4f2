"""Params-only inference artifacts: what the renderer loads and what `convert_hf` writes.

Why a format of our own (not an Orbax checkpoint): a musician's laptop should load a model
with no optimiser state, no mesh and no Orbax, in one read. An export directory holds

    model.safetensors   flat ``encoder.layers.0.self_attn.q_proj`` -> array (fp32 or bf16)
    model.yaml          the ModelConfig (sizes, softcaps, ...)
    export.json         format version, tokenizer version, dtype, where it came from

Training checkpoints (`python -m pianist_jax.export`, `checkpoint_export`) and reference
checkpoints (`python -m pianist_jax.convert_hf`) both end up here, so the renderer and parity
checks have a single loading path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import jax
import ml_dtypes
import numpy as np
import yaml
from flax import nnx
from safetensors.numpy import load_file, save_file

from pianist_jax.config.schema import ModelConfig
from pianist_jax.model import PianistTransformer
from pianist_jax.model.params import flatten, unflatten
from pianist_jax.tokenizer import TOKENIZER_VERSION
from pianist_jax.train.sharding import abstract_model

FORMAT = "pianist-jax-export/1"
WEIGHTS, MODEL_CONFIG, INFO = "model.safetensors", "model.yaml", "export.json"
DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
    """An export directory is missing, incomplete or from an incompatible tokenizer/format."""


def write_export(
    out_dir: str | Path,
    params: Mapping,
    model_cfg: ModelConfig,
    *,
    dtype: str = "float32",
    source: dict | None = None,
) -> Path:
    """Write an export directory atomically (a temp dir renamed into place)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    flat = {
        k: np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype))
        for k, v in flatten(params).items()
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    save_file(flat, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    cfg = dataclasses.replace(model_cfg, param_dtype=dtype)
    (tmp / MODEL_CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    info = {
        "format": FORMAT,
        "tokenizer_version": TOKENIZER_VERSION,
        "dtype": dtype,
        "num_params": int(sum(a.size for a in flat.values())),
        "source": source or {},
    }
    (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def read_export(path: str | Path) -> tuple[ModelConfig, dict, dict]:
    """``(model config, params as a nested dict of numpy arrays, export.json)``."""
    path = Path(path)
    missing = [n for n in (WEIGHTS, MODEL_CONFIG, INFO) if not (path / n).is_file()]
    if missing:
        raise ExportError(f"{path}: not a pianist-jax export (missing {', '.join(missing)})")
    info = json.loads((path / INFO).read_text())
    if info.get("format") != FORMAT:
        raise ExportError(
            f"{path}: unknown export format {info.get('format')!r} (this version reads {FORMAT!r})"
        )
    if info.get("tokenizer_version") != TOKENIZER_VERSION:
        raise ExportError(
            f"{path}: exported with tokenizer {info.get('tokenizer_version')!r}, "
            f"this package uses {TOKENIZER_VERSION!r}"
        )
    raw = yaml.safe_load((path / MODEL_CONFIG).read_text())
    cfg = ModelConfig(**raw)
    return cfg, unflatten(load_file(str(path / WEIGHTS))), info


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat parameter name -> shape that a model with ``cfg`` expects (nothing allocated)."""
    _, state = abstract_model(cfg)
    return {k: tuple(v.shape) for k, v in flatten(nnx.to_pure_dict(state)).items()}


def shape_mismatches(params: Mapping, cfg: ModelConfig) -> list[str]:
    """Names missing, unexpected or of the wrong shape in ``params`` (nested dict) for ``cfg``."""
    expected = param_shapes(cfg)
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    return [
        f"{k}: {got.get(k, 'missing')} != {expected.get(k, 'unexpected')}"
        for k in sorted(set(expected) | set(got))
        if got.get(k) != expected.get(k)
    ]


def load_model(path: str | Path, dtype: str | None = None):
    """An NNX `PianistTransformer` with the exported params (compute in ``dtype``, default
    float32), on the default device. Checks every parameter's name and shape."""
    cfg, params, _ = read_export(path)
    cfg = dataclasses.replace(cfg, dtype=dtype or "float32")
    model = nnx.eval_shape(lambda: PianistTransformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    bad = shape_mismatches(params, cfg)
    if bad:
        raise ExportError(f"{path}: parameters do not match the model config: {bad[:8]}")
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    nnx.update(model, state)
    return model
