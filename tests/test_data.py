"""The Grain pre-training pipeline (pianist_jax/data/pipeline.py) on tiny synthetic shards.

Every synthetic note carries its record number in the IOI slot and its source's marker in the
pedal slots, so a block says which records and which source it was cut from.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from pianist_jax import tokenizer as tok
from pianist_jax.config.schema import Config, DataConfig, SourceConfig, TrainConfig
from pianist_jax.data import pipeline as data
from pianist_jax.data import records

BLOCK = 64  # 8 notes: pieces (3..40 notes) span several blocks and blocks span several pieces


def piece_ids(record: int, n_notes: int, marker: int) -> np.ndarray:
    notes = np.empty((n_notes, tok.TOKENS_PER_NOTE), np.int64)
    notes[:, tok.PITCH] = tok.PITCH_START + 60 + np.arange(n_notes) % 12
    notes[:, tok.IOI] = tok.TIME_START + record  # record number
    notes[:, tok.VELOCITY] = tok.VELOCITY_START + 64
    notes[:, tok.DURATION] = tok.TIME_START + 300
    notes[:, 4:] = tok.PEDAL_START + marker  # source marker
    return notes.reshape(-1)


def write_source(
    directory, n_records: int, marker: int, num_shards: int = 2, extra: tuple[np.ndarray, ...] = ()
) -> dict[int, np.ndarray]:
    """Shards with records 0..n_records-1 (3..40 notes each) plus `extra` raw id arrays."""
    directory.mkdir(parents=True)
    pieces = {r: piece_ids(r, 3 + (r * 7) % 38, marker) for r in range(n_records)}
    all_ids = list(pieces.values()) + list(extra)
    for s in range(num_shards):
        writer = ArrayRecordWriter(
            str(directory / records.shard_filename(s, num_shards)), records.ARRAY_RECORD_OPTIONS
        )
        for i in range(s, len(all_ids), num_shards):
            ids = all_ids[i]
            writer.write(
                records.encode_record(
                    ids,
                    source=f"piece{i}.mid",
                    corpus="synthetic",
                    kind="performance",
                    n_notes=len(ids) // 8,
                    content_hash=f"{i:064x}",
                )
            )
        writer.close()
    return pieces


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    short = (np.zeros(0, np.int64), piece_ids(999, 1, 0)[:4])  # skipped: < 8 tokens
    return {
        "a": (root / "a", write_source(root / "a", 30, marker=1, extra=short)),
        "b": (root / "b", write_source(root / "b", 12, marker=2)),
    }


def make_cfg(
    shards,
    *,
    names=("a",),
    weights=None,
    batch=4,
    seed=0,
    mask_prob=0.3,
    crop_prob=0.0,
    workers=0,
    **source_kw,
) -> Config:
    weights = weights or [1.0] * len(names)
    sources = tuple(
        SourceConfig(name=n, path=str(shards[n][0]), weight=w, **source_kw)
        for n, w in zip(names, weights)
    )
    return Config(
        data=DataConfig(
            sources=sources,
            eval_sources=sources[:1],
            block_size=BLOCK,
            window_stride=BLOCK // 2,
            mask_prob=mask_prob,
            crop_prob=crop_prob,
            seed=seed,
            worker_count=workers,
        ),
        train=TrainConfig(batch_size=batch),
    )


def take(it, n):
    return [next(it) for _ in range(n)]


def stack(batches, key):
    return np.concatenate([b[key] for b in batches])


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_shapes_and_dtypes(shards):
    batch = next(data.make_train_iterator(make_cfg(shards), process_index=0, process_count=1))
    assert set(batch) == set(data.EXAMPLE_KEYS)
    for key in ("encoder_ids", "decoder_input_ids", "targets"):
        assert batch[key].shape == (4, BLOCK) and batch[key].dtype == np.int32
    assert batch["loss_mask"].shape == (4, BLOCK) and batch["loss_mask"].dtype == np.float32


def test_masking_and_decoder_input(shards):
    cfg = make_cfg(shards, names=("a", "b"), batch=8, crop_prob=0.3)
    batches = take(data.make_train_iterator(cfg, process_index=0, process_count=1), 40)
    enc, dec, tgt, loss = (
        stack(batches, k) for k in ("encoder_ids", "decoder_input_ids", "targets", "loss_mask")
    )
    real = tgt != tok.PAD
    assert real.sum() / tgt.size < 1.0  # some crops, so PAD is exercised
    assert abs(loss.sum() / real.sum() - 0.3) < 0.01  # exact count per block: tight
    per_block = loss.sum(1) / real.sum(1)
    assert np.all(np.abs(per_block - 0.3) <= 0.5 / real.sum(1) + 1e-6)
    assert set(np.unique(loss)) == {0.0, 1.0}
    np.testing.assert_array_equal(loss == 1, enc == tok.MASK)  # MASK exactly where the loss is
    assert not np.any((loss == 1) & ~real)  # never on PAD
    np.testing.assert_array_equal(enc[loss == 0], tgt[loss == 0])
    assert np.all(dec[:, 0] == tok.BOS)
    np.testing.assert_array_equal(dec[:, 1:], tgt[:, :-1])
    assert not np.any(tgt == tok.MASK) and not np.any(tgt == tok.BOS)


def test_masked_positions_are_uniform_over_slots(shards):
    cfg = make_cfg(shards, batch=8)
    loss = stack(
        take(data.make_train_iterator(cfg, process_index=0, process_count=1), 30), "loss_mask"
    )
    per_slot = loss.reshape(-1, tok.TOKENS_PER_NOTE).mean(0)
    assert np.all(np.abs(per_slot - 0.3) < 0.04), per_slot


def test_packing_concatenates_shuffled_pieces(shards):
    """Blocks are the host's shuffled piece stream cut every BLOCK tokens, with no gaps."""
    cfg = make_cfg(shards)
    stream, _ = data.source_dataset(
        cfg.data.sources[0], seed=data.derive_seed(0, "train"), process_index=0, process_count=1
    )
    expected = np.concatenate([stream[i] for i in range(40)]).astype(np.int32)
    got = stack(
        take(data.make_train_iterator(cfg, process_index=0, process_count=1), 10), "targets"
    ).reshape(-1)
    assert len(got) % 8 == 0 and len(got) <= len(expected)
    np.testing.assert_array_equal(got, expected[: len(got)])


