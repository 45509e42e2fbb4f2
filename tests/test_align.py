"""Score <-> performance alignment and SFT pair building (pianist_jax.data.align,
data_prep.build_sft).

Synthetic pieces are built in code with a known score->performance mapping, so every test can
check exact pairs; one test reads a few real ASAP performances when ../shared is present.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep import build_sft
from pianist_jax import midi, tokenizer
from pianist_jax.data import align, records

SHARED_ASAP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "asap"
_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def make_score(n: int = 160, seed: int = 0) -> midi.Notes:
    """A quantized two-voice score: eighth-note melody + a bass note every quarter (ms)."""
    rng = np.random.default_rng(seed)
    mel_on = np.arange(n) * 250
    mel_pitch = 60 + np.cumsum(rng.integers(-3, 4, n)) % 24
    bass_on = np.arange(0, n, 2) * 250
    bass_pitch = 36 + rng.integers(0, 12, len(bass_on))
    on = np.concatenate([mel_on, bass_on])
    pitch = np.concatenate([mel_pitch, bass_pitch])
    dur = np.concatenate([np.full(n, 240), np.full(len(bass_on), 490)])
    o = np.lexsort((pitch, on))
    empty = np.zeros(0, dtype=np.int64)
    return midi.Notes(on[o], on[o] + dur[o], pitch[o], np.full(len(o), 64), empty, empty)


def perf_time(t):
    """A known non-linear warp: slower overall, with a sinusoidal rubato."""
    t = np.asarray(t, float)
    return 300.0 + 1.3 * t + 400.0 * np.sin(t / 4000.0)


def make_performance(score: midi.Notes, drop=(), seed: int = 1, extra: int = 0):
    """(performance notes, truth: perf index per score note or -1) with jitter and pedal."""
    rng = np.random.default_rng(seed)
    keep = np.setdiff1d(np.arange(len(score)), np.asarray(drop, dtype=np.int64))
    on = np.rint(perf_time(score.onset[keep]) + rng.normal(0, 8, len(keep))).astype(np.int64)
    dur = rng.integers(80, 400, len(keep))
    vel = rng.integers(30, 110, len(keep))
    pitch = score.pitch[keep]
    if extra:  # insertions: high notes no score note has, so nothing may pair them
        on = np.concatenate([on, rng.integers(on.min(), on.max(), extra)])
        pitch = np.concatenate([pitch, np.full(extra, 100)])
        dur, vel = (
            np.concatenate([dur, np.full(extra, 50)]),
            np.concatenate([vel, np.full(extra, 20)]),
        )
    pedal_ms = np.arange(0, on.max(), 700, dtype=np.int64)
    pedal_val = np.resize(np.array([0, 100, 30, 64, 63, 127], dtype=np.int64), len(pedal_ms))
    perf = midi.resolve_same_pitch_overlaps(
        midi.Notes(on, on + dur, pitch, vel, pedal_ms, pedal_val)
    )
    truth = np.full(len(score), -1, dtype=np.int64)
    for j in keep:  # locate each kept score note in the re-sorted performance
        t = perf_time(score.onset[j])
        cand = np.flatnonzero(perf.pitch == score.pitch[j])
        truth[j] = cand[np.argmin(np.abs(perf.onset[cand] - t))]
    return perf, truth


def match_text(score: midi.Notes, perf: midi.Notes, truth: np.ndarray) -> str:
    """Match-file v1.0.0 text: beats are eighths from a one-eighth pickup (3/8-like)."""
    ticks = lambda ms: int(round(ms * 480 / 500))  # noqa: E731 - 500000 us per 480 ticks
    lines = [
        "info(matchFileVersion,1.0.0).",
        "info(midiClockUnits,480).",
        "info(midiClockRate,500000).",
        "scoreprop(timeSignature,3/8,0:1,0,-1.0000).",
    ]
    used = set()
    for j in range(len(score)):
        p = int(score.pitch[j])
        beat = score.onset[j] / 250.0 - 1.0
        name = _NAMES[p % 12]
        s = (
            f"snote(n{j}-1,[{name[0]},{'#' if len(name) > 1 else 'n'}],{p // 12 - 1},1:1,0,1/8,"
            f"{beat:.4f},{beat + 1:.4f},[v1])"
        )
        q = truth[j]
        if q < 0:
            lines.append(s + "-deletion.")
            continue
        used.add(int(q))
        lines.append(
            s + f"-note(n{q},{perf.pitch[q]},{ticks(perf.onset[q])},"
            f"{ticks(perf.offset[q])},{perf.velocity[q]},0,0)."
        )
    for q in sorted(set(range(len(perf))) - used):
        lines.append(
            f"insertion-note(n{q},{perf.pitch[q]},{ticks(perf.onset[q])},"
            f"{ticks(perf.offset[q])},{perf.velocity[q]},0,0)."
        )
    lines.append("sustain(100,64).")
    return "\n".join(lines) + "\n"


def beats_for(score: midi.Notes):
    sb = np.arange(0, score.onset.max() + 500, 500, dtype=float)
    return sb, perf_time(sb)


# ----------------------------------------------------------------------------- match files


def test_parse_match_both_layouts():
    text = (
        "info(midiClockUnits,480).\ninfo(midiClockRate,500000).\n"
        "snote(n1,[B,b],3,1:1,0,1/16,-1.0000,0.0000,[])-note(n0,[B,b],3,960,1000,1000,97).\n"
        "snote(n2,[C,x],4,1:2,0,1/16,0.0,1.0,[])-deletion.\n"
        "insertion-note(n5,61,480,500,40,0,0).\nsustain(10,30).\n"
    )
    m = align.parse_match(text)
    assert m.snote_pitch.tolist() == [58, 62] and m.snote_beat.tolist() == [-1.0, 0.0]
    assert m.snote_perf.tolist() == [0, -1]
    assert m.perf_pitch.tolist() == [58, 61]
    np.testing.assert_allclose(m.perf_onset, [1000.0, 500.0])
    with pytest.raises(align.AlignError, match="midiClock"):
        align.parse_match("snote(n1,[C,n],4,1:1,0,1/4,0.0,1.0,[])-deletion.\n", "x.match")
    with pytest.raises(align.AlignError, match="line 4.*spelling"):
        align.parse_match(text.replace("[C,x],4", "[Q,x],4"), "x.match")


def test_match_align_recovers_pairs():
    score = make_score()
    drop = [10, 11, 50, 90]
    perf, truth = make_performance(score, drop=drop, extra=6)
    m = align.parse_match(match_text(score, perf, truth))
    for beats in (beats_for(score), (None, None)):  # bridge through beats, then through DTW
        res = align.match_align(score, perf, m, *beats)
        np.testing.assert_array_equal(res["idx"], truth)
        assert res["from_match"].sum() == len(score) - len(drop)
        assert res["snotes_located"] == 1.0 and res["perf_located"] == 1.0
        assert (res["pairs_in_file"], res["snotes_in_file"]) == (len(score) - len(drop), len(score))


def test_match_align_score_with_unplayed_repeat():
    """midi_score.mid repeats a section the match file's score and the pianist play once: the
    map fitted on the two scores alone locates every match pair (the bridge through the
    performance cannot: the automatic aligner has no beats to skip the repeat with)."""
    score = make_score(240, seed=5)
    perf, truth = make_performance(score, drop=[10, 11, 50], seed=6)
    m = align.parse_match(match_text(score, perf, truth))
    a, b = 15000, 35000  # score section [a, b) is written twice, played once
    sec = (score.onset >= a) & (score.onset < b)
    on = np.concatenate(
        [score.onset + np.where(score.onset >= b, b - a, 0), score.onset[sec] + b - a]
    )
    dur = np.concatenate([score.duration, score.duration[sec]])
    pitch = np.concatenate([score.pitch, score.pitch[sec]])
    o = np.lexsort((pitch, on))
    empty = np.zeros(0, dtype=np.int64)
    repeated = midi.Notes(on[o], on[o] + dur[o], pitch[o], np.full(len(o), 64), empty, empty)
    src = np.concatenate([np.arange(len(score)), np.flatnonzero(sec)])[o]
    copy = np.concatenate([np.zeros(len(score), bool), np.ones(sec.sum(), bool)])[o]
    res = align.match_align(repeated, perf, m)
    assert res["located_by"] == "scores" and res["snotes_located"] == 1.0
    assert res["from_match"].sum() == (truth >= 0).sum()
    first = np.where(copy, -1, truth[src])  # played = the first time through
    second = np.where(sec[src] & ~copy, -1, truth[src])  # played = the repeat
    assert np.array_equal(res["idx"], first) or np.array_equal(res["idx"], second)


def test_auto_aligner_recovers_known_warp():
    score = make_score(240, seed=3)
    perf, truth = make_performance(score, drop=[7, 100], seed=4)
    idx, how = align.auto_align(score, perf, *beats_for(score))
    assert how == "beats"
    np.testing.assert_array_equal(idx, truth)
    idx, how = align.auto_align(score, perf)
    assert how == "dtw" and (idx == truth).mean() >= 0.97


# ----------------------------------------------------------------------------- targets


def test_interpolated_note_and_running_max():
    empty = np.zeros(0, dtype=np.int64)
    score = midi.Notes(
        np.array([0, 500, 1000, 1500, 1500]),
        np.array([400, 900, 1500, 1900, 1900]),
        np.array([60, 62, 64, 65, 69]),
        np.full(5, 64),
        empty,
        empty,
    )
    perf = midi.Notes(
        np.array([100, 1100, 1500, 1700]),
        np.array([400, 1400, 2000, 1900]),
        np.array([60, 64, 69, 65]),
        np.array([40, 80, 70, 60]),
        empty,
        empty,
    )
    idx = np.array([0, -1, 1, 3, 2])  # note 1 unpaired; chord 65/69 played 69 first
    t, order = build_sft.target_notes(score, perf, idx)
    assert t.onset[1] == 600  # halfway in score time between 100 and 1100
    assert t.velocity[1] == 60  # halfway between 40 and 80
    # duration: score 400 ms x geometric mean of the neighbours' ratios (300/400, 300/500)
    assert t.duration[1] == round(400 * np.sqrt(0.75 * 0.6))
    # the chord 65/69 is ordered as played (69 first), not flattened to IOI 0 in pitch order
    assert order.tolist() == [0, 1, 2, 4, 3]
    assert t.onset.tolist() == [100, 600, 1100, 1500, 1700]
    assert t.pitch.tolist() == [60, 62, 64, 69, 65] and t.duration[3:].tolist() == [500, 200]


def test_running_max_across_chords_and_stable_ties():
    """Notes of different score onsets keep score order (a note played early is moved up to
    its predecessor); notes of a chord played together keep the score's pitch order."""
    empty = np.zeros(0, dtype=np.int64)
    score = midi.Notes(
        np.array([0, 0, 0, 500]),
        np.array([400, 400, 400, 900]),
        np.array([60, 64, 67, 72]),
        np.full(4, 64),
        empty,
        empty,
    )
    perf = midi.Notes(
        np.array([100, 100, 100, 90]),
        np.array([500, 500, 500, 300]),
        np.array([60, 64, 67, 72]),
        np.array([50, 50, 50, 50]),
        empty,
        empty,
    )
    t, order = build_sft.target_notes(score, perf, np.arange(4))
    assert order.tolist() == [0, 1, 2, 3] and t.pitch.tolist() == [60, 64, 67, 72]
    assert t.onset.tolist() == [100, 100, 100, 100]  # 72 played before the chord: running max


