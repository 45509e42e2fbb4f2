"""Performance MIDI -> audio (WAV or FLAC) with the `fluidsynth` command-line program.

Why the command-line program and not the pyfluidsynth package: with pyfluidsynth importable,
`import partitura` tries to download a SoundFont at import time, which breaks offline users.
The program needs no Python binding, renders faster than real time (`-F`, no audio driver, no
shell) and gives the same bytes for the same input.

Why the MIDI is padded: fluidsynth before 2.3.1 stops rendering at the last MIDI event, which
cuts off the release of the last notes (2.3.1 and later keep going until every voice is silent,
then 2 s more). We render a temporary copy with one extra track that lets go of everything at
the last event (sustain pedal up, all notes off, as fluidsynth >= 2.3.1 does itself) and ends
`TAIL_SECONDS` later, so every version renders the release; the audio lasts at least until the
last note-off / pedal release plus `TAIL_SECONDS`.

A failure raises `AudioError`, whose `str()` is one line telling the user what to do; the
output is written to a temporary file in the same directory and renamed when complete, so a
failure never leaves a half-written file.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import mido

SOUNDFONT_ENV = "PIANIST_JAX_SOUNDFONT"
# Searched in order after --soundfont and $PIANIST_JAX_SOUNDFONT; globs, `~` expanded.
SOUNDFONT_SEARCH = (
    "/usr/share/sounds/sf2/default-GM.sf2",  # Debian/Ubuntu: fluid-soundfont-gm or alternatives
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf2/*.sf2",
    "/usr/share/sounds/sf3/default-GM.sf3",  # Debian: fluidsynth's own default
    "/usr/share/sounds/sf3/*.sf3",
    "/usr/share/soundfonts/default.sf2",  # Arch, Fedora
    "/usr/share/soundfonts/*.sf2",
    "/opt/homebrew/share/soundfonts/*.sf2",  # Homebrew (Apple silicon, Intel)
    "/usr/local/share/soundfonts/*.sf2",
    "~/.local/share/soundfonts/*.sf2",
    "~/Library/Audio/Sounds/Banks/*.sf2",  # macOS
)
FORMATS = {".wav": "wav", ".flac": "flac"}
TAIL_SECONDS = 1.5  # rendered after the last event for the release (fluidsynth < 2.3.1 cuts it)
DEFAULT_GAIN = 0.4  # fluidsynth's 0.2 is quiet; dense fortissimo with pedal peaks near 0.8 FS

INSTALL_FLUIDSYNTH = (
    "fluidsynth not found on PATH: install it (Debian/Ubuntu: "
    "`sudo apt-get install fluidsynth fluid-soundfont-gm`; macOS: `brew install fluid-synth` "
    "plus a General MIDI SoundFont, see --soundfont)"
)
INSTALL_SOUNDFONT = (
    "no SoundFont found: install one (Debian/Ubuntu: `sudo apt-get install fluid-soundfont-gm`; "
    "macOS: download a General MIDI .sf2 such as GeneralUser GS or FluidR3_GM into "
    f"~/Library/Audio/Sounds/Banks/), or pass --soundfont FILE.sf2 or set {SOUNDFONT_ENV}"
)


class AudioError(RuntimeError):
    """Audio could not be made; `str()` is one line a user can act on."""


class SetupError(AudioError):
    """No synthesizer or no SoundFont: nothing can be synthesized until it is installed."""


def find_soundfont(explicit: str | os.PathLike | None = None) -> Path:
    """The SoundFont to use: `explicit` (--soundfont), else $PIANIST_JAX_SOUNDFONT, else the
    first of `SOUNDFONT_SEARCH` that exists. A path given but missing is an error."""
    sources = [(explicit, "--soundfont"), (os.environ.get(SOUNDFONT_ENV), SOUNDFONT_ENV)]
    for given, origin in sources:
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise SetupError(f"SoundFont not found: {path} (from {origin})")
            return path
    for pattern in SOUNDFONT_SEARCH:
        for path in sorted(glob.glob(os.path.expanduser(pattern))):
            if os.path.isfile(path):  # follows symlinks (default-GM.sf2 is one)
                return Path(path)
    raise SetupError(INSTALL_SOUNDFONT)


def synthesize(
    midi_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    soundfont: str | os.PathLike | None = None,
    sample_rate: int = 44100,
    gain: float = DEFAULT_GAIN,
) -> Path:
    """Render `midi_path` to `out_path` (.wav: 16-bit PCM, or .flac; stereo) and return it."""
    midi_path, out_path = Path(midi_path), Path(out_path)
    kind = FORMATS.get(out_path.suffix.lower())
    if kind is None:
        raise AudioError(f"{out_path}: unsupported audio type, use one of {', '.join(FORMATS)}")
    if not 8000 <= sample_rate <= 96000:
        raise AudioError(f"sample rate {sample_rate} Hz outside fluidsynth's 8000..96000")
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise SetupError(INSTALL_FLUIDSYNTH)
    sf2 = find_soundfont(soundfont)
    _check_soundfont(sf2)
    if not midi_path.is_file():
        raise AudioError(f"MIDI file not found: {midi_path}")
    if not out_path.parent.is_dir():
        raise AudioError(f"{out_path}: directory {out_path.parent} does not exist")
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.part")
    try:
        with tempfile.TemporaryDirectory(prefix="pianist-jax-audio-") as tmpdir:
            padded = Path(tmpdir) / "padded.mid"
            seconds = _write_padded(midi_path, padded)
            cmd = [exe, "-n", "-i", "-q", "-g", f"{gain:g}", "-r", str(sample_rate)]
            cmd += ["-O", "s16", "-T", kind, "-F", str(tmp), str(sf2), str(padded)]
            timeout = 60 + 2 * (seconds + 10)  # fast render is many times faster than real time
            try:
                proc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
                )
            except subprocess.TimeoutExpired:
                msg = f"{midi_path}: fluidsynth did not finish in {timeout:.0f} s"
                raise AudioError(msg) from None
        # fluidsynth exits 0 after many errors (e.g. cannot open the output): check the file too
        if proc.returncode != 0 or not _audio_written(tmp, kind):
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            raise AudioError(f"{midi_path}: fluidsynth failed to write {out_path.name}: {why}")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _check_soundfont(path: Path) -> None:
    """fluidsynth renders silence (exit 0) for a file that is not a SoundFont: refuse early."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise SetupError(f"cannot read SoundFont {path}: {e.strerror}") from None
    if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        raise SetupError(f"{path} is not a SoundFont (.sf2/.sf3); pass another with --soundfont")


