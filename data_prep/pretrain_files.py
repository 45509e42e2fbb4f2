"""Pre-training file lists that leave out the validation pieces (for `data_prep.tokenize`).

    python -m data_prep.pretrain_files --split SFT_DIR/split.json --asap DATA/asap \
        [--corpus pop909=DATA/unlabeled/pop909 --corpus giantmidi=DATA/unlabeled/giantmidi] \
        --out-dir WORK/pretrain_files [--limit N] [--overlap-threshold 0.3] [--no-overlap-check]

`data_prep.build_sft` splits ASAP piece-wise (``split.json``); the fine-tuned model is evaluated
on the validation pieces, so the pre-training corpus must not contain them either. This writes
one list per corpus for ``python -m data_prep.tokenize --file-list OUT/<corpus>.txt:<corpus>``:

* ``asap.txt``: the performances of ASAP's *training* folders (``split.json`` ``train_folders``;
  the scores ``midi_score.mid`` are left out, as in ``launch/tokenize_shared.sh``: they are the
  fine-tuning inputs; ``--include-scores`` keeps the training scores);
* ``<name>.txt`` for every ``--corpus NAME=DIR`` (all ``*.mid``/``*.midi`` under DIR).

Other corpora can hold the same music: GiantMIDI, for instance, has sequenced scores, MAESTRO
performances and transcriptions of pieces that are also in ASAP. Every candidate file (and every
ASAP training score) is therefore compared with the validation scores by *content*: the share of
its pitch 4-grams (notes in onset order, notes within 35 ms read as a chord in pitch order) that
also occur in one validation score. Unrelated music shares under ~0.15 of its 4-grams with any
score; a transcription, performance or score of the same piece shares 0.4-0.95, so files above
``--overlap-threshold`` (0.3) are left out (ASAP training folders too, all their performances).

Also written: ``excluded.jsonl`` (one line per left-out file: path, corpus, reason, overlap,
matched validation folder) and ``summary.json`` (counts per corpus). Deterministic: the lists
are sorted absolute paths (tokenize's ``source`` of such an entry is the path without its
leading '/'). ``--limit N`` keeps the first N files of each list (smoke runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from data_prep.sources import MIDI_SUFFIXES, SCORE_FILE_NAMES

NGRAM = 4
CHORD_MS = 35
DEFAULT_THRESHOLD = 0.3
ASAP = "asap"


# ----------------------------------------------------------------------------- content overlap


def pitch_ngrams(path: str | Path, n: int = NGRAM, chord_ms: int = CHORD_MS) -> set[bytes]:
    """The set of pitch n-grams of a MIDI file (notes in onset order; notes whose onsets are
    within `chord_ms` of the previous note form one chord, read low to high)."""
    from pianist_jax import midi

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        notes = midi.read_midi(path)
    onset, pitch = np.asarray(notes.onset), np.asarray(notes.pitch, np.uint8)
    order = np.lexsort((pitch, onset))
    onset, pitch = onset[order], pitch[order]
    chord = np.concatenate([[0], np.cumsum(np.diff(onset) > chord_ms)])
    seq = pitch[np.lexsort((pitch, chord))]
    if len(seq) < n:
        return set()
    windows = np.lib.stride_tricks.sliding_window_view(seq, n)
    return {w.tobytes() for w in windows}


def containment(grams: set, reference: set) -> float:
    """Share of `grams` that occur in `reference` (0 for an empty `grams`)."""
    return len(grams & reference) / len(grams) if grams else 0.0


def best_overlap(path: str | Path, references: dict[str, set]) -> tuple[float, str | None]:
    """(highest containment in any reference, that reference's name)."""
    grams = pitch_ngrams(path)
    best, name = 0.0, None
    for ref_name, ref in references.items():
        c = containment(grams, ref)
        if c > best:
            best, name = c, ref_name
    return best, name


# ----------------------------------------------------------------------------- file lists


def read_split(path: Path) -> dict:
    split = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("train_folders", "val_folders"):
        if not isinstance(split.get(key), list):
            raise SystemExit(f"{path}: no {key!r} list (expected data_prep.build_sft's split.json)")
    if set(split["train_folders"]) & set(split["val_folders"]):
        raise SystemExit(
            f"{path}: folders in both train and val: "
            f"{sorted(set(split['train_folders']) & set(split['val_folders']))[:5]}"
        )
    return split


def asap_files(
    asap: Path, split: dict, include_scores: bool = False
) -> tuple[list[Path], list[dict]]:
    """(ASAP training performances [+ training scores], excluded entries) from metadata.csv.

    A performance is kept only if its folder is a training folder; validation folders and
    folders in neither list (e.g. a metadata.csv newer than the split) are excluded."""
    from data_prep.build_sft import read_metadata

    train, val = set(split["train_folders"]), set(split["val_folders"])
    kept, excluded, scores = [], [], set()
    for row in read_metadata(asap):
        folder, perf = row["folder"], row["midi_performance"]
        if folder in train:
            kept.append(asap / perf)
            scores.add(asap / row["midi_score"])
        else:
            excluded.append(
                {
                    "path": str(asap / perf),
                    "corpus": ASAP,
                    "reason": "validation piece" if folder in val else "not in split",
                    "folder": folder,
                }
            )
    if include_scores:
        kept.extend(scores)
    return sorted(set(kept)), excluded


def corpus_files(root: Path) -> list[Path]:
    """Every *.mid/*.midi under `root` (sorted; symlinks kept as found)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(
            Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(MIDI_SUFFIXES)
        )
    if not out:
        raise SystemExit(f"{root}: no MIDI files")
    return out


def val_references(asap: Path, split: dict) -> dict[str, set]:
    """Validation folder -> pitch n-grams of its score."""
    return {
        folder: pitch_ngrams(asap / folder / SCORE_FILE_NAMES[0]) for folder in split["val_folders"]
    }


def build_lists(
    split_path: Path,
    asap: Path,
    corpora: dict[str, Path],
    *,
    limit: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    check_overlap: bool = True,
    include_scores: bool = False,
) -> tuple[dict[str, list[Path]], list[dict], dict]:
    """({corpus: kept files}, excluded entries, summary)."""
    t0 = time.monotonic()
    split = read_split(split_path)
    asap = Path(os.path.abspath(asap))
    lists: dict[str, list[Path]] = {}
    asap_kept, excluded = asap_files(asap, split, include_scores)
    lists[ASAP] = asap_kept
    for name, root in corpora.items():
        if name in lists:
            raise SystemExit(f"corpus {name!r} given twice")
        lists[name] = corpus_files(Path(os.path.abspath(root)))
    if limit:
        lists = {k: v[:limit] for k, v in lists.items()}
    overlap_checked = 0
    if check_overlap and lists:
        refs = val_references(asap, split)
        # ASAP: one check per training folder (its score), applied to all its performances.
        folder_of = {p: p.parent for p in lists[ASAP]}
        folder_hit = {}
        for folder in sorted(set(folder_of.values())):
            folder_hit[folder] = best_overlap(folder / SCORE_FILE_NAMES[0], refs)
            overlap_checked += 1
        keep = []
        for p in lists[ASAP]:
            score, ref = folder_hit[folder_of[p]]
            if score > threshold:
                excluded.append(
                    {
                        "path": str(p),
                        "corpus": ASAP,
                        "reason": "overlaps validation",
                        "overlap": round(score, 4),
                        "matches": ref,
                    }
                )
            else:
                keep.append(p)
        lists[ASAP] = keep
        for name in corpora:
            keep = []
            for p in lists[name]:
                try:
                    score, ref = best_overlap(p, refs)
                except Exception:  # noqa: BLE001 - unreadable: tokenize quarantines it
                    score, ref = 0.0, None
                overlap_checked += 1
                if score > threshold:
                    excluded.append(
                        {
                            "path": str(p),
                            "corpus": name,
                            "reason": "overlaps validation",
                            "overlap": round(score, 4),
                            "matches": ref,
                        }
                    )
                else:
                    keep.append(p)
            lists[name] = keep
    summary = {
        "split": str(Path(split_path).resolve()),
        "asap": str(asap),
        "corpora": {name: str(Path(os.path.abspath(root))) for name, root in corpora.items()},
        "val_folders": len(split["val_folders"]),
        "train_folders": len(split["train_folders"]),
        "include_scores": include_scores,
        "limit": limit,
        "overlap": {
            "checked": check_overlap,
            "threshold": threshold,
            "ngram": NGRAM,
            "chord_ms": CHORD_MS,
            "files_checked": overlap_checked,
        },
        "files": {name: len(files) for name, files in lists.items()},
        "excluded": {},
        "seconds": round(time.monotonic() - t0, 1),
    }
    for e in excluded:
        per = summary["excluded"].setdefault(e["corpus"], {})
        per[e["reason"]] = per.get(e["reason"], 0) + 1
    return lists, excluded, summary


def write_lists(
    out_dir: Path, lists: dict[str, list[Path]], excluded: list[dict], summary: dict
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, files in lists.items():
        header = f"# {name}: {len(files)} files (data_prep.pretrain_files)\n"
        _write(out_dir / f"{name}.txt", header + "".join(f"{p}\n" for p in files))
    _write(
        out_dir / "excluded.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in excluded)
    )
    _write(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")  # last: "done"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _corpus_arg(text: str) -> tuple[str, Path]:
    name, sep, root = text.partition("=")
    if not sep or not name or not root or "/" in name or ":" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(root)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data_prep.pretrain_files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--split", required=True, type=Path, help="split.json of data_prep.build_sft")
    ap.add_argument("--asap", required=True, type=Path, help="ASAP root (holds metadata.csv)")
    ap.add_argument(
        "--corpus",
        action="append",
        default=[],
        type=_corpus_arg,
        metavar="NAME=DIR",
        help="another corpus (all MIDI files under DIR)",
    )
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--limit", type=int, help="first N files of each list (smoke runs)")
    ap.add_argument(
        "--overlap-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="leave out files sharing more than this share of their pitch 4-grams "
        "with a validation score (default %(default)s)",
    )
    ap.add_argument("--no-overlap-check", action="store_true")
    ap.add_argument(
        "--include-scores",
        action="store_true",
        help="also list the training folders' midi_score.mid",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lists, excluded, summary = build_lists(
        args.split,
        args.asap,
        dict(args.corpus),
        limit=args.limit,
        threshold=args.overlap_threshold,
        check_overlap=not args.no_overlap_check,
        include_scores=args.include_scores,
    )
    write_lists(args.out_dir, lists, excluded, summary)
    for e in excluded:
        if e["reason"] == "overlaps validation":
            print(
                f"excluded {e['corpus']}: {e['path']} (overlap {e['overlap']:.2f} with "
                f"{e['matches']})",
                file=sys.stderr,
            )
    print(json.dumps({k: summary[k] for k in ("files", "excluded", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
