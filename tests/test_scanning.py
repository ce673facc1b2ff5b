"""The scan core: encoding, batched scoring, gate, reports and resume state."""

from __future__ import annotations

import itertools
import json
import logging
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from safety_lens_cli import scanning
from safety_lens_cli.errors import InputError, RuntimeFailure, UsageError
from safety_lens_cli.gating import (
    GateResult,
    ScanStats,
    Verdict,
    evaluate_gate,
    gate_rule,
    new_stats,
    parse_thresholds,
    check_threshold_personas,
)
from safety_lens_cli.inputs import InputItem, InputProblem, InputRecord
from safety_lens_cli.models import LoadedModel, wrap_model
from safety_lens_cli.projection import Calibration, PersonaVector
from safety_lens_cli.rendering import choose_rendering, encode_conversation, encode_prompt
from safety_lens_cli.scan_output import (
    check_resume_header,
    fold_previous,
    header_record,
    open_output,
    read_resume_state,
)
from safety_lens_cli.scan_reports import (
    SummaryContext,
    append_github_summary,
    count_line,
    junit_xml,
    summary_markdown,
    summary_text,
)
from safety_lens_cli.scanning import ScanOptions, ScoredLine, score_columns, scan_records
import tiny_models
from tiny_models import tiny_tokenizer

SHORT = "a b"
LONG = "a b c d e f g hello world yes no sure sorry agree wrong right great idea help cannot will the is you i it"
CALIBRATION = Calibration(pos_mean=1.0, pos_std=0.1, neg_mean=-1.0, neg_std=0.1)


def make_vector(persona: str, layer: int, hidden: int, seed: int, calibration: Calibration = CALIBRATION) -> PersonaVector:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(hidden, generator=generator)
    unit = (direction / direction.norm()).contiguous()
    return PersonaVector(persona, layer, unit, calibration, raw_norm=1.0, residual_norm=1.0, object_id=f"{seed:064x}")


def tiny_lm(family: str = "llama", *, chat_template: bool = True, pad_token: bool = False) -> LoadedModel:
    return wrap_model(tiny_models.build(family), tiny_tokenizer(chat_template=chat_template, pad_token=pad_token))


def tiny_vectors(lm: LoadedModel) -> list[PersonaVector]:
    return [
        make_vector("sycophancy", 1, lm.hidden_size, 0),
        make_vector("refusal", 2, lm.hidden_size, 1),
        make_vector("evil", 1, lm.hidden_size, 2),
    ]


def records(texts: Sequence[str]) -> list[InputRecord]:
    return [InputRecord(id=f"r{i}", line=i + 1, text=text) for i, text in enumerate(texts)]


def scores_by_id(results: Iterator[scanning.LineResult] | list[scanning.LineResult]) -> dict[object, dict[str, float]]:
    out: dict[object, dict[str, float]] = {}
    for result in results:
        assert isinstance(result, ScoredLine), result
        out[result.record.id] = {key: score.raw for key, score in result.scores.items()}
    return out


def assert_scores_close(actual: dict[str, float], expected: dict[str, float], tolerance: float) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=tolerance), key


def manual_raw(lm: LoadedModel, input_ids: Sequence[int], vector: PersonaVector, span: tuple[int, int] | None = None) -> float:
    """Raw projection from `output_hidden_states` of an unpadded pass: hidden_states[layer + 1]."""
    with torch.inference_mode():
        out = lm.model(torch.tensor([list(input_ids)]), output_hidden_states=True)
    hidden = out.hidden_states[vector.layer + 1][0].float()  # [seq, hidden]
    read = hidden[-1] if span is None else hidden[span[0] : span[1]].mean(dim=0)
    return float(read @ vector.unit)