def test_cut_segments_runs_and_short_segments():
    paired = np.ones(300, dtype=bool)
    paired[100:105] = False  # a run of 5 cuts
    paired[200:204] = False  # a run of 4 does not
    paired[270:275] = False  # cut, leaving a 25-note tail that is too short
    spans, dropped = build_sft.cut_segments(paired)
    assert spans == [(0, 100), (105, 270)] and dropped == 1
    assert build_sft.cut_segments(paired, min_notes=20) == ([(0, 100), (105, 270), (275, 300)], 0)


def test_segments_tokens_pitch_and_pedal():
    score = make_score(200)
    perf, truth = make_performance(score, drop=[3, 60, 61, 62, 63, 64, 65])
    segs, dropped = build_sft.sft_segments(score, perf, truth)
    assert [(s.start, s.stop) for s in segs] == [(66, len(score))] and dropped == 1
    seg = segs[0]
    assert seg.score_ids.shape == seg.target_ids.shape
    np.testing.assert_array_equal(seg.target_ids[::8], seg.score_ids[::8])
    tok = seg.target_ids.reshape(-1, 8)
    assert tok[0, 1] == tokenizer.TIME_START and seg.score_ids[1] == tokenizer.TIME_START
    assert set(np.unique(tok[:, 4:]).tolist()) == {
        tokenizer.PEDAL_START,
        tokenizer.PEDAL_START + 127,
    }
    assert seg.n_interpolated == 0
    # the pedal is the performance's (binarised), read on the target timeline
    onset = np.cumsum(tok[:, 1] - tokenizer.TIME_START) + perf.onset[truth[66]]
    last = perf.pedal_value[np.searchsorted(perf.pedal_ms, onset, side="right") - 1]
    np.testing.assert_array_equal(tok[:, 4] - tokenizer.PEDAL_START, np.where(last >= 64, 127, 0))


