"""The note-level judge per piece, as a Markdown table, averaged over rendering seeds.

    python -m pianist_jax.evaluate.per_piece out/default/eval/metrics/seed*/metrics.json

Each ``metrics.json`` is one ``python -m pianist_jax.evaluate ... --scores`` run (one seed);
a row per piece: its notes and human performances, the rendering's four figures and pedal use
(mean over the files), the humans' pedal use, and the human ceiling's velocity r where the
piece has >= 2 humans. A mean over pieces hides which music a model cannot play yet; this
shows it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pianist_jax.evaluate.note_level import FIGURES, finite_mean

COLUMNS = (*FIGURES, "pedal_down")


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """Piece -> its per-piece note-level rows, one per metrics file that judged it."""
    rows: dict[str, list[dict]] = {}
    for path in paths:
        try:
            notes = json.loads(Path(path).read_text())["notes"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"error: {path}: not a note-level metrics.json ({err})") from None
        for row in notes["per_piece"]:
            rows.setdefault(row["piece"], []).append(row)
    return rows


def _fmt(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def table(rows: dict[str, list[dict]]) -> str:
    head = (
        "| piece | notes | humans | velocity r | local-tempo r | articulation r | "
        "pedal agreement | pedal down: model | pedal down: humans | velocity r: ceiling |"
    )
    lines = [head, "|---|" + "---:|" * 9]
    for piece in sorted(rows):
        runs = rows[piece]
        first = runs[0]
        means = [finite_mean(r["prediction"][k] for r in runs) for k in COLUMNS]
        ceiling = first["human_ceiling"]
        lines.append(
            f"| {piece} | {first['n_notes']:,} | {first['n_humans']} | "
            + " | ".join(_fmt(v) for v in means)
            + f" | {_fmt(first['human_pedal_down'])} | "
            + f"{_fmt(ceiling['velocity_r']) if ceiling else '-'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metrics", nargs="+", type=Path, help="metrics.json files (one per seed)")
    args = ap.parse_args(argv)
    print(table(load(args.metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
