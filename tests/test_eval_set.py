"""pianist_jax.evaluate.eval_set lays out validation pieces as the evaluator expects them."""

from pianist_jax.evaluate import eval_set
from pianist_jax.evaluate import histograms as evaluate


def test_lay_out_links_scores_and_numbered_humans(tmp_path):
    root = tmp_path / "asap"
    for rel in (
        "A/x/midi_score.mid",
        "A/x/p1.mid",
        "A/x/p2.mid",
        "B/y-1/midi_score.mid",
        "B/y-1/q.mid",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    listing = tmp_path / "val_pieces.txt"
    listing.write_text(
        f"# asap_root\t{root}\nA/x/midi_score.mid\tA/x/p1.mid\tA/x/p2.mid\n"
        "B/y-1/midi_score.mid\tB/y-1/q.mid\n"
    )
    out = tmp_path / "out"
    assert eval_set.main([str(listing), str(out)]) == 0
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["A_x.mid", "B_y-1.mid"]
    humans = sorted(p.name for p in (out / "human").iterdir())
    assert humans == ["A_x-1.mid", "A_x-2.mid", "B_y-1-1.mid"]
    assert (out / "human" / "A_x-2.mid").read_bytes() == b"A/x/p2.mid"
    assert [evaluate.human_piece(h[:-4]) for h in humans] == [
        ("A_x", "1"),
        ("A_x", "2"),
        ("B_y-1", "1"),
    ]


def test_missing_file_is_one_line_error(tmp_path, capsys):
    listing = tmp_path / "val.txt"
    listing.write_text(f"# asap_root\t{tmp_path}\nnope/midi_score.mid\tnope/p.mid\n")
    assert eval_set.main([str(listing), str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
