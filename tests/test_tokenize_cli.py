"""data_prep.tokenize / merge_manifests / inspect end to end on synthetic MIDI built with mido.

The CLIs run in-process (``--workers 0``) except one test that checks the 'spawn' pool gives the
same bytes. Broken inputs (truncated, garbage, drums-only) must be quarantined, never fatal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mido
import numpy as np
import pytest

from data_prep import inspect as dp_inspect
from data_prep import merge_manifests as mm
from data_prep import sources
from data_prep import tokenize as tk
from pianist_jax.data import records

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
N_SHARDS = 8


def write_midi(path: Path, seed: int, n: int = 24, channel: int = 0) -> Path:
    """A small piano piece: random pitches/velocities, a tempo change and some pedal."""
    rng = np.random.default_rng(seed)
    mf = mido.MidiFile(type=1, ticks_per_beat=480)
    meta = mido.MidiTrack(
        [
            mido.MetaMessage("set_tempo", tempo=int(rng.integers(4, 8)) * 100_000),
            mido.MetaMessage("set_tempo", tempo=600_000, time=960),
        ]
    )
    events = []
    for i in range(n):
        start = i * 240 + int(rng.integers(0, 60))
        pitch, vel = int(rng.integers(36, 96)), int(rng.integers(20, 120))
        on = mido.Message("note_on", note=pitch, velocity=vel, channel=channel)
        events.append((start, 1, on))
        events.append((start + 200, 0, mido.Message("note_off", note=pitch, channel=channel)))
    events.append((100, 2, mido.Message("control_change", control=64, value=127, channel=channel)))
    events.append((900, 2, mido.Message("control_change", control=64, value=0, channel=channel)))
    track, last = mido.MidiTrack(), 0
    for t, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(msg.copy(time=t - last))
        last = t
    mf.tracks += [meta, track]
    path.parent.mkdir(parents=True, exist_ok=True)
    mf.save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """root/pieces: 7 good files (+ a .MIDI, a nested score, 2 duplicates) and 3 broken ones;
    root/extra: 2 good files and a copy of one piece in the other corpus."""
    root = tmp_path_factory.mktemp("corpus")
    a, b = root / "pieces", root / "extra"
    for i in range(5):
        write_midi(a / f"p{i}.mid", seed=i)
    write_midi(a / "upper" / "LOUD.MIDI", seed=10)
    write_midi(a / "Work" / "midi_score.mid", seed=11)
    shutil.copy(a / "p1.mid", a / "p1_copy.mid")
    good = (a / "p2.mid").read_bytes()
    (a / "bad_truncated.mid").write_bytes(good[: len(good) // 2])
    (a / "bad_garbage.mid").write_bytes(np.random.default_rng(0).bytes(300))
    write_midi(a / "bad_drums.mid", seed=3, channel=9)
    (a / "notes.txt").write_text("not midi, ignored")
    for i in range(2):
        write_midi(b / f"e{i}.mid", seed=20 + i)
    shutil.copy(a / "p3.mid", b / "p3_again.mid")
    return root


N_GOOD_UNIQUE = 9  # p0-p4, LOUD, midi_score, e0, e1 (copies of p1 and p3 dropped)
BAD = ("bad_truncated.mid", "bad_garbage.mid", "bad_drums.mid")


def run(corpus: Path, out: Path, *extra: str) -> int:
    return tk.main(
        [
            "--input",
            f"{corpus / 'pieces'}",
            "--input",
            f"{corpus / 'extra'}:extra",
            "--output",
            str(out),
            "--num-shards",
            str(N_SHARDS),
            "--workers",
            "0",
            "--no-progress",
            *extra,
        ]
    )


def read_all(out: Path) -> list[records.Record]:
    return [r for p in records.list_shards(out) for r in dp_inspect.iter_records(p)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in records.list_shards(out)}


def without_commands(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "commands"}


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert run(corpus, out) == 0
    return out


def test_good_files_written_bad_files_quarantined(full_run):
    recs = read_all(full_run)
    assert len(recs) == N_GOOD_UNIQUE
    assert len({r.content_hash for r in recs}) == N_GOOD_UNIQUE
    by_source = {(r.corpus, r.source): r for r in recs}
    assert ("pieces", "upper/LOUD.MIDI") in by_source
    assert by_source[("pieces", "Work/midi_score.mid")].kind == "score"
    assert by_source[("extra", "e0.mid")].kind == "performance"
    for r in recs:
        assert r.n_tokens == 8 * r.n_notes == 8 * 24
        assert r.ids.max() < 5389
    rows = (full_run / "quarantine.tsv").read_text().splitlines()
    assert rows[0] == "path\treason"
    reasons = dict(line.split("\t") for line in rows[1:])
    assert sorted(Path(p).name for p in reasons) == sorted(BAD)
    assert all(reasons.values())
    drums = next(r for p, r in reasons.items() if p.endswith("bad_drums.mid"))
    assert "drum" in drums.lower()
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == N_SHARDS
    assert manifest["totals"]["files"] == N_GOOD_UNIQUE
    assert manifest["totals"]["notes"] == 24 * N_GOOD_UNIQUE
    assert manifest["totals"]["quarantined"] == 3
    assert manifest["corpora"]["extra"]["files"] == 3  # e0, e1 and the kept copy of p3
    assert manifest["corpora"]["pieces"]["kinds"]["score"]["files"] == 1
    assert len(manifest["shards"]) == N_SHARDS
    assert sum(s["totals"]["files"] for s in manifest["shards"]) == N_GOOD_UNIQUE


def test_duplicates_written_once(full_run):
    manifest = json.loads((full_run / "manifest.json").read_text())
    dups = {(d["kept"], d["duplicate"]) for d in manifest["duplicates"]}
    # the copy in the other corpus ('extra' sorts before 'pieces') is the one kept
    assert dups == {
        ("pieces/p1.mid", "pieces/p1_copy.mid"),
        ("extra/p3_again.mid", "pieces/p3.mid"),
    }
    assert manifest["totals"]["duplicates"] == 2


def test_deterministic_bytes(corpus, full_run, tmp_path):
    assert run(corpus, tmp_path) == 0
    assert shard_bytes(tmp_path) == shard_bytes(full_run)
    for i in range(N_SHARDS):
        name = mm.fragment_filename(i, N_SHARDS)
        a, b = (json.loads((d / name).read_text()) for d in (tmp_path, full_run))
        a.pop("command"), b.pop("command")
        assert a == b


def test_split_run_equals_single_run(corpus, full_run, tmp_path):
    assert run(corpus, tmp_path, "--shard-index", "0-3") == 0
    assert not (tmp_path / "manifest.json").exists()  # merged only when every shard is done
    assert len(records.list_shards(tmp_path)) == 4
    assert run(corpus, tmp_path, "--num-hosts", "2", "--host-index", "1") == 0  # shards 4-7
    assert shard_bytes(tmp_path) == shard_bytes(full_run)
    merged = json.loads((tmp_path / "manifest.json").read_text())
    single = json.loads((full_run / "manifest.json").read_text())
    assert without_commands(merged) == without_commands(single)
    assert len(merged["commands"]) == 2
    assert (tmp_path / "quarantine.tsv").read_text() == (full_run / "quarantine.tsv").read_text()
    # the standalone merge tool reproduces the same manifest
    assert mm.main([str(tmp_path)]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text()) == merged


def test_resume_skips_done_shards(corpus, full_run, tmp_path, monkeypatch):
    shutil.copytree(full_run, tmp_path, dirs_exist_ok=True)

    def must_not_run(*a, **k):
        raise AssertionError("inputs listed although every shard is done")

    with monkeypatch.context() as m:
        m.setattr(tk, "collect_sources", must_not_run)
        assert run(corpus, tmp_path) == 0
    # an interrupted shard (no fragment) is redone; the others are left alone
    redo = 5
    (tmp_path / mm.fragment_filename(redo, N_SHARDS)).unlink()
    # a rewritten shard is a new file renamed into place, so it gets a new inode
    before = {p.name: p.stat().st_ino for p in records.list_shards(tmp_path)}
    calls = []
    real = tk.tokenize_one
    monkeypatch.setattr(tk, "tokenize_one", lambda t: calls.append(t) or real(t))
    assert run(corpus, tmp_path) == 0
    after = {p.name: p.stat().st_ino for p in records.list_shards(tmp_path)}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {records.shard_filename(redo, N_SHARDS)}
    expected = json.loads((full_run / mm.fragment_filename(redo, N_SHARDS)).read_text())
    assert len(calls) == expected["totals"]["files"] + sum(
        1 for q in expected["quarantine"] if not q["reason"].startswith("unreadable")
    )
    assert shard_bytes(tmp_path) == shard_bytes(full_run)
    assert (tmp_path / "manifest.json").exists()


def test_stale_settings_refused(corpus, full_run, tmp_path):
    shutil.copytree(full_run, tmp_path, dirs_exist_ok=True)
    frag_path = tmp_path / mm.fragment_filename(0, N_SHARDS)
    frag = json.loads(frag_path.read_text())
    frag["tokenizer_version"] = "old"
    frag_path.write_text(json.dumps(frag))
    with pytest.raises(SystemExit, match="--overwrite"):
        run(corpus, tmp_path)
    with pytest.raises(ValueError, match="written with"):
        mm.merge(tmp_path)
    assert run(corpus, tmp_path, "--overwrite") == 0
    assert shard_bytes(tmp_path) == shard_bytes(full_run)


def test_spawn_workers_match_in_process(corpus, full_run, tmp_path):
    assert (
        tk.main(
            [
                "--input",
                f"{corpus / 'pieces'}",
                "--input",
                f"{corpus / 'extra'}:extra",
                "--output",
                str(tmp_path),
                "--num-shards",
                str(N_SHARDS),
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert shard_bytes(tmp_path) == shard_bytes(full_run)


def test_inspect_summary_and_decode(full_run, tmp_path, capsys):
    assert dp_inspect.main([str(full_run)]) == 0
    text = capsys.readouterr().out
    assert "TOTAL" in text and f"{N_GOOD_UNIQUE:>8,}" in text and "tokens per record" in text
    out = tmp_path / "decoded.mid"
    assert dp_inspect.main([str(full_run), "--decode", "0", "--out", str(out)]) == 0
    mf = mido.MidiFile(out)
    n_on = sum(1 for t in mf.tracks for m in t if m.type == "note_on" and m.velocity > 0)
    assert n_on == 24
    first_nonempty = next(
        i
        for i, p in enumerate(records.list_shards(full_run))
        if json.loads((full_run / mm.fragment_filename(i, N_SHARDS)).read_text())["totals"]["files"]
    )
    assert (
        dp_inspect.main(
            [str(full_run), "--shard", str(first_nonempty), "--decode", "-1", "--out", str(out)]
        )
        == 0
    )


def test_input_specs_globs_and_file_lists(corpus, tmp_path):
    spec = sources.parse_input_spec(f"{corpus / 'pieces'}:mine:score")
    assert (spec.corpus, spec.kind) == ("mine", "score")
    assert sources.parse_input_spec(str(corpus / "pieces")).corpus == ""
    assert sources.parse_input_spec("/x/*.mid::performance").kind == "performance"
    files = sources.expand_input(sources.parse_input_spec(f"{corpus}/*/p[0-2].mid"))
    assert [(f.corpus, f.source) for f in files] == [
        (corpus.name, f"pieces/p{i}.mid") for i in range(3)
    ]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{corpus / 'extra' / 'e0.mid'}\n\n")
    got = sources.read_file_list(sources.parse_input_spec(f"{lst}:listed"))
    assert [(f.corpus, f.kind) for f in got] == [("listed", "performance")]
    assert sources.guess_kind("/d/giantmidi/ground_truth/x.mid") == "score"
    assert sources.guess_kind("/d/asap/Bach/x/midi_score.mid") == "score"
    assert sources.guess_kind("/d/asap/Bach/x/Ashkenazy01.mid") == "performance"
    assert tk.parse_shard_indices(["0-2", "5,7"], 8) == [0, 1, 2, 5, 7]
    assert tk.host_shards(3, 2, 8) == [5, 6, 7]
    with pytest.raises(SystemExit):
        tk.parse_shard_indices(["8"], 8)
    with pytest.raises(FileNotFoundError):
        sources.expand_input(sources.parse_input_spec(str(tmp_path / "nothing*.mid")))


@pytest.mark.slow
def test_real_data_subset(tmp_path):
    asap = SHARED_DATA / "asap" / "Bach" / "Fugue"
    gt = SHARED_DATA / "unlabeled" / "giantmidi" / "ground_truth"
    if not asap.is_dir() or not gt.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path / "out"
    assert (
        tk.main(
            [
                "--input",
                f"{asap}/bwv_84*/*.mid:asap",
                "--input",
                f"{gt}/bach_*.mid",
                "--output",
                str(out),
                "--num-shards",
                "2",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["files"] > 3
    kinds = manifest["corpora"]["asap"]["kinds"]
    assert kinds["score"]["files"] >= 1 and kinds["performance"]["files"] >= 1
    assert manifest["corpora"]["ground_truth"]["kinds"]["score"]["files"] >= 1
    recs = read_all(out)
    assert len(recs) == manifest["totals"]["files"]
    assert all(r.n_tokens == 8 * r.n_notes > 0 for r in recs)
    assert dp_inspect.main([str(out), "--decode", "0", "--out", str(tmp_path / "x.mid")]) == 0
    assert mido.MidiFile(tmp_path / "x.mid").length > 0


def test_unexpected_errors_and_unreadable_files_are_quarantined(corpus, tmp_path, monkeypatch):
    from pianist_jax import midi

    real = midi.read_midi

    def flaky(path, data=None):
        if Path(path).name == "e1.mid":
            raise RuntimeError("boom\tin\nthe tokenizer")
        return real(path, data)

    monkeypatch.setattr(midi, "read_midi", flaky)
    lst = tmp_path / "list.txt"
    lst.write_text(
        "../corpus_missing/gone.mid\n"
        + "\n".join(str(p) for p in sorted((corpus / "extra").glob("*.mid")))
        + "\n"
    )
    out = tmp_path / "out"
    assert (
        tk.main(
            [
                "--file-list",
                f"{lst}:listed",
                "--output",
                str(out),
                "--num-shards",
                "3",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = dict(line.split("\t") for line in (out / "quarantine.tsv").read_text().splitlines()[1:])
    reasons = {Path(p).name: r for p, r in rows.items()}
    assert reasons["e1.mid"] == "RuntimeError: boom in the tokenizer"
    assert reasons["gone.mid"].startswith("unreadable")
    assert len(read_all(out)) == 2


def test_exclude_keeps_only_performances(corpus, tmp_path):
    kept = sources.collect_sources(
        [str(corpus / "pieces")], [], exclude=["midi_score.mid", "bad_*"]
    )
    names = {s.source for s in kept}
    assert "Work/midi_score.mid" not in names and not any(n.startswith("bad_") for n in names)
    assert "p0.mid" in names and "upper/LOUD.MIDI" in names
    out = tmp_path / "ex"
    run(corpus, out, "--exclude", "midi_score.mid")
    manifest = json.loads((out / mm.MANIFEST).read_text())
    assert manifest["totals"]["files"] == N_GOOD_UNIQUE - 1
    # a resumed run with other excludes would mix datasets: refused
    with pytest.raises(SystemExit, match="written with"):
        tk.main(
            [
                "--input",
                str(corpus / "pieces"),
                "--output",
                str(out),
                "--num-shards",
                str(N_SHARDS),
                "--workers",
                "0",
                "--no-progress",
                "--shard-index",
                "0",
            ]
        )


def test_every_kind_of_bad_file_is_quarantined_with_its_reason(tmp_path):
    """The synthetic broken files of test_midi (truncated, garbage, wrong header, SMPTE,
    type 2, empty, note-less, drums-only) next to good ones: the run finishes, writes the
    good files and lists each bad one with the reason its MidiError gives."""
    from test_midi import bad_files

    bad_dir = tmp_path / "in"
    bad_dir.mkdir()
    cases = bad_files(bad_dir)
    good = [write_midi(bad_dir / f"fine{i}.mid", seed=100 + i) for i in range(3)]
    (bad_dir / "good.mid").unlink()  # the template bad_files() cut up; keep only the fine*.mid
    out = tmp_path / "out"
    assert (
        tk.main(
            [
                "--input",
                f"{bad_dir}:mixed",
                "--output",
                str(out),
                "--num-shards",
                "2",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(r.source for r in read_all(out)) == sorted(p.name for p in good)
    rows = (out / "quarantine.tsv").read_text().splitlines()[1:]
    reasons = {Path(p).name: why for p, why in (line.split("\t") for line in rows)}
    assert set(reasons) == {path.name for path, _, _ in cases.values()}
    for path, err, fragment in cases.values():
        assert fragment.lower() in reasons[path.name].lower(), (path.name, reasons[path.name])


def test_assign_by_path_reads_only_own_files_and_splits_cleanly(corpus, tmp_path, monkeypatch):
    one, split = tmp_path / "one", tmp_path / "split"
    run(corpus, one, "--assign-by", "path")
    hashed: list[str] = []
    real = tk._sha256_path
    monkeypatch.setattr(tk, "_sha256_path", lambda p: hashed.append(p) or real(p))
    run(corpus, split, "--assign-by", "path", "--shard-index", "0-3")
    first_half = {
        s.path
        for s in sources.collect_sources([str(corpus / "pieces"), f"{corpus / 'extra'}:extra"], [])
        if tk.path_shard(s, N_SHARDS) < 4
    }
    assert set(hashed) == first_half  # the other shards' files were never read
    run(corpus, split, "--assign-by", "path", "--shard-index", "4-7")
    assert shard_bytes(one) == shard_bytes(split)
    assert without_commands(json.loads((one / mm.MANIFEST).read_text())) == without_commands(
        json.loads((split / mm.MANIFEST).read_text())
    )
    recs = read_all(one)
    # p1_copy duplicates p1; it is dropped only if both paths hash to the same shard
    same_shard = tk.path_shard(
        sources.SourceFile("pieces", "p1.mid", "", ""), N_SHARDS
    ) == tk.path_shard(sources.SourceFile("pieces", "p1_copy.mid", "", ""), N_SHARDS)
    names = {(r.corpus, r.source) for r in recs}
    assert (("pieces", "p1_copy.mid") in names) != same_shard
    assert all(r.n_notes == 24 for r in recs)
