"""The Pianist Transformer: note-compressed encoder (10 layers) + token-level decoder (2 layers).

Why this shape (PAPER_NOTES §2): the encoder sees one vector per *note* (each of the 8 token
embeddings is projected to hidden/8 by its own slot projection and the 8 pieces concatenated),
so it runs on N/8 positions; the decoder stays token-level because it must emit 8 tokens per
note. `encode()` and `decode()` are separate so a renderer encodes a score window once and then
decodes token by token against a KV cache (`init_cache`), which gives the same logits as the
full forward pass.

Parameter names follow the reference checkpoint closely (`pianist_jax.convert_hf` maps them);
kernels are ``[in, out]``-style with named head axes. ``load_exported(dir)`` gives a ready
callable for parity checks: ``model(encoder_ids, decoder_input_ids) -> float32 logits``.

`PianistTransformer.slot_logits` is the training-time alternative to full-vocabulary logits
(``model.slot_logits``): each decoder position scores only the ids its token slot can take
(`SLOT_GROUPS`), as the renderer samples them, which makes the output projection ~4x cheaper.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pianist_jax.config_schema import SLOTS_PER_NOTE, ModelConfig
from pianist_jax.layers import (DecoderLayer, EncoderLayer, RMSNorm, constrain, is_sliding,
                                logical_param, softcap, use_weight, window_mask)
from pianist_jax.tokenizer import PAD, SLOT_RANGES


def _slot_groups() -> tuple[tuple[tuple[int, ...], int, int], ...]:
    """Token slots that share an id range, as ``(slots, lo, hi)`` in slot order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for slot, (lo, hi) in enumerate(SLOT_RANGES.tolist()):
        groups.setdefault((lo, hi), []).append(slot)
    return tuple((tuple(slots), lo, hi) for (lo, hi), slots in groups.items())


SLOT_GROUPS = _slot_groups()
"""``((slots), lo, hi)``: the slots of a note whose targets are ids in ``[lo, hi)`` - pitch,
IOI (the first 4991 time ids), velocity, duration (5000 time ids), the 4 pedals (one group).
`PianistTransformer.slot_logits` returns one logits array per group, in this order."""


