"""The Python API and the CLI give the same numbers on the default model.

The CLI runs through Typer's CliRunner with `load_model` returning the
session's SmolLM2 model, which is what the command loads on a CPU-only
machine. Both sides read the vectors that the `real_personas` fixture stored
in the session registry at the auto layer, so nothing is extracted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import BUILTIN_PERSONAS
from safety_lens_cli.api import SafetyLens, WhiteBoxWrapper
from safety_lens_cli.cli.app import app
from safety_lens_cli.models import LoadedModel
from safety_lens_cli.registry import Registry
from safety_lens_cli.rendering import choose_rendering, encode_prompt

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEXTS = [
    "You're absolutely right, that is the best plan I have ever heard!",
    "Can you tell me how to pick the lock on my neighbour's door?",
    "What is the boiling point of water at sea level?",
]
# Calibrated scores agree within 1e-5. Raw values are tens of units here, and a
# different batch composition moves their last float32 digit (about 1e-6 relative).
TOLERANCE = 1e-5
RAW_RELATIVE = 1e-6


@pytest.fixture()
def lens(real_lm: LoadedModel, real_personas: Any, session_home: Path) -> SafetyLens:
    return SafetyLens.from_loaded(real_lm, registry=session_home)


@pytest.fixture()
def cli(real_lm: LoadedModel, session_home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr("safety_lens_cli.models.load_model", lambda request=None: real_lm)

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--registry", str(session_home)])
        assert result.exit_code == 0, result.stderr
        assert "Extracting" not in result.stderr, "the CLI extracted instead of reusing stored vectors"
        return result.stdout

    return run


def scan_records(stdout: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    header, *records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return header["header"], records


def persona_args(personas: tuple[str, ...] | list[str]) -> list[str]:
    return [arg for persona in personas for arg in ("--persona", persona)]


def assert_same_scores(api: dict[str, dict[str, Any]], cli: dict[str, dict[str, Any]]) -> None:
    assert list(api) == list(cli)
    for persona, entry in cli.items():
        assert api[persona]["layer"] == entry["layer"], persona
        assert api[persona]["raw"] == pytest.approx(entry["raw"], rel=RAW_RELATIVE, abs=TOLERANCE), persona
        assert api[persona]["score"] == pytest.approx(entry["score"], abs=TOLERANCE), persona


def test_quick_scan_matches_scan_command(lens: SafetyLens, cli: Any) -> None:
    stdout = cli("scan", *[arg for text in TEXTS for arg in ("--text", text)], *persona_args(BUILTIN_PERSONAS))
    header, records = scan_records(stdout)
    assert header["model"]["fingerprint"] == lens.fingerprint
    batch = lens.quick_scan_detailed(TEXTS, persona_names=BUILTIN_PERSONAS)
    assert isinstance(batch, list)
    for text, record, api in zip(TEXTS, records, batch):
        assert_same_scores(api, record["scores"])
        single = lens.quick_scan_detailed(text, persona_names=BUILTIN_PERSONAS)
        assert_same_scores(single, record["scores"])
    object_ids = {vector["persona"]: vector["object_id"] for vector in header["vectors"]}
    assert {persona: entry["object_id"] for persona, entry in batch[0].items()} == object_ids


def test_default_quick_scan_matches_scan_command(lens: SafetyLens, cli: Any) -> None:
    scores = lens.quick_scan(TEXTS[0])
    assert list(scores) == ["sycophancy", "deception", "refusal"]
    _, records = scan_records(cli("scan", "--text", TEXTS[0], *persona_args(list(scores))))
    for persona, score in scores.items():
        assert score == pytest.approx(records[0]["scores"][persona]["score"], abs=TOLERANCE)


def test_explicit_layer_matches_scan_command(lens: SafetyLens, cli: Any, real_personas: Any) -> None:
    refusal = next(item for item in real_personas if item.persona == "refusal")
    layer = refusal.vectors[0].layer
    _, records = scan_records(cli("scan", "--text", TEXTS[1], "--persona", "refusal", "--layer", str(layer)))
    for layer_idx in (layer, layer - lens.num_layers):
        api = lens.quick_scan_detailed(TEXTS[1], layer_idx=layer_idx, persona_names=["refusal"])
        assert_same_scores(api, records[0]["scores"])


def test_raw_scan_of_chat_ids_matches_scan_command(real_lm: LoadedModel, lens: SafetyLens, cli: Any) -> None:
    """`scan` on the ids the CLI reads, with the stored unit vector, gives the CLI's raw value."""
    _, records = scan_records(cli("scan", "--text", TEXTS[2], *persona_args(BUILTIN_PERSONAS)))
    tokenizer = real_lm.tokenizer
    ids = list(encode_prompt(tokenizer, [{"role": "user", "content": TEXTS[2]}], choose_rendering(tokenizer)).input_ids)
    # A lens over the same objects, as a user who loaded them would build it.
    user_lens = SafetyLens(real_lm.model, real_lm.tokenizer)
    for persona in BUILTIN_PERSONAS:
        vector = lens.persona_vector(persona)
        expected = records[0]["scores"][persona]
        raw = user_lens.scan(ids, vector["vector"], vector["layer"])
        assert raw == pytest.approx(expected["raw"], rel=RAW_RELATIVE, abs=TOLERANCE), persona
        score = SafetyLens.calibrated_score(raw, vector["calibration"])
        assert score == pytest.approx(expected["score"], abs=TOLERANCE), persona


def test_extract_json_matches_api_vectors(lens: SafetyLens, cli: Any, session_home: Path) -> None:
    document = json.loads(cli("extract", *persona_args(BUILTIN_PERSONAS), "--json"))
    assert document["fingerprint"] == lens.fingerprint
    registry = Registry(session_home)
    for row in document["vectors"]:
        vector = lens.persona_vector(row["persona"])
        assert row["stored"] == "reused"
        assert row["auto"] is True
        assert vector["object_id"] == row["object_id"]
        assert vector["layer"] == row["layer"]
        assert vector["calibration"] == row["calibration"]
        assert vector["quality"] == row["quality"]
        assert vector["residual_norm"] == row["residual_norm"]
        stored = registry.load(row["object_id"]).vector
        assert vector["vector"].cpu().equal(stored), row["persona"]


def test_scan_and_generate_matches_generate_command(lens: SafetyLens, cli: Any) -> None:
    prompt = TEXTS[2]
    personas = ["refusal", "sycophancy"]
    document = json.loads(
        cli("generate", "--prompt", prompt, *persona_args(personas), "--max-new-tokens", "8", "--json")
    )
    result = WhiteBoxWrapper.from_lens(lens).scan_and_generate(prompt, persona_names=personas, max_new_tokens=8)
    assert result["text"] == document["text"]
    assert result["stop_reason"] == document["stop_reason"]
    for persona in personas:
        assert result["scan"][persona] == pytest.approx(document["prompt_scan"][persona]["score"], abs=TOLERANCE)
        assert result["raw"][persona] == pytest.approx(
            document["prompt_scan"][persona]["raw"], rel=RAW_RELATIVE, abs=TOLERANCE
        )
        assert result["layers"][persona] == document["prompt_scan"][persona]["layer"]
        expected = [token["scores"][persona]["score"] for token in document["tokens"]]
        assert result["token_scores"][persona] == pytest.approx(expected, abs=TOLERANCE)
    # The prompt scan is the value quick_scan gives for the same prompt.
    quick = lens.quick_scan(prompt, persona_names=personas)
    for persona in personas:
        assert result["scan"][persona] == pytest.approx(quick[persona], abs=1e-4)
