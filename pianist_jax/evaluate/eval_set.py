"""Lay out the validation pieces for rendering and evaluation.

    python -m pianist_jax.evaluate.eval_set out/shards/asap_sft/val_pieces.txt OUT

reads the list written by `data_prep.build_sft` (one line per piece: score path, then its
performance paths, relative to the ``# asap_root`` header) and writes

    OUT/scores/<piece>.mid       the score (render these; also the deadpan baseline)
    OUT/human/<piece>-<k>.mid    the human performances, k = 1, 2, ...

as symbolic links (nothing is copied), so that

    python -m pianist_jax.render OUT/scores/*.mid --out-dir OUT/pred
    python -m pianist_jax.evaluate --pred OUT/pred --human OUT/human

evaluate renderings against the humans of the same pieces (and ``--pred OUT/scores`` the
deadpan score). ``<piece>`` is the score folder with '/' -> '_'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def read_pieces(listing: Path) -> tuple[Path, list[tuple[str, Path, list[Path]]]]:
    """(dataset root, [(piece name, score path, performance paths)])."""
    root, pieces = None, []
    for line in listing.read_text().splitlines():
        if line.startswith("# asap_root"):
            root = Path(line.split("\t", 1)[1].strip())
            continue
        if not line.strip() or line.startswith("#"):
            continue
        score, *perfs = line.split("\t")
        if root is None:
            raise ValueError(f"{listing}: no '# asap_root' header line before the pieces")
        name = str(Path(score).parent).replace("/", "_")
        pieces.append((name, root / score, [root / p for p in perfs]))
    if not pieces:
        raise ValueError(f"{listing}: no pieces listed")
    return root, pieces


def lay_out(listing: Path, out: Path) -> dict:
    _, pieces = read_pieces(listing)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    (out / "human").mkdir(parents=True, exist_ok=True)
    n_perf = 0
    for name, score, perfs in pieces:
        for path in [score, *perfs]:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {listing} but missing")
        _link(score, out / "scores" / f"{name}.mid")
        for k, perf in enumerate(perfs, 1):
            _link(perf, out / "human" / f"{name}-{k}.mid")
        n_perf += len(perfs)
    return {"pieces": len(pieces), "performances": n_perf}


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pianist_jax.evaluate.eval_set", description=__doc__)
    p.add_argument("listing", type=Path, help="val_pieces.txt from data_prep.build_sft")
    p.add_argument("out", type=Path, help="output directory")
    args = p.parse_args(argv)
    try:
        info = lay_out(args.listing, args.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{info['pieces']} pieces, {info['performances']} human performances -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
