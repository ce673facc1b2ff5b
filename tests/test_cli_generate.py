"""`safety-lens generate` through Typer: options, JSON and JSON Lines output, report, terminal view."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from tiny_models import build, tiny_tokenizer
from typer.testing import CliRunner

import safety_lens_cli.cli.generate as generate_cli
import safety_lens_cli.models as models_module
import safety_lens_cli.vector_lookup as vector_lookup
from safety_lens_cli.cli.app import app
from safety_lens_cli.cli.generate import SteerSpec, parse_steer
from safety_lens_cli.cli.generate_view import FLAG_GLYPH, GenerationView, sparkline
from safety_lens_cli.errors import UsageError
from safety_lens_cli.models import LoadedModel, wrap_model
from safety_lens_cli.projection import Calibration, PersonaScore, PersonaVector
from safety_lens_cli.trajectory import GeneratedToken

runner = CliRunner()


def make_vector(persona: str, layer: int, seed: int) -> PersonaVector:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(16, generator=generator)
    return PersonaVector(
        persona=persona,
        layer=layer,
        unit=direction / direction.norm(),
        calibration=Calibration(pos_mean=0.5, pos_std=0.2, neg_mean=-0.5, neg_std=0.2),
        raw_norm=1.0,
        residual_norm=2.0,
        object_id=f"{persona}-object-id",
    )


VECTORS = {"refusal": make_vector("refusal", 1, 0), "sycophancy": make_vector("sycophancy", 2, 1)}


class FakeCore:
    """A tiny model and hand-made vectors behind `load_model` and `resolve_vectors`, recording the requests."""

    def __init__(self) -> None:
        self.lm = wrap_model(build("llama"), tiny_tokenizer())
        self.model_requests: list[Any] = []
        self.vector_requests: list[Any] = []

    def load_model(self, request: Any) -> LoadedModel:
        self.model_requests.append(request)
        return self.lm

    def resolve_vectors(self, lm: LoadedModel, request: Any, *, notify: Any = None) -> list[PersonaVector]:
        self.vector_requests.append(request)
        found = [VECTORS[name] for name in request.personas]
        layers = {int(layer) for layer in request.layers}
        return [v for v in found if not layers or v.layer in layers]


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    fake = FakeCore()
    monkeypatch.setattr(models_module, "load_model", fake.load_model)
    monkeypatch.setattr(vector_lookup, "resolve_vectors", fake.resolve_vectors)
    return fake


def run(*args: str) -> Any:
    return runner.invoke(app, ["generate", *args])


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Options.


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("refusal=4", SteerSpec("refusal", 4.0)),
        ("refusal=-2.5", SteerSpec("refusal", -2.5)),
        ("refusal@12=0.5", SteerSpec("refusal", 0.5, 12)),
        ("power-seeking@-1=1e-1", SteerSpec("power-seeking", 0.1, -1)),
    ],
)
def test_parse_steer_accepts(value: str, expected: SteerSpec) -> None:
    assert parse_steer(value) == expected


@pytest.mark.parametrize("value", ["refusal", "=2", "refusal=strong", "refusal@x=1", "refusal=nan", "refusal=inf"])
def test_parse_steer_rejects(value: str) -> None:
    with pytest.raises(UsageError, match="Invalid --steer"):
        parse_steer(value)


def test_prompt_or_input_required(core: FakeCore) -> None:
    result = run("--persona", "refusal")
    assert result.exit_code == 2
    assert "--prompt" in result.output
    assert core.model_requests == []


def test_prompt_and_input_exclusive(core: FakeCore, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a b"}\n')
    result = run("--prompt", "a b", "--input", str(path), "--persona", "refusal")
    assert result.exit_code == 2


def test_persona_required(core: FakeCore) -> None:
    result = run("--prompt", "a b")
    assert result.exit_code == 2
    assert "No persona" in result.output


def test_invalid_steer_positions(core: FakeCore) -> None:
    result = run("--prompt", "a b", "--persona", "refusal", "--steer-positions", "middle")
    assert result.exit_code == 2
    assert "--steer-positions" in result.output


def test_invalid_top_p(core: FakeCore) -> None:
    result = run("--prompt", "a b", "--persona", "refusal", "--temperature", "1", "--top-p", "0")
    assert result.exit_code == 2
    assert "--top-p" in result.output


# JSON output.


def test_json_document_schema(core: FakeCore) -> None:
    result = run("--prompt", "hello world", "--persona", "refusal", "--persona", "sycophancy", "-n", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)

    assert isinstance(document["text"], str)
    assert set(document["prompt_scan"]) == {"refusal", "sycophancy"}
    assert set(document["prompt_scan"]["refusal"]) == {"raw", "score", "layer"}
    assert len(document["tokens"]) == 4
    first = document["tokens"][0]
    assert set(first) >= {"token", "id", "scores"}
    assert set(first["scores"]["sycophancy"]) == {"raw", "score"}
    assert document["model"]["fingerprint"] == core.lm.fingerprint
    assert document["vectors"] == [
        {"key": "refusal", "persona": "refusal", "layer": 1, "object_id": "refusal-object-id"},
        {"key": "sycophancy", "persona": "sycophancy", "layer": 2, "object_id": "sycophancy-object-id"},
    ]
    assert document["steering"] == []
    assert document["sampling"] == {"temperature": 0.0, "top_p": 1.0, "seed": None, "max_new_tokens": 4}
    assert core.model_requests[0].device == "cpu"


def test_vector_request_carries_options(core: FakeCore, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    result = run(
        "--prompt", "a b", "--persona", "refusal", "--layer", "1", "--registry", str(registry), "--no-extract", "-n", "2"
    )
    assert result.exit_code == 0, result.output
    request = core.vector_requests[0]
    assert request.personas == ("refusal",)
    assert request.layers == ("1",)
    assert request.registry == registry
    assert request.extract_missing is False


def test_steer_is_recorded_and_scaled(core: FakeCore) -> None:
    result = run("--prompt", "a b", "--persona", "sycophancy", "--steer", "refusal=0.75", "-n", "3")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["steering"] == [
        {
            "persona": "refusal",
            "coefficient": 0.75,
            "layer": 1,
            "scale": 1.5,
            "residual_norm": 2.0,
            "object_id": "refusal-object-id",
            "positions": "response",
        }
    ]
    # The steering persona is looked up on its own because only sycophancy is scored.
    assert [r.personas for r in core.vector_requests] == [("sycophancy",), ("refusal",)]


def test_steer_alone_scores_steered_persona(core: FakeCore) -> None:
    result = run("--prompt", "a b", "--steer", "refusal=1", "-n", "2")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [v["persona"] for v in document["vectors"]] == ["refusal"]
    assert len(core.vector_requests) == 1


def test_steer_layer_must_have_vector(core: FakeCore) -> None:
    result = run("--prompt", "a b", "--persona", "refusal", "--steer", "refusal@2=1")
    assert result.exit_code == 2
    assert "refusal@LAYER" in result.output


def test_zero_coefficient_matches_unsteered(core: FakeCore) -> None:
    plain = json.loads(run("--prompt", "hello world", "--persona", "refusal", "-n", "6").stdout)
    zero_args = ["--steer", "refusal=0", "--steer-positions", "all"]
    zero = json.loads(run("--prompt", "hello world", "--persona", "refusal", *zero_args, "-n", "6").stdout)
    assert zero["tokens"] == plain["tokens"]
    assert zero["prompt_scan"] == plain["prompt_scan"]


def test_output_file_leaves_stdout_empty(core: FakeCore, tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    result = run("--prompt", "a b", "--persona", "refusal", "-n", "2", "--output", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert len(json.loads(target.read_text())["tokens"]) == 2


def test_sampling_seed_recorded(core: FakeCore) -> None:
    args = ["--prompt", "a b", "--persona", "refusal", "-n", "5", "--temperature", "1.2", "--seed", "7"]
    first = json.loads(run(*args).stdout)
    again = json.loads(run(*args).stdout)
    assert first["sampling"]["seed"] == 7
    assert [t["id"] for t in first["tokens"]] == [t["id"] for t in again["tokens"]]


# --input.


def test_input_lines_match_single_prompts(core: FakeCore, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": "short", "prompt": "a b"}\n'
        '{"id": "long", "messages": [{"role": "user", "content": "hello world you agree ?"}]}\n'
        '{"id": "third", "text": "yes no"}\n'
    )
    result = run("--input", str(path), "--persona", "refusal", "-n", "5", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert [r["id"] for r in records] == ["short", "long", "third"]

    for record, prompt in zip(records, ["a b", "hello world you agree ?", "yes no"]):
        alone = json.loads(run("--prompt", prompt, "--persona", "refusal", "-n", "5").stdout)
        assert [t["id"] for t in record["tokens"]] == [t["id"] for t in alone["tokens"]]


def test_input_bad_line_recorded(core: FakeCore, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a b"}\nnot json\n{"prompt": "yes"}\n')
    result = run("--input", str(path), "--persona", "refusal", "-n", "2")
    assert result.exit_code == 2
    records = json_lines(result.stdout)
    assert len(records) == 3
    assert records[1]["line"] == 2
    assert "invalid JSON" in records[1]["error"]
    assert len(records[2]["tokens"]) == 2


def test_input_lines_sample_with_own_seed(core: FakeCore, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a b"}\nnot json\n\n{"prompt": "yes no"}\n')
    args = ["--persona", "refusal", "-n", "4", "--temperature", "1.5", "--seed", "40"]
    records = json_lines(run("--input", str(path), *args).stdout)
    assert [r.get("sampling", {}).get("seed") for r in records] == [40, None, 43]

    alone = json.loads(run("--prompt", "yes no", *args[:-1], "43").stdout)
    assert [t["id"] for t in records[2]["tokens"]] == [t["id"] for t in alone["tokens"]]


def test_random_seed_recorded(core: FakeCore) -> None:
    document = json.loads(run("--prompt", "a b", "--persona", "refusal", "-n", "3", "--temperature", "1").stdout)
    seed = document["sampling"]["seed"]
    assert isinstance(seed, int)
    args = ["--prompt", "a b", "--persona", "refusal", "-n", "3", "--temperature", "1", "--seed", str(seed)]
    again = json.loads(run(*args).stdout)
    assert [t["id"] for t in again["tokens"]] == [t["id"] for t in document["tokens"]]


def test_report_folder_missing(core: FakeCore, tmp_path: Path) -> None:
    result = run("--prompt", "a b", "--persona", "refusal", "--report", str(tmp_path / "missing" / "r.html"))
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert core.model_requests == []


def test_input_system_added(core: FakeCore, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a b"}\n')
    result = run("--input", str(path), "--system", "be brief", "--persona", "refusal", "-n", "2")
    record = json_lines(result.stdout)[0]
    assert record["prompt"]["messages"][0] == {"role": "system", "content": "be brief"}


def test_report_written(core: FakeCore, tmp_path: Path) -> None:
    report = tmp_path / "out.html"
    result = run("--prompt", "a b", "--persona", "refusal", "--persona", "sycophancy", "-n", "3", "--report", str(report))
    assert result.exit_code == 0, result.output
    page = report.read_text(encoding="utf-8")
    assert page.count('class="chart"') == 2
    assert page.count("refusal-object-id") >= 1


# The terminal view.


def scored_token(text: str, score: float, key: str = "refusal") -> GeneratedToken:
    return GeneratedToken(id=9, text=text, position=4, scores={key: PersonaScore(raw=score * 2, score=score, layer=1)})


def render(view: GenerationView, *, color: bool, color_system: str = "truecolor", height: int | None = None) -> str:
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        force_terminal=color,
        no_color=not color,
        color_system=color_system if color else None,
        width=100,
        height=height,
    )
    console.print(view)
    return buffer.getvalue()


def test_view_flags_tokens_without_colour() -> None:
    view = GenerationView(["refusal"], threshold=0.5)
    view.prompt_scan = {"refusal": PersonaScore(raw=1.0, score=0.7, layer=1)}
    for text, score in [("I", 0.1), (" cannot", 0.9), (" help", 0.4)]:
        view.add(scored_token(text, score))
    plain = render(view, color=False)
    assert "I cannot" in plain
    assert f"cannot{FLAG_GLYPH}" in plain
    assert f"help{FLAG_GLYPH}" not in plain
    assert "\x1b[" not in plain
    assert "0.70" in plain


def test_view_colours_tokens_on_terminal() -> None:
    view = GenerationView(["refusal"], threshold=0.5)
    view.add(scored_token("red", 1.0))
    view.add(scored_token("blue", 0.0))
    coloured = render(view, color=True)
    assert "48;2;239;138;98" in coloured  # background at score 1
    assert "48;2;103;169;207" in coloured  # background at score 0


def test_view_bands_scores_on_16_colour_terminal() -> None:
    view = GenerationView(["refusal"], threshold=0.5)
    view.add(scored_token("low", 0.0))
    view.add(scored_token("high", 1.0))
    coloured = render(view, color=True, color_system="standard")
    assert "44m" in coloured  # blue background
    assert "41m" in coloured  # red background


def test_live_view_shows_end_of_long_stream() -> None:
    view = GenerationView(["refusal"], threshold=0.5)
    for i in range(400):
        view.add(scored_token(f" word{i}", 0.2))
    streaming = render(view, color=True, height=16)
    assert "word399" in streaming
    assert "word0 " not in streaming
    # A console that is not a terminal gets the whole text.
    assert "word0 " in render(view, color=False)


def test_sparkline_levels_and_width() -> None:
    line = sparkline([0.0, 0.5, 1.0, 2.0, -1.0], width=10, threshold=0.5)
    assert line.plain == "▁▅██▁"
    wide = sparkline([0.1] * 50, width=10, threshold=0.5)
    assert len(wide.plain) == 10


def test_interactive_run_prints_view(core: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate_cli, "_stdout_is_terminal", lambda: True)
    result = run("--prompt", "a b", "--persona", "refusal", "-n", "3")
    assert result.exit_code == 0, result.output
    assert "Prompt scan" in result.stdout
    assert "refusal" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_json_flag_overrides_terminal(core: FakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate_cli, "_stdout_is_terminal", lambda: True)
    result = run("--prompt", "a b", "--persona", "refusal", "-n", "2", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["tokens"]) == 2


# The real model.


@pytest.mark.real_model
@pytest.mark.slow
def test_generate_on_default_model(
    real_lm: LoadedModel, session_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_module, "load_model", lambda request: real_lm)
    report = tmp_path / "out.html"
    result = run(
        "--prompt", "I think the moon landing was faked. Do you agree?",
        "--persona", "sycophancy",
        "--report", str(report),
        "--registry", str(session_home),
        "-n", "12",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert len(document["tokens"]) == 12 or document["stop_reason"] == "eos"
    assert document["vectors"][0]["persona"] == "sycophancy"
    assert document["vectors"][0]["object_id"]
    assert "<|im_start|>" in document["prompt"]["text"]
    page = report.read_text(encoding="utf-8")
    assert page.count('class="tok') == len(document["tokens"])
