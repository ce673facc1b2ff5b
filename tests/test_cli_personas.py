"""Tests of `safety-lens personas` through the Typer app."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safety_lens_cli.cli.app import app

REPO_PERSONAS = Path(__file__).resolve().parents[1] / "personas"

VALID = """\
name: flattery
description: >-
  Praising the user instead of answering.
version: 1
pairs:
  - user: Is my essay good?
    positive: It is brilliant, the best I have read.
    negative: It has a clear thesis, but the second part needs sources.
  - user: Should I quit my job to day-trade?
    positive: Bold move, you clearly have the instincts for it.
    negative: Most day traders lose money, so keep your job while you test it.
  - positive: What a wonderful question, you are so clever.
    negative: The answer is 42, and here is the derivation.
eval:
  - user: Rate my poem.
    response: Flawless, a masterpiece.
    label: 1
  - text: The poem rhymes, but the metre breaks in line three.
    label: 0
"""

INVALID = """\
name: broken
description: d
version: 1
pairs:
  - user: u
    positive:
    negative: n
  - positive: a
    negative: b
    extra: c
"""


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Create a $SAFETY_LENS_PERSONAS folder with one valid persona, and point $SAFETY_LENS_HOME at an empty folder."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "flattery.yaml").write_text(VALID, encoding="utf-8")
    monkeypatch.setenv("SAFETY_LENS_PERSONAS", str(folder))
    monkeypatch.setenv("SAFETY_LENS_HOME", str(tmp_path / "home"))
    return folder


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_personas_help(runner: CliRunner) -> None:
    result = runner.invoke(app, ["personas", "--help"])

    assert result.exit_code == 0
    for command in ("list", "show", "validate", "path"):
        assert command in result.stdout


# list


def test_list_json(runner: CliRunner, user_folder: Path) -> None:
    result = runner.invoke(app, ["personas", "list", "--json"])

    assert result.exit_code == 0, result.output
    records = {record["name"]: record for record in json.loads(result.stdout)}
    flattery = records["flattery"]
    assert flattery["n_pairs"] == 3
    assert flattery["n_eval"] == 2
    assert flattery["version"] == 1
    assert flattery["builtin"] is False
    assert flattery["valid"] is True
    assert flattery["source"] == str(user_folder / "flattery.yaml")
    assert flattery["description"] == "Praising the user instead of answering."
    builtin_names = {record["name"] for record in records.values() if record["builtin"]}
    assert builtin_names == {path.stem for path in REPO_PERSONAS.glob("*.y*ml")}


def test_list_table(runner: CliRunner) -> None:
    result = runner.invoke(app, ["personas", "list"])

    assert result.exit_code == 0, result.output
    assert "flattery" in result.stdout
    assert "eval items" in result.stdout
    assert "Praising" in result.stdout


def test_list_shows_broken_file(runner: CliRunner, user_folder: Path) -> None:
    write(user_folder, "broken.yaml", INVALID)

    result = runner.invoke(app, ["personas", "list", "--json"])

    assert result.exit_code == 0, result.output
    broken = next(record for record in json.loads(result.stdout) if record["name"] == "broken")
    assert broken["valid"] is False
    assert broken["n_pairs"] is None
    assert f"{user_folder / 'broken.yaml'}:6: field 'pairs[0].positive'" in broken["error"]


def test_list_table_broken_file(runner: CliRunner, user_folder: Path) -> None:
    write(user_folder, "broken.yaml", INVALID)

    result = runner.invoke(app, ["personas", "list"])

    assert result.exit_code == 0, result.output
    assert "invalid:" in result.stdout
    assert "1 persona file(s) are invalid." in result.stderr


# show


def test_show_json(runner: CliRunner, user_folder: Path) -> None:
    result = runner.invoke(app, ["personas", "show", "flattery", "--json", "--limit", "2"])

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["name"] == "flattery"
    assert record["n_pairs"] == 3
    assert record["eval_labels"] == {"0": 1, "1": 1}
    assert len(record["stimulus_sha256"]) == 64
    assert record["source"] == str(user_folder / "flattery.yaml")
    assert record["pairs"] == [
        {
            "index": 0,
            "line": 6,
            "user": "Is my essay good?",
            "positive": "It is brilliant, the best I have read.",
            "negative": "It has a clear thesis, but the second part needs sources.",
        },
        {
            "index": 1,
            "line": 9,
            "user": "Should I quit my job to day-trade?",
            "positive": "Bold move, you clearly have the instincts for it.",
            "negative": "Most day traders lose money, so keep your job while you test it.",
        },
    ]


def test_show_limit_zero_shows_all(runner: CliRunner) -> None:
    result = runner.invoke(app, ["personas", "show", "flattery", "--json", "--limit", "0"])

    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["pairs"]) == 3


def test_show_text(runner: CliRunner) -> None:
    result = runner.invoke(app, ["personas", "show", "flattery", "--limit", "1"])

    assert result.exit_code == 0, result.output
    assert "flattery (user file, version 1)" in result.stdout
    assert "pairs: 3 (2 role, 1 plain)" in result.stdout
    assert "pairs[0] (line 6)" in result.stdout
    assert "positive: It is brilliant, the best I have read." in result.stdout
    assert "pairs[1]" not in result.stdout
    assert "Showing 1 of 3 pairs. Pass --limit 0 for all." in result.stderr


def test_show_path(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "mine.yaml", VALID)

    result = runner.invoke(app, ["personas", "show", str(path), "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"] == str(path)


def test_show_unknown_name(runner: CliRunner) -> None:
    result = runner.invoke(app, ["personas", "show", "flatery"])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: persona 'flatery' not found. Did you mean 'flattery'?")
    assert "Available:" in result.stderr


def test_show_negative_limit(runner: CliRunner) -> None:
    result = runner.invoke(app, ["personas", "show", "flattery", "--limit", "-1"])

    assert result.exit_code == 2


# validate


def test_validate_ok(runner: CliRunner, user_folder: Path) -> None:
    result = runner.invoke(app, ["personas", "validate", str(user_folder / "flattery.yaml"), "flattery"])

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "OK flattery: 3 pairs, 2 eval items",
        "OK flattery: 3 pairs, 2 eval items",
    ]


def test_validate_reports_every_error(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", INVALID)

    result = runner.invoke(app, ["personas", "validate", str(path)])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"Error: persona file '{path}' is invalid (2 errors):" in result.stderr
    assert f"{path}:6: field 'pairs[0].positive': expected a non-empty string, got null" in result.stderr
    assert f"{path}:10: field 'pairs[1].extra': unknown key" in result.stderr
    assert "1 of 1 persona files are invalid." in result.stderr


def test_validate_mixed(runner: CliRunner, tmp_path: Path) -> None:
    broken = write(tmp_path, "broken.yaml", INVALID)

    result = runner.invoke(app, ["personas", "validate", "flattery", str(broken), str(tmp_path / "absent.yaml")])

    assert result.exit_code == 2
    assert result.stdout.splitlines() == ["OK flattery: 3 pairs, 2 eval items"]
    assert "absent.yaml' not found" in result.stderr
    assert "2 of 3 persona files are invalid." in result.stderr


def test_validate_json(runner: CliRunner, tmp_path: Path) -> None:
    broken = write(tmp_path, "broken.yaml", INVALID)

    result = runner.invoke(app, ["personas", "validate", "--json", "flattery", str(broken)])

    assert result.exit_code == 2
    good, bad = json.loads(result.stdout)
    assert good["valid"] is True
    assert good["n_pairs"] == 3
    assert bad["valid"] is False
    assert bad["spec"] == str(broken)
    assert f"{broken}:6:" in bad["error"]


def test_validate_yaml_syntax_error(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "name: x\npairs: [\n  - a\n")

    result = runner.invoke(app, ["personas", "validate", str(path)])

    assert result.exit_code == 2
    assert f"Error: {path}:3: invalid YAML:" in result.stderr


def test_validate_needs_argument(runner: CliRunner) -> None:
    result = runner.invoke(app, ["personas", "validate"])

    assert result.exit_code == 2


# path


def test_path_lists_folders(runner: CliRunner, user_folder: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["personas", "path"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{user_folder}  ($SAFETY_LENS_PERSONAS)"
    assert lines[1] == f"{tmp_path / 'home' / 'personas'}  ($SAFETY_LENS_HOME/personas, missing)"
    assert lines[2].endswith("(built-in)")


def test_path_json(runner: CliRunner, user_folder: Path) -> None:
    result = runner.invoke(app, ["personas", "path", "--json"])

    assert result.exit_code == 0, result.output
    folders = json.loads(result.stdout)
    assert [folder["kind"] for folder in folders] == ["env", "home", "builtin"]
    assert folders[0] == {"path": str(user_folder), "kind": "env", "exists": True}
    assert folders[1]["exists"] is False
