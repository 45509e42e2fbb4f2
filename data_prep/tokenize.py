"""MIDI corpora -> ArrayRecord shards of whole-piece token records (+ manifest, quarantine).

    python -m data_prep.tokenize --input DIR_OR_GLOB[:CORPUS[:KIND]] ... --output OUT
        [--file-list FILE[:CORPUS[:KIND]]] [--num-shards N] [--shard-index 0-3 ...]
        [--num-hosts H --host-index h] [--workers W] [--overwrite] [--no-progress]

How it scales without Beam: every invocation lists and hashes *all* inputs (cheap next to
tokenizing), assigns each file to shard ``sha256(bytes) mod N``, and tokenizes only the shards it
was asked for. N hosts given disjoint shard sets therefore write disjoint shards that together
equal a single run. Identical files share a content hash, so they land in one shard and are
deduplicated there (the first in (corpus, source) order is kept; the rest are listed).
With ``--assign-by path`` the shard comes from ``sha256(corpus/source)`` instead, so each host
reads only its own files (for corpora where reading everything on every host is too costly);
duplicates are then removed within a shard only.

Determinism: inputs are sorted, records in a shard follow (corpus, source) order, record bytes
hold no timestamps, and the ArrayRecord writer is single-threaded, so the same inputs give
byte-identical shards. Resume: a shard is written to a temp file and renamed, then its manifest
fragment (the "done" marker) is written; a rerun skips shards whose fragment exists.
A bad file (``MidiError`` or any other exception) is logged to the quarantine and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from data_prep import merge_manifests as mm
from data_prep.sources import SourceFile, collect_sources
from pianist_jax.data import records

log = logging.getLogger("data_prep.tokenize")

TOOL_VERSION = "tokenize/1"  # bump when shard assignment, ordering or dedupe rules change
_MAX_REASON = 300


def _sha256_path(path: str) -> tuple[str | None, str]:
    """(content hash, "") or (None, reason) for a file we cannot read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest(), ""
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"


def assign_shard(key_hex: str, num_shards: int) -> int:
    """Stable shard of a sha256 hex digest: the same content goes to the same shard everywhere."""
    return int(key_hex[:16], 16) % num_shards


