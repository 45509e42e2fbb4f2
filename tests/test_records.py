"""The record schema: bytes round trip, determinism, layout, and bad-input errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pianist_jax.data import records

META = dict(
    source="Bach/Fugue/bwv_846/midi_score.mid",
    corpus="asap",
    kind="score",
    n_notes=3,
    content_hash="ab" * 32,
    tokenizer_version="pt-unified-8/1",
)


def test_round_trip():
    ids = np.arange(24, dtype=np.int32) * 200
    rec = records.decode_record(records.encode_record(ids, **META))
    assert rec.ids.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(rec.ids, ids)
    assert (rec.source, rec.corpus, rec.kind, rec.n_notes, rec.content_hash) == (
        META["source"],
        "asap",
        "score",
        3,
        "ab" * 32,
    )
    assert rec.tokenizer_version == "pt-unified-8/1" and rec.n_tokens == 24
    assert not rec.ids.flags.writeable  # a view into the record bytes, not a copy
    assert dict(rec.extras) == {}


def test_bytes_are_deterministic_and_little_endian():
    ids = np.array([1, 258, 5388], dtype=np.int64)
    a = records.encode_record(ids, **META)
    assert a == records.encode_record(ids.astype(np.uint16), **META)
    assert a[:4] == records.MAGIC
    assert a.endswith(struct.pack("<3H", 1, 258, 5388))
    (meta_len,) = struct.unpack_from("<I", a, 4)
    assert (len(a) - 3 * 2) % 8 == 0 and len(a) - 6 >= 8 + meta_len  # ids start 8-aligned


def test_extras_and_empty_ids():
    score = np.array([7, 8, 9], dtype=np.uint16)
    rec = records.decode_record(records.encode_record([], **META, extras={"score_ids": score}))
    assert rec.ids.shape == (0,)
    np.testing.assert_array_equal(rec.extras["score_ids"], score)


@pytest.mark.parametrize(
    "bad",
    [
        dict(ids=[70000]),
        dict(ids=[-1]),
        dict(ids=[[1, 2]]),
        dict(kind="midi"),
    ],
)
def test_encode_rejects_bad_input(bad):
    kwargs = {**META, **{k: v for k, v in bad.items() if k != "ids"}}
    with pytest.raises(ValueError):
        records.encode_record(bad.get("ids", [1, 2]), **kwargs)


def test_decode_rejects_corrupt_bytes():
    good = records.encode_record(np.arange(16), **META)
    with pytest.raises(ValueError, match="magic"):
        records.decode_record(b"XXXX" + good[4:])
    with pytest.raises(ValueError, match="truncated"):
        records.decode_record(good[:-2])
    with pytest.raises(ValueError, match="trailing"):
        records.decode_record(good + b"\0\0")
    with pytest.raises(ValueError, match="short"):
        records.decode_record(b"PJ")


@settings(max_examples=50, deadline=None)
@given(
    ids=st.lists(st.integers(0, 65535), max_size=200),
    source=st.text(min_size=1, max_size=40),
    corpus=st.text(min_size=1, max_size=10),
    kind=st.sampled_from(records.KINDS),
)
def test_round_trip_property(ids, source, corpus, kind):
    data = records.encode_record(
        ids, source=source, corpus=corpus, kind=kind, n_notes=len(ids) // 8, content_hash="0" * 64
    )
    rec = records.decode_record(data)
    assert rec.ids.tolist() == ids
    assert (rec.source, rec.corpus, rec.kind) == (source, corpus, kind)


def test_shard_names(tmp_path):
    assert records.shard_filename(3, 8) == "shard-00003-of-00008.array_record"
    assert records.parse_shard_filename("shard-00003-of-00008.array_record") == (3, 8)
    assert records.parse_shard_filename("shard-00003-of-00008.manifest.json") is None
    with pytest.raises(ValueError):
        records.shard_filename(8, 8)
    for i in (2, 0, 1):
        (tmp_path / records.shard_filename(i, 3)).touch()
    (tmp_path / "manifest.json").touch()
    assert [p.name for p in records.list_shards(tmp_path)] == [
        records.shard_filename(i, 3) for i in range(3)
    ]
    (tmp_path / records.shard_filename(0, 4)).touch()
    with pytest.raises(ValueError, match="mixes"):
        records.list_shards(tmp_path)
