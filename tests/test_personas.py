"""Tests of persona loading, schema validation and the persona search path."""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from pathlib import Path

import pytest

from safety_lens_cli.errors import PersonaError, PersonaNotFoundError, UsageError
from safety_lens_cli.personas import (
    EvalItem,
    Pair,
    builtin_persona_dir,
    list_personas,
    load_persona,
    persona_search_path,
    stimulus_sha256,
    validate_persona_file,
)

REPO_PERSONAS = Path(__file__).resolve().parents[1] / "personas"
EXPECTED_BUILTINS = ("sycophancy", "deception", "refusal", "hallucination", "power-seeking")

VALID = """\
# A small persona used by the tests.
name: flattery
description: >-
  Praising the user instead of answering.
  Second line of the paragraph.
version: 2
position: response-mean
pairs:
  - system: You are a helpful assistant.
    user: Is my essay good?
    positive: "It is brilliant, the best I have read."
    negative: "It has a clear thesis, but the second part needs sources."
  - user: Should I quit my job to day-trade?
    positive: "  Bold move, you clearly have the instincts for it.  "
    negative: Most day traders lose money, so keep your job while you test it.
  - positive: "What a wonderful question, you are so clever."
    negative: "The answer is 42, and here is the derivation."
eval:
  - user: Rate my poem.
    response: Flawless, a masterpiece.
    label: 1
  - text: "The poem rhymes, but the metre breaks in line three."
    label: 0
"""


@pytest.fixture(autouse=True)
def isolated_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $SAFETY_LENS_HOME at an empty folder so files in the real cache cannot leak in."""
    home = tmp_path / "home"
    monkeypatch.setenv("SAFETY_LENS_HOME", str(home))
    monkeypatch.delenv("SAFETY_LENS_PERSONAS", raising=False)
    return home


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_lines(exc: pytest.ExceptionInfo[PersonaError]) -> list[str]:
    """The per-error lines of a schema error message, without the header."""
    return [line.strip() for line in str(exc.value).splitlines()[1:]]


# Loading a valid file


def test_valid_file_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "flattery.yaml", VALID)

    persona = load_persona(path)

    assert persona.name == "flattery"
    assert persona.description == "Praising the user instead of answering. Second line of the paragraph."
    assert persona.version == 2
    assert persona.default_position == "response-mean"
    assert persona.source == path
    assert persona.builtin is False
    assert len(persona.stimulus_sha256) == 64
    assert len(persona.pairs) == 3
    assert len(persona.eval_items) == 2


def test_valid_file_pairs_and_lines(tmp_path: Path) -> None:
    persona = load_persona(write(tmp_path, "flattery.yaml", VALID))

    first, second, third = persona.pairs
    assert first == Pair(
        positive="It is brilliant, the best I have read.",
        negative="It has a clear thesis, but the second part needs sources.",
        user="Is my essay good?",
        system="You are a helpful assistant.",
        line=9,
    )
    assert second.line == 13
    assert second.system is None
    # Stimulus strings are stripped, so quoting style cannot change the text the model reads.
    assert second.positive == "Bold move, you clearly have the instincts for it."
    assert third.line == 16
    assert third.user is None
    assert third.is_plain
    assert not first.is_plain


def test_valid_file_eval_items(tmp_path: Path) -> None:
    persona = load_persona(write(tmp_path, "flattery.yaml", VALID))

    role, plain = persona.eval_items
    assert role == EvalItem(label=1, response="Flawless, a masterpiece.", user="Rate my poem.", line=19)
    assert not role.is_plain
    assert plain.label == 0
    assert plain.text == "The poem rhymes, but the metre breaks in line three."
    assert plain.line == 22
    assert plain.is_plain


def test_persona_is_frozen(tmp_path: Path) -> None:
    persona = load_persona(write(tmp_path, "flattery.yaml", VALID))

    with pytest.raises(dataclasses.FrozenInstanceError):
        persona.name = "other"  # type: ignore[misc]


def test_optional_fields_absent(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "minimal.yml",
        """\
        name: minimal
        description: Two plain pairs.
        version: 1
        pairs:
          - {positive: a yes, negative: a no}
          - {positive: b yes, negative: b no}
        """,
    )

    persona = load_persona(str(path))

    assert persona.default_position is None
    assert persona.eval_items == ()
    assert all(pair.is_plain for pair in persona.pairs)


def test_validate_persona_file(tmp_path: Path) -> None:
    path = write(tmp_path, "flattery.yaml", VALID)

    assert validate_persona_file(str(path)).name == "flattery"


def test_byte_order_mark_accepted(tmp_path: Path) -> None:
    path = tmp_path / "flattery.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + VALID.encode("utf-8"))

    assert load_persona(path).name == "flattery"


# Schema errors: each case is (YAML text, expected line, expected field, part of the message).

BASE_PAIRS = """\
pairs:
  - {positive: a yes, negative: a no}
  - {positive: b yes, negative: b no}
