"""Fine-tuning input pipeline: aligned (score, performance) shards -> windows -> batches.

Records (written by `data_prep.build_sft`): ``ids`` = the score segment's tokens (encoder
input) and ``extras["performance"]`` = the performance target of the same notes, same pitches,
same order. Per PAPER_NOTES section 3:

- every segment is cut into windows of ``data.block_size`` tokens with stride
  ``data.window_stride`` (50% overlap by default; the last window ends at the segment's end);
  a segment shorter than a window is one window, padded;
- each training window also yields ``data.crops_per_window`` random crops (a random run of
  whole notes inside it, at least min(64, window) notes), so the model sees short inputs;
- loss on every real target position; pedal targets binarised if ``data.binarize_pedal``;
- training windows: ``data.decoder_mask_prob`` of the decoder's input tokens (not pitches)
  become MASK, so the model has to take the performance from the score, not only from the
  notes it has just played.

No packing: a window is one piece of music, so encoder and decoder stay aligned note for note.
The example list is fixed (an index of (record, window start, crop number)), which gives an
exact epoch length for `train.epochs` and a cheap, exactly resumable Grain iterator: shuffled
with a seed per epoch for training; in order, one pass, padded to whole batches with empty
examples (zero loss weight) for evaluation.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from pianist_jax.config.schema import Config, DataConfig
from pianist_jax.data import records
from pianist_jax.tokenizer import BOS, MASK, PAD, PEDAL_START, PITCH, TOKENS_PER_NOTE

PERFORMANCE = "performance"
MIN_CROP_NOTES = 64


def window_starts(n_notes: int, window: int, stride: int) -> list[int]:
    """Note offsets of the windows over a segment: 0, stride, ..., the last one ending at the
    segment's end (so no note is left out)."""
    if n_notes <= window:
        return [0]
    starts = list(range(0, n_notes - window, stride))
    return starts + [n_notes - window]


def binarize_pedal(ids: np.ndarray) -> np.ndarray:
    """Pedal ids >= value 64 -> value 127, else 0 (other slots unchanged)."""
    notes = ids.reshape(-1, TOKENS_PER_NOTE).copy()
    pedal = notes[:, 4:]
    notes[:, 4:] = np.where(pedal - PEDAL_START >= 64, PEDAL_START + 127, PEDAL_START)
    return notes.reshape(-1)


class SftIndex:
    """All examples of some sources: rows of (source, record, first note, notes, crop#)."""

    def __init__(self, cfg: DataConfig, split: str):
        self.sources, rows = [], []
        window = cfg.notes_per_block
        stride = cfg.window_stride // TOKENS_PER_NOTE
        crops = cfg.crops_per_window if split == "train" else 0
        for s, src in enumerate(cfg.eval_sources if split == "eval" else cfg.sources):
            source = grain.sources.ArrayRecordDataSource(records.shard_paths(src))
            self.sources.append(source)
            for r in range(len(source)):
                rec = records.decode_record(source[r])
                if PERFORMANCE not in rec.extras:
                    raise ValueError(
                        f"data source {src.name!r}: record {rec.source!r} has no "
                        f"'{PERFORMANCE}' array: not an SFT shard "
                        "(write them with python -m data_prep.build_sft)"
                    )
                n = rec.n_tokens // TOKENS_PER_NOTE
                for start in window_starts(n, window, stride):
                    for c in range(1 + crops):
                        rows.append((s, r, start, min(window, n), c))
        if not rows:
            raise ValueError(f"SFT {split} sources hold no records")
        self.rows = np.array(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)


class SftExample:
    """Index row (+ per-element rng) -> example dict; crop rows take a random sub-run."""

    def __init__(self, index: SftIndex, data: DataConfig, decoder_mask_prob: float = 0.0):
        self.sources = index.sources
        self.rows = index.rows
        self.block = data.block_size
        self.binarize = data.binarize_pedal
        self.decoder_mask_prob = decoder_mask_prob

    def __call__(self, i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        block = self.block
        out = {"encoder_ids": np.zeros(block, np.int32), "targets": np.zeros(block, np.int32)}
        if i >= 0:
            s, r, start, n, crop = self.rows[i]
            rec = records.decode_record(self.sources[s][int(r)])
            if crop:
                length = int(rng.integers(min(MIN_CROP_NOTES, n), n + 1))
                start += int(rng.integers(0, n - length + 1))
                n = length
            lo, hi = start * TOKENS_PER_NOTE, (start + n) * TOKENS_PER_NOTE
            target = rec.extras[PERFORMANCE][lo:hi].astype(np.int32)
            out["encoder_ids"][: hi - lo] = rec.ids[lo:hi]
            out["targets"][: hi - lo] = binarize_pedal(target) if self.binarize else target
        targets = out["targets"]
        dec = np.concatenate([[BOS], targets[:-1]]).astype(np.int32)
        if self.decoder_mask_prob > 0:  # input p holds target p - 1: pitches sit at 8j + 1
            drop = rng.random(block) < self.decoder_mask_prob
            drop &= (np.arange(block) % TOKENS_PER_NOTE != (PITCH + 1)) & (dec != PAD)
            drop[0] = False  # BOS
            dec = np.where(drop, MASK, dec).astype(np.int32)
        out["decoder_input_ids"] = dec
        out["loss_mask"] = (targets != PAD).astype(np.float32)
        return out


def examples_per_epoch(cfg: Config) -> int:
    """Training examples in one epoch over all hosts (windows + crops)."""
    return len(SftIndex(cfg.data, "train"))


def make_sft_dataset(
    cfg: Config, *, process_index: int, process_count: int, batch: int, split: str
) -> Any:
    """Per-host batches of SFT examples (see module docstring)."""
    data = cfg.data
    index = SftIndex(data, split)
    build = SftExample(index, data, data.decoder_mask_prob if split == "train" else 0.0)
    seed = records.derive_seed(data.seed, split, "sft")
    ds = grain.MapDataset.range(len(index))
    if split == "train":
        ds = ds.shuffle(seed=records.derive_seed(seed, "shuffle"))[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(f"{len(index)} SFT examples leave none for host {process_index}")
        ds = ds.repeat(None)
    else:  # one ordered pass, padded with empty examples to whole batches on every host
        ids = np.arange(len(index))[process_index::process_count]
        per_host = math.ceil(len(index) / process_count)  # same batch count on every host
        padded = np.full(math.ceil(per_host / batch) * batch, -1)
        padded[: len(ids)] = ids
        ds = grain.MapDataset.source(padded.tolist())
    ds = ds.random_map(build, seed=records.derive_seed(seed, "example", process_index))
    return ds.batch(batch, drop_remainder=True).to_iter_dataset()