def path_shard(src: SourceFile, num_shards: int) -> int:
    """Shard by (corpus, relative path): known without reading the file."""
    return assign_shard(
        hashlib.sha256(f"{src.corpus}/{src.source}".encode()).hexdigest(), num_shards
    )


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def tokenize_one(task: tuple[str, str, str, str, str]) -> dict:
    """Worker: one file -> encoded record bytes, or a quarantine reason. Never raises."""
    path, corpus, source, kind, content_hash = task
    from pianist_jax import (  # imported in the worker; neither imports JAX
        midi,
        tokenizer,
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open(path, "rb") as f:  # read once: hash check and tokenizing share the bytes
                data = f.read()
            if hashlib.sha256(data).hexdigest() != content_hash:
                raise RuntimeError("file changed since it was hashed")
            ids = tokenizer.encode_notes(midi.read_midi(path, data))
            if ids.ndim != 1 or ids.size == 0 or ids.size % tokenizer.TOKENS_PER_NOTE:
                raise ValueError(
                    f"tokenizer returned {ids.shape} ids; need a positive "
                    f"multiple of {tokenizer.TOKENS_PER_NOTE}"
                )
            if ids.min() < 0 or ids.max() >= tokenizer.VOCAB_SIZE:
                raise ValueError(f"token ids outside [0, {tokenizer.VOCAB_SIZE})")
            n_notes = ids.size // tokenizer.TOKENS_PER_NOTE
            record = records.encode_record(
                ids,
                source=source,
                corpus=corpus,
                kind=kind,
                n_notes=n_notes,
                content_hash=content_hash,
                tokenizer_version=tokenizer.TOKENIZER_VERSION,
            )
            return {
                "ok": True,
                "record": record,
                "notes": n_notes,
                "tokens": int(ids.size),
                "warnings": len(caught),
            }
        except midi.MidiError as e:
            reason = f"{type(e).__name__}: {e.reason}"
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the run
            reason = f"{type(e).__name__}: {e}"
    return {"ok": False, "reason": _one_line(reason), "warnings": len(caught)}


class Plan:
    """Which kept files each shard holds, plus duplicates and unreadable files per shard."""

    def __init__(
        self,
        sources: list[SourceFile],
        hashes: list[tuple[str | None, str]],
        num_shards: int,
        assign_by: str = "content",
    ):
        self.num_shards = num_shards
        self.files: dict[int, list[tuple[SourceFile, str]]] = {}
        self.duplicates: dict[int, list[dict]] = {}
        self.unreadable: dict[int, list[tuple[SourceFile, str]]] = {}
        kept: dict[str, SourceFile] = {}
        for src, (digest, err) in sorted(zip(sources, hashes)):
            if digest is None:  # no content hash: place it by name, so exactly one shard owns it
                self.unreadable.setdefault(path_shard(src, num_shards), []).append((src, err))
                continue
            if assign_by == "path":
                shard = path_shard(src, num_shards)
            else:
                shard = assign_shard(digest, num_shards)
            key = digest if assign_by == "content" else (shard, digest)  # dedupe scope
            if key in kept:
                first = kept[key]
                self.duplicates.setdefault(shard, []).append(
                    {
                        "content_hash": digest,
                        "kept": f"{first.corpus}/{first.source}",
                        "duplicate": f"{src.corpus}/{src.source}",
                        "corpus": src.corpus,
                    }
                )
            else:
                kept[key] = src
                self.files.setdefault(shard, []).append((src, digest))


class ShardStats:
    """Per-shard counters; everything here is deterministic given the shard's inputs."""

    KEYS = ("files", "notes", "tokens", "duplicates", "quarantined", "warnings")
    KIND_KEYS = ("files", "notes", "tokens")

    def __init__(self):
        self.totals: dict[str, int] = dict.fromkeys(self.KEYS, 0)
        self.corpora: dict[str, dict] = {}
        self.quarantine: list[dict] = []

    def bump(self, corpus: str, key: str, n: int = 1, kind: str | None = None) -> None:
        c = self.corpora.setdefault(corpus, {**dict.fromkeys(self.KEYS, 0), "kinds": {}})
        targets = [self.totals, c]
        if kind:
            targets.append(c["kinds"].setdefault(kind, dict.fromkeys(self.KIND_KEYS, 0)))
        for d in targets:
            d[key] += n

    def add_record(self, src: SourceFile, res: dict) -> None:
        for key, n in (("files", 1), ("notes", res["notes"]), ("tokens", res["tokens"])):
            self.bump(src.corpus, key, n, src.kind)

    def add_quarantine(self, src: SourceFile, reason: str) -> None:
        self.bump(src.corpus, "quarantined")
        self.quarantine.append(
            {"path": src.path, "corpus": src.corpus, "source": src.source, "reason": reason}
        )

    def add_warnings(self, src: SourceFile, n: int) -> None:
        if n:
            self.bump(src.corpus, "warnings", n)


def _settings(num_shards: int, exclude: list[str] = (), assign_by: str = "content") -> dict:
    from pianist_jax import tokenizer

    return {
        "tool_version": TOOL_VERSION,
        "tokenizer_version": tokenizer.TOKENIZER_VERSION,
        "record_format": records.FORMAT_VERSION,
        "array_record_options": records.ARRAY_RECORD_OPTIONS,
        "num_shards": num_shards,
        "exclude": sorted(exclude),
        "assign_by": assign_by,
    }


def shard_is_done(out: Path, index: int, settings: dict, overwrite: bool) -> bool:
    """True if the shard and its fragment exist and match; refuses stale settings."""
    frag_path = out / mm.fragment_filename(index, settings["num_shards"])
    if overwrite or not frag_path.exists():
        return False
    frag = json.loads(frag_path.read_text(encoding="utf-8"))
    if mm.settings_of(frag) != settings:
        raise SystemExit(
            f"{frag_path} was written with {mm.settings_of(frag)}, this run uses "
            f"{settings}; use a fresh --output or pass --overwrite"
        )
    shard = out / frag["file"]
    return shard.exists() and shard.stat().st_size == frag["bytes"]


def parse_shard_indices(specs: list[str], num_shards: int) -> list[int]:
    """'3', '0-3', '0,2,5-7' (repeatable) -> sorted unique indices."""
    out = set()
    for spec in specs:
        for part in filter(None, spec.split(",")):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    bad = sorted(i for i in out if not 0 <= i < num_shards)
    if bad:
        raise SystemExit(f"shard indices {bad} out of range for --num-shards {num_shards}")
    return sorted(out)


def host_shards(num_hosts: int, host_index: int, num_shards: int) -> list[int]:
    """Contiguous shard range of one host: [h*N//H, (h+1)*N//H)."""
    if not 0 <= host_index < num_hosts:
        raise SystemExit(f"--host-index {host_index} out of range for --num-hosts {num_hosts}")
    return list(
        range(host_index * num_shards // num_hosts, (host_index + 1) * num_shards // num_hosts)
    )


def _map_chunk(fn, chunk: list) -> list:
    return [fn(item) for item in chunk]


def _imap(pool, fn, items: list, workers: int):
    """Ordered lazy map; in-process when there is no pool (tests, --workers 0/1).

    At most `workers * 4` chunks are in flight, so memory stays flat on corpora of millions
    of files (Executor.map would submit every task up front and hold every result).
    """
    if pool is None:
        yield from map(fn, items)
        return
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    pending: deque = deque()
    for start in range(0, len(items), chunksize):
        pending.append(pool.submit(_map_chunk, fn, items[start : start + chunksize]))
        if len(pending) >= workers * 4:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


class Progress:
    """tqdm over files (files/s) with a notes/s postfix."""

    def __init__(self, total: int, disable: bool):
        self.bar = tqdm(total=total, desc="tokenizing", unit="file", disable=disable)
        self.notes, self.t0 = 0, time.monotonic()

    def advance(self, notes: int) -> None:
        self.notes += notes
        rate = self.notes / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} notes/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def write_shard(
    out: Path, index: int, plan: Plan, results, settings: dict, command: list[str], bar: Progress
) -> dict:
    """Consume this shard's results (in plan order), write shard + fragment atomically."""
    n = plan.num_shards
    name = records.shard_filename(index, n)
    frag_path = out / mm.fragment_filename(index, n)
    frag_path.unlink(missing_ok=True)  # no stale "done" marker while the shard is rewritten
    for stale in out.glob(f".{name}.tmp-*"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    stats = ShardStats()
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp), records.ARRAY_RECORD_OPTIONS)
    try:
        for src, _ in plan.files.get(index, []):
            res = next(results)
            stats.add_warnings(src, res["warnings"])
            if res["ok"]:
                writer.write(res["record"])
                stats.add_record(src, res)
            else:
                log.warning("quarantined %s: %s", src.path, res["reason"])
                stats.add_quarantine(src, res["reason"])
            bar.advance(res.get("notes", 0))
    finally:
        writer.close()
    os.replace(tmp, out / name)
    for src, reason in plan.unreadable.get(index, []):
        log.warning("quarantined %s: %s", src.path, reason)
        stats.add_quarantine(src, reason)
    dups = plan.duplicates.get(index, [])
    for d in dups:
        stats.bump(d["corpus"], "duplicates")
    frag = {
        **settings,
        "fragment_version": mm.FRAGMENT_VERSION,
        "index": index,
        "file": name,
        "sha256": mm.sha256_file(out / name),
        "bytes": (out / name).stat().st_size,
        "totals": stats.totals,
        "corpora": stats.corpora,
        "duplicates": dups,
        "quarantine": sorted(stats.quarantine, key=lambda q: q["path"]),
        "command": command,
    }
    mm.write_json_atomic(frag_path, frag)
    return frag


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.tokenize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="DIR_OR_GLOB[:CORPUS[:KIND]]",
        help="directory (recursive *.mid/*.midi), file or glob; CORPUS defaults to "
        "the root directory's name, KIND (score|performance) to a guess",
    )
    ap.add_argument(
        "--file-list",
        action="append",
        default=[],
        metavar="FILE[:CORPUS[:KIND]]",
        help="text file with one MIDI path per line (relative to the list's folder)",
    )
    ap.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip files whose path (relative to its input) or name matches, e.g. "
        "'midi_score.mid' to keep only ASAP performances (repeatable)",
    )
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--num-shards", type=int, default=8)
    ap.add_argument(
        "--shard-index",
        action="append",
        default=[],
        metavar="I|A-B|I,J",
        help="shards this invocation writes (repeatable; default: all)",
    )
    ap.add_argument("--num-hosts", type=int, help="split shards into contiguous per-host ranges")
    ap.add_argument("--host-index", type=int)
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes ('spawn'); 0 or 1 = tokenize in this process",
    )
    ap.add_argument(
        "--assign-by",
        choices=("content", "path"),
        default="content",
        help="shard of a file: by content hash (default; identical files anywhere "
        "are written once, but every invocation reads every file to hash it) "
        "or by corpus/path (each host reads only its own files; duplicates "
        "are removed within a shard only)",
    )
    ap.add_argument("--overwrite", action="store_true", help="rewrite shards already done")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.input and not args.file_list:
        raise SystemExit("give at least one --input or --file-list")
    n = args.num_shards
    if n < 1:
        raise SystemExit("--num-shards must be >= 1")
    if (args.num_hosts is None) != (args.host_index is None):
        raise SystemExit("--num-hosts and --host-index go together")
    if args.num_hosts is not None and args.shard_index:
        raise SystemExit("use either --shard-index or --num-hosts/--host-index")
    if args.num_hosts is not None:
        wanted = host_shards(args.num_hosts, args.host_index, n)
    else:
        wanted = parse_shard_indices(args.shard_index, n) if args.shard_index else list(range(n))
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    records.list_shards(out)  # refuses a directory that already holds another shard count
    settings = _settings(n, args.exclude, args.assign_by)
    command = ["python", "-m", "data_prep.tokenize", *argv]
    todo = [i for i in wanted if not shard_is_done(out, i, settings, args.overwrite)]
    if len(todo) < len(wanted):
        log.info("skipping %d shard(s) already done", len(wanted) - len(todo))
    if todo:
        (out / mm.MANIFEST).unlink(missing_ok=True)  # re-merged once every shard is done
        _run(args, out, todo, settings, command)
    return _maybe_merge(out, n)


