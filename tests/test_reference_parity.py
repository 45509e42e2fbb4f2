"""Weight compatibility with the reference: a random `transformers` T5Gemma Pianist model, saved
in the reference checkpoint layout, converted with `pianist_jax.convert_hf`, must give the same
encoder states and logits as our Flax model (fp32, eager attention) on real token sequences.
"""

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
from pianist_jax.artifacts import convert_hf, export
from pianist_jax.artifacts.export import load_model  # noqa: E402

pytestmark = pytest.mark.reference
TOL = 1e-4

# Small but with every feature that matters: GQA (2 query heads per KV head), several layers
# so sliding (0, 2) and full (1) layers alternate, a sliding window shorter than the encoder
# input (2-sided: |i - j| < 6 notes) and than the decoder input (causal: i - j < 6 tokens).
TINY = ref.model_cfg_from_yaml("model/tiny.yaml")
CONFIGS = {
    "tiny": TINY,
    "deep_windowed": dict(
        TINY, hidden=96, mlp=192, head_dim=32, encoder_layers=3, decoder_layers=3, sliding_window=6
    ),
}


def real_sequences(shared_root, tmp_path):
    """Encoder ids (a score) and decoder inputs (a performance, shifted right with BOS), batch 2;
    the second example has padding notes and a PAD tail in the decoder."""
    asap = shared_root / "data" / "asap"
    scores = sorted(asap.rglob("midi_score.mid"))[:1] if asap.is_dir() else []
    if scores:
        score = tokenizer.encode_file(scores[0])
        perfs = sorted(p for p in scores[0].parent.glob("*.mid") if p.name != "midi_score.mid")
        perf = tokenizer.encode_file(perfs[0]) if perfs else score
    else:  # no ../shared: real tokenizer output of a synthetic file
        score = tokenizer.encode_file(simple_file(tmp_path / "a.mid", n=40))
        perf = tokenizer.encode_file(simple_file(tmp_path / "b.mid", n=40, channel=1))
    n = 24 * 8
    enc = np.stack([score[:n], score[n : 2 * n] if len(score) >= 2 * n else score[:n]])
    enc[1, 17 * 8 :] = tokenizer.PAD  # 17 real notes, 7 padding notes
    dec = np.stack([perf[:n], perf[:n]])
    dec = np.concatenate([np.full((2, 1), tokenizer.BOS), dec[:, :-1]], axis=1)
    dec[1, 150:] = tokenizer.PAD
    return enc.astype(np.int64), dec.astype(np.int64)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    module = ref.build_reference(cfg, seed=3)
    ref.save_reference(module, root / "hf", cfg)
    assert convert_hf.main([str(root / "hf"), str(root / "export")]) == 0
    return module, root


def test_encoder_states_and_logits_match_reference(converted, tmp_path, repo_root):
    module, root = converted
    enc, dec = real_sequences(repo_root.parent / "shared", tmp_path)
    ref_states, ref_logits = ref.reference_forward(module, enc, dec)
    model = load_model(root / "export")
    states, mask = model.encode(enc)
    logits = np.asarray(model(enc, dec))
    real = np.asarray(mask)
    assert real.tolist() == [[True] * 24, [True] * 17 + [False] * 7]
    states = np.asarray(states)
    assert np.abs(states[real] - ref_states[real]).max() < TOL
    diff = np.abs(logits - ref_logits)
    print(
        f"max |state diff| {np.abs(states[real] - ref_states[real]).max():.2e}, "
        f"max |logit diff| {diff.max():.2e}, max |logit| {np.abs(ref_logits).max():.1f}"
    )
    assert diff.max() < TOL, f"max |logit diff| {diff.max():.2e}"
    assert np.abs(ref_logits).max() > 10  # the comparison is not between near-zero numbers


def test_converter_round_trips_reference_tensors(converted):
    _, root = converted
    original = load_file(str(root / "hf" / "model.safetensors"))
    cfg, params, info = export.read_export(root / "export")
    assert info["source"]["converted_from"].endswith("hf")
    back = convert_hf.to_reference_tensors(params, cfg)
    ignored = {n for n in original if convert_hf.IGNORED.match(n)}
    assert set(back) == set(original) - ignored
    for name, tensor in back.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)


def test_converter_rejects_mismatched_checkpoints(converted, tmp_path):
    _, root = converted
    tensors = load_file(str(root / "hf" / "model.safetensors"))
    cfg = convert_hf.model_config_from_hf(
        __import__("json").loads((root / "hf" / "config.json").read_text())
    )
    broken = dict(tensors)
    broken.pop("model.decoder.norm.weight")
    broken["model.decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert_hf.ConversionError, match="model.decoder.norm.weight.*extra"):
        convert_hf.convert_tensors(broken, cfg)
    assert convert_hf.main([str(tmp_path), str(tmp_path / "out")]) == 2  # no config.json


def test_bfloat16_export_loads_close(converted, tmp_path, repo_root):
    module, root = converted
    assert convert_hf.main([str(root / "hf"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    enc, dec = real_sequences(repo_root.parent / "shared", tmp_path)
    _, ref_logits = ref.reference_forward(module, enc, dec)
    logits = np.asarray(load_model(tmp_path / "bf16")(enc, dec))
    assert np.abs(logits - ref_logits).mean() < 0.05 * np.abs(ref_logits).mean()
