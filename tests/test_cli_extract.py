"""`safety-lens extract` and `inspect-layers --persona` on a tiny saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_extraction import write_persona
from test_models import save_tiny
from typer.testing import CliRunner

from safety_lens_cli.cli.app import app
from safety_lens_cli.extraction import choose_auto_layer

runner = CliRunner()


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "model", seed=0)


def test_extract_json_then_reuse(tiny_dir: Path, tmp_path: Path) -> None:
    persona = write_persona(tmp_path)
    args = ["extract", "--model", str(tiny_dir), "--persona", str(persona), "--layer", "0:2",
            "--registry", str(tmp_path / "reg"), "--json", "--device", "cpu"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert [v["layer"] for v in document["vectors"]] == [0, 1]
    assert {v["stored"] for v in document["vectors"]} == {"extracted"}
    assert "Extracting tiny" in first.stderr
    second = runner.invoke(app, args)
    again = json.loads(second.stdout)
    assert {v["stored"] for v in again["vectors"]} == {"reused"}
    assert [v["object_id"] for v in again["vectors"]] == [v["object_id"] for v in document["vectors"]]
    objects = sorted(p.stem for p in (tmp_path / "reg" / "objects").iterdir())
    assert objects == sorted(v["object_id"] for v in document["vectors"])


def test_extract_without_persona_lists_builtins(tiny_dir: Path) -> None:
    result = runner.invoke(app, ["extract", "--model", str(tiny_dir)])
    assert result.exit_code == 2
    assert "sycophancy" in result.stderr


def test_extract_rejects_bad_method(tiny_dir: Path, tmp_path: Path) -> None:
    persona = write_persona(tmp_path)
    result = runner.invoke(app, ["extract", "--model", str(tiny_dir), "--persona", str(persona), "--method", "svm"])
    assert result.exit_code == 2
    assert "'svm'" in result.stderr


def test_inspect_layers_persona_marks_auto(tiny_dir: Path, tmp_path: Path) -> None:
    persona = write_persona(tmp_path)
    result = runner.invoke(
        app, ["inspect-layers", "--model", str(tiny_dir), "--persona", str(persona), "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)["personas"]["tiny"]
    assert [row["layer"] for row in info["layers"]] == [0, 1, 2]
    qualities = {row["layer"]: row for row in info["layers"]}
    assert info["auto_layer"] == choose_auto_layer(qualities)
    for row in info["layers"]:
        assert row["random_cv_auroc"] is not None
    extracted = runner.invoke(
        app, ["extract", "--model", str(tiny_dir), "--persona", str(persona), "--registry", str(tmp_path / "r"),
              "--json", "--device", "cpu"]
    )
    assert json.loads(extracted.stdout)["vectors"][0]["layer"] == info["auto_layer"]