def _run(args, out: Path, todo: list[int], settings: dict, command: list[str]) -> None:
    t0 = time.monotonic()
    sources = collect_sources(args.input, args.file_list, args.exclude)
    log.info("%d input files; writing %d of %d shards", len(sources), len(todo), args.num_shards)
    with ExitStack() as stack:
        pool = None
        if args.workers > 1:
            # 'spawn', never fork: a parent may hold JAX or threads. A worker that dies (e.g. OOM)
            # stops the run with BrokenProcessPool instead of hanging; rerun to resume.
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(args.workers, mp_context=ctx)
            stack.callback(pool.shutdown, cancel_futures=True)  # Ctrl-C: drop queued files
        if args.assign_by == "path":  # only this invocation's files are read at all
            wanted = set(todo)
            sources = [s for s in sources if path_shard(s, args.num_shards) in wanted]
        paths = [s.path for s in sources]
        hashes = list(
            tqdm(
                _imap(pool, _sha256_path, paths, args.workers),
                total=len(paths),
                desc="hashing",
                unit="file",
                disable=args.no_progress,
            )
        )
        plan = Plan(sources, hashes, args.num_shards, args.assign_by)
        tasks = [
            (s.path, s.corpus, s.source, s.kind, h) for i in todo for s, h in plan.files.get(i, [])
        ]
        bar = Progress(len(tasks), args.no_progress)
        stack.callback(bar.close)
        results = iter(_imap(pool, tokenize_one, tasks, args.workers))
        for i in todo:
            frag = write_shard(out, i, plan, results, settings, command, bar)
            t = frag["totals"]
            log.info(
                "wrote %s: %d records, %d notes, %d quarantined, %d duplicates",
                frag["file"],
                t.get("files", 0),
                t.get("notes", 0),
                t.get("quarantined", 0),
                t.get("duplicates", 0),
            )
    log.info("tokenized %d files (%d notes) in %.1fs", len(tasks), bar.notes, time.monotonic() - t0)


def _maybe_merge(out: Path, num_shards: int) -> int:
    frags = mm.read_fragments(out)
    if len(frags) < num_shards:
        log.info(
            "%d of %d shards done in %s; the manifest is merged when all are (or run "
            "python -m data_prep.merge_manifests %s)",
            len(frags),
            num_shards,
            out,
            out,
        )
        return 0
    manifest = mm.merge(out)
    log.info("%s -> %s", mm.summary(manifest), out / mm.MANIFEST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