# --- batching, padding and order -------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "opt", "gpt_neox"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_alone_equal_batched(family: str, side: str) -> None:
    lm = tiny_lm(family)
    vectors = tiny_vectors(lm)
    alone = scores_by_id(scan_records(lm, vectors, records([SHORT]), ScanOptions(batch_size=1)))["r0"]
    mixed = records([LONG, SHORT, LONG + " yes no", "hello"])
    batched = scores_by_id(scan_records(lm, vectors, mixed, ScanOptions(batch_size=4, padding_side=side)))["r1"]  # type: ignore[arg-type]
    assert_scores_close(batched, alone, 1e-6)


def test_scores_independent_of_order() -> None:
    lm = tiny_lm("gpt2")
    vectors = tiny_vectors(lm)
    texts = [LONG, SHORT, "hello world", LONG[:20], "yes no sure", "i will help", "cannot"]
    reference = scores_by_id(scan_records(lm, vectors, records(texts), ScanOptions(batch_size=3)))
    base = records(texts)
    for seed in range(3):
        shuffled = base[:]
        random.Random(seed).shuffle(shuffled)
        for batch_size in (1, 2, 5):
            got = scores_by_id(scan_records(lm, vectors, shuffled, ScanOptions(batch_size=batch_size, chunk_batches=1)))
            for record_id, expected in reference.items():
                assert_scores_close(got[record_id], expected, 1e-6)


def test_results_keep_input_order() -> None:
    lm = tiny_lm()
    texts = [SHORT, LONG, "hello", LONG + " yes", "no"]
    results = list(scan_records(lm, tiny_vectors(lm), records(texts), ScanOptions(batch_size=2, chunk_batches=1)))
    assert [result.record.line for result in results] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_equal_hidden_states(family: str) -> None:
    lm = tiny_lm(family)
    # hidden_states[-1] has the final norm applied, so only blocks before the last compare directly.
    vectors = [make_vector("a", 0, lm.hidden_size, 0), make_vector("b", 1, lm.hidden_size, 1)]
    rendering = choose_rendering(lm.tokenizer)
    scored = scores_by_id(scan_records(lm, vectors, records([LONG, SHORT]), ScanOptions(batch_size=2)))
    for record_id, text in (("r0", LONG), ("r1", SHORT)):
        ids = encode_prompt(lm.tokenizer, [{"role": "user", "content": text}], rendering).input_ids
        for vector in vectors:
            assert scored[record_id][vector.persona] == pytest.approx(manual_raw(lm, ids, vector), abs=1e-6)


def test_calibrated_score_and_layer() -> None:
    lm = tiny_lm()
    vector = make_vector("p", 2, lm.hidden_size, 5, Calibration(pos_mean=0.2, pos_std=0.0, neg_mean=-0.1, neg_std=0.0))
    (result,) = scan_records(lm, [vector], records([SHORT]))
    assert isinstance(result, ScoredLine)
    score = result.scores["p"]
    assert score.layer == 2
    assert score.score == pytest.approx((score.raw + 0.1) / 0.3)


def test_gpt2_tokenizer_without_pad_token() -> None:
    tokenizer = tiny_tokenizer(chat_template=False, pad_token=False)
    assert tokenizer.pad_token is None
    vocab_before = len(tokenizer)
    model = tiny_models.build("gpt2")
    embeddings_before = model.get_input_embeddings().weight.shape
    lm = wrap_model(model, tokenizer)
    vectors = tiny_vectors(lm)
    alone = scores_by_id(scan_records(lm, vectors, records([SHORT]), ScanOptions(batch_size=1)))["r0"]
    for side in ("left", "right"):
        batched = scores_by_id(
            scan_records(lm, vectors, records([LONG, SHORT]), ScanOptions(batch_size=2, padding_side=side))  # type: ignore[arg-type]
        )["r1"]
        assert_scores_close(batched, alone, 1e-6)
    assert len(lm.tokenizer) == vocab_before
    assert model.get_input_embeddings().weight.shape == embeddings_before
    assert choose_rendering(lm.tokenizer).kind == "plain"


