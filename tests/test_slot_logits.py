"""Per-slot logits (`model.slot_logits`): the loss equals the full-vocabulary loss with each
slot's out-of-range ids masked out, gradients flow and training lowers it, PAD and other
out-of-range targets carry no weight, and the data pipelines really are slot-aligned."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pianist_jax import midi
from pianist_jax import tokenizer as tok
from pianist_jax.config import load_config
from pianist_jax.data import pipeline as data
from pianist_jax.data import records
from pianist_jax.data import sft as data_sft
from pianist_jax.model import SLOT_GROUPS, flops_per_token
from pianist_jax.train import sharding
from pianist_jax.train.step import StepFns, slot_loss_sums

BLOCK, BATCH = 64, 8


def piece(rng, n):
    """Patterned (learnable) notes -> ids, with pedal changes."""
    onset = np.cumsum(rng.integers(0, 300, n))
    notes = midi.Notes(
        onset=onset,
        offset=onset + rng.integers(50, 800, n),
        pitch=48 + (np.arange(n) * 3) % 36,
        velocity=rng.integers(40, 100, n),
        pedal_ms=np.sort(rng.integers(0, int(onset[-1]) + 1, 4)),
        pedal_value=rng.choice([0, 100], 4),
    )
    return tok.encode_notes(notes)


def batch_of(seed=0, crop=True):
    """Pre-training examples (the loader's masking); some cropped, so PAD tails occur."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(BATCH):
        block = piece(rng, BLOCK // 8)
        if crop and i % 3 == 0:
            block = data.crop_block(block, rng, 1.0)
        examples.append(data.mask_block(block, rng, 0.3))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def slot_valid(targets):
    """[B, T] bool: the target is an id its slot (position % 8) can take."""
    ranges = tok.SLOT_RANGES[np.arange(targets.shape[1]) % 8]
    return (targets >= ranges[:, 0]) & (targets < ranges[:, 1])


def reference_sums(full_logits, targets, weights):
    """Loss, correct, count from full-vocabulary logits with every id outside the position's
    slot range masked to -inf; positions whose target is out of range are dropped."""
    t = targets.shape[1]
    ranges = jnp.asarray(tok.SLOT_RANGES[np.arange(t) % 8])  # [T, 2]
    ids = jnp.arange(full_logits.shape[-1])
    in_range = (ids >= ranges[:, :1]) & (ids < ranges[:, 1:])  # [T, V]
    logits = jnp.where(in_range[None], full_logits, -jnp.inf)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    valid = jnp.asarray(slot_valid(np.asarray(targets)))
    w = jnp.where(valid, weights, 0.0)
    ce = jnp.where(valid, ce, 0.0)
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * w), jnp.sum(hit * w), jnp.sum(w)


TINY = ["model=tiny", "model.encoder_layers=1", "model.slot_logits=true"]
# full-vocabulary logits and per-slot logits of one forward pass; one compile for all tests
FORWARD = nnx.jit(lambda m, e, d: (m(e, d), m.slot_logits(e, d)))


def random_params(abstract: dict, seed: int = 0) -> dict:
    """Random values for every parameter, drawn with numpy (no per-shape init compiles):
    matrices ~ N(0, 1/fan_in), norm scales and biases ~ N(0, 0.1^2) (a less trivial network
    than their zero init)."""
    rng = np.random.default_rng(seed)

    def draw(s):
        scale = 1 / np.sqrt(s.shape[0]) if len(s.shape) > 1 else 0.1
        return (scale * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree.map(draw, abstract)


@pytest.fixture(scope="module")
def model():
    graphdef, abstract = sharding.abstract_model(load_config(None, TINY).model)
    shapes = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract)
    )
    return sharding.bind(graphdef, abstract, random_params(shapes))


def test_slot_groups_cover_every_slot_once():
    assert [s for slots, _, _ in SLOT_GROUPS for s in slots] == list(range(8))
    for slots, lo, hi in SLOT_GROUPS:
        assert all((lo, hi) == tuple(tok.SLOT_RANGES[s]) for s in slots)
    assert SLOT_GROUPS[1][1:] == (tok.TIME_START, tok.TIME_START + tok.MAX_IOI_MS + 1)
    cfg = load_config(None, ["model=tiny"]).model
    assert flops_per_token(dataclasses.replace(cfg, slot_logits=True), 1024) < flops_per_token(
        cfg, 1024
    )