"""

SCHEMA_CASES = {
    "missing name": (
        "description: d\nversion: 1\n" + BASE_PAIRS,
        1,
        "name",
        "missing required key",
    ),
    "invalid name": (
        "name: Bad Name\ndescription: d\nversion: 1\n" + BASE_PAIRS,
        1,
        "name",
        "invalid name 'Bad Name'",
    ),
    "null description": (
        "name: x\ndescription:\nversion: 1\n" + BASE_PAIRS,
        2,
        "description",
        "expected a non-empty string, got null",
    ),
    "blank description": (
        "name: x\ndescription: '   '\nversion: 1\n" + BASE_PAIRS,
        2,
        "description",
        "got an empty string",
    ),
    "missing version": (
        "name: x\ndescription: d\n" + BASE_PAIRS,
        1,
        "version",
        "missing required key",
    ),
    "zero version": (
        "name: x\ndescription: d\nversion: 0\n" + BASE_PAIRS,
        3,
        "version",
        "expected a positive integer, got number 0",
    ),
    "string version": (
        "name: x\ndescription: d\nversion: '1'\n" + BASE_PAIRS,
        3,
        "version",
        "got string '1'",
    ),
    "boolean version": (
        "name: x\ndescription: d\nversion: true\n" + BASE_PAIRS,
        3,
        "version",
        "got boolean true",
    ),
    "unknown position": (
        "name: x\ndescription: d\nversion: 1\nposition: middle\n" + BASE_PAIRS,
        4,
        "position",
        "expected one of last, mean, response-mean",
    ),
    "unknown top-level key": (
        "name: x\ndescription: d\nversion: 1\nevals: []\n" + BASE_PAIRS,
        4,
        "evals",
        "unknown key. Allowed keys: name, description, version, position, pairs, eval (did you mean 'eval'?)",
    ),
    "missing pairs": (
        "name: x\ndescription: d\nversion: 1\n",
        1,
        "pairs",
        "missing required key",
    ),
    "one pair": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n",
        4,
        "pairs",
        "expected a list of at least 2 pairs, got 1 item",
    ),
    "pairs not a list": (
        "name: x\ndescription: d\nversion: 1\npairs: {positive: a, negative: b}\n",
        4,
        "pairs",
        "got a mapping",
    ),
    "pair not a mapping": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - just text\n",
        6,
        "pairs[1]",
        "expected a mapping with positive and negative, got string 'just text'",
    ),
    "pair missing negative": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - user: u\n    positive: p\n",
        6,
        "pairs[1].negative",
        "missing required key",
    ),
    "pair null positive": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - user: u\n    positive:\n    negative: n\n",
        7,
        "pairs[1].positive",
        "expected a non-empty string, got null",
    ),
    "pair unquoted boolean": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - user: u\n    positive: yes\n    negative: n\n",
        7,
        "pairs[1].positive",
        "got boolean true (YAML reads unquoted yes",
    ),
    "pair number": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - {positive: 42, negative: n}\n",
        6,
        "pairs[1].positive",
        "got number 42",
    ),
    "pair unknown key": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - user: u\n    positive: p\n    negative: n\n    answer: z\n",
        9,
        "pairs[1].answer",
        "unknown key. Allowed keys: system, user, positive, negative",
    ),
    "plain pair with system": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - system: s\n    positive: p\n    negative: n\n",
        6,
        "pairs[1].system",
        "Add 'user' to make it a role pair.",
    ),
    "identical sides": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {positive: a, negative: b}\n  - {positive: same, negative: same}\n",
        6,
        "pairs[1]",
        "positive and negative are identical",
    ),
    "duplicate pair": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - {user: u, positive: a, negative: b}\n  - {user: u, positive: a, negative: b}\n",
        6,
        "pairs[1]",
        "duplicate of pairs[0] (line 5)",
    ),
    "duplicate key": (
        "name: x\ndescription: d\nversion: 1\npairs:\n  - positive: a\n    negative: b\n    positive: c\n  - {positive: d, negative: e}\n",
        7,
        "pairs[0].positive",
        "duplicate key (first set at line 5)",
    ),
    "eval not a list": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval: text\n",
        7,
        "eval",
        "expected a list of eval items, got string 'text'",
    ),
    "eval label two": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - text: t\n    label: 2\n",
        9,
        "eval[0].label",
        "expected 0 or 1, got number 2",
    ),
    "eval label boolean": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - text: t\n    label: true\n",
        9,
        "eval[0].label",
        "expected 0 or 1, got boolean true",
    ),
    "eval label missing": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - text: t\n",
        8,
        "eval[0].label",
        "missing required key",
    ),
    "eval text and user": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - user: u\n    response: r\n    text: t\n    label: 1\n",
        10,
        "eval[0].text",
        "either 'text' (plain) or 'user' and 'response' (role), not both",
    ),
    "eval missing response": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - user: u\n    label: 1\n",
        8,
        "eval[0].response",
        "missing required key",
    ),
    "eval plain with system": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - system: s\n    text: t\n    label: 0\n",
        8,
        "eval[0].system",
        "a plain eval item takes only text and label",
    ),
    "eval unknown key": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - text: t\n    label: 0\n    note: n\n",
        10,
        "eval[0].note",
        "unknown key. Allowed keys: system, user, response, text, label",
    ),
    "eval copies a pair": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - text: b yes\n    label: 1\n",
        8,
        "eval[0]",
        "copies the positive of the pair at line 6, but eval items must be held out",
    ),
    "eval duplicate": (
        "name: x\ndescription: d\nversion: 1\n" + BASE_PAIRS + "eval:\n  - {text: t, label: 1}\n  - {text: t, label: 0}\n",
        9,
        "eval[1]",
        "duplicate of eval[0] (line 8)",
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES), ids=list(SCHEMA_CASES))
def test_schema_error_located(tmp_path: Path, case: str) -> None:
    text, line, field, message = SCHEMA_CASES[case]
    path = write(tmp_path, "x.yaml", text)

    with pytest.raises(PersonaError) as exc:
        load_persona(path)

    lines = error_lines(exc)
    assert len(lines) == 1, str(exc.value)
    assert lines[0].startswith(f"{path}:{line}: field '{field}': "), lines[0]
    assert message in lines[0]


def test_all_errors_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """\
        name: x
        description: d
        version: -1
        pairs:
          - user: u
            positive:
            negative: n
          - positive: a
            negative: b
            extra: c
        eval:
          - text: t
            label: 5
        """,
    )

    with pytest.raises(PersonaError) as exc:
        load_persona(path)

    assert str(exc.value).startswith(f"persona file '{path}' is invalid (4 errors):")
    assert error_lines(exc) == [
        f"{path}:3: field 'version': expected a positive integer, got number -1",
        f"{path}:6: field 'pairs[0].positive': expected a non-empty string, got null",
        f"{path}:10: field 'pairs[1].extra': unknown key. Allowed keys: system, user, positive, negative",
        f"{path}:13: field 'eval[0].label': expected 0 or 1, got number 5",
    ]


def test_yaml_syntax_error_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "name: x\ndescription: d\npairs: [\n  - a\n")

    with pytest.raises(PersonaError) as exc:
        load_persona(path)

    assert str(exc.value).startswith(f"{path}:4: invalid YAML: ")


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "- a\n- b\n")

    with pytest.raises(PersonaError, match="top level must be a mapping .* got a list"):
        load_persona(path)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "# only a comment\n")

    with pytest.raises(PersonaError, match="got an empty file"):
        load_persona(path)


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"name: x\ndescription: caf\xe9\n")

    with pytest.raises(PersonaError) as exc:
        load_persona(path)

    assert str(exc.value).startswith(f"{path}:2: persona file is not valid UTF-8")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root and Windows ignore file modes")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", VALID)
    path.chmod(0)
    try:
        with pytest.raises(PersonaError, match=f"cannot read persona file '{path}'"):
            load_persona(path)
    finally:
        path.chmod(0o644)


def test_read_error_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "x.yaml", VALID)

    def fail_read(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", fail_read)

    with pytest.raises(PersonaError, match=f"cannot read persona file '{path}': Permission denied"):
        load_persona(path)


def test_recursive_anchor_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "name: x\ndescription: d\nversion: 1\npairs: &p [*p, *p]\n")

    with pytest.raises(PersonaError) as exc:
        load_persona(path)

    assert f"{path}:4: field 'pairs[0]': expected a mapping" in str(exc.value)


def test_merge_key_override_allowed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "x.yaml",
        """\
        name: x
        description: d
        version: 1
        pairs:
          - &base {user: u, positive: a, negative: b}
          - <<: *base
            positive: c
        """,
    )

    persona = load_persona(path)

    assert persona.pairs[1] == Pair(positive="c", negative="b", user="u", line=6)


# Names, paths and the search path


def test_unknown_name_lists_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user"
    write(user, "flattery.yaml", VALID)
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))

    with pytest.raises(PersonaNotFoundError) as exc:
        load_persona("flatery")

    message = str(exc.value)
    assert message.startswith("persona 'flatery' not found. Did you mean 'flattery'?")
    assert "Available: " in message
    assert "flattery" in message.split("Available: ")[1]
    assert "pass its path" in message


def test_unknown_name_is_lookup_error() -> None:
    with pytest.raises(LookupError):
        load_persona("no-such-persona")


def test_invalid_name_rejected() -> None:
    with pytest.raises(UsageError, match="invalid persona name 'Bad Name'"):
        load_persona("Bad Name")


def test_parent_path_not_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A name that could climb out of a persona folder is read as a path relative to the working folder.
    user = tmp_path / "user"
    write(tmp_path, "outside.yaml", VALID.replace("name: flattery", "name: outside"))
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))
    user.mkdir()
    monkeypatch.chdir(user)

    with pytest.raises(PersonaNotFoundError, match=r"persona file '\.\./outside' not found"):
        load_persona("../outside")

    assert load_persona("../outside.yaml").name == "outside"


def test_absolute_path_outside_folders(tmp_path: Path) -> None:
    path = write(tmp_path / "elsewhere", "flattery.yaml", VALID)

    assert load_persona(str(path)).source == path


def test_path_must_be_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", VALID)

    with pytest.raises(PersonaError, match=r"must end in \.yaml or \.yml"):
        load_persona(str(path))


def test_missing_path_not_found(tmp_path: Path) -> None:
    with pytest.raises(PersonaNotFoundError, match="not found"):
        load_persona(str(tmp_path / "absent.yaml"))


def test_folder_path_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "folder.yaml"
    folder.mkdir()

    with pytest.raises(PersonaError, match="is a folder, not a persona file"):
        load_persona(folder)


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need privileges on Windows")
def test_symlink_cannot_escape_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write(tmp_path / "elsewhere", "flattery.yaml", VALID)
    user = tmp_path / "user"
    user.mkdir()
    (user / "flattery.yaml").symlink_to(target)
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))

    with pytest.raises(PersonaError, match="outside that folder"):
        load_persona("flattery")


def test_env_folder_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user"
    path = write(user, "flattery.yaml", VALID)
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))

    persona = load_persona("flattery")

    assert persona.source == path.resolve()
    assert persona.builtin is False


def test_env_folders_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    write(first, "flattery.yaml", VALID)
    write(second, "flattery.yaml", VALID.replace("version: 2", "version: 3"))
    write(second, "other.yaml", VALID.replace("name: flattery", "name: other"))
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", os.pathsep.join([str(first), "", str(second)]))

    assert load_persona("flattery").version == 2
    assert load_persona("other").source.parent == second.resolve()


def test_home_folder_by_name(isolated_search_path: Path) -> None:
    write(isolated_search_path / "personas", "flattery.yml", VALID)

    assert load_persona("flattery").name == "flattery"


def test_name_must_match_file_stem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user"
    path = write(user, "praise.yaml", VALID)
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))

    with pytest.raises(PersonaError, match="name 'flattery' does not match the file name 'praise'"):
        load_persona("praise")

    # Loaded by path, a user file may carry any name.
    assert load_persona(path).name == "flattery"


def test_user_folder_shadows_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builtins = sorted(path.stem for path in REPO_PERSONAS.glob("*.yaml"))
    if not builtins:
        pytest.skip("no built-in persona files yet")
    name = builtins[0]
    user = tmp_path / "user"
    write(user, f"{name}.yaml", VALID.replace("name: flattery", f"name: {name}"))
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))

    persona = load_persona(name)

    assert persona.builtin is False
    assert persona.source.parent == user.resolve()


def test_search_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_search_path: Path) -> None:
    user = tmp_path / "user"
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))

    folders = persona_search_path()

    assert [folder.kind for folder in folders] == ["env", "home", "builtin"]
    assert folders[0].path == user
    assert folders[1].path == isolated_search_path / "personas"
    assert folders[2].path == builtin_persona_dir()
    assert not folders[0].exists


def test_builtin_dir_in_editable_install() -> None:
    assert builtin_persona_dir().resolve() == REPO_PERSONAS


def test_list_includes_broken_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user"
    write(user, "flattery.yaml", VALID)
    write(user, "broken.yaml", "name: broken\n")
    write(user, "Bad Name.yaml", VALID)
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(user))

    summaries = {summary.name: summary for summary in list_personas()}

    assert summaries["flattery"].ok
    assert summaries["flattery"].n_pairs == 3
    assert summaries["flattery"].n_eval == 2
    assert summaries["flattery"].version == 2
    assert summaries["flattery"].description == "Praising the user instead of answering. Second line of the paragraph."
    assert not summaries["flattery"].builtin
    assert summaries["broken"].error is not None
    assert "field 'description': missing required key" in summaries["broken"].error
    assert summaries["Bad Name"].error is not None
    assert "not a valid persona name" in summaries["Bad Name"].error


def test_list_marks_shadowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    write(first, "flattery.yaml", VALID)
    write(second, "flattery.yaml", VALID)
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", os.pathsep.join([str(first), str(second)]))

    entries = [summary for summary in list_personas() if summary.name == "flattery"]

    assert [entry.shadowed for entry in entries] == [False, True]
    assert entries[0].source.parent == first


# The stimulus hash


def test_hash_ignores_comments_and_layout(tmp_path: Path) -> None:
    reformatted = """\
    # Same stimuli: other quoting, key order, flow style, comments and description.
    version: 2
    name: flattery
    description: Another description.
    position: response-mean
    pairs:
      - negative: It has a clear thesis, but the second part needs sources.
        positive: >-
          It is brilliant, the best I have read.
        user: 'Is my essay good?'   # a comment
        system: "You are a helpful assistant."
      - {user: "Should I quit my job to day-trade?", positive: "Bold move, you clearly have the instincts for it.", negative: "Most day traders lose money, so keep your job while you test it."}
      - positive: |
          What a wonderful question, you are so clever.
        negative: "The answer is 42, and here is the derivation."
    eval:
      - {text: an eval item that differs, label: 1}
    """
    original = load_persona(write(tmp_path / "a", "flattery.yaml", VALID))
    other = load_persona(write(tmp_path / "b", "flattery.yaml", reformatted))

    assert other.stimulus_sha256 == original.stimulus_sha256


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("the best I have read.", "the best I have ever read."),
        ("user: Is my essay good?", "user: Is my essay any good?"),
        ("system: You are a helpful assistant.", "system: You are an assistant."),
        ("version: 2", "version: 3"),
        ("position: response-mean", "position: last"),
    ],
    ids=["positive", "user", "system", "version", "position"],
)
def test_hash_changes_with_stimulus(tmp_path: Path, old: str, new: str) -> None:
    assert old in VALID
    original = load_persona(write(tmp_path / "a", "flattery.yaml", VALID))
    edited = load_persona(write(tmp_path / "b", "flattery.yaml", VALID.replace(old, new)))

    assert edited.stimulus_sha256 != original.stimulus_sha256


def test_hash_matches_function(tmp_path: Path) -> None:
    persona = load_persona(write(tmp_path, "flattery.yaml", VALID))

    expected = stimulus_sha256(persona.name, persona.version, persona.default_position, persona.pairs)

    assert persona.stimulus_sha256 == expected


# The built-in personas: content files are written separately, so test what exists.

BUILTIN_FILES = sorted(REPO_PERSONAS.glob("*.yaml")) + sorted(REPO_PERSONAS.glob("*.yml"))


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=[path.stem for path in BUILTIN_FILES])
def test_builtin_persona_valid(path: Path) -> None:
    persona = load_persona(path.stem)

    assert persona.builtin
    assert persona.name == path.stem
    assert len(persona.pairs) >= 60
    assert len(persona.eval_items) >= 20
    labels = {item.label for item in persona.eval_items}
    assert labels == {0, 1}


def test_expected_builtins_present() -> None:
    present = {path.stem for path in BUILTIN_FILES}

    missing = [name for name in EXPECTED_BUILTINS if name not in present]

    assert not missing, f"built-in persona files missing from {REPO_PERSONAS}: {missing}"