def test_short_records_are_skipped_and_blocks_note_aligned(shards):
    cfg = make_cfg(shards, batch=8)
    tgt = stack(
        take(data.make_train_iterator(cfg, process_index=0, process_count=1), 20), "targets"
    )
    notes = tgt.reshape(-1, tok.TOKENS_PER_NOTE)
    lo, hi = tok.SLOT_RANGES[:, 0], tok.SLOT_RANGES[:, 1]
    assert np.all((notes >= lo) & (notes < hi))  # a 4-token record would shift every slot
    assert not np.any(notes[:, tok.IOI] == tok.TIME_START + 999)


def test_all_short_records_raise(tmp_path):
    d = tmp_path / "short"
    d.mkdir()
    writer = ArrayRecordWriter(str(d / records.shard_filename(0, 1)), records.ARRAY_RECORD_OPTIONS)
    for i in range(3):
        writer.write(
            records.encode_record(
                np.arange(5, 9),
                source=f"{i}",
                corpus="c",
                kind="score",
                n_notes=0,
                content_hash="0",
            )
        )
    writer.close()
    cfg = make_cfg({"a": (d, None)})
    with pytest.raises(ValueError, match="'a'.*no record with at least 8 tokens"):
        next(data.make_train_iterator(cfg, process_index=0, process_count=1))


def test_missing_shards_name_source_and_path(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "nowhere", tmp_path / "*.array_record"):
        cfg = make_cfg({"a": (path, None)})
        with pytest.raises(ValueError, match=f"'a'.*{re.escape(str(path))}"):
            data.make_train_iterator(cfg, process_index=0, process_count=1)


def test_deterministic_by_seed(shards):
    def run(seed):
        cfg = make_cfg(shards, names=("a", "b"), seed=seed, crop_prob=0.2)
        return take(data.make_train_iterator(cfg, process_index=0, process_count=1), 6)

    first = run(0)
    assert_same(first, run(0))
    other = run(1)
    assert not np.array_equal(stack(first, "targets"), stack(other, "targets"))
    assert not np.array_equal(stack(first, "loss_mask"), stack(other, "loss_mask"))


@pytest.mark.parametrize("names", [("a",), ("a", "b")])
def test_state_restore_gives_identical_batches(shards, names):
    cfg = make_cfg(shards, names=names, crop_prob=0.2, jitter_velocity=3)
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    saved = []
    for _ in range(4):  # several points, most of them in the middle of a piece
        take(it, 3)
        saved.append((json.loads(json.dumps(it.get_state())), take(it, 5)))
    if len(names) == 1:
        assert any(s["parent"]["pos"] > 0 for s, _ in saved)  # restored mid-piece
    for state, expected in saved:
        fresh = data.make_train_iterator(cfg, process_index=0, process_count=1)
        fresh.set_state(state)
        assert_same(take(fresh, 5), expected)


def test_hosts_read_disjoint_records_covering_the_source(shards):
    source = make_cfg(shards).data.sources[0]
    n_hosts, epochs = 3, []
    for host in range(n_hosts):
        ds, per_epoch = data.source_dataset(
            source, seed=7, process_index=host, process_count=n_hosts
        )
        assert per_epoch == 32 // n_hosts + (host < 32 % n_hosts)  # 30 pieces + 2 short
        rec = [
            int(x[tok.IOI]) - tok.TIME_START if len(x) else -1  # -1: a short record
            for x in (ds[i] for i in range(2 * per_epoch))
        ]
        epochs.append((rec[:per_epoch], rec[per_epoch:]))
    for epoch in (0, 1):  # in every epoch the hosts' records are disjoint and complete
        assert sorted(r for e in epochs for r in e[epoch]) == [-1, -1] + list(range(30))
    for first, second in epochs:  # and each epoch is reshuffled (each host has >= 10)
        assert first != second


