"""Grain input pipeline: record shards -> masked-denoising examples -> per-host batches.

Per source (PAPER_NOTES section 3)::

    ArrayRecord shards -> global shuffle (seeded, reshuffled every epoch) -> this host's slice
      -> repeat forever -> decode ids -> [jitter] -> pack into block_size-token blocks
    mix sources by weight -> [crop] + mask -> batch (global batch / process_count)
      -> [worker processes]

Choices, and why:
- Packing: pieces are concatenated into one token stream per source and cut every block_size
  tokens, as the paper does (4096-token blocks); no padding is wasted and long pieces are seen
  at every offset. Pieces and block_size are whole notes, so every cut falls on a multiple of 8.
  No separator token is inserted (one would break the 8-tokens-per-note layout); a piece's first
  IOI is its first onset, so boundaries look like a pause.
- Mixing happens on blocks, so a source's weight is its share of *tokens* seen, whatever the
  length of its pieces. Grain's mix is a deterministic interleave, not a random draw.
- Sharding: all hosts shuffle with the same seed, then host h keeps records h, h+n, ...: in every
  epoch the hosts read disjoint records that together are the whole source.
- Randomness: every draw comes from Grain's per-element Philox generators, seeded from
  `data.seed`, the split, the stage and the host (and the element index/epoch); no global RNG.
- State: the returned iterator is a Grain `DatasetIterator`; `get_state()` is a small JSON-able
  dict and `set_state()` resumes exactly (see `make_train_iterator`).
- Workers (`data.worker_count` > 0): Grain 0.2.18 starts them with the multiprocessing *spawn*
  context (never fork), so they are safe after JAX is initialised. Each worker runs the whole
  pipeline on every n-th record of each source, so the stream depends on worker_count.

This module never initialises JAX devices (only `to_global_batch` and the process-index default
touch JAX), so it can be imported and iterated in worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import grain
import numpy as np

from pianist_jax.config.schema import Config, DataConfig, SourceConfig
from pianist_jax.data import records
from pianist_jax.data import sft as data_sft
from pianist_jax.data.global_batches import Prefetch, to_global_batch  # noqa: F401 (data.* API)
from pianist_jax.data.records import derive_seed, shard_paths
from pianist_jax.tokenizer import (
    BOS,
    DURATION,
    IOI,
    MASK,
    PAD,
    SLOT_RANGES,
    TOKENS_PER_NOTE,
    VELOCITY,
)

Split = Literal["train", "eval"]
Example = dict[str, np.ndarray]
EXAMPLE_KEYS = ("encoder_ids", "decoder_input_ids", "targets", "loss_mask")

# Threads reading and decoding records per source (ArrayRecord + zstd release the GIL).
_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=64)


# --------------------------------------------------------------------------- sources


def decode_ids(raw: bytes) -> np.ndarray:
    """Record bytes -> its token ids (uint16), cut to whole notes."""
    ids = records.decode_record(raw).ids
    return ids[: len(ids) - len(ids) % TOKENS_PER_NOTE]


class Jitter:
    """Move velocity / IOI / duration ids by uniform integers in [-a, a], clipped to the slot.

    Why: coarse transcriptions quantise these values; noise keeps the model from learning
    the grid (paper section 3). Runs before packing, so targets see the jittered piece.
    """

    def __init__(self, velocity: int = 0, ioi: int = 0, duration: int = 0):
        self.amplitudes = {
            s: a for s, a in ((VELOCITY, velocity), (IOI, ioi), (DURATION, duration)) if a > 0
        }

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        notes = ids.reshape(-1, TOKENS_PER_NOTE).astype(np.int32)
        for slot, amp in self.amplitudes.items():
            lo, hi = SLOT_RANGES[slot]
            moved = notes[:, slot] + rng.integers(-amp, amp + 1, size=len(notes))
            notes[:, slot] = np.clip(moved, lo, hi - 1)
        return notes.reshape(-1).astype(np.uint16)


def source_dataset(
    source: SourceConfig, *, seed: int, process_index: int, process_count: int
) -> tuple[grain.MapDataset, int]:
    """This host's endless stream of one source's pieces (uint16 id arrays), and its number of
    records per epoch.

    Shuffled with the same `seed` on every host before slicing, so hosts read disjoint records;
    `repeat` folds the epoch into the shuffle seed, so each epoch has a new order.
    """
    data = grain.sources.ArrayRecordDataSource(shard_paths(source))
    ds = grain.MapDataset.source(data).shuffle(seed=derive_seed(seed, "shuffle", source.name))
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(
            f"data source {source.name!r} at {source.path!r}: {len(data)} records "
            f"leave none for host {process_index} of {process_count}"
        )
    per_epoch = len(ds)
    ds = ds.repeat(None).map(decode_ids)
    jitter = Jitter(source.jitter_velocity, source.jitter_ioi, source.jitter_duration)
    if jitter.amplitudes:
        ds = ds.random_map(jitter, seed=derive_seed(seed, "jitter", source.name, process_index))
    return ds, per_epoch


# --------------------------------------------------------------------------- packing


class PackIterDataset(grain.IterDataset):
    """Concatenate pieces into one stream and cut it into blocks of exactly `block_size` ids.

    Pieces with fewer than 8 ids are skipped; `max_skips` consecutive skips (a whole epoch of
    them) raise instead of spinning forever.
    """

    def __init__(self, parent: grain.IterDataset, block_size: int, *, name: str, max_skips: int):
        super().__init__(parent)
        self.block_size, self.name, self.max_skips = block_size, name, max_skips

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackIterDataset(block_size={self.block_size}, source={self.name})"


class _PackIterator(grain.DatasetIterator):
    """State = the parent's state before the piece being cut + the offset into that piece."""

    def __init__(self, parent: grain.DatasetIterator, spec: PackIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._piece: np.ndarray | None = None
        self._pos = 0
        self._piece_state: dict[str, Any] = {}

    def _next_piece(self) -> None:
        for _ in range(self._spec.max_skips + 1):
            self._piece_state = self._parent.get_state()
            piece = next(self._parent)
            if len(piece) >= TOKENS_PER_NOTE:
                self._piece, self._pos = piece, 0
                return
        raise ValueError(
            f"data source {self._spec.name!r}: no record with at least "
            f"{TOKENS_PER_NOTE} tokens in {self._spec.max_skips + 1} reads"
        )

    def __next__(self) -> np.ndarray:
        block = np.empty(self._spec.block_size, dtype=np.uint16)
        filled = 0
        while filled < len(block):
            if self._piece is None or self._pos == len(self._piece):
                self._next_piece()
            take = min(len(block) - filled, len(self._piece) - self._pos)
            block[filled : filled + take] = self._piece[self._pos : self._pos + take]
            filled += take
            self._pos += take
        return block

    def get_state(self) -> dict[str, Any]:
        if self._piece is None or self._pos == len(self._piece):
            return {"parent": self._parent.get_state(), "pos": 0}
        return {"parent": self._piece_state, "pos": self._pos}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._piece, self._pos = None, 0
        if state["pos"]:
            self._next_piece()
            self._pos = state["pos"]

    def __str__(self) -> str:
        return f"PackIterator(source={self._spec.name})"


# --------------------------------------------------------------------------- examples


def crop_block(block: np.ndarray, rng: np.random.Generator, crop_prob: float) -> np.ndarray:
    """With probability crop_prob keep only a random number of whole notes (>= 1, fewer than
    the block holds) and pad the rest with PAD: teaches the model short inputs (paper: ~10%)."""
    notes = len(block) // TOKENS_PER_NOTE
    if notes < 2 or not rng.random() < crop_prob:
        return block
    keep = int(rng.integers(1, notes)) * TOKENS_PER_NOTE
    out = np.full_like(block, PAD)
    out[:keep] = block[:keep]
    return out


def mask_block(block: np.ndarray, rng: np.random.Generator, mask_prob: float) -> Example:
    """Masked-denoising example from one block (PAPER_NOTES section 3).

    round(mask_prob * n_real) real tokens (at least one), chosen uniformly without replacement,
    become MASK in the encoder input: an exact count keeps the loss weight per block steady.
    The decoder reads the original block shifted right behind BOS; loss only where masked.
    """
    targets = block.astype(np.int32)
    real = np.flatnonzero(targets != PAD)
    count = min(len(real), max(1, round(mask_prob * len(real)))) if mask_prob > 0 else 0
    masked = rng.choice(real, size=count, replace=False)
    encoder_ids = targets.copy()
    encoder_ids[masked] = MASK
    loss_mask = np.zeros(len(targets), np.float32)
    loss_mask[masked] = 1.0
    decoder_input_ids = np.empty_like(targets)
    decoder_input_ids[0] = BOS
    decoder_input_ids[1:] = targets[:-1]
    return {
        "encoder_ids": encoder_ids,
        "decoder_input_ids": decoder_input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
    }


class PretrainExample:
    """Block -> example dict: optional crop, then masking. One of `EXAMPLE_BUILDERS`."""

    def __init__(self, data: DataConfig, split: Split):
        self.mask_prob = data.mask_prob
        self.crop_prob = data.crop_prob if split == "train" else 0.0  # eval: full blocks

    def __call__(self, block: np.ndarray, rng: np.random.Generator) -> Example:
        return mask_block(crop_block(block, rng, self.crop_prob), rng, self.mask_prob)


# data.kind -> (DataConfig, split) -> callable(block, rng) -> Example, for packed-block kinds
# (SFT windows are built in pianist_jax.data.sft).
EXAMPLE_BUILDERS: dict[str, Callable[[DataConfig, Split], Callable[..., Example]]] = {
    "pretrain": PretrainExample,
}


# --------------------------------------------------------------------------- pipeline


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: building a pipeline with explicit indices never touches JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _allow_unparsed_grain_flag() -> None:
    """Grain 0.2.18's mp_prefetch reads an absl flag, which fails unless absl parsed the command
    line (absl.app.run); mark just that flag as given, at its default, as Grain does itself."""
    from absl import flags

    flag = flags.FLAGS["grain_enable_multiprocess_worker_profiling"]
    if not flags.FLAGS.is_parsed() and not flag.present:
        flag.present = 1


def local_batch_size(cfg: Config, process_count: int) -> int:
    """train.batch_size (global) split evenly over hosts."""
    if cfg.train.batch_size % process_count:
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the "
            f"number of processes ({process_count})"
        )
    return cfg.train.batch_size // process_count


