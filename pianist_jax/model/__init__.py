"""The Pianist Transformer: note-compressed encoder (10 layers) + token-level decoder (2 layers).

Why this shape (PAPER_NOTES §2): the encoder sees one vector per *note* (each of the 8 token
embeddings is projected to hidden/8 by its own slot projection and the 8 pieces concatenated),
so it runs on N/8 positions; the decoder stays token-level because it must emit 8 tokens per
note. `encode()` and `decode()` are separate so a renderer encodes a score window once and then
decodes token by token against a KV cache (`init_cache`), which gives the same logits as the
full forward pass.

Parameter names follow the reference checkpoint closely (`pianist_jax.artifacts.convert_hf`
maps them); kernels are ``[in, out]``-style with named head axes.
`pianist_jax.artifacts.export.load_model` gives a ready callable:
``model(encoder_ids, decoder_input_ids) -> float32 logits``.

`PianistTransformer.slot_logits` is the training-time alternative to full-vocabulary logits
(``model.slot_logits``): each decoder position scores only the ids its token slot can take
(`SLOT_GROUPS`), as the renderer samples them, which makes the output projection ~4x cheaper.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pianist_jax.config import load_config
from pianist_jax.config.schema import SLOTS_PER_NOTE, ModelConfig
from pianist_jax.model import value_embedding
from pianist_jax.model.layers import (
    DecoderLayer,
    EncoderLayer,
    RMSNorm,
    cache_layout,
    constrain,
    is_sliding,
    logical_param,
    rope_tables,
    softcap,
    use_weight,
    window_mask,
)
from pianist_jax.tokenizer import MASK, PAD, SLOT_KIND, SLOT_RANGES


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
        self.word_embeddings = logical_param(
            rngs, (cfg.vocab_size, h), ("vocab", "embed"), pd, 1.0 / math.sqrt(h)
        )
        self.slot_kernel = logical_param(
            rngs, (s, h, cfg.slot_dim), ("slot", "embed", "slot_embed"), pd, 1.0 / math.sqrt(h)
        )
        self.slot_bias = logical_param(rngs, (s, cfg.slot_dim), ("slot", "slot_embed"), pd)
        self.value_proj = value_embedding.projection(cfg, rngs)
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
        table = value_embedding.table(self.word_embeddings, self.value_proj, dtype)
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
            x = constrain(
                layer(x, sliding if is_sliding(i) else full, positions), "batch", "notes", None
            )
        return self.norm(x), note_mask


class Decoder(nnx.Module):
    """Token-level causal decoder with cross-attention; its embedding is the output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h, pd = cfg.hidden, cfg.param_dtype
        self.embed_tokens = logical_param(
            rngs, (cfg.vocab_size, h), ("vocab", "embed"), pd, 1.0 / math.sqrt(h)
        )
        self.value_proj = value_embedding.projection(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.decoder_layers)])
        self.norm = RMSNorm(h, param_dtype=pd, rngs=rngs)
        self.cfg = cfg

    def cross_kv(self, enc_states: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Per-layer cross-attention keys/values: computed once per encoded window."""
        return [layer.cross_attn.keys_values(enc_states, None) for layer in self.layers]

    def table(self, dtype) -> jax.Array:
        """The tied input/output embedding table in ``dtype`` (with ``value_embedding``: plus
        the projection of each id's value features)."""
        return value_embedding.table(self.embed_tokens, self.value_proj, dtype)

    def project(self, x: jax.Array, table: jax.Array) -> jax.Array:
        """Final states ``[..., H]`` times embedding rows ``table [V, H]`` -> soft-capped float32
        logits ``[..., V]`` (the tied output projection)."""
        logits = jnp.einsum("...m,vm->...v", x, table, preferred_element_type=jnp.float32)
        return softcap(logits, self.cfg.final_logit_softcap)

    def embed(
        self, ids: jax.Array, positions: jax.Array, note_states=None, table=None
    ) -> jax.Array:
        """Input states of ``ids [B, T]`` at token ``positions [T]``: the scaled embedding
        (rows of ``table``, default `table`), plus (``note_conditioning``) the encoder
        state of note ``position // 8`` from ``note_states [B, N, H]``; tokens of the
        ``unread_inputs`` kinds are read as MASK."""
        cfg, dtype = self.cfg, self.cfg.dtype
        table = self.table(dtype) if table is None else table
        if cfg.unread_inputs:  # input p holds token p - 1; position 0 (BOS) is always read
            slots = [s for s, kind in enumerate(SLOT_KIND) if kind in cfg.unread_inputs]
            unread = jnp.isin((positions - 1) % SLOTS_PER_NOTE, jnp.asarray(slots))
            ids = jnp.where(unread & (positions > 0), MASK, ids)
        x = jnp.take(table, ids, axis=0) * jnp.asarray(math.sqrt(cfg.hidden), dtype)
        if cfg.note_conditioning:
            if note_states is None:
                raise ValueError(
                    "model.note_conditioning needs the encoder states (note_states) in the decoder"
                )
            note = jnp.minimum(positions // SLOTS_PER_NOTE, note_states.shape[1] - 1)
            x = x + jnp.take(note_states, note, axis=1).astype(x.dtype)
        return x

    def hidden(self, ids, cross_kv, enc_mask, note_states=None):
        """Final-norm'd states ``[B, T, H]`` (compute dtype) of a whole block and the
        embedding table as used in matmuls (compute dtype, `table`)."""
        cfg, dtype = self.cfg, self.cfg.dtype
        b, t = ids.shape
        q_pos = jnp.arange(t)
        real = (ids != PAD)[:, None, :]  # as T5Gemma: PAD keys are masked
        causal = window_mask(q_pos, q_pos, None, causal=True)[None] & real
        sliding = window_mask(q_pos, q_pos, cfg.sliding_window, causal=True)[None] & real
        cross_mask = enc_mask[:, None, :]
        positions = jnp.broadcast_to(q_pos, (b, t))
        table = self.table(dtype)
        x = constrain(self.embed(ids, q_pos, note_states, table), "batch", "length", None)
        for i, layer in enumerate(self.layers):
            window = cfg.sliding_window if is_sliding(i) else None
            x = layer(x, sliding if window else causal, positions, cross_kv[i], cross_mask, window)
            x = constrain(x, "batch", "length", None)
        return self.norm(x), table

    def step(
        self,
        ids,
        index,
        caches,
        cross,
        cross_mask,
        note_states=None,
        rope=None,
        last_only: bool = False,
        table=None,
    ):
        """Cached decoding of ``ids [B, T]`` at positions ``index .. index + T - 1``: the one
        decoding step that `PianistTransformer.decode` and the renderer share.

        ``caches``: per layer ``(keys, values)`` in `cache_layout` (the renderer may pass a
        prefix of them: attention then reads only that far); ``cross``: per layer the
        encoder's keys and values in the same layout (`cross_cache`) and ``cross_mask
        [B, 1, N]``; ``rope``: the rotary tables of every position (`rope_tables`), made once
        by a loop, else computed here; ``last_only``: the last layer computes the last
        token's outputs only; ``table``: the embedding table (`table`), made once by a loop,
        else here. Returns final-norm'd states ``[B, T (1 if last_only), H]`` and
        the new caches."""
        cfg = self.cfg
        t = ids.shape[1]
        positions = index + jnp.arange(t)
        if rope is None:
            rope = rope_tables(positions[None], cfg.head_dim, cfg.rope_theta, cfg.dtype)
        else:
            rope = tuple(jax.lax.dynamic_slice_in_dim(r, index, t, axis=1) for r in rope)
        table = self.table(cfg.dtype) if table is None else table
        x = self.embed(ids, positions, note_states, table)
        new = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            window = cfg.sliding_window if is_sliding(i) else None
            x, cache = layer.step(
                x, positions, rope, caches[i], cross[i], cross_mask, window, last_only and i == last
            )
            new.append(cache)
        return self.norm(x), new

    def cross_cache(self, enc_states: jax.Array, dtype=None) -> list[tuple[jax.Array, ...]]:
        """Per layer the cross-attention keys and values of the encoder states in
        `cache_layout` (``dtype``: default the compute dtype): made once per encoded window."""
        dtype = dtype or self.cfg.dtype
        return [
            (cache_layout(k, keys=True).astype(dtype), cache_layout(v).astype(dtype))
            for k, v in self.cross_kv(enc_states)
        ]


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

    def decode(self, decoder_ids, enc_states, enc_mask, cache=None, vocab_slice=None):
        """Logits for ``decoder_ids [B, T]`` (``vocab_slice``: only those rows); with ``cache``
        (from `init_cache`) the tokens are placed at ``cache["index"]`` through
        `Decoder.step` and ``(logits, new_cache)`` is returned."""
        decoder = self.decoder
        ids = jnp.asarray(decoder_ids)
        if cache is None:
            x, table = decoder.hidden(ids, decoder.cross_kv(enc_states), enc_mask, enc_states)
        else:
            table = decoder.table(self.cfg.dtype)
            x, layers = decoder.step(
                ids,
                cache["index"],
                cache["layers"],
                cache["cross"],
                enc_mask[:, None, :],
                enc_states,
                table=table,
            )
        if vocab_slice is not None:
            table = table[vocab_slice[0] : vocab_slice[1]]
        logits = decoder.project(x, table)
        if cache is None:
            return logits
        return logits, {**cache, "index": cache["index"] + x.shape[1], "layers": layers}

    def init_cache(self, enc_states: jax.Array, max_length: int, dtype=None) -> dict:
        """Empty self-attention caches of ``max_length`` tokens in `cache_layout` + the
        cross-attention keys and values (``dtype``: default the compute dtype)."""
        cfg = self.cfg
        dtype = dtype or cfg.dtype
        rows = enc_states.shape[0] * cfg.num_kv_heads
        layers = [
            (
                jnp.zeros((rows, cfg.head_dim, max_length), dtype),
                jnp.zeros((rows, max_length, cfg.head_dim), dtype),
            )
            for _ in range(cfg.decoder_layers)
        ]
        return {
            "index": jnp.zeros((), jnp.int32),
            "layers": layers,
            "cross": self.decoder.cross_cache(enc_states, dtype),
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
        x, table = decoder.hidden(ids, decoder.cross_kv(states), mask, note_states=states)
        x = constrain(
            x.reshape(b, t // SLOTS_PER_NOTE, SLOTS_PER_NOTE, x.shape[-1]),
            "batch",
            "notes",
            None,
            None,
        )
        out = []
        for slots, lo, hi in SLOT_GROUPS:
            if slots != tuple(range(slots[0], slots[-1] + 1)):
                raise NotImplementedError(f"slot group {slots} is not contiguous")
            logits = decoder.project(x[:, :, slots[0] : slots[-1] + 1], table[lo:hi])
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
    dec_token = cfg.decoder_layers * (
        2 * (attn_proj + mlp) + 2 * 2 * h * (nh * d) + 4 * t * nh * d + 4 * n * nh * d
    )
    dec_cross_kv_note = cfg.decoder_layers * 2 * 2 * h * (nk * d)
    forward = (enc_note + dec_cross_kv_note) / SLOTS_PER_NOTE + dec_token
    out_rows = cfg.vocab_size
    if cfg.slot_logits:  # each slot scores only its own id range (mean width ~1345)
        out_rows = sum(len(slots) * (hi - lo) for slots, lo, hi in SLOT_GROUPS) / SLOTS_PER_NOTE
    forward += 2 * h * cfg.slot_dim + 2 * h * out_rows
    return float(forward * (3 if training else 1))


# --------------------------------------------------------------------------- loading


def describe(names: list[str], block_size: int = 4096) -> str:
    """One line per model config: parameters and training FLOPs per token."""
    lines = []
    for name in names:
        cfg = load_config(None, [f"model=model/{name}.yaml"]).model
        lines.append(
            f"{name:>6}: {param_count(cfg) / 1e6:8.2f} M params, "
            f"{flops_per_token(cfg, block_size) / 1e6:8.1f} MFLOPs/token (train, "
            f"block {block_size}), {cfg.encoder_layers}-{cfg.decoder_layers} layers, "
            f"hidden {cfg.hidden}"
        )
    return "\n".join(lines)
