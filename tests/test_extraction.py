"""Extraction: directions, calibration, cross-validation, auto layer and registry reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import build, tiny_tokenizer

from safety_lens_cli.extraction import (
    ExtractionOptions,
    choose_auto_layer,
    compute_direction,
    cross_validate,
    extract,
    layer_result,
)
from safety_lens_cli.models import wrap_model
from safety_lens_cli.personas import load_persona
from safety_lens_cli.vector_lookup import VectorRequest, resolve_personas, resolve_vectors


def test_mean_diff_is_centred_and_order_free() -> None:
    generator = torch.Generator().manual_seed(0)
    positive = torch.randn(3, 8, generator=generator) + 2.0
    negative = torch.randn(5, 8, generator=generator)
    expected = positive.double().mean(0) - negative.double().mean(0)
    direction = compute_direction(positive, negative, "mean-diff")
    torch.testing.assert_close(direction.double(), expected, rtol=0, atol=1e-6)
    shuffled = compute_direction(positive[[2, 0, 1]], negative[[4, 1, 3, 0, 2]], "mean-diff")
    torch.testing.assert_close(shuffled, direction, rtol=0, atol=1e-6)
    doubled = compute_direction(torch.cat([positive, positive]), torch.cat([negative, negative]), "mean-diff")
    torch.testing.assert_close(doubled, direction, rtol=0, atol=1e-6)


def test_pca_sign_follows_mean_difference() -> None:
    generator = torch.Generator().manual_seed(1)
    shift = torch.zeros(8)
    shift[3] = 5.0
    negative = torch.randn(20, 8, generator=generator)
    positive = negative + shift + 0.1 * torch.randn(20, 8, generator=generator)
    direction = compute_direction(positive, negative, "pca")
    unit = direction / direction.norm()
    assert float(unit @ (positive.mean(0) - negative.mean(0))) > 0
    assert abs(float(unit[3])) > 0.99


def test_cross_validation_separable_and_random_baseline() -> None:
    generator = torch.Generator().manual_seed(2)
    negative = torch.randn(40, 32, generator=generator)
    positive = negative + 12.0 * torch.nn.functional.one_hot(torch.tensor(5), 32).float()
    auc, acc = cross_validate(positive, negative, "mean-diff", 5, 0)
    assert auc == pytest.approx(1.0)
    assert acc == pytest.approx(1.0)
    random_auc, _ = cross_validate(positive, negative, "mean-diff", 5, 0, random_direction=True)
    assert random_auc is not None and random_auc < 0.9


def test_calibration_maps_means_to_zero_and_one() -> None:
    generator = torch.Generator().manual_seed(3)
    negative = torch.randn(10, 8, generator=generator)
    positive = torch.randn(10, 8, generator=generator) + 1.0
    result = layer_result("p", 0, positive, negative, 1.0, ExtractionOptions())
    pos_scores = [result.calibration.score(float(x @ result.unit)) for x in positive]
    neg_scores = [result.calibration.score(float(x @ result.unit)) for x in negative]
    assert sum(pos_scores) / 10 == pytest.approx(1.0, abs=1e-5)
    assert sum(neg_scores) / 10 == pytest.approx(0.0, abs=1e-5)
    assert result.unit.norm() == pytest.approx(1.0)


def test_auto_rule_prefers_cohens_d_among_ties() -> None:
    qualities = {
        3: {"cv_auroc": 0.95, "cohens_d": 9.0},
        5: {"cv_auroc": 0.999, "cohens_d": 2.0},
        7: {"cv_auroc": 0.995, "cohens_d": 4.0},
        9: {"cv_auroc": 0.995, "cohens_d": 4.0},
    }
    assert choose_auto_layer(qualities) == 7


def write_persona(folder: Path, name: str = "tiny", extra_word: str = "") -> Path:
    pairs = [
        {"user": f"is {w} right ?", "positive": f"yes i agree great idea {w}{extra_word}", "negative": f"no it is wrong {w}"}
        for w in "abcdefghij"
    ]
    evals = [{"user": "is k right ?", "response": "yes great idea", "label": 1}, {"text": "no it is wrong", "label": 0}]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "description": "test", "version": 1, "pairs": pairs, "eval": evals}))
    return path


@pytest.fixture()
def tiny_lm():  # type: ignore[no-untyped-def]
    return wrap_model(build("llama"), tiny_tokenizer())


def test_vector_independent_of_batch_size(tiny_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    persona = load_persona(write_persona(tmp_path))
    one = extract(tiny_lm, [persona], [1], ExtractionOptions(batch_size=1))[0].layers[1]
    many = extract(tiny_lm, [persona], [1], ExtractionOptions(batch_size=7))[0].layers[1]
    torch.testing.assert_close(one.unit, many.unit, rtol=0, atol=1e-5)


def test_registry_reuse_and_determinism(tiny_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_persona(tmp_path)
    notes: list[str] = []
    request = VectorRequest(personas=(str(path),), layers=("1",), registry=tmp_path / "reg")
    first = resolve_vectors(tiny_lm, request, notify=notes.append)
    assert len(notes) == 1
    second = resolve_vectors(tiny_lm, request, notify=notes.append)
    assert len(notes) == 1  # the second call is a registry hit
    assert first[0].object_id == second[0].object_id
    assert torch.equal(first[0].unit, second[0].unit)
    # A fresh registry gives the same bytes, hence the same object id.
    again = resolve_vectors(tiny_lm, VectorRequest(personas=(str(path),), layers=("1",), registry=tmp_path / "other"))
    assert again[0].object_id == first[0].object_id
    # An edited persona gives a new entry, never a stale hit.
    write_persona(tmp_path, extra_word=" !")
    edited = resolve_vectors(tiny_lm, request, notify=notes.append)
    assert len(notes) == 2
    assert edited[0].object_id != first[0].object_id


def test_metadata_holds_required_fields(tiny_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_persona(tmp_path)
    vector = resolve_vectors(tiny_lm, VectorRequest(personas=(str(path),), layers=("-1",), registry=tmp_path))[0]
    meta = vector.metadata
    for name in (
        "model_id", "model_fingerprint", "revision", "layer", "module_path", "persona", "stimulus_sha256",
        "method", "position", "rendering", "hidden_size", "dtype", "calibration", "quality", "tool_version",
        "raw_norm", "residual_norm",
    ):
        assert name in meta, name
    assert meta["layer"] == 2
    assert meta["module_path"] == "model.layers.2"
    assert meta["rendering"]["kind"] == "chat-template"
    assert meta["quality"]["cv_folds"] == 5


def test_auto_stores_one_vector_and_records_choice(tiny_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_persona(tmp_path)
    request = VectorRequest(personas=(str(path),), registry=tmp_path / "reg")
    resolved = resolve_personas(tiny_lm, request)[0]
    assert resolved.auto_layer == choose_auto_layer(resolved.qualities)
    assert len(list((tmp_path / "reg" / "objects").iterdir())) == 1
    again = resolve_personas(tiny_lm, request)[0]
    assert again.extracted_layers == []
    assert again.vectors[0].object_id == resolved.vectors[0].object_id


def test_no_extract_names_the_command(tiny_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safety_lens_cli.errors import VectorNotFoundError

    path = write_persona(tmp_path)
    request = VectorRequest(personas=(str(path),), layers=("1",), registry=tmp_path / "r", extract_missing=False)
    with pytest.raises(VectorNotFoundError, match="safety-lens extract --persona tiny --layer 1"):
        resolve_vectors(tiny_lm, request)


@pytest.mark.real_model
def test_builtin_personas_separate_on_real_model(real_personas) -> None:  # type: ignore[no-untyped-def]
    for resolved in real_personas:
        quality = resolved.vectors[0].metadata["quality"]
        assert resolved.auto_layer is not None
        assert quality["cv_auroc"] >= 0.9, (resolved.persona, quality)
        assert quality["eval_auroc"] >= 0.9, (resolved.persona, quality)
        assert quality["random_cv_auroc"] < quality["cv_auroc"], (resolved.persona, quality)
