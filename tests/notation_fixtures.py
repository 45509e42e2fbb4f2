"""MusicXML fixtures written in code: a few measures with exactly the features under test."""

from __future__ import annotations

STEPS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def midi_pitch(name: str) -> int:
    """'C4' -> 60, 'F#5' -> 78."""
    step, octave = name[0], int(name[-1])
    alter = name[1:-1].count("#") - name[1:-1].count("b")
    return 12 * (octave + 1) + STEPS[step] + alter


def note(
    name: str | None,
    dur: int,
    *,
    staff: int = 1,
    voice: int = 1,
    chord: bool = False,
    tie: str | None = None,
    grace: bool = False,
) -> str:
    """A <note>; name None is a rest; tie 'start', 'stop' or 'both'."""
    parts = ["<note>"]
    if grace:
        parts.append('<grace slash="yes"/>')
    if chord:
        parts.append("<chord/>")
    if name is None:
        parts.append("<rest/>")
    else:
        alter = name[1:-1].count("#") - name[1:-1].count("b")
        alter_xml = f"<alter>{alter}</alter>" if alter else ""
        parts.append(f"<pitch><step>{name[0]}</step>{alter_xml}<octave>{name[-1]}</octave></pitch>")
    if not grace:
        parts.append(f"<duration>{dur}</duration>")
    ties = {"start": ["start"], "stop": ["stop"], "both": ["stop", "start"]}.get(tie, [])
    parts += [f'<tie type="{t}"/>' for t in ties]
    parts.append(f"<voice>{voice}</voice>")
    parts.append("<type>eighth</type>" if grace else "")
    parts.append(f"<staff>{staff}</staff>")
    if ties:
        parts.append("<notations>" + "".join(f'<tied type="{t}"/>' for t in ties) + "</notations>")
    parts.append("</note>")
    return "".join(parts)


def backup(dur: int) -> str:
    return f"<backup><duration>{dur}</duration></backup>"


def direction(inner: str, sound: str = "", staff: int = 1) -> str:
    return (
        f'<direction placement="below"><direction-type>{inner}</direction-type>'
        f"<staff>{staff}</staff>{sound}</direction>"
    )


def dynamic(mark: str) -> str:
    return direction(f"<dynamics><{mark}/></dynamics>")


def metronome(qpm: int) -> str:
    return direction(
        f"<metronome><beat-unit>quarter</beat-unit><per-minute>{qpm}</per-minute></metronome>",
        f'<sound tempo="{qpm}"/>',
    )


def pedal(kind: str) -> str:
    return direction(f'<pedal type="{kind}" line="yes"/>')


def attributes(divisions: int = 4, beats: int = 4, staves: int = 2) -> str:
    clefs = '<clef number="1"><sign>G</sign><line>2</line></clef>'
    if staves == 2:
        clefs += '<clef number="2"><sign>F</sign><line>4</line></clef>'
    return (
        f"<attributes><divisions>{divisions}</divisions><key><fifths>0</fifths></key>"
        f"<time><beats>{beats}</beats><beat-type>4</beat-type></time>"
        f"<staves>{staves}</staves>{clefs}</attributes>"
    )


def barline(location: str, repeat: str | None = None, ending: str | None = None) -> str:
    inner = f'<repeat direction="{repeat}"/>' if repeat else ""
    if ending:
        number, kind = ending.split(":")
        inner = f'<ending number="{number}" type="{kind}"/>' + inner
    return f'<barline location="{location}">{inner}</barline>'


def measure(number: int | str, *content: str, implicit: bool = False) -> str:
    flag = ' implicit="yes"' if implicit else ""
    return f'<measure number="{number}"{flag}>' + "".join(content) + "</measure>"


def score(*parts: tuple[str, list[str]]) -> str:
    """A score-partwise document from (part name, measures) pairs."""
    plist = "".join(
        f'<score-part id="P{i + 1}"><part-name>{name}</part-name></score-part>'
        for i, (name, _) in enumerate(parts)
    )
    body = "".join(
        f'<part id="P{i + 1}">' + "".join(ms) + "</part>" for i, (_, ms) in enumerate(parts)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE score-partwise PUBLIC "-//Recordare//DTD MusicXML 4.0 Partwise//EN" '
        '"http://www.musicxml.org/dtds/partwise.dtd">\n'
        f'<score-partwise version="4.0"><part-list>{plist}</part-list>{body}</score-partwise>'
    )