def make_dataset(
    cfg: Config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    split: Split = "train",
) -> grain.IterDataset:
    """The whole pipeline as a Grain IterDataset of per-host batches (dicts of numpy arrays)."""
    process_index, process_count = _process_info(process_index, process_count)
    data = cfg.data
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    sources = data.sources if split == "train" else data.eval_sources
    if not sources:
        raise ValueError(f"data.{'sources' if split == 'train' else 'eval_sources'} is empty")
    batch = local_batch_size(cfg, process_count)
    if data.kind == "sft":  # aligned pairs: windows, not packed blocks (pianist_jax.data.sft)
        ds = data_sft.make_sft_dataset(
            cfg, process_index=process_index, process_count=process_count, batch=batch, split=split
        )
        return _with_workers(ds, data.worker_count)
    if data.kind not in EXAMPLE_BUILDERS:
        raise NotImplementedError(f"data.kind={data.kind!r}: no example builder")
    seed = derive_seed(data.seed, split)

    blocks = {}
    for src in sources:
        pieces, per_epoch = source_dataset(
            src, seed=seed, process_index=process_index, process_count=process_count
        )
        blocks[src.name] = PackIterDataset(
            pieces.to_iter_dataset(_READ_OPTIONS),
            data.block_size,
            name=src.name,
            max_skips=per_epoch,
        )
    if len(blocks) == 1:
        ds = next(iter(blocks.values()))
    else:
        ds = grain.IterDataset.mix(blocks, {s.name: s.weight for s in sources})
    builder = EXAMPLE_BUILDERS[data.kind](data, split)
    ds = ds.random_map(builder, seed=derive_seed(seed, "example", process_index))
    return _with_workers(ds.batch(batch, drop_remainder=True), data.worker_count)


def _with_workers(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    if worker_count > 0:
        _allow_unparsed_grain_flag()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2)
        )
    return ds


def make_train_iterator(
    cfg: Config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    split: Split = "train",
) -> grain.DatasetIterator:
    """An endless iterator of per-host batches: dict of numpy arrays, each [B_local, block_size]
    (`encoder_ids`, `decoder_input_ids`, `targets` int32; `loss_mask` float32).

    Checkpointing: `state = it.get_state()` (a JSON-able dict; `json.dumps` it per host) and
    `it.set_state(state)` on a fresh iterator from the same config resume with exactly the same
    batches. With Orbax: `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` as
    the args of an item handled by `grain.checkpoint.CheckpointHandler()` (one file per host).
    """
    return iter(
        make_dataset(cfg, process_index=process_index, process_count=process_count, split=split)
    )