def test_slot_loss_equals_masked_full_vocab_loss(model):
    b = batch_of(0)
    weights = jnp.asarray(b["loss_mask"])
    full, groups = FORWARD(model, b["encoder_ids"], b["decoder_input_ids"])
    # every per-slot logit is the full-vocabulary logit of the same id
    full_notes = full.reshape(BATCH, BLOCK // 8, 8, -1)
    for (slots, lo, hi), logits in zip(SLOT_GROUPS, groups):
        assert logits.shape == (BATCH, BLOCK // 8, len(slots), hi - lo)
        np.testing.assert_allclose(
            logits, full_notes[:, :, slots[0] : slots[-1] + 1, lo:hi], atol=1e-5, rtol=1e-5
        )
    got = slot_loss_sums(groups, jnp.asarray(b["targets"]), weights)
    want = reference_sums(full, jnp.asarray(b["targets"]), weights)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(got[2]) == float(weights.sum()) > 0  # real masked targets are all in range
    # all positions weighted (SFT-style), not only the masked ones
    ones = jnp.ones_like(weights)
    np.testing.assert_allclose(
        slot_loss_sums(groups, jnp.asarray(b["targets"]), ones),
        reference_sums(full, jnp.asarray(b["targets"]), ones),
        rtol=1e-5,
        atol=1e-5,
    )


def test_out_of_range_targets_carry_no_weight(model):
    b = batch_of(1)
    targets = b["targets"].copy()
    targets[0, -16:] = tok.PAD  # a piece ended
    targets[1, 0] = tok.VELOCITY_START + 3  # pitch slot, velocity id
    targets[1, 9] = tok.TIME_START + 4995  # IOI slot: a duration-only time id
    targets[2, 12] = tok.MASK  # pedal slot
    bad = ~slot_valid(targets)
    assert bad.sum() >= 19
    ones = jnp.ones(targets.shape, jnp.float32)  # weight 1 everywhere, PAD included
    _, groups = FORWARD(model, b["encoder_ids"], b["decoder_input_ids"])

    def loss_fn(gs, t):
        sums = slot_loss_sums(gs, t, ones)
        return sums[0], sums

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, (loss, _, count)), grads = value_and_grad(groups, jnp.asarray(targets))
    assert float(count) == (~bad).sum() and np.isfinite(float(loss))
    # no gradient reaches the logits of out-of-range positions; every other one gets some
    bad_notes = bad.reshape(BATCH, BLOCK // 8, 8)
    for (slots, _, _), g in zip(SLOT_GROUPS, grads):
        g = np.abs(np.asarray(g)).sum(-1)
        dead = bad_notes[:, :, slots[0] : slots[-1] + 1]
        assert np.isfinite(g).all() and not g[dead].any() and g[~dead].all()
    # loss and gradients do not depend on what the out-of-range targets are
    (_, (loss2, _, count2)), grads2 = value_and_grad(
        groups, jnp.asarray(np.where(bad, tok.EOS, targets))
    )
    assert (float(loss2), float(count2)) == (float(loss), float(count))
    assert all(np.array_equal(x, y) for x, y in zip(grads, grads2))


def test_train_steps_on_a_mesh_match_the_reference_and_lower_the_loss():
    cfg = load_config(
        None,
        [
            *TINY,
            "mesh.shape=[2,2,2]",
            f"data.block_size={BLOCK}",
            f"train.batch_size={BATCH}",
            "train.lr=3e-3",
            "train.warmup_steps=0",
            "train.steps=20",
        ],
    )
    fns = StepFns(cfg, sharding.make_mesh(cfg.mesh), total_steps=20)
    params = random_params(fns._abstract_params(), seed=1)
    host = batch_of(2)
    # the first step's metrics (8-device mesh: data, fsdp and tensor axes) = the masked
    # full-vocabulary reference on one device, at the initial parameters
    model = sharding.bind(fns.graphdef, fns.abstract, params)
    full, _ = FORWARD(model, host["encoder_ids"], host["decoder_input_ids"])
    loss, correct, count = reference_sums(
        full, jnp.asarray(host["targets"]), jnp.asarray(host["loss_mask"])
    )
    state = fns.init_state(params)
    batch = jax.device_put(host, fns.batch_sharding)
    history = []
    for _ in range(8):
        state, metrics = fns.train_step(state, batch)
        history.append(jax.device_get(metrics))
    first = history[0]
    np.testing.assert_allclose(
        [first["loss"], first["accuracy"], first["loss_tokens"]],
        [loss / count, correct / count, count],
        rtol=1e-5,
    )
    assert int(state["bad_step"]) == -1
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in history)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


def test_pipelines_are_slot_aligned():
    """Position p's target is slot p % 8 (or PAD with zero weight) in pre-training blocks
    (packed, cropped) and SFT windows (and crops, and eval padding examples)."""
    b = batch_of(3)
    assert slot_valid(b["targets"])[b["targets"] != tok.PAD].all()
    assert not b["loss_mask"][b["targets"] == tok.PAD].any()
    assert (b["decoder_input_ids"][:, 1:] == b["targets"][:, :-1]).all()

    rng = np.random.default_rng(4)
    score, perf = piece(rng, 40), piece(rng, 40)
    raw = records.encode_record(
        score,
        source="x.mid",
        corpus="syn",
        kind="score",
        n_notes=40,
        content_hash="0" * 64,
        extras={"performance": perf},
    )

    index = types.SimpleNamespace(  # the SftIndex interface: sources[s][r] -> bytes, rows
        sources=[[raw]],
        rows=np.array([(0, 0, 0, 16, 0), (0, 0, 24, 16, 1), (0, 0, 30, 10, 0)], np.int64),
    )
    cfg = load_config(
        None,
        ["data.kind=sft", "data.block_size=128", "data.window_stride=64", "data.mask_prob=0.3"],
    ).data
    build = data_sft.SftExample(index, cfg)
    for i in (0, 1, 2, -1):
        ex = build(i, np.random.default_rng(i + 10))
        real = ex["targets"] != tok.PAD
        assert slot_valid(ex["targets"][None])[0][real].all()
        assert (ex["loss_mask"] == real).all()
        assert ex["decoder_input_ids"][0] == tok.BOS
        assert (ex["decoder_input_ids"][1:] == ex["targets"][:-1]).all()