# ----------------------------------------------------------------------------- build_sft


def _rows(n_titles: int = 12) -> list[dict]:
    rows = []
    for t in range(n_titles):
        for folder in [f"C/T{t}"] + ([f"C/T{t}_no_repeat"] if t % 3 == 0 else []):
            rows.append(
                {
                    "composer": "C",
                    "title": f"T{t}",
                    "folder": folder,
                    "midi_performance": f"{folder}/p.mid",
                }
            )
    return rows


def test_split_deterministic_and_disjoint():
    rows = _rows()
    a, b = build_sft.make_split(rows, 0.25, seed=0), build_sft.make_split(rows, 0.25, seed=0)
    assert a == b and len(a["val_pieces"]) == 3
    assert not set(a["val_folders"]) & set(a["train_folders"])
    assert not set(a["val_pieces"]) & set(a["train_pieces"])
    for f in a["val_folders"]:  # a title's repeat variants travel together
        assert f.replace("_no_repeat", "") in a["val_folders"]
    assert build_sft.make_split(rows, 0.25, seed=1) != a


def _fake_asap(root: Path) -> None:
    """Two pieces x two performances; one performance is a broken MIDI file."""
    rows = []
    for k in range(2):
        folder = root / "Comp" / f"Work{k}"
        folder.mkdir(parents=True)
        score = make_score(150, seed=k)
        midi.write_midi(score, folder / "midi_score.mid")
        sb, pb = beats_for(score)
        (folder / "midi_score_annotations.txt").write_text(
            "".join(f"{t / 1000}\t{t / 1000}\tb\n" for t in sb)
        )
        for name in ("A", "B"):
            perf, truth = make_performance(score, seed=ord(name) + k)
            midi.write_midi(perf, folder / f"{name}.mid")
            (folder / f"{name}_annotations.txt").write_text(
                "".join(f"{t / 1000}\t{t / 1000}\tb\n" for t in pb)
            )
            if name == "A":
                (folder / "A.match").write_text(match_text(score, perf, truth))
            rows.append(
                {
                    "composer": "Comp",
                    "title": f"Work{k}",
                    "folder": f"Comp/Work{k}",
                    "midi_score": f"Comp/Work{k}/midi_score.mid",
                    "midi_performance": f"Comp/Work{k}/{name}.mid",
                    "performance_annotations": f"Comp/Work{k}/{name}_annotations.txt",
                    "midi_score_annotations": f"Comp/Work{k}/midi_score_annotations.txt",
                    "match_file": f"Comp/Work{k}/A.match" if name == "A" else "",
                }
            )
    (root / "Comp" / "Work1" / "B.mid").write_bytes(b"not midi")
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_build_sft_cli_end_to_end(tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader

    _fake_asap(tmp_path / "asap")
    outs = []
    for run, workers in (("a", "0"), ("b", "2")):  # same bytes in-process and with a pool
        out = tmp_path / run
        assert (
            build_sft.main(
                [
                    "--asap",
                    str(tmp_path / "asap"),
                    "--out",
                    str(out),
                    "--workers",
                    workers,
                    "--val-fraction",
                    "0.5",
                    "--num-shards",
                    "2",
                    "--no-progress",
                ]
            )
            == 0
        )
        outs.append(out)
    report = [json.loads(x) for x in (outs[0] / "report.jsonl").read_text().splitlines()]
    assert [r.get("source") for r in report] == ["match", "auto", "match", None]
    assert report[0]["matched_pct"] == 100.0 and report[1]["warp"] == "beats"
    assert "Work1/B.mid" in (outs[0] / "quarantine.jsonl").read_text()
    summary = json.loads((outs[0] / "summary.json").read_text())
    m = [r for r in report if r.get("source") == "match"]
    assert all(r["match_snotes_in_file"] >= r["match_pairs_in_file"] > 0 for r in m)
    assert summary["match_files_own_paired_pct"] == round(
        100 * sum(r["match_pairs_in_file"] for r in m) / sum(r["match_snotes_in_file"] for r in m),
        2,
    )
    split = json.loads((outs[0] / "split.json").read_text())
    val_lines = (outs[0] / "val_pieces.txt").read_text().splitlines()
    assert len(val_lines) == 2 and val_lines[1].startswith(split["val_folders"][0])
    seen = {}
    for part in ("train", "val"):
        for shard in records.list_shards(outs[0] / part):
            assert shard.read_bytes() == (outs[1] / part / shard.name).read_bytes()
            reader = ArrayRecordReader(str(shard))
            for raw in reader.read(list(range(reader.num_records()))):
                rec = records.decode_record(raw)
                seen[rec.source] = part
                assert rec.kind == "score" and rec.corpus == "asap"
                assert rec.tokenizer_version == tokenizer.TOKENIZER_VERSION
                assert rec.extras["performance"].shape == rec.ids.shape
                np.testing.assert_array_equal(rec.extras["performance"][::8], rec.ids[::8])
            reader.close()
    assert sorted(seen) == [
        "Comp/Work0/A.mid#seg0",
        "Comp/Work0/B.mid#seg0",
        "Comp/Work1/A.mid#seg0",
    ]
    for source, part in seen.items():
        assert (source.rsplit("/", 1)[0] in split["val_folders"]) == (part == "val")


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED_ASAP.is_dir(), reason="needs ../shared/data/asap")
@pytest.mark.parametrize(
    "perf",
    [
        "Bach/Fugue/bwv_856/LuoJ01M",  # 3/8, eighth pickup, v1.0.0
        "Bach/Prelude/bwv_848/Lee01M",
        "Chopin/Etudes_op_10/8/Masycheva02",
    ],
)  # match v5.0
def test_real_asap_match_rate(perf):
    folder = SHARED_ASAP / perf.rsplit("/", 1)[0]
    score = midi.read_midi(folder / "midi_score.mid")
    performance = midi.read_midi(SHARED_ASAP / f"{perf}.mid")
    res = align.match_align(
        score,
        performance,
        align.read_match(SHARED_ASAP / f"{perf}.match.gz"),
        align.read_beats(folder / "midi_score_annotations.txt"),
        align.read_beats(SHARED_ASAP / f"{perf}_annotations.txt"),
    )
    assert res["from_match"].mean() >= 0.9
    assert res["from_match"].sum() >= 0.98 * res["pairs_in_file"]
    segs, _ = build_sft.sft_segments(score, performance, res["idx"])
    assert sum(s.stop - s.start for s in segs) >= 0.9 * len(score)
