"""The PyTorch T5Gemma reference (tests/reference_t5gemma.py) that the JAX parity tests use.

Needs requirements-reference.txt (torch CPU, transformers 4.54.0, safetensors). Locally the
tests skip when those are missing; in CI (CI set) a missing install is an error, not a skip.
"""

import json
import os

import numpy as np
import pytest

if not os.environ.get("CI"):
    for _name in ("torch", "transformers", "safetensors"):
        pytest.importorskip(_name)

import reference_t5gemma as ref  # noqa: E402
from midi_fixtures import simple_file  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from pianist_jax import tokenizer  # noqa: E402

pytestmark = pytest.mark.reference

TINY = dict(
    vocab_size=5389,
    hidden=64,
    mlp=256,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    encoder_layers=2,
    decoder_layers=1,
    query_pre_attn_scalar=256.0,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    rope_theta=10000.0,
    sliding_window=1024,
    rms_norm_eps=1e-6,
)


@pytest.fixture(scope="module")
def tiny():
    return ref.build_reference(TINY, seed=0)


@pytest.fixture(scope="module")
def score_ids(tmp_path_factory):
    """Real token ids [8N] of a 12-note MIDI file."""
    path = simple_file(tmp_path_factory.mktemp("midi") / "score.mid", n=12)
    ids = tokenizer.encode_file(path).astype(np.int64)
    assert ids.shape == (96,) and (ids != tokenizer.PAD).all()
    return ids


def decoder_inputs(ids, length):
    """BOS + the ids shifted right (teacher forcing), cut to `length`."""
    return np.concatenate([[tokenizer.BOS], ids[:-1]])[:length]