def test_host_batches_differ_and_batch_must_divide(shards):
    cfg = make_cfg(shards, batch=4)
    a, b = (next(data.make_train_iterator(cfg, process_index=i, process_count=2)) for i in range(2))
    assert a["targets"].shape == (2, BLOCK)
    assert not np.array_equal(a["targets"], b["targets"])
    with pytest.raises(ValueError, match="divisible"):
        data.make_train_iterator(cfg, process_index=0, process_count=3)


def test_mixing_weights(shards):
    cfg = make_cfg(shards, names=("a", "b"), weights=[3.0, 1.0], batch=8)
    tgt = stack(
        take(data.make_train_iterator(cfg, process_index=0, process_count=1), 25), "targets"
    )
    source = tgt[:, 4] - tok.PEDAL_START  # pedal marker of each block's first note
    assert set(np.unique(source)) == {1, 2}
    assert abs(np.mean(source == 1) - 0.75) < 0.03


def test_crops_are_whole_notes(shards):
    cfg = make_cfg(shards, batch=8, crop_prob=0.5)
    tgt = stack(
        take(data.make_train_iterator(cfg, process_index=0, process_count=1), 25), "targets"
    )
    lengths = (tgt != tok.PAD).sum(1)
    for row, n in zip(tgt, lengths):
        assert np.all(row[n:] == tok.PAD) and np.all(row[:n] != tok.PAD)  # PAD only at the end
    cropped = lengths[lengths < BLOCK]
    assert np.all(cropped % 8 == 0) and np.all(cropped >= 8)
    assert abs(len(cropped) / len(lengths) - 0.5) < 0.12
    assert len(set(cropped.tolist())) > 3  # random lengths


def test_eval_split_uses_eval_sources_without_crops(shards):
    cfg = make_cfg(shards, names=("b", "a"), crop_prob=1.0)
    tgt = stack(
        take(data.make_train_iterator(cfg, process_index=0, process_count=1, split="eval"), 5),
        "targets",
    )
    assert np.all(tgt != tok.PAD) and np.all(tgt[:, 4] == tok.PEDAL_START + 2)
    bare = Config(
        data=DataConfig(sources=cfg.data.sources, block_size=BLOCK, window_stride=BLOCK),
        train=cfg.train,
    )
    with pytest.raises(ValueError, match="eval_sources"):
        data.make_train_iterator(bare, process_index=0, process_count=1, split="eval")


def test_jitter_stays_in_range_and_moves_only_its_slots(shards):
    def targets(**kw):
        cfg = make_cfg(shards, mask_prob=0.1, **kw)
        return stack(
            take(data.make_train_iterator(cfg, process_index=0, process_count=1), 10), "targets"
        ).reshape(-1, tok.TOKENS_PER_NOTE)

    plain, jittered = targets(), targets(jitter_velocity=5, jitter_ioi=2, jitter_duration=400)
    lo, hi = tok.SLOT_RANGES[:, 0], tok.SLOT_RANGES[:, 1]
    assert np.all((jittered >= lo) & (jittered < hi))
    diff = jittered - plain
    np.testing.assert_array_equal(diff[:, [tok.PITCH, 4, 5, 6, 7]], 0)
    for slot, amp in ((tok.VELOCITY, 5), (tok.IOI, 2), (tok.DURATION, 400)):
        assert np.all(np.abs(diff[:, slot]) <= amp) and np.any(diff[:, slot] != 0)
    assert diff[:, tok.VELOCITY].std() > 2  # roughly uniform in [-5, 5]


def test_to_global_batch_on_data_fsdp_mesh(shards):
    import jax
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    batch = next(data.make_train_iterator(make_cfg(shards, batch=8)))  # default: jax process
    out = data.to_global_batch(batch, mesh, PartitionSpec(("data", "fsdp")))
    for key, arr in out.items():
        assert arr.shape == (8, BLOCK) and arr.dtype == batch[key].dtype
        assert arr.sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(arr), batch[key])
        shards_ = arr.addressable_shards
        assert len(shards_) == 8 and {s.data.shape for s in shards_} == {(1, BLOCK)}
        for s in shards_:
            np.testing.assert_array_equal(np.asarray(s.data), batch[key][s.index])
    default = data.to_global_batch(batch, mesh)["targets"]
    assert default.sharding.spec == PartitionSpec(("data", "fsdp"))


def test_worker_processes(shards):
    """worker_count > 0: spawned Grain workers give full batches and restore exactly."""
    cfg = make_cfg(shards, names=("a", "b"), workers=2)
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    try:
        first = take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 4)
        take(it, 2)
        it.set_state(state)  # workers are told to rewind: same batches again
        assert_same(take(it, 4), expected)
    finally:
        it.close()
    assert first[0]["targets"].shape == (4, BLOCK)
    assert {int(m) for m in stack(first + expected, "targets")[:, 4] - tok.PEDAL_START} == {1, 2}