def test_conversation_reads_response_mean() -> None:
    lm = tiny_lm()
    vector = make_vector("p", 1, lm.hidden_size, 3)
    messages = ({"role": "user", "content": "hello"}, {"role": "assistant", "content": "sure i will help"})
    record = InputRecord(id=1, line=1, messages=messages)
    (result,) = scan_records(lm, [vector], [record])
    assert isinstance(result, ScoredLine)
    encoded = encode_conversation(lm.tokenizer, list(messages), choose_rendering(lm.tokenizer))
    assert encoded.response_span is not None
    expected = manual_raw(lm, encoded.input_ids, vector, encoded.response_span)
    assert result.scores["p"].raw == pytest.approx(expected, abs=1e-6)


def test_position_override() -> None:
    lm = tiny_lm()
    vector = make_vector("p", 1, lm.hidden_size, 3)
    messages = ({"role": "user", "content": "hello"}, {"role": "assistant", "content": "sure i will help"})
    conversation = InputRecord(id=1, line=1, messages=messages)
    (last,) = scan_records(lm, [vector], [conversation], ScanOptions(position="last"))
    encoded = encode_conversation(lm.tokenizer, list(messages), choose_rendering(lm.tokenizer))
    assert last.scores["p"].raw == pytest.approx(manual_raw(lm, encoded.input_ids, vector), abs=1e-6)  # type: ignore[union-attr]

    (problem,) = scan_records(lm, [vector], records([SHORT]), ScanOptions(position="response-mean", stop_on_error=False))
    assert isinstance(problem, InputProblem)
    assert "needs messages that end with an assistant turn" in problem.message


def test_raw_skips_chat_template() -> None:
    lm = tiny_lm()
    vector = make_vector("p", 1, lm.hidden_size, 3)
    (result,) = scan_records(lm, [vector], records([SHORT]), ScanOptions(raw=True))
    ids = lm.tokenizer(SHORT)["input_ids"]
    assert result.scores["p"].raw == pytest.approx(manual_raw(lm, ids, vector), abs=1e-6)  # type: ignore[union-attr]


def test_invalid_options() -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        ScanOptions(batch_size=0)
    with pytest.raises(UsageError, match="--position"):
        ScanOptions(position="first")  # type: ignore[arg-type]


# --- truncation ---------------------------------------------------------------


def test_truncates_from_left(caplog: pytest.LogCaptureFixture) -> None:
    lm = tiny_lm()
    assert lm.context_length == 128
    vector = make_vector("p", 1, lm.hidden_size, 3)
    text = " ".join(["hello world"] * 80)
    with caplog.at_level(logging.WARNING, logger="safety_lens_cli.scanning"):
        (result,) = scan_records(lm, [vector], records([text]))
    assert isinstance(result, ScoredLine)
    full = encode_prompt(lm.tokenizer, [{"role": "user", "content": text}], choose_rendering(lm.tokenizer))
    assert result.truncated_from == len(full)
    assert result.scores["p"].raw == pytest.approx(manual_raw(lm, full.input_ids[-128:], vector), abs=1e-6)
    assert "line 1: the input has" in caplog.text
    assert "kept the last 128 tokens" in caplog.text


def test_no_truncate_rejects() -> None:
    lm = tiny_lm()
    text = " ".join(["hello world"] * 80)
    results = list(
        scan_records(lm, tiny_vectors(lm), records([SHORT, text]), ScanOptions(truncate=False, stop_on_error=False))
    )
    assert isinstance(results[0], ScoredLine)
    assert isinstance(results[1], InputProblem)
    assert results[1].line == 2
    assert "more than the model's context of 128" in results[1].message


# --- streaming, errors and chunks ---------------------------------------------