def _write_padded(midi_path: Path, dst: Path) -> float:
    """Copy `midi_path` to `dst` with a last track: at the last event of the file, sustain pedal
    up and all notes off on every channel; end of track `TAIL_SECONDS` later. Returns the
    length of the copy in seconds."""
    try:
        mf = mido.MidiFile(midi_path)
        end_ticks, seconds, tempo = 0, 0.0, 500_000
        for msg in mido.merge_tracks(mf.tracks):
            end_ticks += msg.time
            seconds += mido.tick2second(msg.time, mf.ticks_per_beat, tempo)
            if msg.type == "set_tempo":
                tempo = msg.tempo
    except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
        raise AudioError(f"{midi_path}: not a readable MIDI file ({e})") from None
    track = mido.MidiTrack()
    for channel in range(16):
        for control in (64, 123):  # sustain pedal off, all notes off
            track.append(mido.Message("control_change", channel=channel, control=control, value=0))
    track[0].time = end_ticks
    pad = round(mido.second2tick(TAIL_SECONDS, mf.ticks_per_beat, tempo))
    track.append(mido.MetaMessage("end_of_track", time=pad))
    mf.type = max(mf.type, 1)  # type 0 holds one track only
    mf.tracks.append(track)
    mf.save(dst)
    return seconds + TAIL_SECONDS


def _audio_written(path: Path, kind: str) -> bool:
    try:
        if kind == "wav":
            with wave.open(str(path), "rb") as w:
                return w.getnframes() > 0
        with open(path, "rb") as f:
            return f.read(4) == b"fLaC" and os.fstat(f.fileno()).st_size > 1024
    except (OSError, EOFError, wave.Error):
        return False
