"""Capture, early stop, steering and hook cleanup on tiny random models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build, tiny_tokenizer

from safety_lens_cli.activations import pad_batch, read_pooled
from safety_lens_cli.hooks import block_hidden, capture_residual, model_inputs, steer
from safety_lens_cli.layers import find_layer_stack
from safety_lens_cli.models import wrap_model
from safety_lens_cli.rendering import Encoded


def all_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        for m in model.modules()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_shape_is_batch_seq_hidden(family: str) -> None:
    model = build(family)
    stack = find_layer_stack(model)
    ids = torch.randint(8, 60, (3, 5))
    with torch.no_grad(), capture_residual(stack, [0, 1, 2]) as cap:
        model(input_ids=ids)
    for layer in range(3):
        assert cap.states[layer].shape == (3, 5, 16), f"{family} layer {layer}"


def test_stop_after_deepest_skips_later_blocks() -> None:
    model = build("llama")
    stack = find_layer_stack(model)
    calls: list[str] = []
    last = stack.blocks[2].register_forward_hook(lambda *_: calls.append("block2"))
    head = model.lm_head.register_forward_hook(lambda *_: calls.append("head"))
    try:
        ids = torch.randint(8, 60, (1, 6))
        with torch.no_grad(), capture_residual(stack, [0, 1], stop_after_deepest=True) as cap:
            result = cap.forward(model, input_ids=ids)
        assert result is None
        assert cap.stopped_early
        assert sorted(cap.states) == [0, 1]
        assert calls == []
        with torch.no_grad():
            reference = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert torch.equal(cap.states[1], reference[2])
    finally:
        last.remove()
        head.remove()


def test_hooks_removed_when_forward_raises() -> None:
    model = build("llama")
    stack = find_layer_stack(model)
    ids = torch.randint(8, 60, (1, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    baseline_hooks = all_hooks(model)
    bad = torch.tensor([[5, 999]])  # 999 is beyond the vocabulary
    with pytest.raises(IndexError):
        with capture_residual(stack, [0, 2]):
            model(input_ids=bad)
    with pytest.raises(IndexError):
        with steer(stack, {1: torch.ones(16)}):
            model(input_ids=bad)
    assert all_hooks(model) == baseline_hooks == 0
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_nested_contexts_remove_only_their_own() -> None:
    model = build("gpt2")
    stack = find_layer_stack(model)
    with capture_residual(stack, [0]):
        with steer(stack, {1: torch.ones(16)}):
            assert all_hooks(model) == 2
        assert all_hooks(model) == 1
    assert all_hooks(model) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neo", "falcon", "mpt"])
def test_steering_adds_vector_exactly_once(family: str) -> None:
    model = build(family)
    stack = find_layer_stack(model)
    ids = torch.randint(8, 60, (2, 6))
    vector = torch.randn(16)
    coefficient = 3.0
    native_types: list[type] = []
    probe = stack.blocks[0].register_forward_hook(lambda _m, _a, out: native_types.append(type(out)))
    try:
        with torch.no_grad(), capture_residual(stack, [0]) as plain:
            model(input_ids=ids)
    finally:
        probe.remove()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2] = True
    steered_types: list[type] = []
    probe = stack.blocks[0].register_forward_hook(lambda _m, _a, out: steered_types.append(type(out)))
    try:
        with torch.no_grad(), steer(stack, {0: coefficient * vector}) as steering, capture_residual(stack, [0]) as cap:
            steering.positions = mask
            model(input_ids=ids)
    finally:
        probe.remove()
    delta = cap.states[0] - plain.states[0]
    torch.testing.assert_close(delta[:, 2], (coefficient * vector).expand(2, 16), rtol=0, atol=1e-6)
    assert torch.equal(delta[:, [0, 1, 3, 4, 5]], torch.zeros(2, 5, 16))
    # The steering hook returns the container type the block produced.
    assert steered_types == native_types


def test_zero_coefficient_is_bitwise_identical() -> None:
    model = build("llama")
    stack = find_layer_stack(model)
    ids = torch.randint(8, 60, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with steer(stack, {1: 0.0 * torch.randn(16)}):
            after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_block_hidden_never_takes_row_zero_of_tensor() -> None:
    tensor = torch.randn(3, 4, 16)
    assert block_hidden(tensor) is tensor
    assert block_hidden((tensor, None)) is tensor


SHORT = Encoded((1, 8, 9))  # "a b"
LONG = Encoded((1, 8, 9, 10, 11, 12, 13, 14))  # "a b c d e f g"


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gpt_neox", "bloom", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("position", ["last", "mean"])
def test_padded_batch_matches_batch_of_one(family: str, side: str, position: str) -> None:
    lm = wrap_model(build(family), tiny_tokenizer())
    alone = read_pooled(lm, [SHORT], position, [0, 2], batch_size=1)
    together = read_pooled(lm, [SHORT, LONG], position, [0, 2], batch_size=2, padding_side=side)  # type: ignore[arg-type]
    for layer in (0, 2):
        torch.testing.assert_close(together[layer][0], alone[layer][0], rtol=0, atol=1e-5)


def test_left_padding_without_position_ids_shifts_gpt2() -> None:
    """The fault the position ids guard against: learned positions shift under left padding."""
    model = build("gpt2")
    stack = find_layer_stack(model)
    ids, mask = pad_batch([SHORT.input_ids, LONG.input_ids], pad_id=0, side="left")
    with torch.no_grad(), capture_residual(stack, [0]) as naive:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), capture_residual(stack, [0]) as fixed:
        model(**model_inputs(model, ids, mask))
    with torch.no_grad(), capture_residual(stack, [0]) as single:
        model(input_ids=torch.tensor([SHORT.input_ids]))
    assert (naive.states[0][0, -1] - single.states[0][0, -1]).abs().max() > 1e-3
    torch.testing.assert_close(fixed.states[0][0, -1], single.states[0][0, -1], rtol=0, atol=1e-5)


def test_gpt2_tokenizer_without_pad_token() -> None:
    tokenizer = tiny_tokenizer(pad_token=False)
    assert tokenizer.pad_token is None
    size_before = len(tokenizer)
    model = build("gpt2")
    embeddings_before = model.get_input_embeddings().weight.shape
    lm = wrap_model(model, tokenizer)
    assert lm.tokenizer.pad_token is not None
    assert len(lm.tokenizer) == size_before
    assert model.get_input_embeddings().weight.shape == embeddings_before
    alone = read_pooled(lm, [SHORT], "last", [1])
    together = read_pooled(lm, [LONG, SHORT], "last", [1], batch_size=2)
    torch.testing.assert_close(together[1][1], alone[1][0], rtol=0, atol=1e-5)
