"""Gemma-2 / T5Gemma building blocks in Flax NNX, laid out to load the reference weights.

Why these exact choices: the published Pianist Transformer is a `transformers` T5Gemma model, so
every detail that changes the numbers is copied from it (see docs/REFERENCE_MODEL_NOTES.md):
RMSNorm scales by ``1 + w`` in float32, the attention scale is ``query_pre_attn_scalar ** -0.5``
(not ``head_dim ** -0.5``), attention logits are soft-capped before masking, softmax runs in
float32, RoPE rotates halves (not interleaved pairs), query head ``h`` reads key/value head
``h // (heads / kv_heads)``, and the MLP is ``down(gelu_tanh(gate(x)) * up(x))`` without biases.

Kernels are stored ``[in, ..., out]`` with named head axes (``q: [embed, heads, head_dim]``), so
each dimension carries a logical axis name (``out_sharding`` metadata) that
`pianist_jax.train.sharding` maps onto the device mesh with the config's rule table. Parameters are
kept in ``param_dtype`` and cast to the compute ``dtype`` where they are used.
"""

from __future__ import annotations

import contextlib
import math
import threading

import jax
import jax.numpy as jnp
from flax import nnx

RMS_NORM_EPS = 1e-6
_NEG = float(jnp.finfo(jnp.float32).min)  # masked logits: what `transformers` adds, in fp32


_CONTEXT = threading.local()


@contextlib.contextmanager
def activation_sharding(to_sharding):
    """While tracing inside this context, `constrain` pins activations to
    ``to_sharding(logical_names, shape)`` (set up by
    `pianist_jax.train.sharding.activation_rules`)."""
    previous = getattr(_CONTEXT, "fn", None)
    _CONTEXT.fn = to_sharding
    try:
        yield
    finally:
        _CONTEXT.fn = previous


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """Sharding hint for an activation (e.g. ``("batch", None, None)``): keeps FSDP gathering
    weights instead of re-sharding activations; a no-op outside `activation_sharding`."""
    fn = getattr(_CONTEXT, "fn", None)
    return x if fn is None else jax.lax.with_sharding_constraint(x, fn(logical, x.shape))


def use_weight(param: nnx.Param, dtype) -> jax.Array:
    """A parameter as used in a matmul: cast to the compute dtype and, under
    `activation_sharding`, gathered over the FSDP axis (``embed`` dimensions unsharded) while
    tensor-parallel dimensions stay split - FSDP's all-gather before use, reduce-scatter of
    the gradient after, instead of XLA re-sharding activations to match the stored layout."""
    value = param[...].astype(dtype)
    if getattr(_CONTEXT, "fn", None) is None:
        return value
    names = param.get_metadata().get("out_sharding") or (None,) * value.ndim
    return constrain(value, *(None if n == "embed" else n for n in names))


