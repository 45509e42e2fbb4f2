"""MusicXML in: the notes a player plays (repeats unfolded, ties merged, grace notes timed, staves
merged, non-keyboard parts skipped), dynamics, tempo and pedal marks; fixtures written in code."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pianist_jax import midi
from pianist_jax.midi import notation
from tests.notation_fixtures import (
    attributes,
    backup,
    barline,
    direction,
    dynamic,
    measure,
    metronome,
    midi_pitch,
    note,
    pedal,
    score,
)

partitura = pytest.importorskip("partitura")


def repeat_piece() -> list[str]:
    """Pickup, a repeated two-bar phrase (tie across the bar, a grace note), a final chord."""
    return [
        measure(0, attributes(), metronome(90), dynamic("p"), note("E5", 4), implicit=True),
        measure(
            1,
            barline("left", "forward"),
            note("C5", 8),
            note("D5", 0, grace=True),
            note("E5", 8, tie="start"),
            backup(16),
            note("C3", 16, staff=2, voice=5),
        ),
        measure(
            2,
            note("E5", 4, tie="stop"),
            note("G4", 4),
            note("B4", 4, chord=True),
            note(None, 8),
            backup(16),
            note("G2", 16, staff=2, voice=5),
            barline("right", "backward"),
        ),
        measure(
            3,
            dynamic("f"),
            pedal("start"),
            note("C4", 16),
            note("E4", 16, chord=True),
            note("G4", 16, chord=True),
            backup(16),
            note("C3", 16, staff=2, voice=5),
            pedal("stop"),
        ),
    ]


def write(tmp_path, name: str, *parts) -> str:
    path = tmp_path / name
    path.write_text(score(*parts))
    return str(path)


def read(path, **kw) -> midi.Notes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", notation.NotationWarning)
        return midi.read_midi(path, notation.score_midi_bytes(path, **kw))


def partitura_pitches(path, unfold=True) -> list[int]:
    """What partitura says a player plays: its unfolded note array, ties merged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt_score = partitura.load_musicxml(path, force_note_ids=True)
    pitches = []
    for part in pt_score.parts:
        if unfold:
            part = partitura.score.unfold_part_maximal(part, ignore_leaps=False)
        pitches += part.note_array(include_grace_notes=True)["pitch"].tolist()
    return sorted(pitches)


def test_repeats_ties_grace_notes_two_staves_pickup(tmp_path):
    path = write(tmp_path, "a.musicxml", ("Piano", repeat_piece()))
    notes = read(path)
    phrase = ["C3", "C5", "D5", "E5", "G2", "G4", "B4"]  # the tied E5 is one note
    want = ["E5"] + phrase * 2 + ["C3", "C4", "E4", "G4"]
    assert sorted(notes.pitch.tolist()) == sorted(map(midi_pitch, want))
    assert sorted(notes.pitch.tolist()) == partitura_pitches(path)
    quarter = 60_000 / 90  # the metronome mark: 90 quarters per minute
    e5 = notes.pitch == midi_pitch("E5")
    # the pickup is a quarter before bar 1; the tied E5 lasts 2 + 1 quarters, twice
    np.testing.assert_allclose(notes.onset[e5], [0, 3 * quarter, 11 * quarter], atol=1)
    np.testing.assert_allclose(notes.duration[e5][1:], 3 * quarter, atol=1)
    d5 = notes.onset[notes.pitch == midi_pitch("D5")]  # grace: a 32nd before its E5
    np.testing.assert_allclose(d5, notes.onset[e5][1:] - quarter / 8, atol=1)
    last_bar = notes.onset >= 17 * quarter - 1  # pickup + 2 x 2 bars
    assert set(notes.velocity[~last_bar].tolist()) == {49}  # p
    assert set(notes.velocity[last_bar].tolist()) == {96}  # f
    np.testing.assert_allclose(notes.pedal_ms, [17 * quarter, 21 * quarter], atol=1)
    assert notes.pedal_value.tolist() == [127, 0]


def test_no_unfold_plays_the_score_as_printed(tmp_path):
    path = write(tmp_path, "a.musicxml", ("Piano", repeat_piece()))
    notes = read(path, unfold=False)
    assert len(notes) == 12
    assert sorted(notes.pitch.tolist()) == partitura_pitches(path, unfold=False)


