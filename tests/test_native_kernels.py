"""The native CPU kernels (pianist_jax.native_kernels): exact enough products for every row
count the renderer uses, float32 and bfloat16 storage, a clean fallback when they are disabled,
and the same tokens in the renderer."""
from __future__ import annotations

import numpy as np
import pytest

from pianist_jax import native_kernels

USABLE, WHY = native_kernels.load()
needs_kernel = pytest.mark.skipif(not USABLE, reason=f"native kernel unavailable: {WHY}")


def as_stored(a: np.ndarray, dtype: str):
    """``a`` in the storage dtype the kernel gets, and its exact float64 values."""
    import jax.numpy as jnp

    stored = jnp.asarray(a, dtype)
    return stored, np.asarray(stored.astype(jnp.float32), np.float64)


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 11, 16])
@pytest.mark.parametrize("out_in", [(13, 8), (40, 24), (300, 768)])
def test_matvec_matches_numpy(rows, out_in, dtype):
    import jax

    o, i = out_in
    rng = np.random.default_rng(rows * 1000 + o)
    x = rng.standard_normal((rows, i)).astype(np.float32)
    w, w64 = as_stored(rng.standard_normal((o, i)), dtype)
    got = np.asarray(jax.jit(native_kernels.matvec_t)(x, w))
    # builds with AVX512-BF16 round the rows of a bfloat16 product to bfloat16 (VDPBF16PS)
    rounded = dtype == "bfloat16" and native_kernels.rounds_bf16()
    want = (as_stored(x, "bfloat16")[1] if rounded else x.astype(np.float64)) @ w64.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(i))
    # a row's result does not depend on the other rows (batch-invariant rendering)
    alone = np.asarray(jax.jit(native_kernels.matvec_t)(x[-1:], w))
    np.testing.assert_array_equal(got[-1:], alone)


needs_amx = pytest.mark.skipif(not (USABLE and native_kernels.amx()),
                               reason="AMX kernel unavailable on this CPU")


