"""`safety-lens scan` through the Typer app: records, exit codes, errors, resume, shards and reports.

Most tests run a tiny random model with hand-made vectors, patched in where
the command loads the model and looks vectors up. The end-to-end test uses the
default model with vectors from the registry (extracted on first use).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import tiny_models
from tiny_models import tiny_tokenizer
from typer.testing import CliRunner

from safety_lens_cli.cli.app import app
from safety_lens_cli.errors import ModelLoadError
from safety_lens_cli.models import LoadedModel, wrap_model
from safety_lens_cli.projection import Calibration, PersonaVector

PROMPTS = [
    {"id": "a", "prompt": "hello world", "label": 1},
    {"id": "b", "text": "i cannot help", "label": 0},
    {"id": "c", "messages": [{"role": "user", "content": "is it right"}, {"role": "assistant", "content": "yes it is"}]},
    {"prompt": "sure great idea", "label": 1},
    {"id": "e", "prompt": "no", "label": 0, "source": "manual"},
]
# Thresholds that flag every line, or none, whatever the random model computes.
FLAG_ALL = "-1e9"
FLAG_NONE = "1e9"
# Merges shard outputs back into input order: every record starts with its
# line number, each shard is already in order, and all shards share one header.
MERGE_COMMAND = "LC_ALL=C sort -m -s -n -t: -k2,2 {files} | awk '!/^{{\"header\"/ || !seen++'"


def _vector(persona: str, layer: int, seed: int) -> PersonaVector:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(tiny_models.HIDDEN, generator=generator)
    calibration = Calibration(pos_mean=0.05, pos_std=0.01, neg_mean=-0.05, neg_std=0.01)
    return PersonaVector(persona, layer, direction / direction.norm(), calibration, 1.0, 1.0, object_id=f"{seed:064x}")


class Patched:
    """The tiny model and the vector lookups the command made."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.requests: list[Any] = []
        self.vectors = {"sycophancy": _vector("sycophancy", 1, 0), "refusal": _vector("refusal", 2, 1)}


@pytest.fixture()
def patched(monkeypatch: pytest.MonkeyPatch) -> Patched:
    lm = wrap_model(tiny_models.build("llama"), tiny_tokenizer())
    state = Patched(lm)

    def load_model(request: object = None) -> LoadedModel:
        return lm

    def resolve_vectors(lm_: LoadedModel, request: Any, *, notify: Any = None) -> list[PersonaVector]:
        state.requests.append(request)
        if notify is not None:
            notify("Extracting sycophancy at layer 1 ...")
        return [state.vectors[name] for name in request.personas]

    monkeypatch.setattr("safety_lens_cli.models.load_model", load_model)
    monkeypatch.setattr("safety_lens_cli.vector_lookup.resolve_vectors", resolve_vectors)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return state


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def invoke(args: Sequence[str], stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, ["scan", *args], input=stdin)


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


PERSONAS = ["--persona", "sycophancy", "--persona", "refusal"]