def project(spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, weight)`` summed in float32, returned in ``x.dtype``: what
    accelerators do for bfloat16 anyway, and XLA:CPU's bfloat16 products are faster this way
    than with bfloat16 sums."""
    return jnp.einsum(spec, x, weight, preferred_element_type=jnp.float32).astype(x.dtype)


def logical_param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = None) -> nnx.Param:
    """A parameter with logical axis names; ``std=None`` -> zeros (RMSNorm scales, biases)."""
    if len(shape) != len(axes):
        raise ValueError(f"parameter shape {shape} and logical axes {axes} differ in rank")
    if std is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``tanh(x / cap) * cap``; ``cap=None`` leaves ``x`` unchanged."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: normalise in float32, scale by ``1 + w`` (``w`` starts at zero)."""

    def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.scale = logical_param(rngs, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + RMS_NORM_EPS)
        return (h * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope_tables(positions: jax.Array, dim: int, theta: float, dtype) -> tuple[jax.Array, ...]:
    """cos and sin ``[B, T, 1, D]`` of the rotary embedding at integer ``positions [B, T]``:
    computed in float32 and cast to ``dtype``, as `transformers` does."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half on ``x [B, T, heads, D]`` with tables from `rope_tables`."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on ``x [B, T, heads, D]`` at integer ``positions [B, T]`` (rotate-half)."""
    return rotate(x, *rope_tables(positions, x.shape[-1], theta, x.dtype))


class Attention(nnx.Module):
    """Grouped-query attention with soft-capped logits; self- (RoPE) or cross-attention (none)."""

    def __init__(self, cfg, *, rope: bool, rngs: nnx.Rngs):
        h, n, k, d = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd, std = cfg.param_dtype, 1.0 / math.sqrt(h)
        self.q_proj = logical_param(rngs, (h, n, d), ("embed", "heads", "head_dim"), pd, std)
        self.k_proj = logical_param(rngs, (h, k, d), ("embed", "kv", "head_dim"), pd, std)
        self.v_proj = logical_param(rngs, (h, k, d), ("embed", "kv", "head_dim"), pd, std)
        self.o_proj = logical_param(
            rngs, (n, d, h), ("heads", "head_dim", "embed"), pd, 1.0 / math.sqrt(n * d)
        )
        self.rope = rope
        self.theta = cfg.rope_theta
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.logit_cap = cfg.attn_logit_softcap
        self.dtype = cfg.dtype

    def _rope(self, x: jax.Array, positions: jax.Array | None, tables) -> jax.Array:
        if not self.rope:
            return x
        return rotate(x, *tables) if tables is not None else apply_rope(x, positions, self.theta)

    def queries(self, x: jax.Array, positions: jax.Array | None, tables=None) -> jax.Array:
        """Queries ``[B, T, H, D]``; ``tables``: ready rotary tables for the positions
        (`rope_tables`), which a decode loop makes once instead of at every step."""
        q = project("btm,mhd->bthd", x, use_weight(self.q_proj, self.dtype))
        return self._rope(q, positions, tables)

    def keys_values(
        self, x: jax.Array, positions: jax.Array | None, tables=None
    ) -> tuple[jax.Array, jax.Array]:
        k = project("bsm,mkd->bskd", x, use_weight(self.k_proj, self.dtype))
        v = project("bsm,mkd->bskd", x, use_weight(self.v_proj, self.dtype))
        return self._rope(k, positions, tables), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """``q [B,T,H,D]``, ``k/v [B,S,K,D]``, boolean ``mask`` broadcastable to ``[B,T,S]``."""
        b, t, n, d = q.shape
        kv = k.shape[2]
        qg = q.reshape(b, t, kv, n // kv, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(self.scale, q.dtype)
        logits = softcap(logits.astype(jnp.float32), self.logit_cap)
        logits = jnp.where(mask[:, None, None, :, :], logits, _NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, d)
        return project("bthd,hdm->btm", out, use_weight(self.o_proj, self.dtype))

    def attend_cached(
        self, q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array
    ) -> jax.Array:
        """`attend` over a cache in the decoding layout (`cache_layout`): ``keys [B*K, D, S]``,
        ``values [B*K, S, D]``, ``mask`` broadcastable to ``[B, T, S]``. Batch and kv-head
        axes are merged so each product has one batch axis and XLA reads the cache in place
        (with separate axes it copied and transposed the whole cache at every step)."""
        b, t, n, d = q.shape
        kv = values.shape[0] // b
        g = n // kv
        qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, g * t, d)
        logits = jnp.einsum("nqd,nds->nqs", qg, keys.astype(q.dtype))
        logits = logits * jnp.asarray(self.scale, q.dtype)
        logits = softcap(logits.astype(jnp.float32), self.logit_cap).reshape(b, kv, g, t, -1)
        mask = jnp.broadcast_to(mask, (b, t, mask.shape[-1]))
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, _NEG), axis=-1)
        probs = probs.reshape(b * kv, g * t, -1).astype(q.dtype)
        out = jnp.einsum("nqs,nsd->nqd", probs, values.astype(q.dtype))
        out = out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)
        return project("bthd,hdm->btm", out, use_weight(self.o_proj, self.dtype))

    def attend_causal(self, q, k, v, mask, chunk: int | None, window: int | None) -> jax.Array:
        """`attend` for a causal block (query i = key i) in query chunks of ``chunk`` tokens,
        each over only the keys it may see (from ``s - window + 1`` to the chunk's end)."""
        t = q.shape[1]
        if chunk is None or t <= chunk or k.shape[1] != t:
            return self.attend(q, k, v, mask)
        outs = []
        for s in range(0, t, chunk):
            e = min(s + chunk, t)
            k0 = 0 if window is None else max(0, s - window + 1)
            outs.append(self.attend(q[:, s:e], k[:, k0:e], v[:, k0:e], mask[:, s:e, k0:e]))
        return jnp.concatenate(outs, axis=1)

    def __call__(self, x, source, mask, q_positions=None, kv_positions=None) -> jax.Array:
        """Full attention of ``x`` over ``source`` (itself for self-attention), no cache."""
        k, v = self.keys_values(source, kv_positions)
        return self.attend(self.queries(x, q_positions), k, v, mask)


class MLP(nnx.Module):
    """Gated GELU (tanh approximation, = PyTorch ``gelu_pytorch_tanh``), no biases."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        h, f, pd = cfg.hidden, cfg.mlp, cfg.param_dtype
        self.gate_proj = logical_param(rngs, (h, f), ("embed", "mlp"), pd, 1.0 / math.sqrt(h))
        self.up_proj = logical_param(rngs, (h, f), ("embed", "mlp"), pd, 1.0 / math.sqrt(h))
        self.down_proj = logical_param(rngs, (f, h), ("mlp", "embed"), pd, 1.0 / math.sqrt(f))
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project("...m,mf->...f", x, use_weight(self.gate_proj, self.dtype))
        up = project("...m,mf->...f", x, use_weight(self.up_proj, self.dtype))
        return project(
            "...f,fm->...m",
            jax.nn.gelu(gate, approximate=True) * up,
            use_weight(self.down_proj, self.dtype),
        )


class EncoderLayer(nnx.Module):
    """Bidirectional self-attention + MLP, each wrapped in a pre- and a post-norm."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
        self.pre_self_attn_norm = RMSNorm(cfg.hidden, **kw)
        self.self_attn = Attention(cfg, rope=True, rngs=rngs)
        self.post_self_attn_norm = RMSNorm(cfg.hidden, **kw)
        self.pre_ffw_norm = RMSNorm(cfg.hidden, **kw)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_ffw_norm = RMSNorm(cfg.hidden, **kw)

    def __call__(self, x, mask, positions) -> jax.Array:
        h = self.pre_self_attn_norm(x)
        x = x + self.post_self_attn_norm(self.self_attn(h, h, mask, positions, positions))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


