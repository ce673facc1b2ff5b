"""Baseline comparison on tiny models: zero shift, a planted shift, and sequential runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import build, tiny_tokenizer

from safety_lens_cli.comparison import (
    MaxShift,
    PairedLine,
    ShiftCollector,
    compare_in_memory,
    compare_sequential,
    paired_record,
    parse_max_shift,
)
from safety_lens_cli.errors import ModelMismatchError, UsageError
from safety_lens_cli.gating import Thresholds
from safety_lens_cli.inputs import InputRecord
from safety_lens_cli.models import ModelRequest, load_model
from safety_lens_cli.projection import Calibration, PersonaVector
from safety_lens_cli.scanning import ScanOptions, score_columns

PROMPTS = ["hello world", "is a right ?", "yes i agree", "the idea is great", "no it is wrong", "sure , i will help"]


def records() -> list[InputRecord]:
    return [InputRecord(id=i + 1, line=i + 1, text=t) for i, t in enumerate(PROMPTS * 3)]


def unit_vector(seed: int = 7) -> torch.Tensor:
    v = torch.randn(16, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def vectors(unit: torch.Tensor) -> list[PersonaVector]:
    calibration = Calibration(pos_mean=1.0, pos_std=0.1, neg_mean=0.0, neg_std=0.1)
    return [PersonaVector("trait", 0, unit, calibration, raw_norm=1.0, residual_norm=1.0, object_id="x" * 64)]


def save(folder: Path, shift: float = 0.0, unit: torch.Tensor | None = None) -> Path:
    model = build("llama")
    if shift:
        with torch.no_grad():
            model.get_input_embeddings().weight += shift * unit  # every token moves the same step
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def load(folder: Path):  # type: ignore[no-untyped-def]
    return load_model(ModelRequest(model=str(folder), device="cpu", dtype="float32"))


def run(baseline_dir: Path, candidate_dir: Path, unit: torch.Tensor, sequential: bool) -> list[PairedLine]:
    baseline = load(baseline_dir)
    columns = score_columns(baseline, vectors(unit))
    options = ScanOptions(batch_size=4, chunk_batches=1)
    if sequential:
        results = compare_sequential(baseline, lambda: load(candidate_dir), columns, records, options)
    else:
        results = compare_in_memory(baseline, load(candidate_dir), columns, records(), options)
    return [r for r in results if isinstance(r, PairedLine)]


def test_identical_candidate_has_zero_shift(tmp_path: Path) -> None:
    unit = unit_vector()
    base = save(tmp_path / "base")
    lines = run(base, save(tmp_path / "same"), unit, sequential=False)
    assert len(lines) == len(PROMPTS) * 3
    assert all(line.shift("trait") == 0.0 for line in lines)
    collector = ShiftCollector(score_columns(load(base), vectors(unit)), parse_max_shift(["0.0"]))
    for line in lines:
        collector.add(line)
    gate = collector.gates()[0]
    assert gate.stats.mean == 0.0
    assert gate.passed


def test_planted_embedding_shift_is_detected(tmp_path: Path) -> None:
    unit = unit_vector()
    base = save(tmp_path / "base")
    moved = save(tmp_path / "moved", shift=0.5, unit=unit)
    lines = run(base, moved, unit, sequential=False)
    collector = ShiftCollector(score_columns(load(base), vectors(unit)), parse_max_shift(["trait=0.05"]))
    for line in lines:
        collector.add(line)
    gate = collector.gates()[0]
    assert gate.stats.mean > 0.1
    assert gate.stats.ci_low > 0.05
    assert not gate.passed
    assert "FAIL" in gate.describe()
    # Moving against the vector lowers the score instead.
    against = save(tmp_path / "against", shift=-0.5, unit=unit)
    assert sum(line.shift("trait") for line in run(base, against, unit, sequential=False)) < 0


def test_sequential_equals_in_memory(tmp_path: Path) -> None:
    unit = unit_vector()
    base = save(tmp_path / "base")
    moved = save(tmp_path / "moved", shift=0.3, unit=unit)
    together = run(base, moved, unit, sequential=False)
    apart = run(base, moved, unit, sequential=True)
    assert [line.record.line for line in apart] == [line.record.line for line in together]
    for a, b in zip(apart, together):
        assert a.candidate["trait"].raw == pytest.approx(b.candidate["trait"].raw, abs=1e-6)
        assert a.baseline["trait"].raw == pytest.approx(b.baseline["trait"].raw, abs=1e-6)


def test_paired_record_carries_both_scores(tmp_path: Path) -> None:
    unit = unit_vector()
    base = save(tmp_path / "base")
    lines = run(base, save(tmp_path / "moved", shift=0.3, unit=unit), unit, sequential=False)
    columns = score_columns(load(base), vectors(unit))
    record = paired_record(lines[0], Thresholds(), columns)
    entry = record["scores"]["trait"]
    assert entry["shift"]["score"] == pytest.approx(entry["score"] - entry["baseline"]["score"])
    assert entry["shift"]["raw"] == pytest.approx(entry["raw"] - entry["baseline"]["raw"])


def test_architecture_mismatch_rejected(tmp_path: Path) -> None:
    base = save(tmp_path / "base")
    other = tmp_path / "gpt2"
    build("gpt2").save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    unit = unit_vector()
    with pytest.raises(ModelMismatchError, match="same architecture"):
        run(base, other, unit, sequential=False)


@pytest.mark.parametrize("bad", ["x", "p=", "=0.1", "nan"])
def test_parse_max_shift_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_max_shift([bad])


def test_parse_max_shift_values() -> None:
    limits = parse_max_shift(["0.2", "sycophancy=0.05"])
    assert limits == MaxShift(0.2, {"sycophancy": 0.05})
    assert limits.for_persona("refusal") == 0.2
    assert limits.for_persona("sycophancy") == 0.05
