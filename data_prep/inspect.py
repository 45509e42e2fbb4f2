"""Look inside tokenized shards: counts per corpus/kind, a length histogram, decode one record.

    python -m data_prep.inspect SHARD_DIR [--shard S] [--decode K --out piece.mid]

Reads the shards themselves (not the manifest), so it checks what a loader will actually see.
With ``--shard S`` only shard S is read and K indexes into it; otherwise K counts records across
all shards in index order.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from pianist_jax.data import records

_BATCH = 256
_BAR = 40


def _reader(path: Path):
    from array_record.python.array_record_module import ArrayRecordReader

    return ArrayRecordReader(str(path))


def iter_records(path: Path):
    """Every record of one shard, in order, read in batches."""
    reader = _reader(path)
    try:
        n = reader.num_records()
        for start in range(0, n, _BATCH):
            for data in reader.read(list(range(start, min(n, start + _BATCH)))):
                yield records.decode_record(data)
    finally:
        reader.close()


def select_shards(directory: Path, shard: int | None) -> list[Path]:
    shards = records.list_shards(directory)
    if not shards:
        raise SystemExit(f"no shards in {directory}")
    if shard is None:
        return shards
    picked = [p for p in shards if records.parse_shard_filename(p.name)[0] == shard]
    if not picked:
        raise SystemExit(f"shard {shard} not found in {directory}")
    return picked


def get_record(shards: list[Path], k: int) -> tuple[Path, int, records.Record]:
    """Record k counted across ``shards`` in order (negative k counts from the end)."""
    sizes = []
    for p in shards:
        r = _reader(p)
        sizes.append(r.num_records())
        r.close()
    total = sum(sizes)
    if not -total <= k < total:
        raise SystemExit(f"record {k} out of range: {total} records")
    k %= total
    for p, n in zip(shards, sizes):
        if k < n:
            r = _reader(p)
            data = r.read([k])[0]
            r.close()
            return p, k, records.decode_record(data)
        k -= n
    raise AssertionError("unreachable")


def histogram(lengths: list[int]) -> str:
    """Text histogram of tokens per record in power-of-two buckets."""
    if not lengths:
        return "(no records)"
    counts = defaultdict(int)
    for n in lengths:
        counts[max(0, int(n).bit_length() - 1)] += 1
    peak = max(counts.values())
    lines = []
    for b in range(min(counts), max(counts) + 1):
        c = counts.get(b, 0)
        lo, hi = (1 << b) if b else 0, (1 << (b + 1)) - 1
        lines.append(f"{lo:>9,}-{hi:<9,} {c:>7} {'#' * max(c > 0, round(_BAR * c / peak))}")
    return "\n".join(lines)


def summarize(shards: list[Path]) -> str:
    per = defaultdict(lambda: [0, 0, 0])  # (corpus, kind) -> records, notes, tokens
    lengths = []
    for p in shards:
        for rec in iter_records(p):
            row = per[(rec.corpus, rec.kind)]
            row[0] += 1
            row[1] += rec.n_notes
            row[2] += rec.n_tokens
            lengths.append(rec.n_tokens)
    lines = [
        f"{len(shards)} shard(s)",
        f"{'corpus':<20} {'kind':<12} {'records':>8} {'notes':>12} {'tokens':>14}",
    ]
    total = np.zeros(3, dtype=np.int64)
    for (corpus, kind), row in sorted(per.items()):
        lines.append(f"{corpus:<20} {kind:<12} {row[0]:>8,} {row[1]:>12,} {row[2]:>14,}")
        total += row
    lines.append(f"{'TOTAL':<33} {total[0]:>8,} {total[1]:>12,} {total[2]:>14,}")
    lines += ["", "tokens per record:", histogram(lengths)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.inspect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("directory", type=Path)
    ap.add_argument("--shard", type=int, help="only this shard index")
    ap.add_argument("--decode", type=int, metavar="K", help="decode record K to MIDI")
    ap.add_argument("--out", type=Path, help="MIDI path for --decode")
    args = ap.parse_args(argv)
    shards = select_shards(args.directory, args.shard)
    if args.decode is None:
        print(summarize(shards))
        return 0
    if args.out is None:
        raise SystemExit("--decode needs --out FILE.mid")
    from pianist_jax import tokenizer

    path, index, rec = get_record(shards, args.decode)
    if rec.tokenizer_version and rec.tokenizer_version != tokenizer.TOKENIZER_VERSION:
        print(
            f"warning: record made by tokenizer {rec.tokenizer_version}, decoding with "
            f"{tokenizer.TOKENIZER_VERSION}",
            file=sys.stderr,
        )
    tokenizer.decode_to_midi(rec.ids.astype(np.int32), args.out)
    print(
        f"{path.name}[{index}]: {rec.corpus}/{rec.source} ({rec.kind}, {rec.n_notes} notes, "
        f"sha256 {rec.content_hash[:12]}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