@needs_amx
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("out_in", [(13, 32), (100, 64), (300, 768), (5000, 96)])
def test_matvec_amx_matches_numpy(rows, out_in):
    """The tile kernel: the rows rounded to bfloat16, products summed in float32."""
    import jax
    import jax.numpy as jnp

    o, i = out_in
    rng = np.random.default_rng(rows * 7 + o)
    x = rng.standard_normal((rows, i)).astype(np.float32)
    w, w64 = as_stored(rng.standard_normal((o, i)), "bfloat16")
    wp = native_kernels.pack_amx(w)
    assert wp.shape == (-(-o // 64), i // 32, 4, 16, 16)
    mv = jax.jit(native_kernels.matvec_amx, static_argnums=2)
    got = np.asarray(mv(x, wp, o))
    _, x64 = as_stored(x, "bfloat16")
    np.testing.assert_allclose(got, x64 @ w64.T, rtol=1e-5, atol=1e-5 * np.sqrt(i))
    np.testing.assert_array_equal(got[-1:], np.asarray(mv(x[-1:], wp, o)))  # batch-invariant


def test_isa_choice(monkeypatch):
    """The widest build the CPU runs unless forced narrower; a bad choice is named."""
    monkeypatch.delenv("PIANIST_JAX_NATIVE_ISA", raising=False)
    assert native_kernels.isa() in native_kernels.ISAS
    monkeypatch.setenv("PIANIST_JAX_NATIVE_ISA", "avx2")
    assert native_kernels.isa() == "avx2"
    monkeypatch.setenv("PIANIST_JAX_NATIVE_ISA", "sse9")
    with pytest.raises(ValueError, match="PIANIST_JAX_NATIVE_ISA"):
        native_kernels.isa()


def test_isa_by_cpu_flags(monkeypatch):
    """Each build is picked by the CPU flags it needs: AVX512-BF16 without AMX (e.g. AMD
    Zen 4) gets avx512bf16, whose bfloat16 products round their rows (`rounds_bf16`); the
    renderer's encoder computes in bfloat16 only where the CPU multiplies it in hardware."""
    monkeypatch.delenv("PIANIST_JAX_NATIVE_ISA", raising=False)
    zen3 = "fma avx2".split()
    zen4 = zen3 + "avx512f avx512bw avx512vl avx512dq avx512_bf16".split()
    spr = zen4 + ["amx_tile", "amx_bf16"]
    for flags, want, bf16 in ((zen3, "avx2", False), (zen3 + list(native_kernels.AVX512),
                              "avx512", False), (zen4, "avx512bf16", True), (spr, "amx", True)):
        monkeypatch.setattr(native_kernels, "_cpu_flags", lambda f=flags: f)
        assert native_kernels.isa() == want
        assert native_kernels.rounds_bf16() == (want in ("avx512bf16", "amx"))
        assert native_kernels.cpu_multiplies_bf16() == bf16
    monkeypatch.setenv("PIANIST_JAX_NATIVE_ISA", "avx512bf16")
    monkeypatch.setattr(native_kernels, "_cpu_flags", lambda: zen3)
    with pytest.raises(ValueError, match="lacks"):
        native_kernels.isa()


NARROW_CHECK = """
import numpy as np, jax, jax.numpy as jnp
from pianist_jax import native_kernels as nk
assert nk.load()[0] and nk.build().name.startswith("libpianist_native-avx2-"), nk.load()
rng = np.random.default_rng(0)
for dtype in ("float32", "bfloat16"):
    x = rng.standard_normal((8, 24)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((40, 24)), dtype)
    want = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T
    np.testing.assert_allclose(np.asarray(nk.matvec_t(x, w)), want, rtol=1e-5, atol=1e-3)
q = rng.standard_normal((2, 1, 4, 16)).astype(np.float32)
kv = rng.standard_normal((4, 8, 16)).astype(np.float32)
out = np.asarray(nk.attend(q, kv, kv, np.ones((2, 1, 8), bool), 0.25, None))
k = kv.reshape(2, 2, 8, 16)
x = np.einsum("bhd,bhsd->bhs", q[:, 0].reshape(2, 2, 2, 16)[:, :, 0], k) * 0.25
p = np.exp(x - x.max(-1, keepdims=True))
ref = np.einsum("bhs,bhsd->bhd", p / p.sum(-1, keepdims=True), k)
np.testing.assert_allclose(out[:, 0].reshape(2, 2, 2, 16)[:, :, 0], ref, rtol=1e-4, atol=1e-5)
print("ok")
"""


@needs_kernel
def test_avx2_build_where_a_wider_one_is_chosen():
    """On a CPU that gets the AVX-512 (or AMX) build, the AVX2 build still works: the one
    older CPUs get (run in a fresh process, where PIANIST_JAX_NATIVE_ISA=avx2 picks it)."""
    import os
    import subprocess
    import sys

    if native_kernels.isa() == "avx2":
        pytest.skip("this CPU gets the AVX2 build already (tested above)")
    env = {**os.environ, "PIANIST_JAX_NATIVE_ISA": "avx2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", NARROW_CHECK], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@needs_kernel
def test_matvec_keeps_leading_axes():
    import jax.numpy as jnp

    x = jnp.ones((2, 3, 16), jnp.float32)
    w = jnp.arange(5 * 16, dtype=jnp.float32).reshape(5, 16)
    np.testing.assert_allclose(np.asarray(native_kernels.matvec_t(x, w)),
                               np.broadcast_to(np.asarray(w).sum(1), (2, 3, 5)))


def reference_attention(q, keys, values, mask, scale, cap, round_q=False):
    """float64 numpy: softmax over the visible positions (-finfo.min where masked, so a row that
    sees nothing is uniform, as in XLA), then the weighted values. ``round_q``: the scaled
    queries and the (unnormalised) weights rounded to bfloat16 first, as the AVX512-BF16 builds
    multiplies them with bfloat16 keys and values."""
    import jax.numpy as jnp

    b, t, h, d = q.shape
    kv = keys.shape[0] // b
    g, s = h // kv, keys.shape[1]
    k = keys.reshape(b, kv, s, d).transpose(0, 1, 3, 2).astype(np.float64)
    v = values.reshape(b, kv, s, d).astype(np.float64)
    out = np.zeros(q.shape)
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                qi = scale * q[bi, ti, hi]
                if round_q:
                    qi = np.asarray(jnp.asarray(qi, jnp.bfloat16).astype(jnp.float32))
                x = qi.astype(np.float64) @ k[bi, hi // g]
                if cap:
                    x = cap * np.tanh(x / cap)
                x = np.where(mask[bi, ti], x, np.finfo(np.float32).min)
                p = np.exp(x - x.max())
                w = np.asarray(jnp.asarray(p, jnp.bfloat16).astype(jnp.float32)) if round_q else p
                out[bi, ti, hi] = (w @ v[bi, hi // g]) / p.sum()
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("b,t,h,kv,d,s,cap", [(1, 1, 8, 4, 128, 3072, 50.0),
                                              (1, 2, 8, 4, 128, 1030, 50.0),
                                              (8, 1, 8, 4, 128, 700, 50.0),
                                              (3, 2, 4, 2, 16, 45, None),
                                              (2, 1, 4, 4, 32, 8, 5.0),
                                              (2, 2, 6, 2, 16, 3, None)])
def test_attend_matches_numpy(b, t, h, kv, d, s, cap, dtype):
    import jax

    rng = np.random.default_rng(s)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    keys, keys64 = as_stored(rng.standard_normal((b * kv, s, d)), dtype)
    values, values64 = as_stored(rng.standard_normal((b * kv, s, d)), dtype)
    pos = rng.integers(0, s, size=(b, 1)) + np.arange(t)  # causal: sees 0..pos
    mask = np.arange(s)[None, None] <= np.minimum(pos, s - 1)[..., None]
    if b > 1:
        mask[-1, 0, :] = rng.random(s) < 0.5  # scattered holes
    if b > 2:
        mask[1, 0, :] = False  # sees nothing: uniform, as XLA's softmax over finfo.min
    scale = 1.0 / np.sqrt(d)
    got = np.asarray(jax.jit(native_kernels.attend, static_argnums=(4, 5))(
        q, keys, values, mask, scale, cap))
    round_q = dtype == "bfloat16" and native_kernels.rounds_bf16() and d % 32 == 0
    want = reference_attention(q, keys64, values64, mask, scale, cap, round_q)
    # rounded: a weight whose float32 exp sits at a bfloat16 rounding boundary may round the
    # other way than numpy's (one bfloat16 step, 2^-8 of that weight): outputs ~0.04 +- 2e-4
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=5e-4 if round_q else 2e-5)


@needs_kernel
def test_targets_are_named_after_the_build():
    """A new kernel build gets new target names, so compiled programs that call an older
    build (JAX's persistent compilation cache) are never reused with it."""
    import jax
    import jax.numpy as jnp

    key = native_kernels.build().stem.rsplit("-", 1)[-1]
    hlo = jax.jit(native_kernels.matvec_t).lower(jnp.ones((2, 8)), jnp.ones((3, 8))).as_text()
    assert f"pianist_matvec_t_{key}" in hlo


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PIANIST_JAX_NATIVE", "0")
    assert native_kernels.load() == (False, "disabled by PIANIST_JAX_NATIVE=0")


def test_cpu_check_names_a_reason():
    ok, why = native_kernels.cpu_supports()
    assert ok or why  # never an unexplained "no"


def tiny_scores(tmp_path, sizes: list[int]) -> list[np.ndarray]:
    """Export a tiny random model to ``tmp_path / "tiny"``; score ids of len(sizes) pieces."""
    from flax import nnx

    from pianist_jax import export, midi, tokenizer
    from pianist_jax.config import load_config
    from pianist_jax.model import PianistTransformer

    cfg = load_config(None, ["model=tiny"]).model
    model = PianistTransformer(cfg, rngs=nnx.Rngs(3))
    export.write_export(tmp_path / "tiny", nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    scores = []
    for seed, n in enumerate(sizes):
        rng = np.random.default_rng(seed)
        onset = np.cumsum(rng.choice([0, 125, 250], size=n))
        notes = midi.Notes(onset=onset, offset=onset + 200, pitch=rng.integers(40, 90, size=n),
                           velocity=np.full(n, 64), pedal_ms=np.array([0]),
                           pedal_value=np.array([127]))
        midi.write_midi(notes, tmp_path / f"s{seed}.mid")
        scores.append(tokenizer.encode_file(tmp_path / f"s{seed}.mid"))
    return scores


@needs_kernel
def test_renderer_same_tokens_with_and_without_kernel(tmp_path):
    """A tiny model renders a batch of two scores to the same tokens, greedy and sampled,
    with the kernel (its matrices: 64 x 128 etc., I % 8 == 0) and with XLA's products."""
    from pianist_jax.render import Renderer

    scores = tiny_scores(tmp_path, [40, 40])
    outs = {}
    for native in (True, False):
        r = Renderer(tmp_path / "tiny", native=native, window=128, shift=64)
        assert r.native == native
        outs[native] = [r.render_ids(scores, [1, 2], temperature=t) for t in (0.0, 1.0)]
    for a, b in zip(outs[True], outs[False]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@needs_kernel
def test_bfloat16_renderer_on_the_kernels(tmp_path):
    """bfloat16 on the kernels stores parameters and caches in bfloat16 and computes in
    float32 (the products' rows rounded to bfloat16 on the AVX512-BF16 and AMX builds): the
    score's pitches in order, every slot in its range, the same tokens for the same seed, a
    batch equal to its rows rendered one by one (2 windows of 128 notes)."""
    import jax
    import jax.numpy as jnp

    from flax import nnx

    from pianist_jax import render_core
    from pianist_jax.render import Renderer
    from pianist_jax.tokenizer import RENDER_RANGES

    scores = tiny_scores(tmp_path, [150, 60])
    r = Renderer(tmp_path / "tiny", dtype="bfloat16", native=True, window=128, shift=64)
    assert r.cfg.dtype == "float32" and r.cache_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(r.params)} == {jnp.dtype(jnp.bfloat16)}
    model = nnx.merge(r.graphdef, r.params)
    assert render_core.uses_amx(model, True) == native_kernels.amx()
    batch = r.render_ids(scores, [4, 5])
    assert [len(x) for x in batch] == [len(x) for x in scores]
    for got, score in zip(batch, scores):
        notes = got.reshape(-1, 8)
        np.testing.assert_array_equal(notes[:, 0], score.reshape(-1, 8)[:, 0])
        for s, (lo, hi) in enumerate(RENDER_RANGES):
            assert ((notes[:, s] >= lo) & (notes[:, s] < hi)).all()
    again = r.render_ids(scores, [4, 5])
    for a, b in zip(batch, again):
        np.testing.assert_array_equal(a, b)
    for i, (score, seed) in enumerate(zip(scores, [4, 5])):
        np.testing.assert_array_equal(r.render_ids([score], [seed])[0], batch[i])