def test_volta_endings(tmp_path):
    ms = [
        measure(1, attributes(staves=1), barline("left", "forward"), note("C4", 16)),
        measure(2, barline("left", ending="1:start"), note("D4", 16),
                barline("right", "backward", ending="1:stop")),
        measure(3, barline("left", ending="2:start"), note("E4", 16),
                barline("right", ending="2:stop")),
    ]  # fmt: skip
    notes = read(write(tmp_path, "v.musicxml", ("Piano", ms)))
    assert notes.pitch.tolist() == [midi_pitch(p) for p in ("C4", "D4", "C4", "E4")]


def test_da_capo_al_fine(tmp_path):
    fine = direction("<words>Fine</words>", '<sound fine="yes"/>')
    dc = direction("<words>D.C. al Fine</words>", '<sound dacapo="yes"/>')
    ms = [
        measure(1, attributes(staves=1), note("C4", 16)),
        measure(2, note("D4", 16), fine, barline("right")),
        measure(3, note("E4", 16), dc),
    ]
    path = write(tmp_path, "dc.musicxml", ("Piano", ms))
    assert read(path).pitch.tolist() == [midi_pitch(p) for p in ("C4", "D4", "E4", "C4", "D4")]
    assert read(path, unfold=False).pitch.tolist() == [midi_pitch(p) for p in ("C4", "D4", "E4")]


def test_second_non_keyboard_part_is_skipped_with_a_warning(tmp_path):
    violin = [measure(1, attributes(staves=1), note("A5", 16)) for _ in range(1)]
    path = write(tmp_path, "duo.musicxml", ("Piano", repeat_piece()), ("Violin", violin))
    with pytest.warns(notation.NotationWarning, match=r"skipped part 'Violin' \(P2\)"):
        played = notation.read_notation(path)
    assert played.parts == ["'Piano' (P1)"] and played.skipped == ["'Violin' (P2)"]
    assert midi_pitch("A5") not in played.pitch


def test_no_tempo_mark_warns_and_uses_120(tmp_path):
    ms = [measure(1, attributes(staves=1), note("C4", 4), note("D4", 4))]
    path = write(tmp_path, "t.musicxml", ("Piano", ms))
    with pytest.warns(notation.NotationWarning, match="no tempo; reading it at 120"):
        notes = midi.read_midi(path, notation.score_midi_bytes(path))
    assert notes.onset.tolist() == [0, 500] and set(notes.velocity.tolist()) == {80}


