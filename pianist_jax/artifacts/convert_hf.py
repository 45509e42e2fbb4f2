"""Import a reference (Hugging Face layout) Pianist Transformer checkpoint, and write one back.

    python -m pianist_jax.convert_hf CHECKPOINT_DIR OUT_DIR [--dtype bfloat16]

The reference is a `transformers` T5Gemma model plus the 8-slot note-compression embedding:
``config.json`` (with ``encoder`` / ``decoder`` sub-configs) and ``model.safetensors``. PyTorch
``Linear`` weights are ``[out, in]``; ours are ``[in, ..., out]`` with named head axes, so each
tensor is transposed and reshaped here, and nowhere else. The output is the same export format
as `pianist_jax.export` (`pianist_jax.artifacts.export.load_model` reads both).

Unused tables that the reference file also carries (top-level ``embeddings.*``,
``model.encoder.embed_tokens``) are ignored; any other unknown tensor, a missing tensor, a shape
mismatch or an unsupported setting (e.g. another RMSNorm epsilon or activation) is an error
that names it, because a silently half-loaded model would render nonsense.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from pianist_jax.artifacts import export
from pianist_jax.config.schema import SLOTS_PER_NOTE, ModelConfig
from pianist_jax.model.layers import RMS_NORM_EPS

IGNORED = re.compile(r"^(embeddings\..*|model\.encoder\.embed_tokens\.weight|lm_head\.weight)$")
NORMS = {  # reference layer-norm name -> ours
    "pre_self_attn_layernorm": "pre_self_attn_norm",
    "post_self_attn_layernorm": "post_self_attn_norm",
    "pre_cross_attn_layernorm": "pre_cross_attn_norm",
    "post_cross_attn_layernorm": "post_cross_attn_norm",
    "pre_feedforward_layernorm": "pre_ffw_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


class ConversionError(ValueError):
    """The reference checkpoint does not match the architecture this package implements."""


def model_config_from_hf(config: dict) -> ModelConfig:
    """Our ModelConfig from a T5Gemma ``config.json`` (checks what we do not support)."""
    try:
        enc, dec = config["encoder"], config["decoder"]
    except KeyError as err:
        raise ConversionError(f"config.json has no {err.args[0]!r} sub-config") from None
    same = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "query_pre_attn_scalar",
        "rope_theta",
    )
    for key in same:
        if enc.get(key) != dec.get(key):
            raise ConversionError(
                f"encoder and decoder differ in {key}: {enc.get(key)} vs {dec.get(key)}"
            )
    for sub, name in ((enc, "encoder"), (dec, "decoder")):
        eps = sub.get("rms_norm_eps", RMS_NORM_EPS)
        if abs(eps - RMS_NORM_EPS) > 1e-12:
            raise ConversionError(f"{name}.rms_norm_eps={eps} (this model uses {RMS_NORM_EPS})")
        act = sub.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConversionError(f"{name}.hidden_activation={act!r} (needs gelu_pytorch_tanh)")
    vocab = config.get("vocab_size", enc.get("vocab_size"))
    return ModelConfig(
        vocab_size=int(vocab),
        hidden=int(enc["hidden_size"]),
        mlp=int(enc["intermediate_size"]),
        num_heads=int(enc["num_attention_heads"]),
        num_kv_heads=int(enc["num_key_value_heads"]),
        head_dim=int(enc["head_dim"]),
        encoder_layers=int(enc["num_hidden_layers"]),
        decoder_layers=int(dec["num_hidden_layers"]),
        query_pre_attn_scalar=float(enc["query_pre_attn_scalar"]),
        attn_logit_softcap=_opt(enc.get("attn_logit_softcapping")),
        final_logit_softcap=_opt(
            dec.get("final_logit_softcapping", config.get("final_logit_softcapping"))
        ),
        rope_theta=float(enc["rope_theta"]),
        sliding_window=_opt_int(enc.get("sliding_window")),
        dtype="float32",
        param_dtype="float32",
    )


def _opt(value):
    return None if value is None else float(value)


def _opt_int(value):
    return None if value is None else int(value)


def mapping(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """Reference tensor name -> (our flat param name, how to convert it)."""
    table = {
        "model.encoder.embeddings.word_embeddings.weight": ("encoder.word_embeddings", "copy"),
        "model.encoder.norm.weight": ("encoder.norm.scale", "copy"),
        "model.decoder.embed_tokens.weight": ("decoder.embed_tokens", "copy"),
        "model.decoder.norm.weight": ("decoder.norm.scale", "copy"),
    }
    for i in range(SLOTS_PER_NOTE):
        base = f"model.encoder.embeddings.projection_layers.{i}"
        table[f"{base}.weight"] = (f"encoder.slot_kernel.{i}", "slot_weight")
        table[f"{base}.bias"] = (f"encoder.slot_bias.{i}", "slot_bias")
    for stack, count in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        attns = ("self_attn", "cross_attn") if stack == "decoder" else ("self_attn",)
        for n in range(count):
            ref, ours = f"model.{stack}.layers.{n}", f"{stack}.layers.{n}"
            for ref_norm, our_norm in NORMS.items():
                if "cross" in ref_norm and stack == "encoder":
                    continue
                table[f"{ref}.{ref_norm}.weight"] = (f"{ours}.{our_norm}.scale", "copy")
            for attn in attns:
                for proj in ("q", "k", "v", "o"):
                    kind = "o_proj" if proj == "o" else "q_proj" if proj == "q" else "kv_proj"
                    table[f"{ref}.{attn}.{proj}_proj.weight"] = (f"{ours}.{attn}.{proj}_proj", kind)
            for proj in ("gate", "up", "down"):
                table[f"{ref}.mlp.{proj}_proj.weight"] = (f"{ours}.mlp.{proj}_proj", "transpose")
    return table


def _to_ours(kind: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    h, n, k, d = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if kind in ("copy", "slot_bias"):
        return w
    if kind in ("transpose", "slot_weight"):
        return w.T
    if kind == "q_proj":
        return w.T.reshape(h, n, d)
    if kind == "kv_proj":
        return w.T.reshape(h, k, d)
    if kind == "o_proj":
        return w.T.reshape(n, d, h)
    raise AssertionError(kind)


def _to_reference(kind: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if kind in ("copy", "slot_bias"):
        return w
    if kind in ("transpose", "slot_weight"):
        return w.T
    if kind in ("q_proj", "kv_proj"):
        return w.reshape(cfg.hidden, -1).T
    return w.reshape(-1, cfg.hidden).T  # o_proj


def convert_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Reference state dict -> our params (nested dict, float32)."""
    table = mapping(cfg)
    unknown = sorted(n for n in tensors if n not in table and not IGNORED.match(n))
    missing = sorted(n for n in table if n not in tensors)
    if unknown or missing:
        raise ConversionError(
            "checkpoint does not match the model config: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unknown[:6]}{'...' if len(unknown) > 6 else ''}"
        )
    flat: dict[str, np.ndarray] = {}
    slots: dict[str, list] = {
        "encoder.slot_kernel": [None] * SLOTS_PER_NOTE,
        "encoder.slot_bias": [None] * SLOTS_PER_NOTE,
    }
    for name, (ours, kind) in table.items():
        w = _to_ours(kind, np.asarray(tensors[name], np.float32), cfg)
        if kind.startswith("slot_"):
            base, index = ours.rsplit(".", 1)
            slots[base][int(index)] = w
        else:
            flat[ours] = w
    for base, parts in slots.items():
        flat[base] = np.stack(parts)
    params = export.unflatten(flat)
    _check_shapes(params, cfg)
    return params


