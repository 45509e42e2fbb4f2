"""`bench/render_floor.py` counts the work of a render from the config; check the counts against
what the renderer really builds and runs, so the printed floor follows the code."""

import sys
from pathlib import Path

import numpy as np
from flax import nnx

from pianist_jax.config import load_config
from pianist_jax.model import PianistTransformer
from pianist_jax.tokenizer import TOKENS_PER_NOTE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import render_floor  # noqa: E402


def test_layer_products_match_the_decoder_matrices():
    cfg = load_config(None, ["model=tiny", "model.dtype=float32"]).model
    layer = PianistTransformer(cfg, rngs=nnx.Rngs(0)).decoder.layers[0]
    a, c, mlp = layer.self_attn, layer.cross_attn, layer.mlp
    sizes = {
        "qkv": a.q_proj.size + a.k_proj.size + a.v_proj.size,
        "o": a.o_proj.size,
        "cross_q": c.q_proj.size,
        "cross_o": c.o_proj.size,
        "gate_up": mlp.gate_proj.size + mlp.up_proj.size,
        "down": mlp.down_proj.size,
    }
    assert {k: int(v) for k, v in sizes.items()} == render_floor.layer_macs(cfg)


def test_counts_by_enumerating_the_steps():
    cfg = load_config(None, ["model=small"]).model
    notes, batch, size = 37, 3, 2
    work = render_floor.count_work(cfg, notes, batch, size, size)
    # the decode loop: note j's fused [Pedal4, Pitch] step at positions 8j, 8j + 1, then one
    # step per slot 2..7 at 8j + s; a step sees its positions up to the last query's
    visible = sum(
        8 * j + 2 + sum(8 * j + s + 1 for s in range(2, TOKENS_PER_NOTE)) for j in range(notes)
    )
    kv_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * size * cfg.decoder_layers
    assert work["self_cache_bytes"] == batch * visible * kv_bytes
    assert work["cross_cache_bytes"] == batch * notes * render_floor.STEPS * notes * kv_bytes
    layer = sum(render_floor.layer_macs(cfg).values())
    steps = notes * render_floor.STEPS
    products = (
        2
        * batch
        * (
            steps * cfg.decoder_layers * layer  # one token per step
            + notes * (cfg.decoder_layers - 1) * layer  # the Pitch token
            + notes * render_floor.layer_macs(cfg)["qkv"]
        )
    )  # its last keys
    logits = 2 * batch * notes * cfg.hidden * (5000 * 2 + 128 * 5)
    assert work["decoder_flops"] == products + logits
    # batch rows share each step's weights: the weight bytes do not grow with the batch
    assert (
        render_floor.count_work(cfg, notes, 1, size, size)["weight_bytes"] == work["weight_bytes"]
    )


def test_floor_takes_the_slower_of_compute_and_memory():
    work = {
        "encoder_flops": 1e9,
        "decoder_flops": 2e9,
        "weight_bytes": 4e9,
        "self_cache_bytes": 1e9,
        "cross_cache_bytes": 1e9,
        "attn_flops": 1e12,
    }
    parts = render_floor.floor(work, {"compute": 1e9, "stream": 1e9})
    np.testing.assert_allclose(
        [parts["encoder"], parts["products"], parts["attention"]], [1.0, 4.0, 1000.0]
    )
