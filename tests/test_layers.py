"""Layer resolution and numbering on a tiny random model of every supported family."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import FAMILIES, build, expected_path, final_norm

from safety_lens_cli.errors import LayerIndexError, LayerResolutionError, UsageError
from safety_lens_cli.hooks import capture_residual
from safety_lens_cli.layers import find_layer_stack, normalize_layer, parse_layer_specs


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, build(request.param)


def test_blocks_found_at_family_path(family_model: tuple[str, torch.nn.Module]) -> None:
    family, model = family_model
    stack = find_layer_stack(model)
    assert stack.path == expected_path(family)
    assert stack.num_layers == 3
    assert stack.hidden_size == 16


def test_hook_equals_hidden_states(family_model: tuple[str, torch.nn.Module]) -> None:
    family, model = family_model
    stack = find_layer_stack(model)
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 41]])
    with torch.no_grad(), capture_residual(stack, range(stack.num_layers)) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    for layer in range(stack.num_layers - 1):
        state = cap.states[layer]
        assert state.shape == (1, 7, 16), f"{family} layer {layer}"
        assert torch.equal(state, hidden[layer + 1]), f"{family} layer {layer}"
    # The last block's hook sees the stream before the final norm.
    last = cap.states[stack.num_layers - 1]
    with torch.no_grad():
        normed = final_norm(model, family)(last)
    torch.testing.assert_close(normed, hidden[-1], rtol=1e-5, atol=1e-5)


def test_gemma3_picks_text_stack_over_vision() -> None:
    model = build("gemma3")
    first_list = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList))
    assert "vision" in first_list  # the vision tower's list comes first in named_modules()
    stack = find_layer_stack(model)
    assert stack.path == "model.language_model.layers"
    assert stack.hidden_size == model.config.get_text_config().hidden_size


def test_general_fallback_finds_renamed_stack() -> None:
    model = build("llama")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.config = inner.config
            self.backbone = torch.nn.ModuleDict({"decoder_blocks": inner.model.layers})

    stack = find_layer_stack(Wrapper(model))
    assert stack.path == "backbone.decoder_blocks"


def test_no_stack_error_lists_candidates() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = tf.LlamaConfig(num_hidden_layers=4, hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
            self.a = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2)
            self.b = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3)

    with pytest.raises(LayerResolutionError) as info:
        find_layer_stack(Odd())
    message = str(info.value)
    assert "'a' (2)" in message
    assert "'b' (3)" in message
    assert "--layers-path" in message


def test_layers_path_override() -> None:
    model = build("gpt2")
    stack = find_layer_stack(model, "transformer.h")
    assert stack.num_layers == 3
    with pytest.raises(LayerResolutionError, match="transformer.nope"):
        find_layer_stack(model, "transformer.nope")


def test_negative_and_out_of_range_indices() -> None:
    assert normalize_layer(-1, 30) == 29
    assert normalize_layer(-30, 30) == 0
    with pytest.raises(LayerIndexError, match="0 to 29"):
        normalize_layer(30, 30)
    with pytest.raises(LayerIndexError, match="-30 to -1"):
        normalize_layer(-31, 30)


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (None, "auto"),
        (["auto"], "auto"),
        (["3"], [3]),
        (["-1", "0"], [0, 29]),
        (["4:7"], [4, 5, 6]),
        (["28:"], [28, 29]),
        (["2", "1:3"], [1, 2]),
        (["all"], list(range(30))),
    ],
)
def test_parse_layer_specs(specs: list[str] | None, expected: object) -> None:
    assert parse_layer_specs(specs, 30) == expected


@pytest.mark.parametrize("bad", ["x", "3:2", "1:2:3", "auto,3"])
def test_parse_layer_specs_rejects(bad: str) -> None:
    with pytest.raises((UsageError, LayerIndexError)):
        parse_layer_specs([bad], 30)


def test_auto_with_layers_rejected() -> None:
    with pytest.raises(UsageError, match="auto"):
        parse_layer_specs(["auto", "3"], 30)