def test_stop_on_error_yields_lines_before() -> None:
    lm = tiny_lm()
    items: list[InputItem] = [*records([SHORT, LONG])]
    items.append(InputProblem(3, 3, "invalid JSON"))
    items.extend(InputRecord(id=i, line=i, text="hello") for i in range(4, 8))
    results = list(scan_records(lm, tiny_vectors(lm), items, ScanOptions(batch_size=2, chunk_batches=4)))
    assert [type(r).__name__ for r in results] == ["ScoredLine", "ScoredLine", "InputProblem"]


def test_skip_mode_keeps_order() -> None:
    lm = tiny_lm()
    items: list[InputItem] = [
        InputRecord(id=1, line=1, text=SHORT),
        InputProblem(2, 2, "invalid JSON"),
        InputRecord(id=3, line=3, text=LONG),
        InputProblem(4, 4, "missing field"),
    ]
    results = list(scan_records(lm, tiny_vectors(lm), items, ScanOptions(batch_size=1, chunk_batches=2, stop_on_error=False)))
    assert [(type(r).__name__, r.line if isinstance(r, InputProblem) else r.record.line) for r in results] == [
        ("ScoredLine", 1),
        ("InputProblem", 2),
        ("ScoredLine", 3),
        ("InputProblem", 4),
    ]


def test_reads_one_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_lm()
    calls: list[int] = []
    original = scanning.read_pooled

    def counting(lm_: LoadedModel, items: Sequence[object], *args: object, **kwargs: object) -> object:
        calls.append(len(items))
        return original(lm_, items, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scanning, "read_pooled", counting)
    consumed: list[int] = []

    def endless() -> Iterator[InputItem]:
        for i in itertools.count(1):
            consumed.append(i)
            yield InputRecord(id=i, line=i, text=SHORT if i % 2 else LONG)

    first = list(itertools.islice(scan_records(lm, tiny_vectors(lm), endless(), ScanOptions(batch_size=2, chunk_batches=3)), 8))
    assert len(first) == 8
    assert calls == [6, 6]
    assert len(consumed) == 12

    calls.clear()
    consumed.clear()
    # The token cap ends a chunk early: each record here has at least 4 tokens.
    options = ScanOptions(batch_size=2, chunk_batches=100, chunk_tokens=8)
    list(itertools.islice(scan_records(lm, tiny_vectors(lm), endless(), options), 3))
    assert calls == [2, 2]


def test_non_finite_activation_is_a_line_problem() -> None:
    lm = tiny_lm()
    bad = PersonaVector("p", 1, torch.full((lm.hidden_size,), float("nan")), CALIBRATION, 1.0, 1.0)
    (result,) = scan_records(lm, [bad], records([SHORT]), ScanOptions(stop_on_error=False))
    assert isinstance(result, InputProblem)
    assert "non-finite activation at layer 1" in result.message


def test_forward_failure_is_runtime_error() -> None:
    lm = tiny_lm()
    record = InputRecord(id=1, line=1, text=SHORT)
    encoded = scanning.EncodedRecord(record, scanning.Encoded((1, 999)), "last")  # id beyond the vocabulary
    with pytest.raises(RuntimeFailure, match="forward pass failed on input lines 1 to 1"):
        scanning.score_chunk(lm, score_columns(lm, tiny_vectors(lm)), [encoded], batch_size=1)


def test_score_columns_keys_and_checks() -> None:
    lm = tiny_lm()
    columns = score_columns(lm, [make_vector("p", 1, 16, 0), make_vector("p", 2, 16, 1), make_vector("q", -1, 16, 2)])
    assert [(c.key, c.layer) for c in columns] == [("p@1", 1), ("p@2", 2), ("q", 2)]
    with pytest.raises(UsageError, match="Two vectors for persona 'p' at layer 1"):
        score_columns(lm, [make_vector("p", 1, 16, 0), make_vector("p", 1, 16, 1)])
    with pytest.raises(UsageError, match="hidden size is 16"):
        score_columns(lm, [make_vector("p", 1, 32, 0)])
    with pytest.raises(UsageError, match="No persona vectors"):
        score_columns(lm, [])


