"""The jitted core of the renderer: one window of notes, encoded once, decoded in one XLA loop.

Why it is shaped this way (measured on a 2-core CPU, `bench/render_bench.py`):
- Decoding is memory-bound: every decoder step reads all decoder weights, so the work per note
  is what counts. The pitch of every note is known (pitch forcing), so the step that would
  predict it is fused with the next one: ``[previous Pedal4, Pitch]`` go in together and yield
  the IOI. That makes 7 decoder steps per note instead of 8.
- The decoder's matrices are stored transposed, ``[out, in]``, for the loop (each output a
  dot product of two contiguous rows), which streams faster from memory and suits the
  several-row products of a batch: in one process, base fp32 6.0 -> 5.6 ms per step at
  batch 1 and 33.5 -> 25.0 ms at batch 8; small fp32 at batch 8 8.4 -> 7.6 ms. The one
  exception is a single row with matrices small enough to stay in the CPU cache (up to
  32 MiB, e.g. small): ``[in, out]`` computes faster there (small fp32, batch 1: 1.16-1.19
  vs 1.41 ms per step). Off the kernels the output tables are ``[H, n]``, which measured
  faster for XLA.
- On CPU those ``[out, in]`` products, the output logits and the attention step go through
  small native kernels when they can be built (`pianist_jax.native_kernels`): XLA's kernels
  for 2-16 rows and its batched attention products run at about half the speed of streaming
  the data, and XLA's attention reads the whole cache buffer, the kernel only the visible
  part. Base fp32 batch 1, in one process: 5.68 -> 4.83 ms per step (products), 4.61 -> 3.89
  ms (attention), same tokens. The kernels read bfloat16 parameters and caches and widen
  them as they go, so a bfloat16 renderer computes in float32 from half the bytes (the
  caches are kept as uint16 bits: XLA:CPU widened a bfloat16 buffer around every update).
- bfloat16 models on CPUs with AMX (the ``amx`` build): the decoder's products and the output
  logits go through the tile kernel (weights packed once per window, `amx_pack`): at batch 8
  the float32 products were bound by arithmetic, the tile products cost about what reading
  the weights costs. On CPUs with AVX512-BF16 but no AMX (the ``avx512bf16`` build, e.g. AMD
  Zen 4) the ``[out, in]`` kernel multiplies the bfloat16 weights with ``VDPBF16PS`` instead
  of widening them (base bfloat16 batch 8: 127 -> 167 notes/s on a 2-core Zen 4). Top-p
  draws go through a native kernel (the same rule as `sample`).
- Logits are computed only over the slot's valid id range (velocity 128, time 5000, pedal 128
  rows), from output tables sliced (and, off the kernels, transposed) once per window; what
  may be drawn is `RENDER_RANGES` (IOI up to 4990 ms, velocity 1..127).
- The window is decoded in segments of 128 notes (1024 tokens); segment ``m`` carries a cache
  buffer of only the ``(m + 1) * 1024`` tokens it can see, so a note near the start of a
  window reads little cache.
- Every cache (self- and cross-attention) is laid out as the attention products read it:
  batch and kv-head axes merged, keys ``[B*K, D, S]`` (``[B*K, S, D]`` for the kernel, which
  reads them row by row in memory order), values ``[B*K, S, D]``. With separate
  ``[B, K, ...]`` axes XLA copied and transposed the written cache at every step (about a
  fifth of a step at batch 1); now it is updated in place.
- In the fused ``[Pedal4, Pitch]`` step only the Pitch position's output is used, so the last
  decoder layer computes attention, cross-attention and MLP for that one token (the other's
  keys and values are all it needs from that layer).
- The whole window is one `jax.jit` call (``while_loop`` per segment, the 7 steps of a note
  unrolled, so each slot's sampling is specialised): no Python per-token loop, no host round
  trips; compiled once per (bucket, prime) shape. Against a ``fori_loop`` over the slot steps
  with ``lax.switch``: 26.3 vs 30.2 ms per step at batch 8 (base), the same at batch 1, but
  compiling takes longer (bundled model, 136-note example: 14.3 vs 8.8 s, once per cache).

Sampling is per row: temperature (0 = greedy) and top-p inside the slot's range, with a key
folded from (row key, global note index, slot), so a note's draw does not depend on the
window it is rendered in, on the batch, or on the other rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pianist_jax import native_kernels
from pianist_jax.layers import _NEG, is_sliding, rope_tables, rotate, softcap, window_mask
from pianist_jax.tokenizer import (BOS, PEDAL_START, RENDER_RANGES, TIME_START,
                                   TOKENS_PER_NOTE, VELOCITY_START)

SEGMENT_NOTES = 128  # cache chunk: 1024 tokens (64 compiles slower for ~no gain)

CACHED_BYTES = 32 << 20  # single-row decoding keeps [in, out] matrices up to this size


# how fused matrices are used: [in, out] or [out, in] through XLA, [out, in] through the
# native kernel, or packed for the AMX tile kernel as (tiles, out features)
IN_OUT, OUT_IN, NATIVE, AMX = "in_out", "out_in", "out_in_native", "amx"
MAX_NATIVE_ROWS = 16  # the native kernel re-reads the matrix once per 8 rows
# the output table each sampled slot draws from: IOI and duration share the time ids
SLOT_TABLES = (None, "time", "velocity", "time", "pedal", "pedal", "pedal", "pedal")


def _mv(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    """``x [..., I]`` times ``w`` -> ``[..., O]``: ``w [I, O]`` for `IN_OUT`, ``(tiles, O)``
    for `AMX` (see `amx_pack`), else ``[O, I]``, through `pianist_jax.native_kernels` for
    `NATIVE` where it applies (``x`` float32, ``w`` float32 or bfloat16, I % 8 == 0, at most
    `MAX_NATIVE_ROWS` rows)."""
    rows = math.prod(x.shape[:-1])
    if layout == AMX:  # at most 16 rows per tile product
        wp, out = w
        flat = x.reshape(rows, x.shape[-1])
        parts = [native_kernels.matvec_amx(flat[r:r + 16], wp, out) for r in range(0, rows, 16)]
        return jnp.concatenate(parts).reshape(*x.shape[:-1], out)
    if (layout == NATIVE and x.dtype == jnp.float32 and w.dtype in (jnp.float32, jnp.bfloat16)
            and x.shape[-1] % 8 == 0 and rows <= MAX_NATIVE_ROWS):
        return native_kernels.matvec_t(x, w)
    w = w.astype(x.dtype)  # a no-op unless bfloat16 weights meet float32 rows off the kernel
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0 if layout == IN_OUT else 1,)), ((), ())))


def _to_cache(x: jax.Array, cache: jax.Array) -> jax.Array:
    """``x`` in the cache's storage: bfloat16 caches of the native path are kept as their bits
    (uint16), because XLA:CPU widens a bfloat16 buffer to float32 around every in-place
    update (it copied the whole cache at every update: 42 of 121 ms per note at batch 8)."""
    if cache.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(cache.dtype)


def _heads_first(x: jax.Array, positions_last: bool = False) -> jax.Array:
    """``[B, S, K, D]`` keys or values -> the caches' layout with batch and kv-head axes
    merged: ``[B*K, S, D]``, or ``[B*K, D, S]`` when ``positions_last`` (keys read by XLA's
    attention products; see `_attend`)."""
    b, s, k, d = x.shape
    if positions_last:
        return x.transpose(0, 2, 3, 1).reshape(b * k, d, s)
    return x.transpose(0, 2, 1, 3).reshape(b * k, s, d)


def native_attention(cfg, native: bool) -> bool:
    """Whether the decode loop attends through the native kernel (it needs D % 16 == 0);
    this also fixes the layout of the keys in the caches (see `_attend`)."""
    return native and cfg.head_dim % 16 == 0


def _attend(attn, q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
            o: jax.Array, layout: str, native: bool = False) -> jax.Array:
    """Softmax attention of ``q [B, T, H, D]`` over ``keys [B*K, D, S]`` (``[B*K, S, D]``
    when ``native``), ``values [B*K, S, D]`` where ``mask [B|1, T, S]`` is true, then the
    output projection ``o`` (``[H*D, hidden]``, or ``[hidden, H*D]``: see `_mv`).
    ``native`` (see `native_attention`): through the native kernel, which reads keys and
    values in memory order (float32 ``q``; float32 or bfloat16 caches).
    Batch and kv-head axes are merged in the caches so every attention product has one batch
    axis: XLA then reads the caches in place (with ``[B, K, ...]`` it re-laid them out)."""
    b, t, n, d = q.shape
    if native:
        out = native_kernels.attend(q, keys, values,
                                    jnp.broadcast_to(mask, (b, t, mask.shape[-1])),
                                    float(attn.scale), attn.logit_cap)
        return _mv(out.reshape(b, t, n * d), o, layout)
    kv = values.shape[0] // b
    g = n // kv
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, g * t, d)
    logits = jnp.einsum("nqd,nds->nqs", qg, keys) * jnp.asarray(attn.scale, q.dtype)
    logits = softcap(logits.astype(jnp.float32), attn.logit_cap).reshape(b, kv, g, t, -1)
    mask = jnp.broadcast_to(mask, (b, t, mask.shape[-1]))
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, _NEG), axis=-1)
    probs = probs.reshape(b * kv, g * t, -1).astype(values.dtype)
    out = jnp.einsum("nqs,nsd->nqd", probs, values)
    out = out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n * d)
    return _mv(out, o, layout)


def amx_pack(w: jax.Array) -> tuple[jax.Array, int]:
    """``[O, I]`` bfloat16 -> the `AMX` layout of `_mv`: (tiles, O)."""
    return native_kernels.pack_amx(w), w.shape[0]


def uses_amx(model, native: bool) -> bool:
    """Whether the loop's products go through the AMX tile kernel: native, bfloat16
    parameters, every input width a multiple of 32, and the kernel usable on this CPU."""
    cfg = model.cfg
    widths = (cfg.hidden, cfg.num_heads * cfg.head_dim, cfg.mlp)
    return (native and native_kernels.amx() and all(w % 32 == 0 for w in widths)
            and model.decoder.embed_tokens[...].dtype == jnp.bfloat16)


def fuse_weights(model, rows: int, native: bool = False) -> tuple[list[dict], str]:
    """Per decoder layer, every matrix the loop uses (built once per window, outside the
    loop): the q/k/v projections as one ``[H, (n + 2k) * D]`` matrix and the MLP gate/up as
    one ``[H, 2F]`` matrix, so one matrix-vector product instead of three / two per step
    (decoding is memory-bound: fewer, larger reads). All transposed to ``[out, in]``, unless
    ``rows`` is 1 and they add up to at most `CACHED_BYTES` (float32 only: XLA would widen
    bfloat16 matrices at every step); ``[out, in]`` matrices go through the native kernel
    when ``native``, or packed for the AMX kernel where `uses_amx`: its tile products cost about
    what reading the weights costs, where the several rows of a batch made the float32
    products bound by arithmetic. Returns (matrices, layout for `_mv`)."""
    fused = []
    for layer in model.decoder.layers:
        a, c, mlp = layer.self_attn, layer.cross_attn, layer.mlp
        h = a.q_proj.shape[0]
        fused.append({
            "qkv": jnp.concatenate([a.q_proj[...].reshape(h, -1), a.k_proj[...].reshape(h, -1),
                                    a.v_proj[...].reshape(h, -1)], axis=1),
            "o": a.o_proj[...].reshape(-1, h),
            "cross_q": c.q_proj[...].reshape(h, -1),
            "cross_o": c.o_proj[...].reshape(-1, h),
            "gate_up": jnp.concatenate([mlp.gate_proj[...], mlp.up_proj[...]], axis=1),
            "down": mlp.down_proj[...]})
    if uses_amx(model, native):
        return [{k: amx_pack(w.T) for k, w in f.items()} for f in fused], AMX
    size = sum(w.size * w.dtype.itemsize for f in fused for w in f.values())
    narrow = any(w.dtype != jnp.float32 for f in fused for w in f.values())
    transposed = rows > 1 or size > CACHED_BYTES or (native and narrow)
    if transposed:
        fused = [{k: w.T for k, w in f.items()} for f in fused]
    return fused, (NATIVE if native else OUT_IN) if transposed else IN_OUT


def _decoder_step(model, fused, layout, ids, pos0, cross, cache, rope, native=False,
                  note_states=None):
    """Run the decoder on ``ids [B, T]`` at positions ``pos0 ..``; writes their keys/values into
    ``cache`` (list per layer of ``(keys [B*K, D, S], values [B*K, S, D])``, position 0 first;
    keys ``[B*K, S, D]`` when ``native``: see `native_attention`). ``rope``: the window's
    rotary tables (cos, sin ``[1, tokens, 1, D]``), made once: computed at every step, XLA
    evaluated cos and sin again for every element of the rotated queries and keys.
    ``note_states``: the window's encoder states (``model.note_conditioning``).
    Returns the final hidden state of the last token ``[B, H]`` and the updated cache."""
    dec, cfg = model.decoder, model.cfg
    b, t = ids.shape
    q_pos = pos0 + jnp.arange(t)
    cos, sin = (jax.lax.dynamic_slice_in_dim(r, pos0, t, axis=1) for r in rope)
    x = dec.embed(ids, q_pos, note_states)
    new_cache = []
    for i, layer in enumerate(dec.layers):
        window = cfg.sliding_window if is_sliding(i) else None
        attn = layer.self_attn
        n, d = attn.q_proj.shape[1], attn.q_proj.shape[2]
        kv = attn.k_proj.shape[1]
        w = fused[i]
        qkv = _mv(layer.pre_self_attn_norm(x), w["qkv"], layout)
        q = rotate(qkv[..., :n * d].reshape(b, t, n, d), cos, sin)
        k = rotate(qkv[..., n * d:(n + kv) * d].reshape(b, t, kv, d), cos, sin)
        v = qkv[..., (n + kv) * d:].reshape(b, t, kv, d)
        ck, cv = cache[i]
        ck = jax.lax.dynamic_update_slice_in_dim(
            ck, _to_cache(_heads_first(k, not native), ck), pos0, 1 if native else 2)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, _to_cache(_heads_first(v), cv), pos0, 1)
        new_cache.append((ck, cv))
        if i == len(dec.layers) - 1 and t > 1:  # only the last token's output is used
            q, x, q_pos = q[:, -1:], x[:, -1:], q_pos[-1:]
        mask = window_mask(q_pos, jnp.arange(cv.shape[1]), window, causal=True)[None]
        x = x + layer.post_self_attn_norm(_attend(attn, q, ck, cv, mask, w["o"], layout,
                                                            native))
        h = layer.pre_cross_attn_norm(x)
        cq = _mv(h, w["cross_q"], layout).reshape(*h.shape[:2],
                                                      *layer.cross_attn.q_proj.shape[1:])
        x = x + layer.post_cross_attn_norm(
            _attend(layer.cross_attn, cq, *cross[i], w["cross_o"], layout, native))
        gate, up = jnp.split(_mv(layer.pre_ffw_norm(x), w["gate_up"], layout), 2, axis=-1)
        x = x + layer.post_ffw_norm(
            _mv(jax.nn.gelu(gate, approximate=True) * up, w["down"], layout))
    return dec.norm(x[:, -1]), new_cache


def _search(lo, hi, rounds: int, count_fn, ways: int = 16):
    """Largest integer ``x`` in ``[lo, hi]`` with ``count_fn(x)`` true (monotone: true up to
    some point), per row, by a ``ways``-ary search: ``rounds`` rounds of ``ways`` candidates.
    Vectorised (no sort, no cumulative sum: both are slow in XLA on CPU)."""
    steps = jnp.arange(1, ways + 1, dtype=lo.dtype)
    for _ in range(rounds):
        width = jnp.maximum((hi - lo + ways) // (ways + 1), 1)
        cand = jnp.minimum(lo[:, None] + steps * width[:, None], hi[:, None])  # [B, ways]
        ok = count_fn(cand)  # [B, ways] bool, true for a prefix of the candidates
        best = jnp.max(jnp.where(ok, cand, lo[:, None]), axis=-1)
        first_bad = jnp.min(jnp.where(ok, hi[:, None] + 1, cand), axis=-1)
        lo, hi = best, jnp.minimum(first_bad - 1, hi)
    return lo


def sample(logits: jax.Array, u: jax.Array, temperature: jax.Array,
           top_p: jax.Array, native: bool = False) -> jax.Array:
    """Index into ``logits [B, n]`` per row: greedy when temperature is 0, else top-p sampling
    at that temperature with the uniform numbers ``u [B]`` (inverse CDF, so one random number
    per draw).

    The nucleus is every id whose probability is >= the largest threshold ``x`` for which the
    ids >= ``x`` hold at least ``top_p`` of the mass (ties at the threshold are all kept).
    Both the threshold (over the float32 bit patterns of the probabilities, which order like
    the values) and the drawn id are found by vectorised search; ``native``: by the native
    kernel instead (`native_kernels.sample_top_p`: the same rule, sums in another order), which
    at batch 8 over the 5,000 time ids takes microseconds where the search took ~2 ms.
    """
    greedy = jnp.argmax(logits, axis=-1)
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)
    if native:
        return jnp.where(temperature > 0, native_kernels.sample_top_p(probs, u, top_p), greedy)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # >= 0, monotone in the value
    b, n = probs.shape

    def enough_mass(x):  # [B, W] thresholds -> mass of ids >= x reaches top_p
        mass = jnp.sum(jnp.where(bits[:, None, :] >= x[:, :, None], probs[:, None, :], 0.0), -1)
        return mass >= top_p[:, None]

    zero = jnp.zeros((b,), jnp.int32)
    threshold = _search(zero, jnp.max(bits, axis=-1), 8, enough_mass)
    kept = jnp.where(bits >= threshold[:, None], probs, 0.0)
    target = u * jnp.sum(kept, axis=-1)
    index = jnp.arange(n, dtype=jnp.int32)

    def below(m):  # [B, W] -> mass of ids < m is <= target
        mass = jnp.sum(jnp.where(index[None, None, :] < m[:, :, None], kept[:, None, :], 0.0), -1)
        return mass <= target[:, None]

    drawn = _search(zero, jnp.full((b,), n - 1, jnp.int32), 4, below)
    # an id with zero kept mass is never chosen: step forward to the next kept id if needed
    drawn = jnp.where(jnp.take_along_axis(kept, drawn[:, None], -1)[:, 0] > 0, drawn,
                      jnp.argmax((index[None, :] >= drawn[:, None]) & (kept > 0), axis=-1))
    return jnp.where(temperature > 0, drawn, greedy)


def _uniforms(row_keys: jax.Array, first_note: jax.Array, notes: int) -> jax.Array:
    """``[B, notes, 8]`` uniform numbers: entry (r, j, s) comes from row r's key folded with
    the global note index ``first_note[r] + j`` and the slot ``s``, so a draw does not depend
    on the window it falls in, nor on the other rows of the batch."""
    def one(key, note):
        def per_note(j):
            k = jax.random.fold_in(key, note + j)
            return jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(k, s)))(
                jnp.arange(TOKENS_PER_NOTE))
        return jax.vmap(per_note)(jnp.arange(notes))
    return jax.vmap(one)(row_keys, first_note)


def make_window_fn(model_graphdef, notes: int, prime_notes: int,
                   segment_notes: int = SEGMENT_NOTES, native: bool = False,
                   cache_dtype=None, encoder_graphdef=None) -> Callable:
    """Pure function rendering one window of ``notes`` notes whose first ``prime_notes`` are
    given (the previous window's output); `pianist_jax.render.Renderer` jits and compiles it.

    Arguments: ``params`` (NNX pure state), ``enc_ids [B, 8*notes]`` (score tokens, PAD after
    the piece), ``prime [B, 8*prime_notes]`` (performance tokens), ``n_notes [B]`` (real notes
    in the window), ``row_keys [B, 2]`` (uint32 PRNG keys), ``first_note [B]`` (global index of
    the window's first note, for the sampling keys), ``temperature [B, 8]``, ``top_p [B, 8]``
    (per row and token slot: `pianist_jax.decoding.per_slot`).
    Returns ``[B, 8*notes]`` tokens: the prime, then the rendered notes (pitch = score).
    ``native``: the ``[out, in]`` decoder products, the output logits and the attention steps
    use `pianist_jax.native_kernels` (CPU; the caller has loaded it; the model computes in
    float32, its parameters may be bfloat16). ``cache_dtype``: the self- and cross-attention
    caches' dtype (default: the model's compute dtype); bfloat16 halves the bytes each step
    reads. ``encoder_graphdef``: the same model with another compute dtype to encode with
    (e.g. bfloat16 where the loop computes in float32).
    """
    if notes % segment_notes and notes > segment_notes:
        raise ValueError(f"window of {notes} notes is not a multiple of {segment_notes}")
    chunk_notes = min(notes, segment_notes)
    chunk = chunk_notes * TOKENS_PER_NOTE
    n_chunks = notes // chunk_notes
    tokens = notes * TOKENS_PER_NOTE

    def window_fn(params, enc_ids, prime, n_notes, row_keys, first_note, temperature, top_p):
        model = nnx.merge(model_graphdef, params)
        cfg, dtype = model.cfg, model.cfg.dtype
        if native and jnp.dtype(dtype) != jnp.float32:
            raise ValueError("the native kernels need a float32 compute dtype (parameters "
                             "and caches may be bfloat16)")
        b = enc_ids.shape[0]
        kv_dtype = jnp.dtype(cache_dtype or dtype)
        sd_keys = native_attention(cfg, native)  # keys [B*K, S, D] (else [B*K, D, S])
        # the caches' storage (a scalar of that dtype): bfloat16 as uint16 bits for the kernel
        storage = jnp.zeros((), jnp.uint16 if sd_keys and kv_dtype == jnp.bfloat16 else kv_dtype)
        encoder = model if encoder_graphdef is None else nnx.merge(encoder_graphdef, params)
        states, enc_mask = encoder.encode(enc_ids)
        states = states.astype(dtype)
        cross = []
        for layer in model.decoder.layers:
            k, v = layer.cross_attn.keys_values(states, None)  # [B, N, K, D]
            cross.append((_to_cache(_heads_first(k, not sd_keys), storage),
                          _to_cache(_heads_first(v), storage), enc_mask[:, None]))
        fused, layout = fuse_weights(model, b, native)
        table = model.decoder.embed_tokens[...]
        out_tables = {  # the valid rows of each slot kind: [n, H] for the kernel, else [H, n]
            "time": table[TIME_START:TIME_START + 5000],  # IOI and duration
            "velocity": table[VELOCITY_START:VELOCITY_START + 128],
            "pedal": table[PEDAL_START:PEDAL_START + 128]}
        if layout == AMX:
            out_tables = {k: amx_pack(t) for k, t in out_tables.items()}
        elif not native:
            out_tables = {k: t.T for k, t in out_tables.items()}
        offsets = {"time": TIME_START, "velocity": VELOCITY_START, "pedal": PEDAL_START}

        uniforms = _uniforms(row_keys, first_note, notes)  # [B, notes, 8], drawn up front
        rope = rope_tables(jnp.arange(tokens)[None], cfg.head_dim, cfg.rope_theta, dtype)

        def pick(x, note_index, slot: int):
            """Sample one slot's id from the final hidden state ``x [B, H]``, within the
            slot's `RENDER_RANGES` (e.g. IOI: time ids up to 4990 ms; velocity: not 0)."""
            kind = SLOT_TABLES[slot]
            logits = (_mv(x, out_tables[kind], AMX if layout == AMX else NATIVE) if native else
                      jnp.einsum("bh,hn->bn", x, out_tables[kind],
                                 preferred_element_type=jnp.float32))
            logits = softcap(logits, cfg.final_logit_softcap)
            lo, hi = (int(v) - offsets[kind] for v in RENDER_RANGES[slot])
            if lo > 0 or hi < logits.shape[-1]:
                index = jnp.arange(logits.shape[-1])
                logits = jnp.where((index >= lo) & (index < hi), logits, -jnp.inf)
            u = jax.lax.dynamic_index_in_dim(uniforms, note_index, 1, False)[:, slot]
            return sample(logits, u, temperature[:, slot], top_p[:, slot], native) + offsets[kind]

        prime_len = prime_notes * TOKENS_PER_NOTE
        cache = model.init_cache(states, tokens, kv_dtype)
        if prime_notes:  # BOS + the prime except its last token (it goes in with the next pitch)
            ids = jnp.concatenate([jnp.full((b, 1), BOS, prime.dtype), prime[:, :-1]], axis=1)
            _, cache = model.decode(ids, states, enc_mask, cache, vocab_slice=(0, 1),
                                    attend_len=prime_len)
            last = prime[:, -1]
        else:
            last = jnp.full((b,), BOS, enc_ids.dtype)
        key_axis = 1 if sd_keys else 2  # the keys' position axis
        full = [(_to_cache(_heads_first(c["k"], not sd_keys), storage),
                 _to_cache(_heads_first(c["v"]), storage)) for c in cache["layers"]]
        pitch = enc_ids.reshape(b, notes, TOKENS_PER_NOTE)[:, :, 0]
        out = jnp.zeros((b, notes, TOKENS_PER_NOTE), enc_ids.dtype)
        if prime_notes:
            out = out.at[:, :prime_notes].set(prime.reshape(b, prime_notes, TOKENS_PER_NOTE))
        n_max = jnp.max(n_notes)

        for m in range(n_chunks):
            lo_note, hi_note = m * chunk_notes, (m + 1) * chunk_notes
            if hi_note <= prime_notes:
                continue
            seen = (m + 1) * chunk  # the tokens this segment's notes can attend to
            seg = [(jax.lax.slice_in_dim(k, 0, seen, axis=key_axis), v[:, :seen])
                   for k, v in full]

            def note_step(carry):
                j, seg, last, out = carry
                pos = j * TOKENS_PER_NOTE
                x, seg = _decoder_step(model, fused, layout,
                                       jnp.stack([last, pitch[:, j]], axis=1), pos, cross, seg,
                                       rope, sd_keys, states)
                row = [pitch[:, j], pick(x, j, 1)]
                for s in range(2, TOKENS_PER_NOTE):  # velocity, duration, pedal 1-4
                    x, seg = _decoder_step(model, fused, layout,
                                           row[-1][:, None].astype(out.dtype), pos + s, cross, seg,
                                           rope, sd_keys, states)
                    row.append(pick(x, j, s))
                row = jnp.stack([r.astype(out.dtype) for r in row], axis=1)
                out = jax.lax.dynamic_update_slice_in_dim(out, row[:, None], j, 1)
                return j + 1, seg, row[:, -1], out

            start = max(lo_note, prime_notes)
            stop = jnp.minimum(hi_note, n_max)
            _, seg, last, out = jax.lax.while_loop(lambda c, stop=stop: c[0] < stop, note_step,
                                                   (jnp.int32(start), seg, last, out))
            full = [(jax.lax.dynamic_update_slice_in_dim(fk, sk, 0, key_axis),
                     jax.lax.dynamic_update_slice_in_dim(fv, sv, 0, 1))
                    for (fk, fv), (sk, sv) in zip(full, seg)]
        return out.reshape(b, tokens)

    return window_fn
