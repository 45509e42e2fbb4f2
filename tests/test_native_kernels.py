"""The native CPU kernel (pianist_jax.native_kernels): exact enough products for every row count
the renderer uses, a clean fallback when it is disabled, and the same tokens in the renderer."""
from __future__ import annotations

import numpy as np
import pytest

from pianist_jax import native_kernels

USABLE, WHY = native_kernels.load()
needs_kernel = pytest.mark.skipif(not USABLE, reason=f"native kernel unavailable: {WHY}")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("out_in", [(13, 8), (40, 24), (300, 768)])
def test_matvec_matches_numpy(rows, out_in):
    import jax

    o, i = out_in
    rng = np.random.default_rng(rows * 1000 + o)
    x = rng.standard_normal((rows, i)).astype(np.float32)
    w = rng.standard_normal((o, i)).astype(np.float32)
    got = np.asarray(jax.jit(native_kernels.matvec_t)(x, w))
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(i))
    # a row's result does not depend on the other rows (batch-invariant rendering)
    alone = np.asarray(jax.jit(native_kernels.matvec_t)(x[-1:], w))
    np.testing.assert_array_equal(got[-1:], alone)


@needs_kernel
def test_matvec_keeps_leading_axes():
    import jax.numpy as jnp

    x = jnp.ones((2, 3, 16), jnp.float32)
    w = jnp.arange(5 * 16, dtype=jnp.float32).reshape(5, 16)
    np.testing.assert_allclose(np.asarray(native_kernels.matvec_t(x, w)),
                               np.broadcast_to(np.asarray(w).sum(1), (2, 3, 5)))


def reference_attention(q, keys, values, mask, scale, cap):
    """float64 numpy: softmax over the visible positions (-finfo.min where masked, so a row that
    sees nothing is uniform, as in XLA), then the weighted values."""
    b, t, h, d = q.shape
    kv = keys.shape[0] // b
    g, s = h // kv, keys.shape[-1]
    k = keys.reshape(b, kv, d, s).astype(np.float64)
    v = values.reshape(b, kv, s, d).astype(np.float64)
    out = np.zeros(q.shape)
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                x = scale * (q[bi, ti, hi].astype(np.float64) @ k[bi, hi // g])
                if cap:
                    x = cap * np.tanh(x / cap)
                x = np.where(mask[bi, ti], x, np.finfo(np.float32).min)
                p = np.exp(x - x.max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, hi // g]
    return out


@needs_kernel
@pytest.mark.parametrize("b,t,h,kv,d,s,cap", [(1, 1, 8, 4, 128, 3072, 50.0),
                                              (1, 2, 8, 4, 128, 1030, 50.0),
                                              (3, 2, 4, 2, 16, 45, None),
                                              (2, 1, 4, 4, 32, 8, 5.0)])
def test_attend_matches_numpy(b, t, h, kv, d, s, cap):
    import jax

    rng = np.random.default_rng(s)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    keys = rng.standard_normal((b * kv, d, s)).astype(np.float32)
    values = rng.standard_normal((b * kv, s, d)).astype(np.float32)
    pos = rng.integers(0, s, size=(b, 1)) + np.arange(t)  # causal: sees 0..pos
    mask = np.arange(s)[None, None] <= np.minimum(pos, s - 1)[..., None]
    if b > 1:
        mask[-1, 0, :] = rng.random(s) < 0.5  # scattered holes
    if b > 2:
        mask[1, 0, :] = False  # sees nothing: uniform, as XLA's softmax over finfo.min
    scale = 1.0 / np.sqrt(d)
    got = np.asarray(jax.jit(native_kernels.attend, static_argnums=(4, 5))(
        q, keys, values, mask, scale, cap))
    np.testing.assert_allclose(got, reference_attention(q, keys, values, mask, scale, cap),
                               rtol=2e-4, atol=2e-5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PIANIST_JAX_NATIVE", "0")
    assert native_kernels.load() == (False, "disabled by PIANIST_JAX_NATIVE=0")


def test_cpu_check_names_a_reason():
    ok, why = native_kernels.cpu_supports()
    assert ok or why  # never an unexplained "no"


@needs_kernel
def test_renderer_same_tokens_with_and_without_kernel(tmp_path):
    """A tiny model renders a batch of two scores to the same tokens, greedy and sampled,
    with the kernel (its matrices: 64 x 128 etc., I % 8 == 0) and with XLA's products."""
    from flax import nnx

    from pianist_jax import export, midi, tokenizer
    from pianist_jax.config import load_config
    from pianist_jax.model import PianistTransformer
    from pianist_jax.render import Renderer

    cfg = load_config(None, ["model=tiny"]).model
    model = PianistTransformer(cfg, rngs=nnx.Rngs(3))
    export.write_export(tmp_path / "tiny", nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    scores = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        onset = np.cumsum(rng.choice([0, 125, 250], size=40))
        notes = midi.Notes(onset=onset, offset=onset + 200, pitch=rng.integers(40, 90, size=40),
                           velocity=np.full(40, 64), pedal_ms=np.array([0]),
                           pedal_value=np.array([127]))
        midi.write_midi(notes, tmp_path / f"s{seed}.mid")
        scores.append(tokenizer.encode_file(tmp_path / f"s{seed}.mid"))
    outs = {}
    for native in (True, False):
        r = Renderer(tmp_path / "tiny", native=native, window=128, shift=64)
        assert r.native == native
        outs[native] = [r.render_ids(scores, [1, 2], temperature=t) for t in (0.0, 1.0)]
    for a, b in zip(outs[True], outs[False]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