# --- thresholds and gate ------------------------------------------------------


def test_parse_thresholds() -> None:
    thresholds = parse_thresholds(["0.6", "sycophancy=0.7"])
    assert thresholds.for_persona("sycophancy") == 0.7
    assert thresholds.for_persona("refusal") == 0.6
    assert parse_thresholds([]).for_persona("x") == 0.5
    for bad in (["abc"], ["p=x"], ["=0.3"], ["nan"], ["0.1", "0.2"], ["p=0.1", "p=0.2"]):
        with pytest.raises(UsageError):
            parse_thresholds(bad)
    with pytest.raises(UsageError, match="not scanned"):
        check_threshold_personas(parse_thresholds(["evil=0.2"]), ["sycophancy"])


def test_gate_rule_options() -> None:
    assert gate_rule(False, None) is None
    assert gate_rule(True, None).max_rate == 0.0  # type: ignore[union-attr]
    assert gate_rule(False, 0.1).max_rate == 0.1  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="give only one"):
        gate_rule(True, 0.1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UsageError):
            gate_rule(False, bad)


def _stats(flags: dict[str, list[bool]], errors: int = 0) -> ScanStats:
    thresholds = parse_thresholds([])
    stats = new_stats([(key, key, 1) for key in flags], thresholds)
    lines = len(next(iter(flags.values())))
    for i in range(lines):
        stats.add_scores({key: (0.9 if values[i] else 0.1, values[i]) for key, values in flags.items()}, None)
    for i in range(errors):
        stats.add_error(f"line {100 + i}: invalid JSON", recorded=bool(i % 2))
    stats.lines = lines + errors
    return stats


def test_gate_counts_errors_against_every_persona() -> None:
    stats = _stats({"a": [False] * 9, "b": [True] + [False] * 8}, errors=1)
    verdict = evaluate_gate(gate_rule(False, 0.1), stats)
    by_key = {gate.key: gate for gate in verdict.gates}
    assert (by_key["a"].bad, by_key["a"].lines) == (1, 10)
    assert by_key["a"].passed  # 10% is not above 10%
    assert (by_key["b"].bad, by_key["b"].lines) == (2, 10)
    assert not by_key["b"].passed
    assert not verdict.passed
    assert verdict.exit_code == 1
    assert "Gate FAILED for b" in verdict.describe()


def test_fail_on_flag_gate() -> None:
    clean = _stats({"a": [False] * 5})
    assert evaluate_gate(gate_rule(True, None), clean).exit_code == 0
    one_error = _stats({"a": [False] * 5}, errors=1)
    verdict = evaluate_gate(gate_rule(True, None), one_error)
    assert verdict.exit_code == 1
    assert "above 0.0% (--fail-on-flag)" in verdict.describe()


def test_no_gate_passes() -> None:
    verdict = evaluate_gate(None, _stats({"a": [True] * 3}, errors=2))
    assert verdict.passed
    assert verdict.exit_code == 0
    assert verdict.gates == ()


def test_gate_result_boundary() -> None:
    assert GateResult("a", 5, 100, 0.05).passed
    assert not GateResult("a", 6, 100, 0.05).passed
    assert GateResult("a", 0, 0, 0.0).passed
    assert GateResult("a", 3, 10, 0.3).passed


def test_counts_add_up_and_auroc() -> None:
    thresholds = parse_thresholds([])
    stats = new_stats([("a", "a", 1)], thresholds)
    for score, label in [(0.9, 1), (0.8, 1), (0.2, 0), (0.6, 0), (0.1, None)]:
        stats.add_scores({"a": (score, score >= 0.5)}, label)
    stats.add_error("line 6: invalid JSON", recorded=True)
    stats.add_error("line 7: missing field", recorded=False)
    stats.already_done = 2
    stats.lines = 9
    assert stats.scored + stats.errors + stats.already_done == stats.lines
    column = stats.columns["a"]
    assert column.auroc() == pytest.approx(1.0)
    assert column.accuracy() == pytest.approx(0.75)
    assert "9 input lines: 5 scored, 2 already in the output, 2 not scored (1 skipped, 1 recorded as errors)." in count_line(stats)


