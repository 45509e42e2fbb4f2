"""Input discovery for data_prep: ``DIR_OR_GLOB[:CORPUS[:KIND]]`` specs -> sorted source files.

Kept apart from the tokenize CLI so the SFT builder can reuse the same corpus tagging. Every
list returned here is sorted, so shard contents never depend on filesystem listing order.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import os
from pathlib import Path

from pianist_jax.data.records import KINDS

MIDI_SUFFIXES = (".mid", ".midi")
# Path components (lower-cased) that mark score MIDI rather than performances: ASAP's
# midi_score.mid, GiantMIDI's ground_truth/ sequenced scores, and plain score folders.
SCORE_FILE_NAMES = ("midi_score.mid", "midi_score.midi")
SCORE_DIR_NAMES = ("ground_truth", "score", "scores", "midi_score", "midi_scores")


@dataclasses.dataclass(frozen=True, order=True)
class SourceFile:
    """One input file. Sort order (corpus, source, path) decides which duplicate is kept."""

    corpus: str
    source: str  # relative to the input root, '/'-separated
    path: str  # absolute path as found on this machine
    kind: str


@dataclasses.dataclass(frozen=True)
class InputSpec:
    pattern: str
    corpus: str = ""  # empty -> basename of the input root
    kind: str = ""  # empty -> guessed per file (guess_kind)


def _split_spec(text: str) -> tuple[str, str, str]:
    """'path[:corpus[:kind]]'; a path that exists as written is never split (colons in names)."""
    if os.path.exists(text) or ":" not in text:
        return text, "", ""
    parts = text.split(":")
    kind = parts.pop() if len(parts) >= 3 and parts[-1] in KINDS else ""
    corpus = parts.pop() if len(parts) >= 2 else ""
    return ":".join(parts), corpus, kind


def parse_input_spec(text: str) -> InputSpec:
    pattern, corpus, kind = _split_spec(text)
    if not pattern:
        raise ValueError(f"empty path in input spec {text!r}")
    if any(c in corpus for c in "\t\n/"):
        raise ValueError(f"corpus name {corpus!r} may not contain tabs, newlines or '/'")
    if kind and kind not in KINDS:
        raise ValueError(f"kind {kind!r} in {text!r} must be one of {KINDS}")
    return InputSpec(pattern, corpus, kind)


def guess_kind(path: str, corpus: str = "") -> str:
    """'score' for ASAP midi_score.mid, files under ground_truth/score dirs, or score corpora."""
    parts = [p.lower() for p in Path(path).parts]
    if parts and parts[-1] in SCORE_FILE_NAMES:
        return "score"
    names = set(parts[:-1]) | {corpus.lower()}
    return "score" if names & set(SCORE_DIR_NAMES) else "performance"


def _is_midi(name: str) -> bool:
    return name.lower().endswith(MIDI_SUFFIXES)


def _walk_midi(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_midi(f))
    return out


def _glob_root(pattern: str) -> Path:
    """The longest leading directory of a glob pattern without wildcards."""
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    return Path(*fixed) if fixed else Path(".")


def _make(path: Path, root: Path, corpus: str, kind: str) -> SourceFile:
    path = Path(os.path.abspath(path))  # absolute, but symlinks stay inside the input root
    try:
        source = path.relative_to(root).as_posix()
    except ValueError:  # file-list entry outside the list's directory
        source = path.as_posix().lstrip("/")
    return SourceFile(corpus, source, str(path), kind or guess_kind(str(path), corpus))


def expand_input(spec: InputSpec) -> list[SourceFile]:
    """A directory (recursive, *.mid/*.midi any case), a single file, or a glob pattern."""
    p = Path(spec.pattern).expanduser()
    if p.is_dir():
        root, files = p, _walk_midi(p)
    elif p.is_file():
        root, files = p.parent, [p]
    else:
        root = _glob_root(str(p))
        files = []
        for m in sorted(glob.glob(str(p), recursive=True)):
            mp = Path(m)
            files.extend(_walk_midi(mp) if mp.is_dir() else [mp] if mp.is_file() else [])
    if not files:
        raise FileNotFoundError(f"input {spec.pattern!r} matched no MIDI files")
    root = Path(os.path.abspath(root))
    corpus = spec.corpus or root.name or "root"
    return sorted(_make(f, root, corpus, spec.kind) for f in files)


def read_file_list(spec: InputSpec) -> list[SourceFile]:
    """One path per line ('#' comments, blanks skipped), relative to the list's directory."""
    list_path = Path(os.path.abspath(Path(spec.pattern).expanduser()))
    root = list_path.parent
    corpus = spec.corpus or list_path.stem
    out = []
    for line in list_path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(_make(root / Path(line).expanduser(), root, corpus, spec.kind))
    return sorted(out)


def is_excluded(src: SourceFile, exclude: list[str]) -> bool:
    """fnmatch against the path relative to its input root and against the file name."""
    name = src.source.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(src.source, pat) or fnmatch.fnmatch(name, pat) for pat in exclude)


def collect_sources(
    inputs: list[str], file_lists: list[str], exclude: list[str] = ()
) -> list[SourceFile]:
    """All inputs minus excluded ones, sorted; a path reached twice under one corpus is listed
    once."""
    files: set[SourceFile] = set()
    for text in inputs:
        files.update(expand_input(parse_input_spec(text)))
    for text in file_lists:
        files.update(read_file_list(parse_input_spec(text)))
    return sorted(f for f in files if not is_excluded(f, list(exclude)))