def assert_same_records(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Same header and records; scores may differ in the last float digits with batch composition."""
    assert got[0] == expected[0]
    assert [(r["line"], r["id"]) for r in got[1:]] == [(r["line"], r["id"]) for r in expected[1:]]
    for a, b in zip(got[1:], expected[1:]):
        for key, entry in b["scores"].items():
            assert a["scores"][key]["raw"] == pytest.approx(entry["raw"], abs=1e-6)
            assert a["scores"][key]["flagged"] == entry["flagged"]


def test_jsonl_schema_on_stdout(patched: Patched, prompts_file: Path) -> None:
    result = invoke(["--input", str(prompts_file), *PERSONAS, "--keep-fields"])
    assert result.exit_code == 0, result.stderr
    header, *records = jsonl(result.stdout)
    assert header["header"]["schema"] == "safety-lens.scan"
    assert header["header"]["model"]["fingerprint"].startswith("sha256:")
    assert [v["key"] for v in header["header"]["vectors"]] == ["sycophancy", "refusal"]
    assert header["header"]["vectors"][0]["object_id"] == f"{0:064x}"
    assert [r["id"] for r in records] == ["a", "b", "c", 4, "e"]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    for record in records:
        assert list(record)[:2] == ["line", "id"]
        assert set(record["scores"]) == {"sycophancy", "refusal"}
        for entry in record["scores"].values():
            assert set(entry) == {"raw", "score", "layer", "flagged"}
            assert entry["flagged"] == (entry["score"] >= 0.5)
        assert record["flagged"] == any(e["flagged"] for e in record["scores"].values())
    assert records[0]["scores"]["refusal"]["layer"] == 2
    assert records[0]["label"] == 1
    assert records[4]["meta"] == {"source": "manual"}
    assert "Extracting sycophancy at layer 1" in result.stderr
    assert "5 input lines: 5 scored" in result.stderr


def test_request_carries_options(patched: Patched, prompts_file: Path) -> None:
    result = invoke(["-i", str(prompts_file), *PERSONAS, "--layer", "1", "--no-extract", "--vector", "abc123"])
    assert result.exit_code == 0, result.stderr
    request = patched.requests[0]
    assert request.personas == ("sycophancy", "refusal")
    assert request.layers == ("1",)
    assert request.extract_missing is False
    assert request.vector_ids == ("abc123",)


def test_stdin_without_input_option(patched: Patched) -> None:
    result = invoke(PERSONAS, stdin='{"prompt": "hello"}\n{"prompt": "world"}\n')
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in jsonl(result.stdout)[1:]] == [1, 2]


def test_text_option_and_text_format(patched: Patched, tmp_path: Path) -> None:
    result = invoke([*PERSONAS, "--text", "hello world", "--text", "yes no"])
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in jsonl(result.stdout)[1:]] == [1, 2]

    plain = tmp_path / "prompts.txt"
    plain.write_text("hello world\n\n{not json}\n")
    result = invoke([*PERSONAS, "-i", str(plain), "--format", "text"])
    assert result.exit_code == 0, result.stderr
    assert [r["line"] for r in jsonl(result.stdout)[1:]] == [1, 3]
    assert "1 blank line ignored" in result.stderr.lower()


def test_table_format(patched: Patched, prompts_file: Path) -> None:
    result = invoke(["-i", str(prompts_file), *PERSONAS, "--format", "table"])
    assert result.exit_code == 0, result.stderr
    assert "sycophancy (L1)" in result.stdout
    assert '"header"' not in result.stdout


def test_exit_codes_follow_gate(patched: Patched, prompts_file: Path) -> None:
    base = ["-i", str(prompts_file), *PERSONAS]
    flagged = invoke([*base, "--threshold", FLAG_ALL, "--fail-on-flag"])
    assert flagged.exit_code == 1
    assert "Gate FAILED for sycophancy, refusal" in flagged.stderr
    clean = invoke([*base, "--threshold", FLAG_NONE, "--fail-on-flag"])
    assert clean.exit_code == 0
    assert "Gate passed" in clean.stderr
    ungated = invoke([*base, "--threshold", FLAG_ALL])
    assert ungated.exit_code == 0
    assert "No gate set" in ungated.stderr


def test_max_flagged_rate_per_persona_threshold(patched: Patched, prompts_file: Path) -> None:
    base = ["-i", str(prompts_file), *PERSONAS, "--threshold", FLAG_NONE]
    result = invoke([*base, "--threshold", f"refusal={FLAG_ALL}", "--max-flagged-rate", "0.5"])
    assert result.exit_code == 1
    assert "refusal: 5/5 = 100.0% > 50.0%: FAILED" in result.stderr
    assert "sycophancy: 0/5 = 0.0% <= 50.0%: passed" in result.stderr
    records = jsonl(result.stdout)[1:]
    assert all(r["scores"]["refusal"]["flagged"] and not r["scores"]["sycophancy"]["flagged"] for r in records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "high"], "Invalid --threshold 'high'"),
        (["--threshold", "evil=0.3"], "names persona 'evil', which is not scanned"),
        (["--on-error", "ignore"], "Invalid --on-error 'ignore'"),
        (["--shard", "3/3"], "Invalid --shard '3/3'"),
        (["--position", "first"], "Invalid --position 'first'"),
        (["--resume"], "--resume appends to an existing file"),
        (["--fail-on-flag", "--max-flagged-rate", "0.1"], "give only one"),
        (["--format", "xml"], "Invalid --format 'xml'"),
    ],
)
def test_usage_errors_exit_2(patched: Patched, prompts_file: Path, args: list[str], message: str) -> None:
    result = invoke(["-i", str(prompts_file), *PERSONAS, *args])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_missing_input_file_exit_2(patched: Patched, tmp_path: Path) -> None:
    result = invoke(["-i", str(tmp_path / "absent.jsonl"), *PERSONAS])
    assert result.exit_code == 2
    assert "not found" in result.stderr


def test_model_load_error_exit_3(patched: Patched, prompts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(request: object = None) -> LoadedModel:
        raise ModelLoadError("GGUF file 'x.gguf' could not be loaded (truncated)")

    monkeypatch.setattr("safety_lens_cli.models.load_model", broken)
    result = invoke(["-i", str(prompts_file), *PERSONAS])
    assert result.exit_code == 3
    assert "could not be loaded" in result.stderr


def test_runtime_failure_mid_scan_exit_3(patched: Patched, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safety_lens_cli.scanning as scanning

    original = scanning.read_pooled
    calls: list[int] = []

    def failing_second_chunk(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(scanning, "read_pooled", failing_second_chunk)
    path = tmp_path / "many.jsonl"
    # With --batch-size 1 a chunk is 64 lines, so the first chunk is written before the failure.
    path.write_text("".join(json.dumps({"prompt": "hello world"}) + "\n" for _ in range(70)))
    junit = tmp_path / "junit.xml"
    result = invoke(["-i", str(path), *PERSONAS, "--batch-size", "1", "--junit", str(junit), "--fail-on-flag"])
    assert result.exit_code == 3
    assert "Scan incomplete" in result.stderr
    assert [r["line"] for r in jsonl(result.stdout)[1:]] == list(range(1, 65))
    assert "70 input lines: 64 scored, 0 not scored (0 skipped, 0 recorded as errors), 6 not reached." in result.stderr
    cases = ET.parse(junit).getroot().iter("testcase")
    assert any(case.find("error") is not None for case in cases)


def test_on_error_fail_stops_after_written_lines(patched: Patched, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "hello"}\n{"prompt": "world"}\n{"prompt": \n{"prompt": "never"}\n')
    result = invoke(["-i", str(path), *PERSONAS])
    assert result.exit_code == 2
    assert "line 3: invalid JSON" in result.stderr
    assert [r["line"] for r in jsonl(result.stdout)[1:]] == [1, 2]
    assert "Scan incomplete" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "x"}\n[1]\n', "line 2: expected a JSON object"),
        (b'{"prompt": "x"}\n{"id": 1}\n', "line 2: missing field"),
        (b'{"prompt": "x"}\n{"prompt": ""}\n', "line 2: field 'prompt' is empty"),
        (b'{"prompt": "x"}\n{"prompt": 3}\n', "line 2: field 'prompt' must be a string"),
        (b'{"prompt": "x"}\n{"prompt": "\xff"}\n', "line 2: invalid UTF-8"),
        (b'{"prompt": "x"}\n{"prompt": "' + b"hello world " * 80 + b'"}\n', "line 2: the input has"),
    ],
)
def test_bad_input_kinds_name_the_line(patched: Patched, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    result = invoke(["-i", str(path), *PERSONAS, "--no-truncate"])
    assert result.exit_code == 2
    assert message in result.stderr


def test_on_error_skip_and_record(patched: Patched, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "hello"}\nnot json\n{"prompt": "world"}\n{"prompt": ""}\n')
    base = ["-i", str(path), *PERSONAS, "--threshold", FLAG_NONE]

    skipped = invoke([*base, "--on-error", "skip"])
    assert skipped.exit_code == 0, skipped.stderr
    assert [r["line"] for r in jsonl(skipped.stdout)[1:]] == [1, 3]
    assert "line 2: invalid JSON" in skipped.stderr
    assert "4 input lines: 2 scored, 2 not scored (2 skipped, 0 recorded as errors)." in skipped.stderr

    recorded = invoke([*base, "--on-error", "record"])
    assert recorded.exit_code == 0
    records = jsonl(recorded.stdout)[1:]
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert records[1] == {"line": 2, "id": 2, "error": records[1]["error"]}
    assert records[1]["error"].startswith("invalid JSON")
    assert "4 input lines: 2 scored, 2 not scored (0 skipped, 2 recorded as errors)." in recorded.stderr


@pytest.mark.parametrize("mode", ["skip", "record"])
def test_unscored_lines_count_against_gate(patched: Patched, tmp_path: Path, mode: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "hello"}\nnot json\n{"prompt": "world"}\n{"prompt": "yes"}\n')
    base = ["-i", str(path), *PERSONAS, "--threshold", FLAG_NONE, "--on-error", mode]
    assert invoke([*base, "--fail-on-flag"]).exit_code == 1
    assert invoke([*base, "--max-flagged-rate", "0.25"]).exit_code == 0
    assert invoke([*base, "--max-flagged-rate", "0.2"]).exit_code == 1


def test_resume_skips_done_ids(patched: Patched, prompts_file: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    assert invoke(["-i", str(prompts_file), *PERSONAS, "-o", str(full)]).exit_code == 0
    full_lines = full.read_text().splitlines(keepends=True)
    assert len(full_lines) == 6

    # A killed run: header, two complete records and half of the third.
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(full_lines[:3]) + full_lines[3][:25])
    result = invoke(["-i", str(prompts_file), *PERSONAS, "-o", str(partial), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert "partial line" in result.stderr
    assert "5 input lines: 3 scored, 2 already in the output" in result.stderr
    assert_same_records(jsonl(partial.read_text()), jsonl(full.read_text()))

    again = invoke(["-i", str(prompts_file), *PERSONAS, "-o", str(partial), "--resume"])
    assert again.exit_code == 0
    assert "5 already in the output" in again.stderr
    assert_same_records(jsonl(partial.read_text()), jsonl(full.read_text()))


def test_resume_gate_covers_earlier_records(patched: Patched, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    base = ["-i", str(prompts_file), *PERSONAS, "-o", str(out), "--threshold", FLAG_ALL]
    assert invoke(base).exit_code == 0
    result = invoke([*base, "--resume", "--fail-on-flag"])
    assert result.exit_code == 1
    assert "sycophancy: 5/5" in result.stderr


def test_resume_rejects_changed_threshold(patched: Patched, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert invoke(["-i", str(prompts_file), *PERSONAS, "-o", str(out)]).exit_code == 0
    result = invoke(["-i", str(prompts_file), *PERSONAS, "-o", str(out), "--resume", "--threshold", "0.9"])
    assert result.exit_code == 2
    assert "different vectors" in result.stderr


def test_shards_merge_back_to_full_output(patched: Patched, tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    words = ["hello", "world", "yes", "no", "sure", "great idea", "i cannot help", "you is right"]
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": words[i % 8]}) + "\n" for i in range(23)))
    full = tmp_path / "full.jsonl"
    assert invoke(["-i", str(path), *PERSONAS, "-o", str(full), "--batch-size", "3"]).exit_code == 0
    shard_files = []
    for index in range(3):
        out = tmp_path / f"shard-{index}.jsonl"
        result = invoke(["-i", str(path), *PERSONAS, "-o", str(out), "--shard", f"{index}/3", "--batch-size", "2"])
        assert result.exit_code == 0, result.stderr
        assert "lines left to other shards" in result.stderr
        shard_files.append(out)
    lines = [jsonl(f.read_text())[1:] for f in shard_files]
    assert [len(shard) for shard in lines] == [8, 8, 7]
    assert all(r["line"] % 3 == (i + 1) % 3 for i, shard in enumerate(lines) for r in shard)

    if shutil.which("sort") is None or shutil.which("awk") is None:
        pytest.skip("sort and awk are needed for the documented merge command")
    command = MERGE_COMMAND.format(files=" ".join(str(f) for f in shard_files))
    merged = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    assert_same_records(jsonl(merged), jsonl(full.read_text()))

    # Gating the merged file: --resume finds every line done and only applies the gate.
    merged_path = tmp_path / "merged.jsonl"
    merged_path.write_text(merged)
    gate = invoke(["-i", str(path), *PERSONAS, "-o", str(merged_path), "--resume", "--max-flagged-rate", "1"])
    assert gate.exit_code == 0, gate.stderr
    assert "23 input lines: 0 scored, 23 already in the output" in gate.stderr
    assert "sycophancy: " in gate.stderr
    assert merged_path.read_text() == merged


def test_junit_summary_and_step_summary(
    patched: Patched, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = tmp_path / "step.md"
    step.write_text("# earlier\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    junit, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    args = ["-i", str(prompts_file), *PERSONAS, "--threshold", f"sycophancy={FLAG_ALL}", "--threshold", FLAG_NONE]
    result = invoke([*args, "--fail-on-flag", "--junit", str(junit), "--summary", str(summary)])
    assert result.exit_code == 1

    root = ET.parse(junit).getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    assert set(cases) == {"sycophancy", "refusal", "unscored lines"}
    assert cases["sycophancy"].find("failure") is not None
    assert cases["refusal"].find("failure") is None
    assert cases["unscored lines"].find("error") is None

    markdown = summary.read_text()
    assert markdown.startswith("## safety-lens scan: failed")
    assert "Gate FAILED for sycophancy" in markdown
    assert "AUROC" in markdown
    assert step.read_text() == "# earlier\n" + markdown


def test_no_progress_bar_off_terminal(patched: Patched, prompts_file: Path) -> None:
    result = invoke(["-i", str(prompts_file), *PERSONAS])
    assert "Scanning" not in result.stderr
    assert all(line.startswith("{") for line in result.stdout.splitlines())


@pytest.mark.real_model
def test_default_model_end_to_end(
    real_lm: LoadedModel, real_personas: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented command on the default model, with the session's registry of built-in vectors."""
    monkeypatch.setattr("safety_lens_cli.models.load_model", lambda request=None: real_lm)
    examples = Path(__file__).resolve().parents[1] / "examples" / "prompts.jsonl"
    junit = tmp_path / "junit.xml"
    result = invoke(["--input", str(examples), *PERSONAS, "--junit", str(junit), "--max-flagged-rate", "1.0"])
    assert result.exit_code == 0, result.stderr
    header, *records = jsonl(result.stdout)
    input_lines = [line for line in examples.read_text().splitlines() if line.strip()]
    assert len(records) == len(input_lines)
    assert header["header"]["model"]["fingerprint"] == real_lm.fingerprint
    auto_layers = {resolved.persona: resolved.auto_layer for resolved in real_personas}
    for vector in header["header"]["vectors"]:
        assert vector["object_id"]
        assert vector["layer"] == auto_layers[vector["persona"]]
    for record in records:
        assert set(record["scores"]) == {"sycophancy", "refusal"}
    assert "Gate passed" in result.stderr
    assert {case.get("name") for case in ET.parse(junit).getroot().iter("testcase")} == {
        "sycophancy",
        "refusal",
        "unscored lines",
    }
    # Labelled lines give AUROC figures in the summary.
    assert "AUROC" in result.stderr
