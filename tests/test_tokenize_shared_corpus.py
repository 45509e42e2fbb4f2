"""Acceptance on the real corpora: ../shared/data/unlabeled + the ASAP performances, 8 shards.

Two full runs give byte-identical shards, shards 0-3 and 4-7 written by two invocations give
the same shards and manifest as one run, the ids in the shards are the tokenizer's, and the
inspect tool decodes a record back to a MIDI file that plays (mido reads it, notes match).
"""

import json

import mido
import numpy as np
import pytest

from data_prep import inspect as dp_inspect
from data_prep import tokenize as tk
from pianist_jax import tokenizer
from pianist_jax.data import records

pytestmark = pytest.mark.slow


def run(shared_data, out, *extra):
    argv = [
        "--input",
        str(shared_data / "unlabeled"),
        "--input",
        f"{shared_data / 'asap'}:asap",
        "--exclude",
        "midi_score.mid",
        "--output",
        str(out),
        "--num-shards",
        "8",
        "--workers",
        "2",
        "--no-progress",
        *extra,
    ]
    assert tk.main(argv) == 0


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in records.list_shards(out)}


def manifest_without_commands(out):
    m = json.loads((out / "manifest.json").read_text())
    m.pop("commands", None)
    return m


def test_shared_corpus_deterministic_split_and_inspect(shared_data, tmp_path):
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
    run(shared_data, one)
    run(shared_data, two)
    run(shared_data, split, "--shard-index", "0-3")
    assert not (split / "manifest.json").exists()  # merged only once every shard is done
    run(shared_data, split, "--shard-index", "4-7")

    a = shard_bytes(one)
    assert len(a) == 8 and all(len(b) > 0 for b in a.values())
    assert a == shard_bytes(two)
    assert a == shard_bytes(split)
    assert manifest_without_commands(one) == manifest_without_commands(split)

    manifest = manifest_without_commands(one)
    assert manifest["totals"]["quarantined"] == 0
    assert set(manifest["corpora"]) == {"unlabeled", "asap"}
    assert manifest["corpora"]["asap"]["kinds"].keys() == {"performance"}
    assert manifest["totals"]["files"] > 1900 and manifest["totals"]["notes"] > 5_000_000

    # the shards hold the tokenizer's ids for their source files
    shard = records.list_shards(one)[3]
    recs = list(dp_inspect.iter_records(shard))
    rec = recs[0]
    root = shared_data / ("asap" if rec.corpus == "asap" else "unlabeled")
    np.testing.assert_array_equal(rec.ids, tokenizer.encode_file(root / rec.source))

    out_mid = tmp_path / "decoded.mid"
    assert dp_inspect.main([str(one), "--shard", "3", "--decode", "0", "--out", str(out_mid)]) == 0
    played = mido.MidiFile(out_mid)
    assert played.length > 1.0
    n_on = sum(1 for t in played.tracks for m in t if m.type == "note_on" and m.velocity > 0)
    assert n_on == rec.n_notes
    np.testing.assert_array_equal(tokenizer.encode_file(out_mid), rec.ids)
