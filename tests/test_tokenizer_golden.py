"""Token ids identical to the reference implementation's (../shared/golden)."""

import numpy as np
import pytest

from pianist_jax import tokenizer


def test_golden_encode_ids_identical(golden_tokens, shared_data):
    assert len(golden_tokens["encode"]) == 6
    for entry in golden_tokens["encode"]:
        ids = tokenizer.encode_file(shared_data / entry["file"])
        assert len(ids) == 8 * entry["n_notes"], entry["file"]
        np.testing.assert_array_equal(ids, np.asarray(entry["ids"]), err_msg=entry["file"])


def test_golden_decode(golden_tokens):
    ids = np.asarray(golden_tokens["encode"][0]["ids"])
    notes = tokenizer.decode_ids(ids, score_ids=ids)
    got = np.stack([notes.onset, notes.offset, notes.pitch, notes.velocity], 1).tolist()
    assert got == golden_tokens["decode_first"]["notes"]
    want = golden_tokens["decode_first"]["sustain"]
    assert len(notes.pedal_ms) == len(want)
    for (t, v), (wt, wv) in zip(zip(notes.pedal_ms.tolist(), notes.pedal_value.tolist()), want):
        assert v == wv and abs(t - wt) <= 1


@pytest.mark.parametrize("which", [2, 3])
def test_golden_decode_of_pedalled_performance_round_trips(golden_tokens, which):
    """Performances with pedal: our floor placement makes decode -> encode exact."""
    ids = np.asarray(golden_tokens["encode"][which]["ids"])
    notes = tokenizer.decode_ids(ids)
    assert len(notes.pedal_ms) > 10
    np.testing.assert_array_equal(tokenizer.encode_notes(notes), ids)


def test_vocab_layout_constants():
    assert tokenizer.VOCAB_SIZE == 5389
    assert tokenizer.SLOT_RANGES.tolist() == [
        [5, 133],
        [261, 5252],
        [133, 261],
        [261, 5261],
        [5261, 5389],
        [5261, 5389],
        [5261, 5389],
        [5261, 5389],
    ]
    assert (tokenizer.PAD, tokenizer.MASK, tokenizer.BOS, tokenizer.EOS, tokenizer.PLAY) == (
        0,
        1,
        2,
        3,
        4,
    )
