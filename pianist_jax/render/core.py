"""The jitted core of the renderer: one window of notes, encoded once, decoded in one XLA loop.

The decoder is the model's own (`pianist_jax.model.Decoder.step`, the same code as cached
scoring); what is the renderer's is how it drives it:
- Pitch forcing: every note's pitch is the score's, so the step that would predict it is
  fused with the next one: ``[previous Pedal4, Pitch]`` go in together and yield the IOI,
  7 decoder steps per note instead of 8, and only the last token's outputs are computed in
  the last layer.
- Logits only over the slot's id range (velocity 128, time 5000, pedal 128 rows of the tied
  embedding), from tables sliced once per window; what may be drawn is `RENDER_RANGES`.
- The window is encoded once; the cross-attention keys and values and the rotary tables are
  made once per window.
- The window is decoded in segments of 128 notes (1024 tokens); segment ``m`` attends over a
  cache of only the ``(m + 1) * 1024`` tokens it can see.
- The whole window is one `jax.jit` call (a ``while_loop`` per segment, the 7 steps of a note
  unrolled so each slot's sampling is specialised): no Python per-token loop, no host round
  trips; compiled once per (batch, window, prime) shape.

Sampling is per row: temperature (0 = greedy) and top-p inside the slot's range, with a key
folded from (row key, global note index, slot), so a note's draw does not depend on the
window it is rendered in, on the batch, or on the other rows.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pianist_jax.model.layers import rope_tables
from pianist_jax.tokenizer import (
    BOS,
    PEDAL_START,
    RENDER_RANGES,
    TIME_START,
    TOKENS_PER_NOTE,
    VELOCITY_START,
)

SEGMENT_NOTES = 128  # cache chunk: 1024 tokens
# the output rows each sampled slot draws from (IOI and duration share the time ids)
SLOT_TABLES = (None, "time", "velocity", "time", "pedal", "pedal", "pedal", "pedal")
TABLES = {
    "time": (TIME_START, 5000),
    "velocity": (VELOCITY_START, 128),
    "pedal": (PEDAL_START, 128),
}


def sample(logits: jax.Array, u: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Index into ``logits [B, n]`` per row: greedy when temperature is 0, else top-p sampling
    at that temperature with the uniform numbers ``u [B]`` (inverse CDF: one random number
    per draw).

    The nucleus is every id whose probability is at least that of the id at which the
    descending cumulative mass first reaches ``top_p`` (ties at the threshold all kept); the
    draw walks the kept ids in id order.
    """
    greedy = jnp.argmax(logits, axis=-1)
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)
    n = probs.shape[-1]
    desc = -jnp.sort(-probs, axis=-1)
    last = jnp.minimum(jnp.sum(jnp.cumsum(desc, axis=-1) < top_p[:, None], axis=-1), n - 1)
    threshold = jnp.take_along_axis(desc, last[:, None], axis=-1)
    kept = jnp.where(probs >= threshold, probs, 0.0)
    cum = jnp.cumsum(kept, axis=-1)
    drawn = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
    last_kept = n - 1 - jnp.argmax(kept[:, ::-1] > 0, axis=-1)  # u * total rounded up
    return jnp.where(temperature > 0, jnp.minimum(drawn, last_kept), greedy)


def _uniforms(row_keys: jax.Array, first_note: jax.Array, notes: int) -> jax.Array:
    """``[B, notes, 8]`` uniform numbers: entry (r, j, s) comes from row r's key folded with
    the global note index ``first_note[r] + j`` and the slot ``s``, so a draw does not depend
    on the window it falls in, nor on the other rows of the batch."""

    def one(key, note):
        def per_note(j):
            k = jax.random.fold_in(key, note + j)
            return jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(k, s)))(
                jnp.arange(TOKENS_PER_NOTE)
            )

        return jax.vmap(per_note)(jnp.arange(notes))

    return jax.vmap(one)(row_keys, first_note)