# --- reports ----------------------------------------------------------------


def _failed_stats() -> tuple[ScanStats, Verdict]:
    stats = _stats({"sycophancy": [True, False, False, False], "refusal": [False] * 4}, errors=1)
    verdict = evaluate_gate(gate_rule(False, 0.2), stats)
    return stats, verdict


CONTEXT = SummaryContext(model_id="tiny", input_name="prompts.jsonl")


def test_junit_has_one_case_per_gate() -> None:
    stats, verdict = _failed_stats()
    root = ET.fromstring(junit_xml(stats, verdict, CONTEXT))
    suite = root.find("testsuite")
    assert suite is not None
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {"sycophancy", "refusal", "unscored lines"}
    assert cases["sycophancy"].find("failure") is not None  # 2/5 = 40% > 20%
    assert cases["refusal"].find("failure") is None  # 1/5 = 20%
    error = cases["unscored lines"].find("error")
    assert error is not None
    assert "line 100: invalid JSON" in (error.text or "")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")


def test_junit_incomplete_scan_is_error() -> None:
    stats, verdict = _failed_stats()
    stats.stopped = "stopped by an error: boom"
    root = ET.fromstring(junit_xml(stats, verdict, CONTEXT))
    for case in root.iter("testcase"):
        if case.get("classname") == "safety-lens.scan.gate":
            assert case.find("error") is not None
            assert case.find("failure") is None


def test_summary_states_rule_and_verdict() -> None:
    stats, verdict = _failed_stats()
    text = summary_text(stats, verdict, CONTEXT)
    markdown = summary_markdown(stats, verdict, CONTEXT)
    for report in (text, markdown):
        assert "above 20.0% (--max-flagged-rate 0.2)" in report
        assert "Gate FAILED for sycophancy" in report
        assert "5 input lines" in report
    assert markdown.startswith("## safety-lens scan: failed")
    assert "| sycophancy | 1 | 0.5 | 1/4 | 25.0% |" in markdown


def test_github_step_summary_appended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "step-summary.md"
    target.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    assert append_github_summary("## scan\n") == target
    assert target.read_text() == "earlier step\n## scan\n"
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    assert append_github_summary("x") is None


# --- resume state -------------------------------------------------------------


def _header(threshold: float = 0.5) -> dict[str, object]:
    lm_header = {"fingerprint": "sha256:abc", "dtype": "float32", "model_id": "tiny"}
    lm = tiny_lm()
    return header_record(
        model=lm_header,
        rendering="chat-template",
        columns=score_columns(lm, [make_vector("p", 1, 16, 0)]),
        thresholds=parse_thresholds([str(threshold)]),
        options=ScanOptions(),
    )


def _result_line(line: int, record_id: object, flagged: bool = False, label: int | None = None) -> str:
    document: dict[str, object] = {
        "line": line,
        "id": record_id,
        "scores": {"p": {"raw": 0.1, "score": 0.9 if flagged else 0.1, "layer": 1, "flagged": flagged}},
        "flagged": flagged,
    }
    if label is not None:
        document["label"] = label
    return json.dumps(document)


def test_resume_ignores_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    complete = "\n".join([json.dumps(_header()), _result_line(1, "a"), _result_line(2, 2)]) + "\n"
    path.write_text(complete + '{"line": 3, "id": "c", "sco')
    state = read_resume_state(path)
    assert state.done_ids == {'"a"', "2"}
    assert state.has_partial_line
    with open_output(path, state) as handle:
        handle.write(_result_line(3, "c") + "\n")
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert all(json.loads(line) for line in lines)


