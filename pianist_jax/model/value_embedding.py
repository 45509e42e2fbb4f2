"""Embeddings that know what a token's value is (``model.value_embedding``).

The vocabulary gives every millisecond from 0 to 4999 its own id, and a plain embedding learns
each of those rows on its own. Fine-tuning data has score gaps of a few hundred distinct
values, most of them rare: on ASAP, inter-onset times of 700-1000 ms occur ~27 times per
value and some (795 ms) never, so their rows stay near their random start. A model that
cannot read a long rest in the score, nor give probability to a long gap it has rarely
produced, plays long notes and rests short and slows where the score is quick.

With the switch on, each velocity, time and pedal id's row is its learned row plus a learned
projection of fixed features of its value: for each kind a constant, the value on [0, 1]
(velocity and pedal linear, time on a log scale) and sines and cosines of it at a few
frequencies. Neighbouring values then share what training taught either of them, in the
encoder's table and in the decoder's tied input/output table alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pianist_jax.model.layers import logical_param, project, use_weight
from pianist_jax.tokenizer import PEDAL_START, TIME_START, VELOCITY_START

# (first id, number of values, log scale): the kinds whose ids stand for numbers
VALUE_KINDS = ((VELOCITY_START, 128, False), (TIME_START, 5000, True), (PEDAL_START, 128, False))
FREQUENCIES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)  # cycles per range
PER_KIND = 2 + 2 * len(FREQUENCIES)
NUM_FEATURES = len(VALUE_KINDS) * PER_KIND


def features(vocab_size: int) -> jax.Array:
    """``[vocab_size, NUM_FEATURES]`` float32: one block of columns per value kind, zero for
    the ids outside it (pitch and special ids get nothing); rows of unit-ish norm."""
    ids = jnp.arange(vocab_size)
    freq = 2 * math.pi * jnp.asarray(FREQUENCIES, jnp.float32)
    blocks = []
    for start, count, log in VALUE_KINDS:
        value = jnp.clip(ids - start, 0, count - 1).astype(jnp.float32)
        x = jnp.log1p(value) / math.log1p(count - 1) if log else value / (count - 1)
        x = x[:, None]
        block = jnp.concatenate([jnp.ones_like(x), x, jnp.sin(x * freq), jnp.cos(x * freq)], axis=1)
        inside = (ids >= start) & (ids < start + count)
        blocks.append(jnp.where(inside[:, None], block, 0.0))
    return jnp.concatenate(blocks, axis=1) / math.sqrt(PER_KIND)


def projection(cfg, rngs: nnx.Rngs) -> nnx.Param | None:
    """The learned ``[NUM_FEATURES, hidden]`` projection (zeros: training starts from the plain
    embedding), or None with the switch off."""
    if not cfg.value_embedding:
        return None
    axes = ("value_features", "embed")
    return logical_param(rngs, (NUM_FEATURES, cfg.hidden), axes, cfg.param_dtype)


def table(embedding: nnx.Param, value_proj: nnx.Param | None, dtype) -> jax.Array:
    """The embedding table as used (compute ``dtype``): the stored rows, plus the value
    projection where the model has one."""
    rows = use_weight(embedding, dtype)
    if value_proj is None:
        return rows
    feats = features(rows.shape[0]).astype(dtype)
    return rows + project("vf,fh->vh", feats, use_weight(value_proj, dtype))
