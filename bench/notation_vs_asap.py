"""How closely the MusicXML reader's notes agree with ASAP's own score MIDIs, piece by piece.

ASAP ships each score twice: ``xml_score.mxl`` and the ``midi_score.mid`` its authors exported
from it (with MuseScore). For each piece: note counts, the share of notes whose pitch has a
partner (pitch multiset), and the share whose (pitch, onset in quarter notes) has one.

    python bench/notation_vs_asap.py [--asap ../shared/data/asap] [--out report.tsv]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from pianist_jax.midi import notation, tempo_map

REPO = Path(__file__).resolve().parents[1]


def onsets_in_quarters(midi_path) -> tuple[np.ndarray, np.ndarray]:
    grid = tempo_map.read_score_grid(midi_path)
    return grid.notes.pitch, grid.tick / grid.ticks_per_beat


def overlap(a: collections.Counter, b: collections.Counter) -> int:
    return sum((a & b).values())


def compare(piece: Path, tmp: Path) -> dict:
    ours_path = tmp / "ours.mid"
    ours_path.write_bytes(notation.score_midi_bytes(piece / "xml_score.mxl"))
    po, qo = onsets_in_quarters(ours_path)
    pr, qr = onsets_in_quarters(piece / "midi_score.mid")
    key = lambda p, q: collections.Counter(zip(p.tolist(), np.rint(q * 48).astype(int).tolist()))  # noqa: E731
    n = max(len(po), len(pr))
    return {
        "ours": len(po),
        "asap": len(pr),
        "pitch": overlap(collections.Counter(po.tolist()), collections.Counter(pr.tolist())) / n,
        "onset": overlap(key(po, qo), key(pr, qr)) / n,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--asap", default=REPO.parent / "shared" / "data" / "asap", type=Path)
    p.add_argument("--out", type=Path, help="also write the per-piece table (TSV)")
    args = p.parse_args(argv)
    pieces = sorted(x.parent for x in args.asap.rglob("xml_score.mxl"))
    if not pieces:
        print(f"error: no xml_score.mxl under {args.asap}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for piece in pieces:
            name = str(piece.relative_to(args.asap))
            try:
                rows.append((name, compare(piece, Path(tmp))))
            except Exception as err:  # noqa: BLE001 - a report: one bad piece is a row
                rows.append((name, {"error": str(err).splitlines()[0][:80]}))
            r = rows[-1][1]
            line = r.get("error") or (
                f"{r['ours']:6d} {r['asap']:6d}  pitch {r['pitch']:.3f}  onset {r['onset']:.3f}"
            )
            print(f"{name[:55]:55s} {line}", flush=True)
    ok = [r for _, r in rows if "error" not in r]
    pitch = np.array([r["pitch"] for r in ok])
    onset = np.array([r["onset"] for r in ok])
    more = np.array([r["asap"] - r["ours"] for r in ok])
    print(
        f"\nread without error: {len(ok)} / {len(rows)}\n"
        f"same note count: {int((more == 0).sum())}\n"
        f"pitch agreement >= 0.99 / >= 0.95: {(pitch >= 0.99).sum()} / {(pitch >= 0.95).sum()}\n"
        f"(pitch, onset) agreement >= 0.99 / >= 0.95: "
        f"{(onset >= 0.99).sum()} / {(onset >= 0.95).sum()}\n"
        f"mean pitch / (pitch, onset) agreement: {pitch.mean():.3f} / {onset.mean():.3f}\n"
        f"ASAP has more notes / the same / fewer: {(more > 0).sum()} / {(more == 0).sum()} / "
        f"{(more < 0).sum()} (median difference "
        f"{np.median([abs(m) / r['asap'] for m, r in zip(more, ok)]):.1%})"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write("piece\tours\tasap\tpitch\tonset\terror\n")
            for name, r in rows:
                f.write(
                    f"{name}\t{r.get('ours', '')}\t{r.get('asap', '')}\t{r.get('pitch', '')}\t"
                    f"{r.get('onset', '')}\t{r.get('error', '')}\n"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
