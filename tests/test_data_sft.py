"""The SFT pipeline (pianist_jax/data/sft.py) and epoch-based fine-tuning runs on tiny
synthetic aligned shards: windows + crops, aligned targets, binarised pedal, exact resume,
one finite padded validation pass, epochs -> steps, and an init-from fine-tuning run."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from pianist_jax import tokenizer as tok
from pianist_jax.config import load_config
from pianist_jax.data import pipeline as data
from pianist_jax.data import records
from pianist_jax.data import sft as data_sft
from pianist_jax.train import loop as train

BLOCK = 128  # 16 notes: stride 64 tokens = 8 notes


def pair(rng, n):
    """Score ids and a 'performance' of the same notes (velocity = pitch, pedal half-way)."""
    notes = np.empty((n, 8), np.int64)
    notes[:, 0] = tok.PITCH_START + 40 + rng.integers(0, 40, n)
    notes[:, 1] = tok.TIME_START + rng.integers(0, 400, n)
    notes[:, 2] = tok.VELOCITY_START + 64
    notes[:, 3] = tok.TIME_START + 300
    notes[:, 4:] = tok.PEDAL_START
    perf = notes.copy()
    perf[:, 2] = tok.VELOCITY_START + (notes[:, 0] - tok.PITCH_START)
    perf[:, 4:] = tok.PEDAL_START + rng.choice([10, 63, 64, 100], size=(n, 4))
    return notes.reshape(-1), perf.reshape(-1)


def write_sft(directory, lengths, seed):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    writer = ArrayRecordWriter(
        str(directory / records.shard_filename(0, 1)), records.ARRAY_RECORD_OPTIONS
    )
    pairs = []
    for i, n in enumerate(lengths):
        score, perf = pair(rng, n)
        pairs.append((score, perf))
        writer.write(
            records.encode_record(
                score,
                source=f"p{i}.mid#seg0",
                corpus="syn",
                kind="score",
                n_notes=n,
                content_hash=f"{i:064x}",
                extras={"performance": perf},
            )
        )
    writer.close()
    return pairs


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    train_pairs = write_sft(root / "train", [5, 16, 40, 70], seed=0)
    val_pairs = write_sft(root / "val", [12, 30, 9], seed=1)
    return root, train_pairs, val_pairs


def make_cfg(root, out="/tmp/unused", *extra):
    return load_config(
        "configs/sft.yaml",
        [
            "model=tiny",
            "mesh.shape=[2,4,1]",
            f"train.output_dir={out}",
            f"data.sources=[{{name: t, path: '{root}/train'}}]",
            f"data.eval_sources=[{{name: v, path: '{root}/val'}}]",
            f"data.block_size={BLOCK}",
            f"data.window_stride={BLOCK // 2}",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every=5",
            "train.checkpoint_every=5",
            *extra,
        ],
    )


def test_window_starts_cover_and_end_at_the_end():
    assert data_sft.window_starts(10, 16, 8) == [0]
    assert data_sft.window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert data_sft.window_starts(41, 16, 8)[-1] == 25


def test_examples_are_aligned_windows_and_crops(sft_shards):
    root, pairs, _ = sft_shards
    cfg = make_cfg(root)
    windows = sum(
        len(data_sft.window_starts(len(s) // 8, BLOCK // 8, BLOCK // 16)) for s, _ in pairs
    )
    assert data_sft.examples_per_epoch(cfg) == 2 * windows  # + one crop per window
    assert train.total_steps(cfg) == math.ceil(2 * 2 * windows / 8)  # 2 epochs, batch 8
    batch = next(data.make_train_iterator(cfg, process_index=0, process_count=1))
    enc, tgt, dec, mask = (
        batch[k] for k in ("encoder_ids", "targets", "decoder_input_ids", "loss_mask")
    )
    np.testing.assert_array_equal(enc[:, ::8], tgt[:, ::8])  # same pitches, same order
    np.testing.assert_array_equal(dec[:, 0], tok.BOS)
    np.testing.assert_array_equal(dec[:, 1:], tgt[:, :-1])
    np.testing.assert_array_equal(mask, (tgt != tok.PAD).astype(np.float32))
    notes = tgt.reshape(-1, 8)
    real = notes[:, 0] != tok.PAD
    assert set(np.unique(notes[real, 4:] - tok.PEDAL_START)) <= {0, 127}  # binarised
    vel = notes[real, 2] - tok.VELOCITY_START
    np.testing.assert_array_equal(vel, notes[real, 0] - tok.PITCH_START)  # velocity = pitch


def test_resume_gives_the_same_batches(sft_shards):
    cfg = make_cfg(sft_shards[0])
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    again = data.make_train_iterator(cfg, process_index=0, process_count=1)
    again.set_state(state)
    for a, b in zip(want, (next(again) for _ in range(3))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_validation_is_one_padded_pass_split_over_hosts(sft_shards):
    root, _, val = sft_shards
    cfg = make_cfg(root)
    expected = sum(len(data_sft.window_starts(len(s) // 8, 16, 8)) for s, _ in val)
    seen, batches = 0, []
    for host in range(2):
        got = list(data.make_train_iterator(cfg, process_index=host, process_count=2, split="eval"))
        batches.append(len(got))
        seen += sum(int((b["loss_mask"].sum(1) > 0).sum()) for b in got)
    assert seen == expected and batches[0] == batches[1]


def test_not_sft_shards_is_a_clear_error(tmp_path):
    from test_train import random_piece  # pre-training records: no performance array

    d = tmp_path / "pre"
    d.mkdir()
    w = ArrayRecordWriter(str(d / records.shard_filename(0, 1)), records.ARRAY_RECORD_OPTIONS)
    ids = random_piece(np.random.default_rng(0), 20)
    w.write(
        records.encode_record(
            ids, source="x.mid", corpus="c", kind="performance", n_notes=20, content_hash="0" * 64
        )
    )
    w.close()
    cfg = load_config(
        "configs/sft.yaml", ["model=tiny", f"data.sources=[{{name: p, path: '{d}'}}]"]
    )
    with pytest.raises(ValueError, match="not an SFT shard"):
        data_sft.examples_per_epoch(cfg)


@pytest.mark.slow  # a pre-training run, then fine-tuning
def test_sft_run_from_pretrained_params_epochs_and_validation(sft_shards, tmp_path, repo_root):
    os.chdir(repo_root)
    root = sft_shards[0]
    pre = tmp_path / "pre"
    one = "mesh.shape=[1,1,1]"  # meshes are covered by test_train; keep this run short
    dev = jax.devices()[:1]
    train.run(
        make_cfg(root, pre, one, "train.steps=3", "train.epochs=null"), progress=False, devices=dev
    )
    out = tmp_path / "sft"
    cfg = make_cfg(root, out, one, f"train.init_from={pre}", "train.lr=3e-3", "train.epochs=5")
    steps = train.total_steps(cfg)
    result = train.run(cfg, progress=False, devices=dev)
    assert result.start_step == 0 and result.end_step == steps  # fresh optimiser, epochs
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tr = [m["loss"] for m in lines if m["split"] == "train"]
    ev = [m["loss"] for m in lines if m["split"] == "eval"]
    assert ev and np.isfinite(ev).all()
    assert np.mean(tr[-3:]) < np.mean(tr[:3]) - 0.5


def test_decoder_inputs_masked_in_training_only(sft_shards):
    """``data.decoder_mask_prob``: training windows replace about that share of the decoder's
    input tokens by MASK, never a pitch nor BOS; targets, encoder input and validation
    batches are unchanged."""
    root, _, _ = sft_shards
    cfg = make_cfg(root, "/tmp/unused", "data.decoder_mask_prob=0.4")
    batch = next(data.make_train_iterator(cfg, process_index=0, process_count=1))
    tgt, dec = batch["targets"], batch["decoder_input_ids"]
    real = np.concatenate([np.ones((len(tgt), 1), bool), tgt[:, :-1] != tok.PAD], axis=1)
    masked = dec == tok.MASK
    assert not masked[:, 0].any() and not masked[:, 1::8].any()  # BOS, pitches
    np.testing.assert_array_equal(dec[:, 1:][~masked[:, 1:]], tgt[:, :-1][~masked[:, 1:]])
    share = masked[real].sum() / (real.sum() * 7 / 8)
    assert 0.3 < share < 0.5
    val = next(data.make_train_iterator(cfg, process_index=0, process_count=1, split="eval"))
    assert not (val["decoder_input_ids"] == tok.MASK).any()
