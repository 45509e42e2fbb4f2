"""Golden PartitionSpecs: the rule table's mapping of every parameter onto the mesh is pinned.

A change here changes how every pod job lays out its parameters, so it must be deliberate.
"""

import pytest

from pianist_jax.config import load_config
from pianist_jax.config.schema import ConfigError, MeshConfig
from pianist_jax.train import sharding

# base model, layer 0 of each stack plus the tables (all layers are checked to match layer 0)
GOLDEN_FSDP = [  # mesh (data=2, fsdp=4, tensor=1)
    "decoder.embed_tokens: P(None, 'fsdp')",
    "decoder.layers.0.cross_attn.k_proj: P('fsdp', None, None)",
    "decoder.layers.0.cross_attn.o_proj: P(None, None, 'fsdp')",
    "decoder.layers.0.cross_attn.q_proj: P('fsdp', None, None)",
    "decoder.layers.0.cross_attn.v_proj: P('fsdp', None, None)",
    "decoder.layers.0.mlp.down_proj: P(None, 'fsdp')",
    "decoder.layers.0.mlp.gate_proj: P('fsdp', None)",
    "decoder.layers.0.mlp.up_proj: P('fsdp', None)",
    "decoder.layers.0.post_cross_attn_norm.scale: P(None,)",
    "decoder.layers.0.post_ffw_norm.scale: P(None,)",
    "decoder.layers.0.post_self_attn_norm.scale: P(None,)",
    "decoder.layers.0.pre_cross_attn_norm.scale: P(None,)",
    "decoder.layers.0.pre_ffw_norm.scale: P(None,)",
    "decoder.layers.0.pre_self_attn_norm.scale: P(None,)",
    "decoder.layers.0.self_attn.k_proj: P('fsdp', None, None)",
    "decoder.layers.0.self_attn.o_proj: P(None, None, 'fsdp')",
    "decoder.layers.0.self_attn.q_proj: P('fsdp', None, None)",
    "decoder.layers.0.self_attn.v_proj: P('fsdp', None, None)",
    "decoder.norm.scale: P(None,)",
    "encoder.layers.0.mlp.down_proj: P(None, 'fsdp')",
    "encoder.layers.0.mlp.gate_proj: P('fsdp', None)",
    "encoder.layers.0.mlp.up_proj: P('fsdp', None)",
    "encoder.layers.0.post_ffw_norm.scale: P(None,)",
    "encoder.layers.0.post_self_attn_norm.scale: P(None,)",
    "encoder.layers.0.pre_ffw_norm.scale: P(None,)",
    "encoder.layers.0.pre_self_attn_norm.scale: P(None,)",
    "encoder.layers.0.self_attn.k_proj: P('fsdp', None, None)",
    "encoder.layers.0.self_attn.o_proj: P(None, None, 'fsdp')",
    "encoder.layers.0.self_attn.q_proj: P('fsdp', None, None)",
    "encoder.layers.0.self_attn.v_proj: P('fsdp', None, None)",
    "encoder.norm.scale: P(None,)",
    "encoder.slot_bias: P(None, None)",
    "encoder.slot_kernel: P(None, 'fsdp', None)",
    "encoder.word_embeddings: P(None, 'fsdp')",
]
GOLDEN_FSDP_TP = [  # mesh (data=1, fsdp=2, tensor=4); vocab 5389 does not divide by 4
    "decoder.embed_tokens: P(None, 'fsdp')",
    "decoder.layers.0.cross_attn.k_proj: P('fsdp', 'tensor', None)",
    "decoder.layers.0.cross_attn.o_proj: P('tensor', None, 'fsdp')",
    "decoder.layers.0.cross_attn.q_proj: P('fsdp', 'tensor', None)",
    "decoder.layers.0.cross_attn.v_proj: P('fsdp', 'tensor', None)",
    "decoder.layers.0.mlp.down_proj: P('tensor', 'fsdp')",
    "decoder.layers.0.mlp.gate_proj: P('fsdp', 'tensor')",
    "decoder.layers.0.mlp.up_proj: P('fsdp', 'tensor')",
    "decoder.layers.0.post_cross_attn_norm.scale: P(None,)",
    "decoder.layers.0.post_ffw_norm.scale: P(None,)",
    "decoder.layers.0.post_self_attn_norm.scale: P(None,)",
    "decoder.layers.0.pre_cross_attn_norm.scale: P(None,)",
    "decoder.layers.0.pre_ffw_norm.scale: P(None,)",
    "decoder.layers.0.pre_self_attn_norm.scale: P(None,)",
    "decoder.layers.0.self_attn.k_proj: P('fsdp', 'tensor', None)",
    "decoder.layers.0.self_attn.o_proj: P('tensor', None, 'fsdp')",
    "decoder.layers.0.self_attn.q_proj: P('fsdp', 'tensor', None)",
    "decoder.layers.0.self_attn.v_proj: P('fsdp', 'tensor', None)",
    "decoder.norm.scale: P(None,)",
    "encoder.layers.0.mlp.down_proj: P('tensor', 'fsdp')",
    "encoder.layers.0.mlp.gate_proj: P('fsdp', 'tensor')",
    "encoder.layers.0.mlp.up_proj: P('fsdp', 'tensor')",
    "encoder.layers.0.post_ffw_norm.scale: P(None,)",
    "encoder.layers.0.post_self_attn_norm.scale: P(None,)",
    "encoder.layers.0.pre_ffw_norm.scale: P(None,)",
    "encoder.layers.0.pre_self_attn_norm.scale: P(None,)",
    "encoder.layers.0.self_attn.k_proj: P('fsdp', 'tensor', None)",
    "encoder.layers.0.self_attn.o_proj: P('tensor', None, 'fsdp')",
    "encoder.layers.0.self_attn.q_proj: P('fsdp', 'tensor', None)",
    "encoder.layers.0.self_attn.v_proj: P('fsdp', 'tensor', None)",
    "encoder.norm.scale: P(None,)",
    "encoder.slot_bias: P(None, None)",
    "encoder.slot_kernel: P(None, 'fsdp', None)",
    "encoder.word_embeddings: P(None, 'fsdp')",
]


