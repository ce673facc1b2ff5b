"""Find and load persona stimulus sets by name or by path.

A name is looked up in the persona search path: each folder of
`$SAFETY_LENS_PERSONAS` (separated by `os.pathsep`), then
`$SAFETY_LENS_HOME/personas` (default `~/.cache/safety-lens/personas`), then
the built-in folder. The first `NAME.yaml` or `NAME.yml` found wins, so a user
file can replace a built-in persona of the same name. The schema itself is
checked in `persona_schema`.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safety_lens_cli.errors import PersonaError, PersonaNotFoundError, UsageError
from safety_lens_cli.persona_schema import (
    NAME_PATTERN,
    POSITIONS,
    EvalItem,
    Pair,
    Persona,
    Position,
    SchemaIssue,
    parse_persona,
    stimulus_sha256,
)

__all__ = [
    "ENV_HOME",
    "ENV_PERSONAS",
    "NAME_PATTERN",
    "POSITIONS",
    "EvalItem",
    "Pair",
    "Persona",
    "PersonaFolder",
    "PersonaSummary",
    "Position",
    "SchemaIssue",
    "available_persona_names",
    "builtin_persona_dir",
    "list_personas",
    "load_persona",
    "persona_search_path",
    "stimulus_sha256",
    "validate_persona_file",
]

logger = logging.getLogger(__name__)

ENV_PERSONAS = "SAFETY_LENS_PERSONAS"
ENV_HOME = "SAFETY_LENS_HOME"
DEFAULT_HOME = "~/.cache/safety-lens"
YAML_SUFFIXES = (".yaml", ".yml")

FolderKind = Literal["env", "home", "builtin"]


@dataclass(frozen=True)
class PersonaFolder:
    """One folder of the persona search path and where its entry came from."""

    path: Path
    kind: FolderKind

    @property
    def exists(self) -> bool:
        return self.path.is_dir()


@dataclass(frozen=True)
class PersonaSummary:
    """One persona file found in the search path, loaded or with the error that stopped it."""

    name: str  # the file stem, which is the name it is looked up by
    source: Path
    builtin: bool
    n_pairs: int = 0
    n_eval: int = 0
    version: int | None = None
    description: str = ""  # first line only
    error: str | None = None
    shadowed: bool = False  # an earlier folder of the search path has a file of the same name

    @property
    def ok(self) -> bool:
        return self.error is None


def builtin_persona_dir() -> Path:
    """Return the folder of the built-in persona files.

    An installed wheel carries them next to this module, because hatch
    force-includes the top-level `personas/` there. An editable install has no
    such copy, so the repository's top-level folder is used.
    """
    packaged = Path(__file__).parent / "personas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "personas"


def persona_search_path() -> list[PersonaFolder]:
    """Return the folders searched for persona names in lookup order, including folders that do not exist."""
    folders: list[PersonaFolder] = []
    for entry in os.environ.get(ENV_PERSONAS, "").split(os.pathsep):
        if entry.strip():
            folders.append(PersonaFolder(Path(entry).expanduser(), "env"))
    home = Path(os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()
    folders.append(PersonaFolder(home / "personas", "home"))
    folders.append(PersonaFolder(builtin_persona_dir(), "builtin"))

    # The same folder twice (say, $SAFETY_LENS_PERSONAS naming the built-in one) is searched once.
    unique: list[PersonaFolder] = []
    seen: set[Path] = set()
    for folder in folders:
        key = folder.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(folder)
    return unique


def _is_builtin_file(path: Path) -> bool:
    return path.resolve().parent == builtin_persona_dir().resolve()


def _looks_like_path(spec: str) -> bool:
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (
        any(sep in spec for sep in separators)
        or ".." in spec
        or spec.startswith("~")
        or spec.lower().endswith(YAML_SUFFIXES)
    )


def load_persona(spec: str | Path) -> Persona:
    """Load a persona from a name in the search path or from a path to a `.yaml`/`.yml` file.

    A string with a path separator, `..`, a leading `~` or a YAML suffix is a
    path. Any other string must be a valid persona name.

    Raises `PersonaNotFoundError` when no file matches and `PersonaError` when
    the file is invalid. Raises `UsageError` for a string that is neither.
    """
    if isinstance(spec, Path):
        return _load_file(spec.expanduser())
    if _looks_like_path(spec):
        return _load_file(Path(spec).expanduser())
    if not NAME_PATTERN.fullmatch(spec):
        raise UsageError(
            f"invalid persona name {spec!r}: names use 1-64 lowercase letters, digits, '-' or '_'. "
            "To load a file, pass its path ending in .yaml, e.g. ./my-trait.yaml."
        )

    found = _find_by_name(spec)
    if found is None:
        raise PersonaNotFoundError(_not_found_message(spec))
    path, folder = found
    logger.debug("persona %s found in %s folder %s", spec, folder.kind, folder.path)
    return _load_file(path, expected_name=spec)


def validate_persona_file(path: str | Path) -> Persona:
    """Load and validate the persona file at `path`. The `PersonaError` it raises lists every error."""
    return _load_file(Path(path).expanduser())


def _find_by_name(name: str) -> tuple[Path, PersonaFolder] | None:
    for folder in persona_search_path():
        if not folder.exists:
            continue
        root = folder.path.resolve()
        for suffix in YAML_SUFFIXES:
            candidate = folder.path / f"{name}{suffix}"
            if not candidate.is_file():
                continue
            resolved = candidate.resolve()
            # The name pattern already rules out `..` and separators, so this
            # check catches a symbolic link that points out of the folder.
            if not resolved.is_relative_to(root):
                raise PersonaError(
                    f"persona '{name}' in {folder.path} resolves to {resolved}, outside that folder. "
                    "Replace the link with the file, or pass the file's path instead of the name."
                )
            return resolved, folder
    return None


def available_persona_names() -> list[str]:
    """Return the sorted names of the persona files in the search path, without loading them."""
    names: set[str] = set()
    for folder in persona_search_path():
        for path in _yaml_files(folder):
            if NAME_PATTERN.fullmatch(path.stem):
                names.add(path.stem)
    return sorted(names)


def _not_found_message(name: str) -> str:
    names = available_persona_names()
    message = f"persona '{name}' not found."
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        message += f" Did you mean '{close[0]}'?"
    message += f" Available: {', '.join(names) if names else 'none'}."
    message += (
        " To use your own file, pass its path (e.g. --persona ./my-trait.yaml) or put NAME.yaml in "
        f"${ENV_PERSONAS} or $SAFETY_LENS_HOME/personas."
    )
    return message


def _yaml_files(folder: PersonaFolder) -> list[Path]:
    if not folder.exists:
        return []
    files = [
        path for path in folder.path.iterdir() if path.suffix.lower() in YAML_SUFFIXES and path.is_file()
    ]
    # `.yaml` sorts before `.yml`, matching the lookup order of `_find_by_name`.
    return sorted(files, key=lambda path: (path.stem, path.suffix != ".yaml", path.name))


def _load_file(path: Path, *, expected_name: str | None = None) -> Persona:
    if not path.exists():
        raise PersonaNotFoundError(
            f"persona file '{path}' not found. Pass the path of an existing .yaml file, "
            "or a persona name (`safety-lens personas list` shows them)."
        )
    if path.is_dir():
        raise PersonaError(f"'{path}' is a folder, not a persona file. Pass the path of a .yaml file in it.")
    if path.suffix.lower() not in YAML_SUFFIXES:
        raise PersonaError(f"persona file '{path}' must end in .yaml or .yml.")

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PersonaError(f"cannot read persona file '{path}': {exc.strerror or exc}.") from None
    try:
        # utf-8-sig drops a byte order mark that some editors write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PersonaError(
            f"{path}:{line}: persona file is not valid UTF-8 (byte offset {exc.start}). Save it as UTF-8."
        ) from None

    builtin = _is_builtin_file(path)
    if builtin and expected_name is None:
        # Built-ins are found by file name, so their `name` must equal the stem even when loaded by path.
        expected_name = path.stem
    return parse_persona(text, path, expected_name=expected_name, builtin=builtin)


def list_personas() -> list[PersonaSummary]:
    """Load every persona file in the search path into a summary, sorted by name.

    A file that fails to load is listed with its error. A file hidden by one of
    the same name in an earlier folder is listed with `shadowed=True`.
    """
    summaries: list[PersonaSummary] = []
    seen: set[str] = set()
    for folder in persona_search_path():
        for path in _yaml_files(folder):
            name = path.stem
            summaries.append(_summarize(path, name, shadowed=name in seen))
            seen.add(name)
    return sorted(summaries, key=lambda summary: (summary.name, summary.shadowed))


def _summarize(path: Path, name: str, *, shadowed: bool) -> PersonaSummary:
    builtin = _is_builtin_file(path)
    if not NAME_PATTERN.fullmatch(name):
        error = (
            f"file name {path.name!r} is not a valid persona name (1-64 lowercase letters, digits, "
            "'-' or '_'); rename the file to load it by name"
        )
        return PersonaSummary(name, path, builtin, error=error, shadowed=shadowed)
    try:
        persona = _load_file(path, expected_name=name)
    except PersonaError as exc:
        logger.debug("persona file %s is invalid: %s", path, exc)
        return PersonaSummary(name, path, builtin, error=str(exc), shadowed=shadowed)
    first_line = persona.description.splitlines()[0]
    return PersonaSummary(
        name=name,
        source=path,
        builtin=builtin,
        n_pairs=len(persona.pairs),
        n_eval=len(persona.eval_items),
        version=persona.version,
        description=first_line,
        shadowed=shadowed,
    )