class DecoderLayer(nnx.Module):
    """Causal self-attention, cross-attention, MLP: over a whole block (`__call__`) or a few
    tokens at a time against a cache (`step`, the one decoding path: cached scoring and the
    renderer both use it)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
        self.pre_self_attn_norm = RMSNorm(cfg.hidden, **kw)
        self.self_attn = Attention(cfg, rope=True, rngs=rngs)
        self.post_self_attn_norm = RMSNorm(cfg.hidden, **kw)
        self.pre_cross_attn_norm = RMSNorm(cfg.hidden, **kw)
        self.cross_attn = Attention(cfg, rope=False, rngs=rngs)
        self.post_cross_attn_norm = RMSNorm(cfg.hidden, **kw)
        self.pre_ffw_norm = RMSNorm(cfg.hidden, **kw)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_ffw_norm = RMSNorm(cfg.hidden, **kw)
        self.attn_chunk = cfg.attn_chunk

    def __call__(
        self, x, self_mask, positions, cross_kv, cross_mask, window: int | None = None
    ) -> jax.Array:
        """The whole block at once (training, scoring). ``cross_kv``: this layer's (k, v) of
        the encoder states ``[B, N, K, D]``."""
        h = self.pre_self_attn_norm(x)
        q = self.self_attn.queries(h, positions)
        k, v = self.self_attn.keys_values(h, positions)
        x = x + self.post_self_attn_norm(
            self.self_attn.attend_causal(q, k, v, self_mask, self.attn_chunk, window)
        )
        return self._cross_and_mlp(x, lambda q: self.cross_attn.attend(q, *cross_kv, cross_mask))

    def step(
        self,
        x,
        positions,
        rope,
        cache,
        cross,
        cross_mask,
        window: int | None = None,
        last_only: bool = False,
    ):
        """Cached decoding of ``x [B, T, H]`` at ``positions [T]`` (consecutive), with their
        rotary ``rope`` tables ``[1, T, 1, D]``: writes the tokens' keys and values into
        ``cache`` (``(keys [B*K, D, S], values [B*K, S, D])``, `cache_layout`) and attends over
        all ``S`` entries up to each token's position; ``cross``: the encoder's keys and values
        in the same layout. ``last_only``: compute the outputs of the last token only (the
        others' keys and values are all that is needed from them).
        Returns ``(x, new_cache)``."""
        h = self.pre_self_attn_norm(x)
        q = self.self_attn.queries(h, None, rope)
        k, v = self.self_attn.keys_values(h, None, rope)
        keys, values = cache
        keys = jax.lax.dynamic_update_slice_in_dim(
            keys, cache_layout(k, keys=True).astype(keys.dtype), positions[0], 2
        )
        values = jax.lax.dynamic_update_slice_in_dim(
            values, cache_layout(v).astype(values.dtype), positions[0], 1
        )
        if last_only and x.shape[1] > 1:
            q, x, positions = q[:, -1:], x[:, -1:], positions[-1:]
        mask = window_mask(positions, jnp.arange(values.shape[1]), window, causal=True)[None]
        x = x + self.post_self_attn_norm(self.self_attn.attend_cached(q, keys, values, mask))
        x = self._cross_and_mlp(x, lambda q: self.cross_attn.attend_cached(q, *cross, cross_mask))
        return x, (keys, values)

    def _cross_and_mlp(self, x, cross_attend):
        h = self.pre_cross_attn_norm(x)
        x = x + self.post_cross_attn_norm(cross_attend(self.cross_attn.queries(h, None)))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


def cache_layout(x: jax.Array, keys: bool = False) -> jax.Array:
    """Keys or values ``[B, S, K, D]`` -> the decoding caches' layout, batch and kv-head axes
    merged: values ``[B*K, S, D]``, keys ``[B*K, D, S]`` (as the attention products read
    them: see `Attention.attend_cached`)."""
    b, s, k, d = x.shape
    if keys:
        return x.transpose(0, 2, 3, 1).reshape(b * k, d, s)
    return x.transpose(0, 2, 1, 3).reshape(b * k, s, d)


def is_sliding(layer_index: int) -> bool:
    """T5Gemma's layer types: layers 0, 2, 4, ... use the sliding window, 1, 3, ... attend fully."""
    return bool((layer_index + 1) % 2)


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None, causal: bool) -> jax.Array:
    """Boolean ``[..., T, S]`` mask from query/key positions: causal and/or a sliding window."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0 if causal else jnp.ones(diff.shape, bool)
    if window is not None:
        mask &= diff < window
        if not causal:
            mask &= -diff < window
    return mask
