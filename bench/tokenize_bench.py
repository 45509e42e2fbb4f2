"""Tokenizer throughput on the ASAP performance MIDIs, against plain mido parsing.

Why: tokenizing a 10B-token corpus is a pipeline stage of its own; the reference tokenizes at
about 8,600 notes/s. This prints (a) mido parse only, (b) our `encode_file` in one process,
(b') the same with the fast scanner off (mido parse + our
extraction: the path irregular files take), (c) `encode_file` over a spawn process pool,
each as files / notes / seconds / notes per second,
plus the ratios. Prints figures only; asserts nothing.

    python bench/tokenize_bench.py [--limit N] [--workers 2] [--repeat 1] [--asap DIR]
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import time
from pathlib import Path

import mido

REFERENCE_NOTES_PER_S = 8_600.0
DEFAULT_ASAP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "asap"


def performance_files(asap: Path, limit: int | None) -> list[Path]:
    """Unique `midi_performance` paths from metadata.csv; `limit` picks an evenly spaced,
    deterministic subset of the sorted list (so it spans composers, not just Bach)."""
    with open(asap / "metadata.csv", newline="") as f:
        files = sorted({row["midi_performance"] for row in csv.DictReader(f)})
    if limit is not None and limit < len(files):
        files = [files[i * len(files) // limit] for i in range(limit)]
    return [asap / f for f in files]


def count_notes_mido(path: Path) -> int:
    return sum(
        1
        for track in mido.MidiFile(path).tracks
        for msg in track
        if msg.type == "note_on" and msg.velocity > 0
    )


def parse_only(files: list[Path]) -> None:
    for path in files:
        mido.MidiFile(path)


def tokenize_notes(path: Path) -> int:
    """Notes in one file via our tokenizer (8 ids per note). Returns a count, not the array,
    so the pool measures tokenizing rather than pickling results."""
    from pianist_jax.tokenizer import encode_file

    return len(encode_file(path)) // 8


def _import_tokenizer() -> None:
    import pianist_jax.tokenizer  # noqa: F401  (pool initializer: import before timing)


def tokenize_all(files: list[Path]) -> int:
    return sum(tokenize_notes(p) for p in files)


def tokenize_all_via_mido(files: list[Path]) -> int:
    """Our tokenizer with the fast scanner switched off: mido parse + our extraction, i.e.
    the overhead we add on top of a plain mido parse (the path irregular files take)."""
    from pianist_jax.midi import scan as midi_scan

    scan = midi_scan.scan
    midi_scan.scan = lambda data: None
    try:
        return tokenize_all(files)
    finally:
        midi_scan.scan = scan


def best_of(repeat: int, fn, *args) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, result


def row(label: str, files: int, notes: int, seconds: float) -> float:
    rate = notes / seconds if seconds > 0 else float("nan")
    print(f"{label:<28} {files:>6} {notes:>10,} {seconds:>9.2f} {rate:>12,.0f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asap", type=Path, default=DEFAULT_ASAP, help="ASAP root (metadata.csv)")
    ap.add_argument("--limit", type=int, default=None, help="deterministic subset of N files")
    ap.add_argument("--workers", type=int, default=2, help="process pool size for (c); 0 skips")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs")
    args = ap.parse_args()

    files = performance_files(args.asap, args.limit)
    if not files:
        raise SystemExit(f"no performance MIDIs under {args.asap}")
    try:
        tokenize_notes(files[0])  # warm up: imports and first-call costs outside the timings
        have_tokenizer = True
    except ImportError as err:
        print(f"pianist_jax.tokenizer.encode_file unavailable ({err}); mido figures only")
        have_tokenizer = False
    count_notes_mido(files[0])
    for path in files:  # page cache warm, so (a) does not pay the disk reads for (b)
        path.read_bytes()

    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
        "(other load skews the pool figures)"
    )
    print(f"{'':<28} {'files':>6} {'notes':>10} {'seconds':>9} {'notes/s':>12}")
    parse_s, _ = best_of(args.repeat, parse_only, files)
    if not have_tokenizer:
        row("(a) mido parse only", len(files), sum(map(count_notes_mido, files)), parse_s)
        return
    single_s, notes = best_of(args.repeat, tokenize_all, files)
    via_mido_s, _ = best_of(args.repeat, tokenize_all_via_mido, files)
    parse_rate = row("(a) mido parse only", len(files), notes, parse_s)
    single_rate = row("(b) encode_file, 1 process", len(files), notes, single_s)
    via_mido_rate = row("(b') same, mido parse path", len(files), notes, via_mido_s)

    pool_rate = None
    if args.workers > 0:
        # Largest files first, one at a time: the pool's tail is a small file, not a sonata.
        by_size = sorted(files, key=lambda p: -p.stat().st_size)
        chunksize = 1
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(args.workers, initializer=_import_tokenizer) as pool:
            pool.map(tokenize_notes, files[:1] * args.workers, chunksize=1)  # spawn + import
            startup_s = time.perf_counter() - t0
            pool_s, pool_notes = best_of(
                args.repeat, lambda: sum(pool.imap_unordered(tokenize_notes, by_size, chunksize))
            )
        pool_rate = row(f"(c) encode_file, {args.workers} workers", len(files), pool_notes, pool_s)
        print(
            f"    (pool start-up and warm-up, not timed above: {startup_s:.2f}s; "
            f"chunksize {chunksize})"
        )

    print()
    print(
        f"tokenize / mido-parse time:      {single_s / parse_s:6.2f}x "
        f"(mido parse alone runs at {parse_rate:,.0f} notes/s)"
    )
    print(
        f"mido-path tokenize / mido-parse: {via_mido_rate / parse_rate:6.2f} of the parse-only "
        "rate (our work on top of mido)"
    )
    print(f"1 process vs reference 8,600/s:  {single_rate / REFERENCE_NOTES_PER_S:6.2f}x")
    if pool_rate is not None:
        print(
            f"{args.workers} workers vs reference:         "
            f"{pool_rate / REFERENCE_NOTES_PER_S:6.2f}x"
        )
        print(
            f"{args.workers}-worker scaling vs 1 process:  {pool_rate / single_rate:6.2f}x "
            f"(ideal {args.workers}x; {os.cpu_count()} CPUs here)"
        )


if __name__ == "__main__":
    main()