@pytest.mark.parametrize("case", ["garbage", "rests_only", "no_keyboard", "suffix", "missing"])
def test_bad_notation_files_raise_one_clear_error(tmp_path, case):
    path = tmp_path / "bad.musicxml"
    if case == "garbage":
        path.write_text("<score-partwise><part-list>")
        match = "cannot read musicxml"
    elif case == "rests_only":
        path.write_text(score(("Piano", [measure(1, attributes(staves=1), note(None, 16))])))
        match = "no notes"
    elif case == "no_keyboard":
        one = [measure(1, attributes(staves=1), note("C5", 16))]
        path.write_text(score(("Violin", one), ("Flute", one)))
        match = r"no keyboard part to play \(parts: 'Violin' \(P1\), 'Flute' \(P2\)\)"
    elif case == "suffix":
        path = tmp_path / "score.pdf"
        path.write_bytes(b"%PDF")
        match = "not a notation file"
    else:
        path = tmp_path / "nothing.mxl"
        match = "no such file"
    with pytest.raises(notation.NotationError, match=match) as err:
        notation.read_notation(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_asap_musicxml_matches_its_score_midi(shared_data):
    """Where ASAP's MuseScore export has no ornaments to expand, the notes agree exactly."""
    piece = shared_data / "asap" / "Bach" / "Prelude" / "bwv_846"
    if not (piece / "xml_score.mxl").exists():
        pytest.skip("ASAP Bach prelude BWV 846 not in ../shared/data")
    ours = read(str(piece / "xml_score.mxl"))
    asap = midi.read_midi(piece / "midi_score.mid")
    assert np.array_equal(ours.pitch, asap.pitch)
    assert np.array_equal(ours.onset, asap.onset) and np.array_equal(ours.offset, asap.offset)


def test_a_lone_non_keyboard_part_is_played_with_a_warning(tmp_path):
    ms = [measure(1, attributes(staves=1), metronome(60), note("A4", 16))]
    path = write(tmp_path, "solo.musicxml", ("Violin", ms))
    with pytest.warns(notation.NotationWarning, match=r"playing part 'Violin' \(P1\) on the piano"):
        played = notation.read_notation(path)
    assert played.pitch.tolist() == [midi_pitch("A4")]


def test_grace_note_before_the_first_beat_keeps_the_bar_grid(tmp_path):
    ms = [
        measure(1, attributes(staves=1), metronome(60), note("D5", 0, grace=True), note("C5", 16)),
        measure(2, note("E5", 16)),
    ]
    path = write(tmp_path, "g.musicxml", ("Piano", ms))
    played = notation.read_notation(path)
    assert played.onset.min() == 0 and played.time_signatures[0][0] == 0
    assert played.tempos[0] == (0.0, pytest.approx(60.0)) and len(played.tempos) == 1
    e5 = played.onset[played.pitch == midi_pitch("E5")]
    assert e5.tolist() == [4.0]  # bar 2 starts 4 quarters after bar 1, as written


def test_printed_dynamics_and_sound_dynamics_combine(tmp_path):
    sounded = direction("<dynamics><ff/></dynamics>", '<sound dynamics="124.44"/>')
    ms = [
        measure(1, attributes(staves=1), dynamic("pp"), note("C4", 16)),
        measure(2, sounded, note("D4", 16)),
    ]
    notes = read(write(tmp_path, "d.musicxml", ("Piano", ms)))
    assert notes.velocity.tolist() == [33, 112]  # pp from its text, ff from <sound> (124.44%)


KERN = (
    "**kern\t**kern\n*staff2\t*staff1\n*clefF4\t*clefG2\n*M4/4\t*M4/4\n=1-\t=1-\n"
    "1C\t4c\n.\t4e\n.\t4g\n.\t4cc\n=\t=\n2G\t2dd\n2GG\t2b\n==\t==\n*-\t*-\n"
)
MEI_NOTES = "".join(
    f'<note xml:id="n{i}" pname="{p}" oct="4" dur="{d}"/>'
    for i, (p, d) in enumerate([("c", 4), ("e", 4), ("g", 2)])
)
MEI = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<mei xmlns="http://www.music-encoding.org/ns/mei" meiversion="4.0.1">'
    "<meiHead><fileDesc><titleStmt><title>t</title></titleStmt><pubStmt/></fileDesc></meiHead>"
    '<music><body><mdiv xml:id="md"><score>'
    '<scoreDef xml:id="sc" meter.count="4" meter.unit="4" key.sig="0"><staffGrp xml:id="sg">'
    '<staffDef xml:id="sd" n="1" lines="5" clef.shape="G" clef.line="2"/></staffGrp></scoreDef>'
    '<section xml:id="se"><measure xml:id="m1" n="1"><staff xml:id="st" n="1">'
    f'<layer xml:id="l" n="1">{MEI_NOTES}</layer></staff></measure></section>'
    "</score></mdiv></body></music></mei>"
)


@pytest.mark.parametrize(
    "name, text, pitches, onsets",
    [
        ("two_hands.krn", KERN, ["C3", "C4", "E4", "G4", "C5", "G3", "D5", "G2", "B4"],
         [0, 0, 500, 1000, 1500, 2000, 2000, 3000, 3000]),
        ("arpeggio.mei", MEI, ["C4", "E4", "G4"], [0, 500, 1000]),
    ],
)  # fmt: skip
def test_humdrum_and_mei_scores(tmp_path, name, text, pitches, onsets):
    path = tmp_path / name
    path.write_text(text)
    notes = read(str(path))
    assert notes.pitch.tolist() == [midi_pitch(p) for p in pitches]
    assert notes.onset.tolist() == onsets