class Encoder(nnx.Module):
    """Token ids ``[B, 8N]`` -> note states ``[B, N, hidden]`` and the note mask ``[B, N]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h, pd, s = cfg.hidden, cfg.param_dtype, SLOTS_PER_NOTE
        self.word_embeddings = logical_param(rngs, (cfg.vocab_size, h), ("vocab", "embed"), pd,
                                             1.0 / math.sqrt(h))
        self.slot_kernel = logical_param(rngs, (s, h, cfg.slot_dim),
                                         ("slot", "embed", "slot_embed"), pd, 1.0 / math.sqrt(h))
        self.slot_bias = logical_param(rngs, (s, cfg.slot_dim), ("slot", "slot_embed"), pd)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.encoder_layers)])
        self.norm = RMSNorm(h, param_dtype=pd, rngs=rngs)
        self.cfg = cfg

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, dtype = self.cfg, self.cfg.dtype
        b, length = ids.shape
        if length % SLOTS_PER_NOTE:
            raise ValueError(f"encoder ids length {length} is not a multiple of {SLOTS_PER_NOTE}")
        notes = ids.reshape(b, length // SLOTS_PER_NOTE, SLOTS_PER_NOTE)
        note_mask = jnp.any(notes != PAD, axis=-1)
        table = use_weight(self.word_embeddings, dtype)
        emb = jnp.take(table, notes, axis=0)  # [B, N, 8, H]
        x = jnp.einsum("bnsh,shd->bnsd", emb, use_weight(self.slot_kernel, dtype))
        x = x + self.slot_bias[...].astype(dtype)
        x = x.reshape(b, notes.shape[1], cfg.hidden)
        x = x * jnp.asarray(math.sqrt(cfg.hidden), dtype)  # normaliser after compression
        x = constrain(x, "batch", "notes", None)
        positions = jnp.broadcast_to(jnp.arange(notes.shape[1]), notes.shape[:2])
        full = note_mask[:, None, :]
        sliding = full & window_mask(positions, positions, cfg.sliding_window, causal=False)
        for i, layer in enumerate(self.layers):
            x = constrain(layer(x, sliding if is_sliding(i) else full, positions),
                          "batch", "notes", None)
        return self.norm(x), note_mask


class Decoder(nnx.Module):
    """Token-level causal decoder with cross-attention; its embedding is the output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h, pd = cfg.hidden, cfg.param_dtype
        self.embed_tokens = logical_param(rngs, (cfg.vocab_size, h), ("vocab", "embed"), pd,
                                          1.0 / math.sqrt(h))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.decoder_layers)])
        self.norm = RMSNorm(h, param_dtype=pd, rngs=rngs)
        self.cfg = cfg

    def cross_kv(self, enc_states: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Per-layer cross-attention keys/values: computed once per encoded window."""
        return [layer.cross_attn.keys_values(enc_states, None) for layer in self.layers]

    def __call__(self, ids, cross_kv, enc_mask, cache=None, vocab_slice=None, attend_len=None,
                 note_states=None):
        """Logits ``[B, T, vocab]`` (or the ``vocab_slice`` rows) in float32 and the new cache."""
        x, table, new_cache = self.hidden(ids, cross_kv, enc_mask, cache, attend_len,
                                          note_states)
        if vocab_slice is not None:  # only the rows a token slot can take (renderer)
            table = table[vocab_slice[0]:vocab_slice[1]]
        return self.project(x, table), new_cache

    def project(self, x: jax.Array, table: jax.Array) -> jax.Array:
        """Final states ``[..., H]`` times embedding rows ``table [V, H]`` -> soft-capped float32
        logits ``[..., V]`` (the tied output projection)."""
        logits = jnp.einsum("...m,vm->...v", x, table, preferred_element_type=jnp.float32)
        return softcap(logits, self.cfg.final_logit_softcap)

    def embed(self, ids: jax.Array, positions: jax.Array, note_states=None,
              table=None) -> jax.Array:
        """Input states of ``ids [B, T]`` at token ``positions [T]``: the scaled embedding
        (rows of ``table``, default the stored one), plus (``note_conditioning``) the encoder
        state of note ``position // 8`` from ``note_states [B, N, H]``."""
        cfg, dtype = self.cfg, self.cfg.dtype
        table = self.embed_tokens[...] if table is None else table
        x = jnp.take(table, ids, axis=0) * jnp.asarray(math.sqrt(cfg.hidden), dtype)
        if cfg.note_conditioning:
            if note_states is None:
                raise ValueError("model.note_conditioning needs the encoder states "
                                 "(note_states) in the decoder")
            note = jnp.minimum(positions // SLOTS_PER_NOTE, note_states.shape[1] - 1)
            x = x + jnp.take(note_states, note, axis=1).astype(x.dtype)
        return x

    def hidden(self, ids, cross_kv, enc_mask, cache=None, attend_len=None, note_states=None):
        """Final-norm'd states ``[B, T, H]`` (compute dtype), the embedding table as used in
        matmuls (compute dtype, `use_weight`), and the new cache (None without one)."""
        cfg, dtype = self.cfg, self.cfg.dtype
        b, t = ids.shape
        index = 0 if cache is None else cache["index"]
        q_pos = index + jnp.arange(t)
        if cache is not None and attend_len is None:
            attend_len = cache["layers"][0]["v"].shape[1]
        k_pos = q_pos if cache is None else jnp.arange(attend_len)
        causal = window_mask(q_pos, k_pos, None, causal=True)[None]
        sliding = window_mask(q_pos, k_pos, cfg.sliding_window, causal=True)[None]
        if cache is None:  # as T5Gemma: PAD keys are masked (only rows after a PAD change)
            real = (ids != PAD)[:, None, :]
            causal, sliding = causal & real, sliding & real
        cross_mask = enc_mask[:, None, :]
        positions = jnp.broadcast_to(q_pos, (b, t))
        table = use_weight(self.embed_tokens, dtype)
        x = constrain(self.embed(ids, q_pos, note_states, table), "batch", "length", None)
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache["layers"][i]
            window = cfg.sliding_window if is_sliding(i) else None
            x, layer_cache = layer(x, sliding if window else causal, positions,
                                   cross_kv[i], cross_mask, layer_cache, index, window, attend_len)
            x = constrain(x, "batch", "length", None)
            new_layers.append(layer_cache)
        new_cache = None if cache is None else {"index": index + t, "layers": new_layers}
        return self.norm(x), table, new_cache


class PianistTransformer(nnx.Module):
    """``model(encoder_ids [B, 8N], decoder_input_ids [B, T]) -> logits [B, T, vocab]`` (fp32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.cfg = cfg

    def encode(self, encoder_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Note states ``[B, N, hidden]`` and the note mask ``[B, N]`` (a note is real if any
        of its 8 tokens is not PAD)."""
        return self.encoder(jnp.asarray(encoder_ids))

    def decode(self, decoder_ids, enc_states, enc_mask, cache=None, vocab_slice=None,
               attend_len=None):
        """Logits for ``decoder_ids [B, T]``; with ``cache`` (from `init_cache`) the tokens are
        placed at ``cache["index"]`` and ``(logits, new_cache)`` is returned. ``attend_len``
        (static): attend only to the first that many cache entries - the caller guarantees
        ``cache["index"] + T <= attend_len`` (the renderer's note segments)."""
        if cache is None:
            cross = self.decoder.cross_kv(enc_states)
            logits, _ = self.decoder(jnp.asarray(decoder_ids), cross, enc_mask, None, vocab_slice,
                                     note_states=enc_states)
            return logits
        cross = [(layer["ck"], layer["cv"]) for layer in cache["cross"]]
        self_cache = {"index": cache["index"], "layers": cache["layers"]}
        logits, new = self.decoder(jnp.asarray(decoder_ids), cross, enc_mask, self_cache,
                                   vocab_slice, attend_len, enc_states)
        return logits, {**cache, "index": new["index"], "layers": new["layers"]}

    def init_cache(self, enc_states: jax.Array, max_length: int, dtype=None) -> dict:
        """Empty self-attention cache of ``max_length`` tokens + the cross-attention K/V."""
        cfg = self.cfg
        dtype = dtype or cfg.dtype
        b = enc_states.shape[0]
        shape = (b, max_length, cfg.num_kv_heads, cfg.head_dim)
        cross = self.decoder.cross_kv(enc_states)
        return {
            "index": jnp.zeros((), jnp.int32),
            "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(cfg.decoder_layers)],
            "cross": [{"ck": k, "cv": v} for k, v in cross],
        }

    def __call__(self, encoder_ids, decoder_input_ids) -> jax.Array:
        states, mask = self.encode(encoder_ids)
        return self.decode(decoder_input_ids, states, mask)

    def slot_logits(self, encoder_ids, decoder_input_ids) -> list[jax.Array]:
        """Per-slot logits of a note-aligned block (no cache): one float32 array
        ``[B, T/8, len(slots), hi - lo]`` per group of `SLOT_GROUPS`, where column ``j`` is id
        ``lo + j``.

        Position ``p`` of ``decoder_input_ids [B, T]`` (``T`` a multiple of 8) predicts the
        token of slot ``p % 8`` - true of pre-training blocks and SFT windows, which start on
        a note and read the targets shifted right behind BOS - so its logits are its final
        state times only the embedding rows of that slot's range (soft-capped as in
        `decode`). Each value equals the full-vocabulary logit of the same id.
        """
        states, mask = self.encode(encoder_ids)
        decoder = self.decoder
        ids = jnp.asarray(decoder_input_ids)
        b, t = ids.shape
        if t % SLOTS_PER_NOTE:
            raise ValueError(f"decoder ids length {t} is not a multiple of {SLOTS_PER_NOTE}")
        x, table, _ = decoder.hidden(ids, decoder.cross_kv(states), mask, note_states=states)
        x = constrain(x.reshape(b, t // SLOTS_PER_NOTE, SLOTS_PER_NOTE, x.shape[-1]),
                      "batch", "notes", None, None)
        out = []
        for slots, lo, hi in SLOT_GROUPS:
            if slots != tuple(range(slots[0], slots[-1] + 1)):
                raise NotImplementedError(f"slot group {slots} is not contiguous")
            logits = decoder.project(x[:, :, slots[0]:slots[-1] + 1], table[lo:hi])
            out.append(constrain(logits, "batch", "notes", None, "vocab"))
        return out


# --------------------------------------------------------------------------- sizes


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the model (tied output projection counted once), from shapes only."""
    model = nnx.eval_shape(lambda: PianistTransformer(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def flops_per_token(cfg: ModelConfig, block_size: int, training: bool = True) -> float:
    """Model FLOPs per *token* of a ``block_size`` block (the MFU numerator).

    Matmuls count 2 FLOPs per multiply-add; training = 3x forward (backward is 2x). Encoder work
    is per note (1/8 per token): layer matmuls ``2 * P_layer`` plus attention ``4 * N * H * D``.
    Decoder per token: layer matmuls (self q/k/v/o, cross q/o, MLP) ``2 * P``, cross-attention
    K/V projections per note, self-attention over the whole block ``4 * T * H * D`` (causality
    not discounted, as in the PaLM convention), cross-attention ``4 * N * H * D``, and the
    output projection ``2 * hidden * vocab`` (``model.slot_logits``: the mean width of the
    slots' id ranges instead of vocab). The 8 slot projections add ``2 * h * h/8``.
    """
    h, f, nh, nk, d = cfg.hidden, cfg.mlp, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t, n = block_size, block_size // SLOTS_PER_NOTE
    attn_proj = 2 * h * (nh * d) + 2 * h * (nk * d)  # q, o + k, v weights
    mlp = 3 * h * f
    enc_note = cfg.encoder_layers * (2 * (attn_proj + mlp) + 4 * n * nh * d)
    dec_token = cfg.decoder_layers * (2 * (attn_proj + mlp) + 2 * 2 * h * (nh * d)
                                      + 4 * t * nh * d + 4 * n * nh * d)
    dec_cross_kv_note = cfg.decoder_layers * 2 * 2 * h * (nk * d)
    forward = (enc_note + dec_cross_kv_note) / SLOTS_PER_NOTE + dec_token
    out_rows = cfg.vocab_size
    if cfg.slot_logits:  # each slot scores only its own id range (mean width ~1345)
        out_rows = sum(len(slots) * (hi - lo) for slots, lo, hi in SLOT_GROUPS) / SLOTS_PER_NOTE
    forward += 2 * h * cfg.slot_dim + 2 * h * out_rows
    return float(forward * (3 if training else 1))


# --------------------------------------------------------------------------- loading


def load_exported(path: str | Path, dtype: str | None = None):
    """Load an exported params artifact (`pianist_jax.export`/`convert_hf`) on the default
    device; returns the model, callable as ``model(encoder_ids, decoder_input_ids)``."""
    from pianist_jax import export  # local import: export imports this module

    return export.load_model(path, dtype=dtype)


def describe(names: list[str], block_size: int = 4096) -> str:
    """One line per model config: parameters and training FLOPs per token."""
    from pianist_jax.config import load_config

    lines = []
    for name in names:
        cfg = load_config(None, [f"model=model/{name}.yaml"]).model
        lines.append(f"{name:>6}: {param_count(cfg) / 1e6:8.2f} M params, "
                     f"{flops_per_token(cfg, block_size) / 1e6:8.1f} MFLOPs/token (train, "
                     f"block {block_size}), {cfg.encoder_layers}-{cfg.decoder_layers} layers, "
                     f"hidden {cfg.hidden}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pianist_jax.model [tiny small base sym66]
    import sys

    print(describe(sys.argv[1:] or ["tiny", "small", "base", "sym66"]))
