"""Merge per-shard manifest fragments into ``manifest.json`` + ``quarantine.tsv``.

Each tokenize invocation (one per host) writes, next to every finished shard, a fragment
``shard-00003-of-00008.manifest.json``; it is both the shard's statistics and its "done" marker.
Because fragments depend only on the shard's inputs, merging the fragments of two hosts gives the
same manifest as one run over all shards (only the recorded command lines differ).

    python -m data_prep.merge_manifests OUT_DIR [--allow-partial] [--verify]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

log = logging.getLogger("data_prep.merge_manifests")

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.tsv"
FRAGMENT_VERSION = 1
_FRAGMENT_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.manifest\.json$")
# Fragment keys that every shard of one dataset must agree on.
SETTINGS_KEYS = (
    "tool_version",
    "tokenizer_version",
    "record_format",
    "array_record_options",
    "num_shards",
    "exclude",
    "assign_by",
)
_SUM_KEYS = ("files", "notes", "tokens", "duplicates", "quarantined", "warnings")


def fragment_filename(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.manifest.json"


def write_json_atomic(path: Path, obj) -> None:
    """Write via a temp file + rename so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_fragments(directory: Path) -> dict[int, dict]:
    """Fragments by shard index; refuses a directory mixing shard counts."""
    frags, totals = {}, set()
    for p in sorted(Path(directory).iterdir()):
        m = _FRAGMENT_RE.match(p.name)
        if m:
            frags[int(m.group(1))] = json.loads(p.read_text(encoding="utf-8"))
            totals.add(int(m.group(2)))
    if len(totals) > 1:
        raise ValueError(f"{directory} mixes fragments for shard counts {sorted(totals)}")
    return frags


def settings_of(frag: dict) -> dict:
    return {k: frag.get(k) for k in SETTINGS_KEYS}


def _add(into: dict, stats: dict) -> None:
    for k in _SUM_KEYS:
        if k in stats:
            into[k] = into.get(k, 0) + stats[k]


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def merge(directory: str | Path, allow_partial: bool = False, verify: bool = False) -> dict:
    """Build and write manifest.json and quarantine.tsv from the fragments in ``directory``."""
    directory = Path(directory)
    frags = read_fragments(directory)
    if not frags:
        raise FileNotFoundError(f"no shard manifest fragments in {directory}")
    settings = settings_of(next(iter(frags.values())))
    for i, f in frags.items():
        if settings_of(f) != settings:
            raise ValueError(f"shard {i} was written with {settings_of(f)}, others with {settings}")
    n = settings["num_shards"]
    missing = sorted(set(range(n)) - set(frags))
    if missing and not allow_partial:
        raise FileNotFoundError(f"{len(missing)} of {n} shards not done yet: {missing[:10]}")
    totals, corpora, shards, dups, quarantine, commands = {}, {}, [], [], [], set()
    for i in sorted(frags):
        f = frags[i]
        shard_file = directory / f["file"]
        if not shard_file.exists():
            raise FileNotFoundError(f"fragment for shard {i} exists but {shard_file} does not")
        if verify and sha256_file(shard_file) != f["sha256"]:
            raise ValueError(f"{shard_file} does not match the sha256 in its fragment")
        _add(totals, f["totals"])
        for name, c in f["corpora"].items():
            dst = corpora.setdefault(name, {"kinds": {}})
            _add(dst, c)
            for kind, kc in c["kinds"].items():
                _add(dst["kinds"].setdefault(kind, {}), kc)
        shards.append({k: f[k] for k in ("index", "file", "sha256", "bytes", "totals", "corpora")})
        dups.extend(f["duplicates"])
        quarantine.extend(f["quarantine"])
        commands.add(shlex.join(f.get("command", [])))
    manifest = {
        **settings,
        "complete": not missing,
        "missing_shards": missing,
        "totals": totals,
        "corpora": dict(sorted(corpora.items())),
        "shards": shards,
        "duplicates": sorted(dups, key=lambda d: (d["duplicate"], d["kept"])),
        "quarantine": sorted(quarantine, key=lambda q: (q["path"], q["reason"])),
        "commands": sorted(commands),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    write_quarantine_tsv(directory / QUARANTINE, manifest["quarantine"])
    return manifest


def write_quarantine_tsv(path: Path, entries: list[dict]) -> None:
    """``path<TAB>reason`` per rejected file (header first); reasons are single-line."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    lines = ["path\treason"] + [f"{q['path']}\t{q['reason']}" for q in entries]
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def summary(manifest: dict) -> str:
    t = manifest["totals"]
    return (
        f"{len(manifest['shards'])}/{manifest['num_shards']} shards: {t.get('files', 0)} "
        f"files, {t.get('notes', 0)} notes, {t.get('tokens', 0)} tokens; "
        f"{t.get('duplicates', 0)} duplicates, {t.get('quarantined', 0)} quarantined"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.merge_manifests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("directory", type=Path)
    ap.add_argument(
        "--allow-partial",
        action="store_true",
        help="write a manifest (complete=false) even if some shards are missing",
    )
    ap.add_argument("--verify", action="store_true", help="re-hash every shard file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = merge(args.directory, args.allow_partial, args.verify)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    log.info("%s -> %s", summary(manifest), args.directory / MANIFEST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