def expected_names(cfg):
    """Every tensor name of the reference checkpoint layout for `cfg`."""
    emb = ["embeddings.word_embeddings.weight"] + [
        f"embeddings.projection_layers.{i}.{p}" for i in range(8) for p in ("weight", "bias")
    ]
    names = set(emb) | {f"model.encoder.{n}" for n in emb}
    names |= {
        "model.encoder.embed_tokens.weight",
        "model.encoder.norm.weight",
        "model.decoder.embed_tokens.weight",
        "model.decoder.norm.weight",
    }
    norms = [
        "pre_self_attn_layernorm",
        "post_self_attn_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ]
    for stack, layers, attns, extra_norms in (
        ("encoder", cfg["encoder_layers"], ["self_attn"], []),
        (
            "decoder",
            cfg["decoder_layers"],
            ["self_attn", "cross_attn"],
            ["pre_cross_attn_layernorm", "post_cross_attn_layernorm"],
        ),
    ):
        for n in range(layers):
            p = f"model.{stack}.layers.{n}."
            names |= {f"{p}{norm}.weight" for norm in norms + extra_norms}
            names |= {f"{p}{a}.{x}_proj.weight" for a in attns for x in "qkvo"}
            names |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return names


def test_model_cfg_from_yaml_matches_tiny_and_base():
    assert ref.model_cfg_from_yaml("model/tiny.yaml") == TINY
    base = ref.model_cfg_from_yaml("model/base.yaml")
    assert (base["hidden"], base["encoder_layers"], base["decoder_layers"]) == (768, 10, 2)


def test_t5gemma_config_settings(tiny):
    enc, dec = tiny.model.encoder.config, tiny.model.decoder.config
    assert enc.layer_types == ["sliding_attention", "full_attention"]  # (i + 1) % 2 -> sliding
    assert dec.layer_types == ["sliding_attention"]
    assert enc.vocab_size == dec.vocab_size == 5389  # not T5GemmaConfig's 256000 default
    assert (enc._attn_implementation, dec._attn_implementation) == ("eager", "eager")
    assert not enc.is_decoder and dec.is_decoder and dec.cross_attention_hidden_size == 64
    assert tiny.model.encoder.layers[0].self_attn.scaling == 256**-0.5
    assert tiny.lm_head.out_proj.weight is tiny.model.decoder.embed_tokens.weight


def test_saved_layout_names_shapes_and_config(tiny, tmp_path, score_ids):
    ref.save_reference(tiny, tmp_path, TINY)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == expected_names(TINY)  # unused tables included, no lm_head
    hidden, mlp, q, kv = 64, 256, 4 * 16, 2 * 16
    shapes = {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "cross_attn.q_proj": (q, hidden),
        "cross_attn.k_proj": (kv, hidden),
        "cross_attn.v_proj": (kv, hidden),
        "cross_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (mlp, hidden),
        "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp),
    }
    for name, array in tensors.items():
        assert array.dtype == np.float32, name
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            assert array.shape == (hidden,), name
        elif "projection_layers" in name:  # Linear(hidden, hidden // 8): weight [out, in]
            assert array.shape == ((8, hidden) if name.endswith("weight") else (8,)), name
        elif "embed" in name:
            assert array.shape == (5389, hidden), name
        else:
            part = ".".join(name.split(".")[-3:-1])
            assert array.shape == shapes[part], name
    enc_table = tensors["model.encoder.embeddings.word_embeddings.weight"]
    assert not enc_table[0].any() and not tensors["model.decoder.embed_tokens.weight"][0].any()
    assert all(
        tensors[f"model.encoder.layers.0.{n}.weight"].std() > 0.01
        for n in ("pre_self_attn_layernorm", "post_feedforward_layernorm")
    )  # perturbed from zero

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "t5gemma" and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 5389
    for part, layers in (("encoder", 2), ("decoder", 1)):
        sub = config[part]
        assert (sub["hidden_size"], sub["intermediate_size"], sub["num_hidden_layers"]) == (
            64,
            256,
            layers,
        )
        assert (sub["num_attention_heads"], sub["num_key_value_heads"], sub["head_dim"]) == (
            4,
            2,
            16,
        )
        assert (
            sub["query_pre_attn_scalar"],
            sub["attn_logit_softcapping"],
            sub["final_logit_softcapping"],
        ) == (256, 50.0, 30.0)
        assert (sub["rope_theta"], sub["sliding_window"], sub["rms_norm_eps"]) == (
            10000.0,
            1024,
            1e-6,
        )
        assert sub["vocab_size"] == 5389 and sub["hidden_activation"] == "gelu_pytorch_tanh"
    assert ref.model_cfg_from_hf(config) == TINY

    # the files alone rebuild the same model
    enc_ids, dec_ids = score_ids[None], decoder_inputs(score_ids, 20)[None]
    reloaded = ref.load_reference(tmp_path)
    for a, b in zip(
        ref.reference_forward(tiny, enc_ids, dec_ids),
        ref.reference_forward(reloaded, enc_ids, dec_ids),
    ):
        np.testing.assert_array_equal(a, b)


def test_forward_shapes_and_determinism(tiny, score_ids):
    enc_ids, dec_ids = score_ids[None], decoder_inputs(score_ids, 24)[None]
    enc, logits = ref.reference_forward(tiny, enc_ids, dec_ids)
    assert enc.shape == (1, 12, 64) and logits.shape == (1, 24, 5389)
    assert enc.dtype == logits.dtype == np.float32
    assert np.isfinite(enc).all() and np.isfinite(logits).all()
    again = ref.reference_forward(ref.build_reference(TINY, seed=0), enc_ids, dec_ids)
    np.testing.assert_array_equal(enc, again[0])
    np.testing.assert_array_equal(logits, again[1])
    other = ref.reference_forward(ref.build_reference(TINY, seed=1), enc_ids, dec_ids)
    assert not np.allclose(logits, other[1])


def test_padding_notes_do_not_change_real_notes(tiny, score_ids):
    short = score_ids[: 8 * 9]  # 9 real notes, then 3 PAD notes
    padded = np.concatenate([short, np.zeros(8 * 3, np.int64)])
    dec_ids = decoder_inputs(score_ids, 16)
    enc_a, logits_a = ref.reference_forward(tiny, short[None], dec_ids[None])
    enc_b, logits_b = ref.reference_forward(
        tiny, np.stack([padded, score_ids]), np.stack([dec_ids, dec_ids])
    )
    np.testing.assert_allclose(enc_b[0, :9], enc_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits_b[0], logits_a[0], rtol=1e-5, atol=1e-4)
    # the masked notes do matter when real: the unpadded row attends to 12 notes
    assert not np.allclose(enc_b[1, :9], enc_a[0], atol=1e-3)
    # a note with one real token is real
    partial = padded.copy()
    partial[8 * 9 + 2] = score_ids[2]
    enc_c, _ = ref.reference_forward(tiny, partial[None], dec_ids[None])
    assert not np.allclose(enc_c[0, :9], enc_a[0], atol=1e-3)


def test_decoder_is_causal(tiny, score_ids):
    dec_ids = decoder_inputs(score_ids, 20)
    changed = dec_ids.copy()
    changed[12] = tokenizer.VELOCITY_START + 7 if dec_ids[12] != tokenizer.VELOCITY_START + 7 else 6
    _, a = ref.reference_forward(tiny, score_ids[None], dec_ids[None])
    _, b = ref.reference_forward(tiny, score_ids[None], changed[None])
    np.testing.assert_array_equal(a[0, :12], b[0, :12])
    assert not np.allclose(a[0, 12:], b[0, 12:], atol=1e-3)


def test_logits_are_softcapped(tiny, score_ids):
    _, logits = ref.reference_forward(tiny, score_ids[None], decoder_inputs(score_ids, 32)[None])
    assert np.abs(logits).max() < 30.0
    assert np.abs(logits).max() > 20.0  # the init reaches the cap's non-linear region


def test_encoder_sliding_window_is_applied(score_ids):
    dec_ids = decoder_inputs(score_ids, 8)[None]
    wide = ref.reference_forward(ref.build_reference(TINY, 0), score_ids[None], dec_ids)
    narrow = ref.reference_forward(
        ref.build_reference(dict(TINY, sliding_window=2), 0), score_ids[None], dec_ids
    )
    assert not np.allclose(wide[0], narrow[0], atol=1e-3)
    none = ref.build_reference(dict(TINY, sliding_window=None), 0)
    assert none.model.encoder.config.layer_types == ["full_attention"] * 2
    np.testing.assert_allclose(
        ref.reference_forward(none, score_ids[None], dec_ids)[0], wide[0], rtol=1e-5, atol=1e-5
    )  # 12 notes < 1024
