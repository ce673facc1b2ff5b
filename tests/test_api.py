"""The Python API on tiny random models: values against hook oracles, inputs, errors, files and hooks."""

from __future__ import annotations

import inspect
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import tiny_models
from tiny_models import tiny_tokenizer

import safety_lens_cli
from safety_lens_cli.api import DEFAULT_PERSONAS, LensHooks, SafetyLens, WhiteBoxWrapper, white_box_metric
from safety_lens_cli.errors import (
    InputError,
    LayerIndexError,
    PersonaNotFoundError,
    UnsafeFormatError,
    UsageError,
    VectorNotFoundError,
)
from safety_lens_cli.extraction import choose_auto_layer
from safety_lens_cli.registry import Registry

POSITIVE = ["yes sure great idea", "i agree you is right", "great great", "sure"]
NEGATIVE = ["no sorry", "i cannot help", "it is wrong", "not right .", "no"]
HIDDEN = tiny_models.HIDDEN


def all_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        for m in model.modules()
    )


def last_token_state(model: torch.nn.Module, ids: list[int], layer: int) -> torch.Tensor:
    """Oracle: the block output at the last token from `output_hidden_states`, one sequence at a time."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return hidden[layer + 1][0, -1].double()


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


@pytest.fixture()
def lens() -> SafetyLens:
    return SafetyLens(tiny_models.build("llama"), tiny_tokenizer())


def unit(seed: int) -> torch.Tensor:
    vector = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


# Package surface


def test_import_stays_free_of_torch() -> None:
    code = (
        "import sys, safety_lens_cli\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        "from safety_lens_cli import SafetyLens\n"
        "print('TORCH=' + str('torch' in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout
    assert "TORCH=True" in result.stdout


def test_lazy_exports_are_the_api_objects() -> None:
    assert safety_lens_cli.SafetyLens is SafetyLens
    assert safety_lens_cli.LensHooks is LensHooks
    assert safety_lens_cli.WhiteBoxWrapper is WhiteBoxWrapper
    assert safety_lens_cli.white_box_metric is white_box_metric
    with pytest.raises(AttributeError):
        safety_lens_cli.NoSuchName  # noqa: B018


def public_callables() -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = [("white_box_metric", white_box_metric)]
    for cls in (SafetyLens, LensHooks, WhiteBoxWrapper):
        for name, member in vars(cls).items():
            if name.startswith("_") and name not in ("__init__", "__enter__", "__exit__"):
                continue
            function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            if isinstance(function, property):
                function = function.fget
            if callable(function):
                found.append((f"{cls.__name__}.{name}", function))
    return found


@pytest.mark.parametrize(("name", "function"), public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_function_has_type_hints(name: str, function: Any) -> None:
    signature = inspect.signature(function)
    for parameter in signature.parameters.values():
        if parameter.name in ("self", "cls"):
            continue
        assert parameter.annotation is not inspect.Parameter.empty, f"{name}: parameter {parameter.name}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: return"


# Extraction


def test_extracted_vector_is_mean_difference_oracle(lens: SafetyLens) -> None:
    layer = 1
    vector = lens.extract_persona_vector(POSITIVE, NEGATIVE, layer)
    assert vector.dtype == torch.float32
    assert vector.shape == (HIDDEN,)
    assert vector.device == lens.device
    assert float(vector.norm()) == pytest.approx(1.0, abs=1e-6)

    model, tokenizer = lens.model, lens.tokenizer
    positive = torch.stack([last_token_state(model, ids_of(tokenizer, t), layer) for t in POSITIVE])
    negative = torch.stack([last_token_state(model, ids_of(tokenizer, t), layer) for t in NEGATIVE])
    expected = positive.mean(0) - negative.mean(0)
    extraction = lens.last_extraction
    assert extraction is not None
    assert extraction["layer"] == layer
    recovered = extraction["vector"].double() * extraction["raw_norm"]
    assert torch.allclose(recovered, expected, atol=1e-6), float((recovered - expected).abs().max())


def test_extraction_ignores_order_and_duplication(lens: SafetyLens) -> None:
    positive, negative = POSITIVE[:3], NEGATIVE  # 3 positive and 5 negative stimuli
    reference = lens.extract_persona_vector(positive, negative, 2)
    shuffled_pos, shuffled_neg = positive[:], negative[:]
    random.Random(0).shuffle(shuffled_pos)
    random.Random(1).shuffle(shuffled_neg)
    shuffled = lens.extract_persona_vector(shuffled_pos, shuffled_neg, 2)
    doubled = lens.extract_persona_vector(positive * 2, negative * 2, 2)
    assert torch.allclose(shuffled, reference, atol=1e-6)
    assert torch.allclose(doubled, reference, atol=1e-6)


def test_extraction_mean_position_reads_all_tokens(lens: SafetyLens) -> None:
    layer = 0
    lens.extract_persona_vector(POSITIVE, NEGATIVE, layer, position="mean")
    model, tokenizer = lens.model, lens.tokenizer

    def mean_state(text: str) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids_of(tokenizer, text)]), output_hidden_states=True).hidden_states
        return hidden[layer + 1][0].double().mean(0)

    expected = torch.stack([mean_state(t) for t in POSITIVE]).mean(0) - torch.stack([mean_state(t) for t in NEGATIVE]).mean(0)
    extraction = lens.last_extraction
    assert extraction is not None
    assert extraction["position"] == "mean"
    assert torch.allclose(extraction["vector"].double() * extraction["raw_norm"], expected, atol=1e-6)


def test_extraction_record_is_plain_and_calibrated(lens: SafetyLens) -> None:
    record = lens.extract_persona(POSITIVE, NEGATIVE, -1, name="agreeable")
    assert record is lens.last_extraction
    assert record["persona"] == "agreeable"
    assert record["layer"] == 2
    assert record["object_id"] is None
    assert set(record["calibration"]) == {"pos_mean", "pos_std", "neg_mean", "neg_std"}
    assert record["calibration"]["pos_mean"] > record["calibration"]["neg_mean"]
    json.dumps({k: v for k, v in record.items() if k != "vector"})
    # The calibration is the stimuli's mean raw projection on each side.
    raws = lens.scan(POSITIVE, record["vector"], -1)
    assert sum(raws) / len(raws) == pytest.approx(record["calibration"]["pos_mean"], abs=1e-5)
    scores = lens.calibrated_score(raws, record["calibration"])
    assert sum(scores) / len(scores) == pytest.approx(1.0, abs=1e-4)


def test_extraction_auto_layer_follows_auto_rule(lens: SafetyLens) -> None:
    record = lens.extract_persona(POSITIVE * 3, NEGATIVE * 3)
    qualities = {layer: lens.extract_persona(POSITIVE * 3, NEGATIVE * 3, layer)["quality"] for layer in range(3)}
    assert record["layer"] == choose_auto_layer(qualities)


@pytest.mark.parametrize(
    ("positive", "negative", "message"),
    [
        ("yes sure", NEGATIVE, "single string"),
        ([], NEGATIVE, "non-empty list"),
        (POSITIVE, ["no", "  "], "empty"),
        (POSITIVE, ["no", 3], "must be a string"),
        (["same text"], ["same text"], "identical mean activations"),
    ],
)
def test_extraction_rejects_bad_texts(lens: SafetyLens, positive: Any, negative: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        lens.extract_persona_vector(positive, negative, 0)


def test_extraction_rejects_bad_layer_and_position(lens: SafetyLens) -> None:
    with pytest.raises(LayerIndexError, match="out of range"):
        lens.extract_persona_vector(POSITIVE, NEGATIVE, 3)
    with pytest.raises(UsageError, match="'last' or 'mean'"):
        lens.extract_persona_vector(POSITIVE, NEGATIVE, 0, position="response-mean")  # type: ignore[arg-type]


# Projection


def test_scan_equals_hook_oracle_on_raw_scale(lens: SafetyLens) -> None:
    vector = unit(0) * 3.0  # not normalised: the raw value scales with it
    ids = ids_of(lens.tokenizer, "is it right ?")
    expected = float(last_token_state(lens.model, ids, 1) @ vector.double())
    value = lens.scan(torch.tensor([ids]), vector, 1)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, abs=1e-5)
    assert lens.scan(ids, vector / 3.0, 1) == pytest.approx(expected / 3.0, abs=1e-5)


def test_scan_input_forms_agree(lens: SafetyLens) -> None:
    vector = unit(1)
    text = "hello world"
    ids = ids_of(lens.tokenizer, text)
    reference = lens.scan(text, vector, -2)
    assert lens.scan(ids, vector, 1) == pytest.approx(reference, abs=1e-6)
    assert lens.scan(torch.tensor(ids), vector, 1) == pytest.approx(reference, abs=1e-6)
    assert lens.scan([ids], vector, 1) == pytest.approx(reference, abs=1e-6)
    assert isinstance(lens.scan([ids], vector, 1), float)
    batch = lens.scan([text, "no"], vector, 1)
    assert isinstance(batch, list)
    assert batch[0] == pytest.approx(reference, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_scan_padded_batch_equals_unbatched(family: str, side: str) -> None:
    lens = SafetyLens(tiny_models.build(family), tiny_tokenizer())
    vector = unit(2)
    short, long = ids_of(lens.tokenizer, "a b"), ids_of(lens.tokenizer, "a b c d e f g")
    width = len(long)
    pad = [3] * (width - len(short))
    padded = pad + short if side == "left" else short + pad
    mask = [0] * len(pad) + [1] * len(short) if side == "left" else [1] * len(short) + [0] * len(pad)
    values = lens.scan(torch.tensor([padded, long]), vector, 1, attention_mask=torch.tensor([mask, [1] * width]))
    assert isinstance(values, list)
    assert values[0] == pytest.approx(lens.scan(short, vector, 1), abs=1e-5)
    assert values[1] == pytest.approx(lens.scan(long, vector, 1), abs=1e-5)


def test_scan_all_layers_uses_one_forward_pass(lens: SafetyLens) -> None:
    vectors = {0: unit(3), 1: unit(4), -1: unit(5)}
    calls: list[int] = []
    handle = lens.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        result = lens.scan_all_layers("is it right", vectors)
    finally:
        handle.remove()
    assert calls == [1]
    assert list(result) == [0, 1, -1]
    for layer, vector in vectors.items():
        assert result[layer] == pytest.approx(lens.scan("is it right", vector, layer), abs=1e-6)
    batch = lens.scan_all_layers(["a", "b c"], {1: unit(3)})
    assert isinstance(batch[1], list)
    assert len(batch[1]) == 2


@pytest.mark.parametrize(
    ("input_ids", "vector", "kwargs", "error", "message"),
    [
        ([1, 2], torch.ones(HIDDEN + 1), {}, UsageError, r"expected \[16\]"),
        ([1, 2], torch.ones(1, HIDDEN), {}, UsageError, r"shape \[1, 16\]"),
        ([1, 2], (torch.ones(HIDDEN), {}), {}, UsageError, "tuple"),
        ([1, 2], torch.full((HIDDEN,), float("nan")), {}, UsageError, "non-finite"),
        (torch.tensor([[0.5, 1.0]]), torch.ones(HIDDEN), {}, UsageError, "integer token ids"),
        ([1, 999], torch.ones(HIDDEN), {}, UsageError, "token id 999 outside the vocabulary"),
        ([1, -1], torch.ones(HIDDEN), {}, UsageError, "outside the vocabulary"),
        ([], torch.ones(HIDDEN), {}, UsageError, "Invalid input_ids"),
        ("   ", torch.ones(HIDDEN), {}, UsageError, "empty"),
        ([[1, 2], [3]], torch.ones(HIDDEN), {"attention_mask": [[1, 1], [1, 1]]}, UsageError, "attention_mask"),
        (torch.tensor([[1, 2]]), torch.ones(HIDDEN), {"attention_mask": torch.tensor([[0, 0]])}, InputError, "no tokens"),
        (torch.tensor([[1, 2]]), torch.ones(HIDDEN), {"attention_mask": torch.tensor([[1, 2]])}, UsageError, "0 .padding. or 1"),
        ("a b", torch.ones(HIDDEN), {"attention_mask": [1, 1]}, UsageError, "not to a string"),
        ([1, 2], torch.ones(HIDDEN), {"layer_idx": 7}, LayerIndexError, "out of range"),
        ([1, 2], torch.ones(HIDDEN), {"layer_idx": 1.0}, UsageError, "expected an int"),
    ],
)
def test_scan_rejects_bad_input(
    lens: SafetyLens, input_ids: Any, vector: Any, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    layer = kwargs.pop("layer_idx", 0)
    with pytest.raises(error, match=message):
        lens.scan(input_ids, vector, layer, **kwargs)


def test_scan_rejects_text_longer_than_context(lens: SafetyLens) -> None:
    with pytest.raises(UsageError, match="more than the model's context of 128"):
        lens.scan([5] * 129, unit(0), 0)


def test_calibrated_score_maps_means_to_zero_and_one() -> None:
    calibration = {"pos_mean": 3.0, "pos_std": 1.0, "neg_mean": 1.0, "neg_std": 1.0}
    assert SafetyLens.calibrated_score(1.0, calibration) == 0.0
    assert SafetyLens.calibrated_score(3.0, calibration) == 1.0
    assert SafetyLens.calibrated_score([2.0, 5.0], calibration) == [0.5, 2.0]
    with pytest.raises(UsageError, match="pos_mean"):
        SafetyLens.calibrated_score(1.0, {"pos_mean": 1.0})


def test_training_mode_is_restored_and_ignored(lens: SafetyLens) -> None:
    lens.model.config.attention_dropout = 0.5
    for module in lens.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    reference = lens.scan("is it right", unit(0), 1)
    lens.model.train()
    lens.model.model.layers[0].eval()
    value = lens.scan("is it right", unit(0), 1)
    assert value == reference
    assert lens.model.training
    assert not lens.model.model.layers[0].training
    assert lens.model.model.layers[1].training


# Hooks


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neo", "falcon"])
def test_lens_hooks_capture_block_outputs(family: str) -> None:
    model = tiny_models.build(family)
    ids = torch.randint(8, 60, (2, 5))
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    # transformers 5 keeps its own output-capturing hooks once hidden states were requested.
    baseline = all_hooks(model)
    with LensHooks(model, [0, -2]) as hooks:
        assert hooks.active
        assert all_hooks(model) == baseline + 2
        with torch.no_grad():
            model(input_ids=ids)
    assert not hooks.active
    assert list(hooks.activations) == [0, -2]
    assert hooks.activations[0].shape == (2, 5, HIDDEN)
    assert torch.equal(hooks.activations[0], reference[1])
    assert torch.equal(hooks.activations[-2], reference[2])
    assert all_hooks(model) == baseline


def test_lens_hooks_single_layer_activation() -> None:
    model = tiny_models.build("llama")
    hooks = LensHooks(model, 1)
    with pytest.raises(UsageError, match="run a forward pass"):
        hooks.activation  # noqa: B018
    with hooks:
        assert all_hooks(model) == 1
        with pytest.raises(UsageError, match="already active"):
            hooks.__enter__()
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 9, 10]]))
    assert hooks.activation.shape == (1, 3, HIDDEN)
    assert torch.equal(hooks.activation, hooks.activations[1])
    with pytest.raises(UsageError, match="single layer_idx"):
        LensHooks(model, [0, 1]).activation  # noqa: B018
    with pytest.raises(UsageError, match="empty list"):
        LensHooks(model, [])
    with pytest.raises(LayerIndexError):
        LensHooks(model, 3)


def test_lens_hooks_removed_after_exception() -> None:
    model = tiny_models.build("llama")
    ids = torch.tensor([[1, 9, 10]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(IndexError):
        with LensHooks(model, [0, 2]):
            model(input_ids=torch.tensor([[5, 999]]))  # 999 is beyond the vocabulary
    assert all_hooks(model) == 0
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_api_calls_leave_no_hooks(lens: SafetyLens, tmp_path: Path) -> None:
    lens.extract_persona_vector(POSITIVE, NEGATIVE, None)
    lens.scan_all_layers("a", {0: unit(0), 2: unit(1)})
    with pytest.raises(UsageError):
        lens.scan([1, 999], unit(0), 0)
    assert all_hooks(lens.model) == 0


def test_api_leaves_no_hooks_when_forward_raises(lens: SafetyLens) -> None:
    def fail(*_: Any) -> None:
        raise RuntimeError("block failed")

    handle = lens.model.model.layers[0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="block failed"):
            lens.scan("a b", unit(0), 1)
        with pytest.raises(RuntimeError, match="block failed"):
            lens.extract_persona_vector(POSITIVE, NEGATIVE, 2)
        assert all_hooks(lens.model) == 1
    finally:
        handle.remove()
    assert all_hooks(lens.model) == 0


# Built-in personas through the registry


@pytest.fixture()
def registry_lens(tmp_path: Path) -> SafetyLens:
    return SafetyLens(tiny_models.build("llama"), tiny_tokenizer(), registry=tmp_path / "registry")


def test_quick_scan_extracts_once_then_reuses(registry_lens: SafetyLens, monkeypatch: pytest.MonkeyPatch) -> None:
    import safety_lens_cli.vector_lookup as vector_lookup

    calls: list[tuple[str, ...]] = []
    original = vector_lookup.resolve_vectors

    def counting(lm: Any, request: Any, **kwargs: Any) -> Any:
        calls.append(request.personas)
        return original(lm, request, **kwargs)

    monkeypatch.setattr(vector_lookup, "resolve_vectors", counting)
    first = registry_lens.quick_scan("is it right", persona_names=["refusal", "sycophancy"])
    assert list(first) == ["refusal", "sycophancy"]
    assert all(isinstance(score, float) for score in first.values())
    assert len(Registry(registry_lens._registry).entries()) == 2
    second = registry_lens.quick_scan("is it right", persona_names=["sycophancy"])
    assert calls == [("refusal", "sycophancy")]
    assert second["sycophancy"] == first["sycophancy"]

    # A new lens on the same weights and registry reads the stored vectors without extracting.
    monkeypatch.setattr("safety_lens_cli.vector_lookup.extract", lambda *a, **k: pytest.fail("extracted again"))
    again = SafetyLens(registry_lens.model, registry_lens.tokenizer, registry=registry_lens._registry)
    assert again.quick_scan("is it right", persona_names=["refusal", "sycophancy"]) == first


def test_quick_scan_detailed_scales(registry_lens: SafetyLens) -> None:
    detailed = registry_lens.quick_scan_detailed("hello world", persona_names="refusal")
    assert isinstance(detailed, dict)
    entry = detailed["refusal"]
    assert set(entry) == {"raw", "score", "layer", "object_id"}
    vector = registry_lens.persona_vector("refusal")
    assert entry["layer"] == vector["layer"]
    assert entry["object_id"] == vector["object_id"]
    assert entry["score"] == pytest.approx(SafetyLens.calibrated_score(entry["raw"], vector["calibration"]), abs=1e-9)
    assert registry_lens.quick_scan("hello world", persona_names=["refusal"]) == {"refusal": entry["score"]}
    json.dumps(detailed)


def test_quick_scan_reads_the_chat_prompt(registry_lens: SafetyLens) -> None:
    """quick_scan reads one user turn with the chat template at the last token, like `safety-lens scan --text`."""
    from safety_lens_cli.rendering import choose_rendering, encode_prompt

    text = "you is right"
    entry = registry_lens.quick_scan_detailed(text, persona_names=["refusal"])["refusal"]
    vector = registry_lens.persona_vector("refusal")
    tokenizer = registry_lens.tokenizer
    ids = encode_prompt(tokenizer, [{"role": "user", "content": text}], choose_rendering(tokenizer)).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1] != tokenizer.bos_token_id
    assert registry_lens.scan(list(ids), vector["vector"], vector["layer"]) == pytest.approx(entry["raw"], abs=1e-6)


def test_quick_scan_explicit_layer_and_batch(registry_lens: SafetyLens) -> None:
    at_last = registry_lens.quick_scan(["a b", "no"], layer_idx=-1, persona_names=["refusal"])
    assert isinstance(at_last, list)
    assert len(at_last) == 2
    detailed = registry_lens.quick_scan_detailed("a b", layer_idx=2, persona_names=["refusal"])
    assert detailed["refusal"]["layer"] == 2
    assert detailed["refusal"]["score"] == pytest.approx(at_last[0]["refusal"], abs=1e-5)


def test_quick_scan_default_personas(registry_lens: SafetyLens) -> None:
    assert DEFAULT_PERSONAS == ("sycophancy", "deception", "refusal")
    assert list(registry_lens.quick_scan("hello")) == list(DEFAULT_PERSONAS)


def test_quick_scan_rejects_unknown_persona_and_empty_text(registry_lens: SafetyLens) -> None:
    with pytest.raises(PersonaNotFoundError, match="no-such-persona"):
        registry_lens.quick_scan("hello", persona_names=["no-such-persona"])
    with pytest.raises(UsageError, match="empty"):
        registry_lens.quick_scan("  ", persona_names=["refusal"])


# Vector files


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_vector_file_round_trip_is_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    vector = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0)).to(dtype)
    path = tmp_path / "v.safetensors"
    SafetyLens.save_vector(vector, path)
    loaded = SafetyLens.load_vector(path)
    assert loaded.dtype == dtype
    assert torch.equal(loaded.view(torch.uint8), vector.view(torch.uint8))
    assert SafetyLens.load_vector_metadata(path) == {}


def test_shared_and_non_contiguous_tensors_save(tmp_path: Path) -> None:
    matrix = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    for index, row in enumerate(matrix):  # rows share the matrix's storage
        SafetyLens.save_vector(row, tmp_path / f"row{index}.safetensors")
    column = matrix[:, 2]
    assert not column.is_contiguous()
    SafetyLens.save_vector(column, tmp_path / "column.safetensors")
    for index in range(3):
        assert torch.equal(SafetyLens.load_vector(tmp_path / f"row{index}.safetensors"), matrix[index])
    assert torch.equal(SafetyLens.load_vector(tmp_path / "column.safetensors"), column)
    # Only the row's own values are stored, not the whole matrix.
    assert (tmp_path / "row0.safetensors").stat().st_size < 3 * HIDDEN * 4


def test_typed_metadata_round_trip(tmp_path: Path) -> None:
    metadata = {"layer": 12, "coefficient": 4.0, "note": None, "persona": "sycophancy", "ok": True, "tags": [1, "a"]}
    path = tmp_path / "v.safetensors"
    SafetyLens.save_vector(unit(0), path, metadata)
    loaded = SafetyLens.load_vector_metadata(path)
    assert loaded == metadata
    assert type(loaded["layer"]) is int
    assert type(loaded["coefficient"]) is float
    assert loaded["note"] is None
    first = path.read_bytes()
    SafetyLens.save_vector(unit(0), path, dict(reversed(list(metadata.items()))))
    assert path.read_bytes() == first


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".PT", ".pth", ".pkl"])
def test_pickle_suffixes_rejected(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"vector{suffix}"
    with pytest.raises(UnsafeFormatError, match=r"can run arbitrary code\. Use a \.safetensors path"):
        SafetyLens.save_vector(unit(0), path)
    assert not path.exists()
    path.write_bytes(b"not read")
    with pytest.raises(UnsafeFormatError, match="pickle"):
        SafetyLens.load_vector(path)


def test_load_vector_errors_and_foreign_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(VectorNotFoundError, match="not found"):
        SafetyLens.load_vector(tmp_path / "missing.safetensors")
    single = tmp_path / "foreign.safetensors"
    save_file({"direction": torch.ones(4)}, str(single), metadata={"format": "pt"})
    assert torch.equal(SafetyLens.load_vector(single), torch.ones(4))
    assert SafetyLens.load_vector_metadata(single) == {"format": "pt"}
    several = tmp_path / "several.safetensors"
    save_file({"a": torch.ones(2), "b": torch.zeros(2)}, str(several))
    with pytest.raises(InputError, match=r"no tensor named 'vector' and contains 2 tensors \(a, b\)"):
        SafetyLens.load_vector(several)
    with pytest.raises(UsageError, match="expected a torch.Tensor"):
        SafetyLens.save_vector([1.0, 2.0], tmp_path / "list.safetensors")  # type: ignore[arg-type]


def test_saved_vector_scans_like_the_original(lens: SafetyLens, tmp_path: Path) -> None:
    vector = lens.extract_persona_vector(POSITIVE, NEGATIVE, 1)
    extraction = lens.last_extraction
    assert extraction is not None
    lens.save_vector(vector, tmp_path / "v.safetensors", {"layer": 1, "calibration": extraction["calibration"]})
    loaded = lens.load_vector(tmp_path / "v.safetensors")
    metadata = lens.load_vector_metadata(tmp_path / "v.safetensors")
    assert lens.scan("a b", loaded, metadata["layer"]) == lens.scan("a b", vector, 1)
    assert metadata["calibration"] == extraction["calibration"]


# Generation and the metric


def test_scan_and_generate_uses_the_decoding_loop(registry_lens: SafetyLens, monkeypatch: pytest.MonkeyPatch) -> None:
    import safety_lens_cli.trajectory as trajectory

    calls: list[int] = []
    original = trajectory.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["max_new_tokens"])
        return original(*args, **kwargs)

    monkeypatch.setattr(trajectory, "decode", counting)
    wrapper = WhiteBoxWrapper.from_lens(registry_lens)
    result = wrapper.scan_and_generate("is it right", persona_names=["refusal"], max_new_tokens=4)
    assert calls == [4]
    assert set(result) == {"text", "scan", "raw", "layers", "token_scores", "stop_reason"}
    assert isinstance(result["text"], str)
    assert result["stop_reason"] in ("eos", "max_new_tokens")
    assert 1 <= len(result["token_scores"]["refusal"]) <= 4
    json.dumps(result)
    # The prompt scan is what quick_scan reads for the same prompt.
    quick = registry_lens.quick_scan_detailed("is it right", persona_names=["refusal"])["refusal"]
    assert result["scan"]["refusal"] == pytest.approx(quick["score"], abs=1e-4)
    assert result["raw"]["refusal"] == pytest.approx(quick["raw"], abs=1e-5)
    assert result["layers"]["refusal"] == quick["layer"]


def test_scan_and_generate_matches_model_generate(tmp_path: Path) -> None:
    from safety_lens_cli.rendering import choose_rendering, encode_prompt

    model, tokenizer = tiny_models.build("llama"), tiny_tokenizer()
    wrapper = WhiteBoxWrapper(model, tokenizer, layer_idx=-1, registry=tmp_path)
    result = wrapper.scan_and_generate("hello", persona_names=["refusal"], max_new_tokens=5)
    assert wrapper.layer_idx == 2
    assert result["layers"] == {"refusal": 2}
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "hello"}], choose_rendering(tokenizer)).input_ids
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, len(ids) :]
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_scan_and_generate_rejects_bad_arguments(registry_lens: SafetyLens) -> None:
    wrapper = WhiteBoxWrapper.from_lens(registry_lens, layer_idx=1)
    with pytest.raises(UsageError, match="max_new_tokens"):
        wrapper.scan_and_generate("hi", max_new_tokens=0)
    with pytest.raises(UsageError, match="non-empty string"):
        wrapper.scan_and_generate("")
    with pytest.raises(LayerIndexError):
        WhiteBoxWrapper.from_lens(registry_lens, layer_idx=5)


def test_white_box_metric_flags_at_threshold() -> None:
    result = white_box_metric({"sycophancy": 0.5, "deception": 0.49, "refusal": 1.2}, threshold=0.5)
    assert result == {
        "scores": {"sycophancy": 0.5, "deception": 0.49, "refusal": 1.2},
        "flagged": True,
        "flagged_personas": ["sycophancy", "refusal"],
        "threshold": 0.5,
    }
    assert white_box_metric({"a": 0.1})["flagged"] is False
    assert white_box_metric({}) == {"scores": {}, "flagged": False, "flagged_personas": [], "threshold": 0.5}
    assert white_box_metric({"a": 1}, threshold=1)["flagged_personas"] == ["a"]


@pytest.mark.parametrize(
    ("scan", "threshold", "message"),
    [
        ({"a": 0.1}, float("nan"), "finite number"),
        ({"a": 0.1}, True, "finite number"),
        ({"a": float("nan")}, 0.5, "not finite"),
        ({"text": "hi", "scan": {"a": 0.1}}, 0.5, r"Pass result\['scan'\]"),
        ([0.1], 0.5, "dict of persona name to score"),
    ],
)
def test_white_box_metric_rejects_bad_input(scan: Any, threshold: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        white_box_metric(scan, threshold)