def specs_for(shape):
    cfg = load_config(None, ["model=base", f"mesh.shape={shape}"])
    mesh = sharding.make_mesh(cfg.mesh)
    return sharding.describe_specs(sharding.param_specs(cfg.model, cfg.mesh.rules, mesh))


@pytest.mark.parametrize("shape, golden", [([2, 4, 1], GOLDEN_FSDP), ([1, 2, 4], GOLDEN_FSDP_TP)])
def test_param_partition_specs_are_pinned(shape, golden):
    lines = specs_for(shape)
    layer0 = [line for line in lines if ".layers." not in line or ".layers.0." in line]
    assert layer0 == golden
    for line in lines:  # every other layer is laid out like layer 0
        if ".layers." in line:
            stack, rest = line.split(".layers.", 1)
            _, tail = rest.split(".", 1)
            assert f"{stack}.layers.0.{tail}" in golden


def test_logical_to_spec_rules():
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("x", None))
    assert sharding.logical_to_spec(("batch", None), rules) == sharding.P(("data", "fsdp"), None)
    # a mesh axis is used once per tensor: the second 'fsdp' dimension stays replicated
    assert sharding.logical_to_spec(("embed", "embed"), rules) == sharding.P("fsdp", None)
    with pytest.raises(ConfigError, match="no entry for logical axis 'heads'"):
        sharding.logical_to_spec(("heads",), rules)


def test_mesh_shape_fills_minus_one():
    import jax

    mesh = sharding.make_mesh(MeshConfig(shape=(2, -1, 1)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    one = sharding.make_mesh(MeshConfig(shape=(1, -1, 1)), jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="does not divide"):
        sharding.make_mesh(MeshConfig(shape=(3, -1, 1)))