def to_reference_tensors(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> the reference layout (the used tensors; the inverse of `convert_tensors`)."""
    flat = export.flatten(params)
    out = {}
    for name, (ours, kind) in mapping(cfg).items():
        if kind.startswith("slot_"):
            base, index = ours.rsplit(".", 1)
            w = np.asarray(flat[base])[int(index)]
        else:
            w = np.asarray(flat[ours])
        out[name] = np.ascontiguousarray(_to_reference(kind, np.asarray(w, np.float32), cfg))
    return out


def _check_shapes(params: dict, cfg: ModelConfig) -> None:
    bad = export.shape_mismatches(params, cfg)
    if bad:
        raise ConversionError("tensor shapes do not match config.json: " + "; ".join(bad[:6]))


def convert(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Reference checkpoint directory -> export directory."""
    from safetensors.numpy import load_file

    src = Path(checkpoint_dir)
    config_path, weights = src / "config.json", src / "model.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise ConversionError(
                f"{src}: missing {path.name} (expected a Hugging Face "
                "checkpoint directory: config.json + model.safetensors)"
            )
    cfg = model_config_from_hf(json.loads(config_path.read_text()))
    params = convert_tensors(load_file(str(weights)), cfg)
    return export.write_export(
        out_dir, params, cfg, dtype=dtype, source={"converted_from": str(src.resolve())}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pianist_jax.convert_hf",
        description="Reference (HF T5Gemma) checkpoint -> export.",
    )
    parser.add_argument("checkpoint", help="directory with config.json and model.safetensors")
    parser.add_argument("out", help="output export directory")
    parser.add_argument("--dtype", choices=export.DTYPES, default="float32")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out, dtype=args.dtype)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
