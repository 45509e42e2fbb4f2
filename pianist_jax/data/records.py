"""The one record schema: a tokenized piece <-> bytes, plus shard file naming.

The writer (``data_prep.tokenize``) and every reader (Grain pipelines, ``data_prep.inspect``)
import this module, so the byte layout is defined exactly once. A record holds a *whole piece*;
block size / windowing is the loader's job, so re-blocking never needs re-tokenizing.

Byte layout (version 1), everything little-endian::

    b"PJR1"                      4-byte magic (format version in the last byte)
    uint32 meta_len              length of the JSON metadata
    meta_len bytes               compact UTF-8 JSON, sorted keys (deterministic bytes)
    0..7 zero bytes              padding so the arrays start 8-byte aligned
    arrays                       raw '<u2' token ids: "ids" first, then any extras

The JSON names the arrays and their lengths (``"arrays": [["ids", n], ...]``), so a later record
kind (e.g. aligned score/performance pairs for SFT) can add arrays without a new format.
No JAX import: this runs inside data-prep worker processes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    from pianist_jax.config.schema import SourceConfig

MAGIC = b"PJR1"
FORMAT_VERSION = 1
KINDS = ("score", "performance")
ID_DTYPE = np.dtype("<u2")  # vocab (5389) fits uint16; little-endian on every host
_HEADER = struct.Struct("<4sI")
_ALIGN = 8

# ArrayRecord writer options shared by every shard writer. group_size:1 puts each record in its
# own compressed chunk, so a random-access read (Grain shuffles globally) decompresses one piece
# rather than a group of neighbours; pieces are tens of KB, big enough to compress well alone.
# max_parallelism:1 keeps the chunk stream byte-identical run to run.
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:3,max_parallelism:1"
SHARD_SUFFIX = ".array_record"
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.array_record$")


@dataclasses.dataclass(frozen=True)
class Record:
    """One tokenized piece. ``ids`` is a read-only uint16 view into the record bytes."""

    ids: np.ndarray
    source: str  # path relative to the corpus input root, '/'-separated
    corpus: str
    kind: str  # 'score' | 'performance'
    n_notes: int
    content_hash: str  # sha256 hex of the source file bytes
    tokenizer_version: str = ""
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])


def _as_ids(name: str, arr) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 1:
        raise ValueError(f"record array {name!r} must be 1-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(ID_DTYPE).max):
        raise ValueError(f"record array {name!r} has ids outside uint16 range")
    return a.astype(ID_DTYPE, copy=False)


def encode_record(
    ids,
    *,
    source: str,
    corpus: str,
    kind: str,
    n_notes: int,
    content_hash: str,
    tokenizer_version: str = "",
    extras: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """Serialize one piece. Same inputs -> same bytes (sorted-key JSON, no timestamps)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    arrays = [("ids", _as_ids("ids", ids))]
    for name in sorted(extras or {}):
        if name == "ids":
            raise ValueError("extras may not be named 'ids'")
        arrays.append((name, _as_ids(name, extras[name])))
    meta = {
        "source": str(source),
        "corpus": str(corpus),
        "kind": kind,
        "n_notes": int(n_notes),
        "content_hash": str(content_hash),
        "tokenizer_version": str(tokenizer_version),
        "arrays": [[name, int(a.shape[0])] for name, a in arrays],
    }
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head = _HEADER.pack(MAGIC, len(meta_bytes)) + meta_bytes
    pad = b"\0" * (-len(head) % _ALIGN)
    return b"".join([head, pad] + [a.tobytes() for _, a in arrays])


def decode_record(data: bytes) -> Record:
    """Parse bytes written by :func:`encode_record`; arrays are zero-copy read-only views."""
    buf = memoryview(data)
    if len(buf) < _HEADER.size:
        raise ValueError("record too short")
    magic, meta_len = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError(f"bad record magic {bytes(magic)!r} (expected {MAGIC!r})")
    start = _HEADER.size
    meta = json.loads(bytes(buf[start : start + meta_len]).decode("utf-8"))
    offset = start + meta_len
    offset += -offset % _ALIGN
    arrays = {}
    for name, n in meta["arrays"]:
        end = offset + n * ID_DTYPE.itemsize
        if end > len(buf):
            raise ValueError(f"record truncated in array {name!r}")
        arrays[name] = np.frombuffer(buf, dtype=ID_DTYPE, count=n, offset=offset)
        offset = end
    if offset != len(buf):
        raise ValueError(f"record has {len(buf) - offset} trailing bytes")
    ids = arrays.pop("ids")
    return Record(
        ids=ids,
        source=meta["source"],
        corpus=meta["corpus"],
        kind=meta["kind"],
        n_notes=meta["n_notes"],
        content_hash=meta["content_hash"],
        tokenizer_version=meta.get("tokenizer_version", ""),
        extras=arrays,
    )


def shard_filename(index: int, num_shards: int) -> str:
    """``shard-00003-of-00008.array_record``: sorts by index, carries the total."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    return f"shard-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def parse_shard_filename(name: str) -> tuple[int, int] | None:
    """Inverse of :func:`shard_filename`; None for any other file name."""
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_shards(directory: str | Path) -> list[Path]:
    """All shard files in ``directory`` in index order; refuses mixed shard counts."""
    found = []
    for p in Path(directory).iterdir():
        parsed = parse_shard_filename(p.name)
        if parsed is not None:
            found.append((parsed, p))
    totals = {n for (_, n), _ in found}
    if len(totals) > 1:
        raise ValueError(f"{directory} mixes shard counts {sorted(totals)}")
    return [p for _, p in sorted(found)]


def derive_seed(*parts: int | str) -> int:
    """A uint32 seed from integers/strings: one independent stream per (seed, split, stage, ...)."""
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def shard_paths(source: SourceConfig) -> list[str]:
    """The shard files of a source (a shard directory, a glob or one shard file); ValueError if
    there are none."""
    path = source.path
    if any(c in path for c in "*?["):
        found = sorted(p for p in glob.glob(path) if p.endswith(SHARD_SUFFIX))
    elif Path(path).is_dir():
        found = [str(p) for p in list_shards(path)]
    elif Path(path).is_file() and path.endswith(SHARD_SUFFIX):
        found = [path]  # one shard file (e.g. a held-out shard for evaluation)
    else:
        found = []
    if not found:
        where = path if Path(path).is_absolute() else f"{path} (from {Path.cwd()})"
        raise ValueError(
            f"data source {source.name!r}: no shard files "
            f"(shard-*-of-*{SHARD_SUFFIX}) at {where}; write them with "
            "python -m data_prep.tokenize (e.g. launch/tokenize_shared.sh)"
        )
    return found