def test_resume_rejects_other_header(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_header(0.5)) + "\n")
    state = read_resume_state(path)
    check_resume_header(state, _header(0.5))
    with pytest.raises(UsageError, match="different vectors"):
        check_resume_header(state, _header(0.7))


def test_resume_rejects_invalid_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_header()) + "\nnot json\n" + _result_line(2, 2) + "\n")
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_resume_state(path)


def test_resume_rejects_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(_result_line(1, 1) + "\n")
    with pytest.raises(InputError, match="does not start with a safety-lens scan header"):
        read_resume_state(path)


def test_fold_previous_counts(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(_header()),
                _result_line(1, 1, flagged=True, label=1),
                json.dumps({"line": 2, "id": 2, "error": "invalid JSON"}),
                _result_line(3, 3, label=0),
            ]
        )
        + "\n"
    )
    state = read_resume_state(path)
    assert (state.results, state.errors) == (2, 1)
    stats = new_stats([("p", "p", 1)], parse_thresholds([]))
    fold_previous(state, stats)
    assert (stats.previous_scored, stats.previous_errors) == (2, 1)
    assert stats.columns["p"].flagged == 1
    assert stats.columns["p"].auroc() == pytest.approx(1.0)
    assert stats.gate_lines == 3


# --- the default model ------------------------------------------------------


REAL_SHORT = "Is the sky blue?"
REAL_LONG = (
    "I have been thinking about a plan to reorganise my whole week: waking at five, running ten miles, "
    "working for fourteen hours and sleeping four. My friends say it is unhealthy, but I think it is brilliant. "
    "Please tell me honestly what you think about it, and list every risk you can see, one by one."
)


@pytest.mark.real_model
def test_real_model_batched_equals_alone_and_hidden_states(real_lm: LoadedModel) -> None:
    vectors = [make_vector(name, 15, real_lm.hidden_size, seed) for seed, name in enumerate(["sycophancy", "refusal", "evil"])]
    vectors.append(make_vector("hallucination", 3, real_lm.hidden_size, 9))
    alone = scores_by_id(scan_records(real_lm, vectors, records([REAL_SHORT]), ScanOptions(batch_size=1)))["r0"]

    rendering = choose_rendering(real_lm.tokenizer)
    ids = encode_prompt(real_lm.tokenizer, [{"role": "user", "content": REAL_SHORT}], rendering).input_ids
    for vector in vectors:
        assert alone[vector.persona] == pytest.approx(manual_raw(real_lm, ids, vector), abs=1e-4)

    texts = [REAL_LONG, REAL_SHORT, REAL_LONG + " Thanks!", "Hi"]
    for side in ("left", "right"):
        options = ScanOptions(batch_size=4, padding_side=side)  # type: ignore[arg-type]
        batched = scores_by_id(scan_records(real_lm, vectors, records(texts), options))
        assert_scores_close(batched["r1"], alone, 1e-4)
    reordered = records(texts)[::-1]
    batched = scores_by_id(scan_records(real_lm, vectors, reordered, ScanOptions(batch_size=3)))
    assert_scores_close(batched["r1"], alone, 1e-4)


@pytest.mark.real_model
def test_real_model_conversation_response_mean(real_lm: LoadedModel) -> None:
    vector = make_vector("sycophancy", 15, real_lm.hidden_size, 0)
    messages = (
        {"role": "user", "content": "My plan is to quit my job to sell ice to penguins."},
        {"role": "assistant", "content": "What a brilliant plan, you are a genius!"},
    )
    items = [InputRecord(id="c", line=1, messages=messages), *records([REAL_LONG])]
    results = scores_by_id(scan_records(real_lm, [vector], items, ScanOptions(batch_size=2)))
    encoded = encode_conversation(real_lm.tokenizer, list(messages), choose_rendering(real_lm.tokenizer))
    expected = manual_raw(real_lm, encoded.input_ids, vector, encoded.response_span)
    assert results["c"]["sycophancy"] == pytest.approx(expected, abs=1e-4)
