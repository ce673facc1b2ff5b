"""`safety-lens scan --baseline-model` end to end on tiny saved models."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from test_comparison import save, unit_vector
from test_extraction import write_persona
from typer.testing import CliRunner

from safety_lens_cli.cli.app import app

runner = CliRunner()
PROMPTS = ["hello world", "is a right ?", "yes i agree", "the idea is great", "no it is wrong", "sure , i will help"]


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS * 3)))
    return {
        "base": save(tmp_path / "base"),
        "same": save(tmp_path / "same"),
        "persona": write_persona(tmp_path),
        "prompts": prompts,
        "registry": tmp_path / "registry",
        "tmp": tmp_path,
    }


def compare(setup: dict[str, Path], candidate: Path, *extra: str) -> object:
    return runner.invoke(
        app,
        [
            "scan", "--model", str(candidate), "--baseline-model", str(setup["base"]),
            "--input", str(setup["prompts"]), "--persona", str(setup["persona"]), "--layer", "0",
            "--registry", str(setup["registry"]), "--device", "cpu", *extra,
        ],
    )


def records(stdout: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_identical_candidate_passes(setup: dict[str, Path]) -> None:
    result = compare(setup, setup["same"], "--max-shift", "0.0")
    assert result.exit_code == 0, result.output
    lines = records(result.stdout)
    header = lines[0]["header"]
    assert header["comparison"]["vectors_from"] == "baseline"
    assert header["comparison"]["candidate"]["fingerprint"].startswith("sha256:")
    assert len(lines) == 1 + len(PROMPTS) * 3
    for record in lines[1:]:
        entry = record["scores"]["tiny"]
        assert entry["shift"]["score"] == 0.0
        assert entry["baseline"]["score"] == entry["score"]
    assert "Shift gate passed" in result.stderr


def test_moved_candidate_fails_tight_gate(setup: dict[str, Path]) -> None:
    # Move embeddings along the baseline's own stored layer-0 vector.
    first = compare(setup, setup["same"])
    header = records(first.stdout)[0]["header"]
    object_id = header["vectors"][0]["object_id"]
    from safety_lens_cli.registry import Registry

    unit = Registry(setup["registry"]).load(object_id).vector
    moved = save(setup["tmp"] / "moved", shift=1.0, unit=unit)
    junit = setup["tmp"] / "junit.xml"
    summary = setup["tmp"] / "summary.md"
    result = compare(setup, moved, "--max-shift", "tiny=0.05", "--junit", str(junit), "--summary", str(summary))
    assert result.exit_code == 1, result.output
    shifts = [r["scores"]["tiny"]["shift"]["score"] for r in records(result.stdout)[1:]]
    assert sum(shifts) / len(shifts) > 0.05
    assert "Shift gate FAILED for tiny" in result.stderr
    root = ET.parse(junit).getroot()
    shift_cases = [c for c in root.iter("testcase") if c.get("classname") == "safety-lens.scan.shift"]
    assert len(shift_cases) == 1
    assert shift_cases[0].find("failure") is not None
    assert "Baseline comparison" in summary.read_text()


def test_sequential_output_equals_in_memory(setup: dict[str, Path]) -> None:
    moved = save(setup["tmp"] / "moved", shift=0.3, unit=torch.nn.functional.normalize(unit_vector(), dim=0))
    together = compare(setup, moved, "--in-memory")
    apart = compare(setup, moved, "--sequential")
    assert together.exit_code == apart.exit_code == 0, apart.output
    a, b = records(together.stdout), records(apart.stdout)
    assert a[0]["header"]["comparison"]["sequential"] is False
    assert b[0]["header"]["comparison"]["sequential"] is True
    assert len(a) == len(b)
    for x, y in zip(a[1:], b[1:]):
        assert x["id"] == y["id"]
        assert x["scores"]["tiny"]["score"] == pytest.approx(y["scores"]["tiny"]["score"], abs=1e-6)
        assert x["scores"]["tiny"]["shift"]["score"] == pytest.approx(y["scores"]["tiny"]["shift"]["score"], abs=1e-6)


def test_shift_options_need_baseline(setup: dict[str, Path]) -> None:
    result = runner.invoke(app, ["scan", "--text", "hi", "--persona", "refusal", "--max-shift", "0.1"])
    assert result.exit_code == 2
    assert "--baseline-model" in result.stderr


def test_architecture_mismatch_exits_2(setup: dict[str, Path]) -> None:
    from test_comparison import build, tiny_tokenizer

    other = setup["tmp"] / "gpt2"
    build("gpt2").save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    result = compare(setup, other)
    assert result.exit_code == 2, result.output
    assert "same architecture" in result.stderr