def make_window_fn(
    model_graphdef, notes: int, prime_notes: int, segment_notes: int = SEGMENT_NOTES
) -> Callable:
    """Pure function rendering one window of ``notes`` notes whose first ``prime_notes`` are
    given (the previous window's output); `pianist_jax.render.renderer.Renderer` jits and
    compiles it.

    Arguments: ``params`` (NNX pure state), ``enc_ids [B, 8*notes]`` (score tokens, PAD after
    the piece), ``prime [B, 8*prime_notes]`` (performance tokens), ``n_notes [B]`` (real notes
    in the window), ``row_keys [B, 2]`` (uint32 PRNG keys), ``first_note [B]`` (global index of
    the window's first note, for the sampling keys), ``temperature [B, 8]``, ``top_p [B, 8]``
    (per row and token slot: `pianist_jax.render.decoding.per_slot`).
    Returns ``[B, 8*notes]`` tokens: the prime, then the rendered notes (pitch = score).
    """
    if notes % segment_notes and notes > segment_notes:
        raise ValueError(f"window of {notes} notes is not a multiple of {segment_notes}")
    chunk_notes = min(notes, segment_notes)
    chunk = chunk_notes * TOKENS_PER_NOTE
    n_chunks = notes // chunk_notes
    tokens = notes * TOKENS_PER_NOTE
    prime_len = prime_notes * TOKENS_PER_NOTE

    def window_fn(params, enc_ids, prime, n_notes, row_keys, first_note, temperature, top_p):
        model = nnx.merge(model_graphdef, params)
        cfg, dec = model.cfg, model.decoder
        b = enc_ids.shape[0]
        states, enc_mask = model.encode(enc_ids)
        cache = model.init_cache(states, tokens)  # empty self-attention + cross K/V, once
        full, cross, cross_mask = cache["layers"], cache["cross"], enc_mask[:, None, :]
        table = dec.table(cfg.dtype)
        out_tables = {kind: table[lo : lo + n] for kind, (lo, n) in TABLES.items()}
        uniforms = _uniforms(row_keys, first_note, notes)  # [B, notes, 8], drawn up front
        rope = rope_tables(jnp.arange(tokens)[None], cfg.head_dim, cfg.rope_theta, cfg.dtype)

        def step(ids, pos, caches):
            """The model's decoding step, last token's final state ``[B, H]``."""
            x, caches = dec.step(
                ids, pos, caches, cross, cross_mask, states, rope, last_only=True, table=table
            )
            return x[:, -1], caches

        def pick(x, note_index, slot: int):
            """Sample one slot's id from the final state ``x [B, H]`` within the slot's
            `RENDER_RANGES` (e.g. IOI: time ids up to 4990 ms; velocity: not 0)."""
            kind = SLOT_TABLES[slot]
            logits = dec.project(x, out_tables[kind])
            start = TABLES[kind][0]
            lo, hi = (int(v) - start for v in RENDER_RANGES[slot])
            if lo > 0 or hi < logits.shape[-1]:
                index = jnp.arange(logits.shape[-1])
                logits = jnp.where((index >= lo) & (index < hi), logits, -jnp.inf)
            u = jax.lax.dynamic_index_in_dim(uniforms, note_index, 1, False)[:, slot]
            return sample(logits, u, temperature[:, slot], top_p[:, slot]) + start

        def prefix(caches, n):  # the first n positions of each cache
            return [(k[:, :, :n], v[:, :n]) for k, v in caches]

        def write_back(caches, part):
            return [
                (
                    jax.lax.dynamic_update_slice_in_dim(k, pk, 0, 2),
                    jax.lax.dynamic_update_slice_in_dim(v, pv, 0, 1),
                )
                for (k, v), (pk, pv) in zip(caches, part)
            ]

        if prime_notes:  # BOS + the prime except its last token (it goes in with the next pitch)
            ids = jnp.concatenate([jnp.full((b, 1), BOS, prime.dtype), prime[:, :-1]], axis=1)
            _, primed = step(ids, 0, prefix(full, prime_len))
            full = write_back(full, primed)
            last = prime[:, -1]
        else:
            last = jnp.full((b,), BOS, enc_ids.dtype)
        pitch = enc_ids.reshape(b, notes, TOKENS_PER_NOTE)[:, :, 0]
        out = jnp.zeros((b, notes, TOKENS_PER_NOTE), enc_ids.dtype)
        if prime_notes:
            out = out.at[:, :prime_notes].set(prime.reshape(b, prime_notes, TOKENS_PER_NOTE))
        n_max = jnp.max(n_notes)

        for m in range(n_chunks):
            lo_note, hi_note = m * chunk_notes, (m + 1) * chunk_notes
            if hi_note <= prime_notes:
                continue

            def note_step(carry):
                j, seg, last, out = carry
                pos = j * TOKENS_PER_NOTE
                x, seg = step(jnp.stack([last, pitch[:, j]], axis=1), pos, seg)
                row = [pitch[:, j], pick(x, j, 1)]
                for s in range(2, TOKENS_PER_NOTE):  # velocity, duration, pedal 1-4
                    x, seg = step(row[-1][:, None].astype(out.dtype), pos + s, seg)
                    row.append(pick(x, j, s))
                row = jnp.stack([r.astype(out.dtype) for r in row], axis=1)
                out = jax.lax.dynamic_update_slice_in_dim(out, row[:, None], j, 1)
                return j + 1, seg, row[:, -1], out

            start = max(lo_note, prime_notes)
            stop = jnp.minimum(hi_note, n_max)
            _, seg, last, out = jax.lax.while_loop(
                lambda c, stop=stop: c[0] < stop,
                note_step,
                (jnp.int32(start), prefix(full, (m + 1) * chunk), last, out),
            )
            full = write_back(full, seg)
        return out.reshape(b, tokens)

    return window_fn
