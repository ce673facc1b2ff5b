"""Scoped forward hooks on decoder blocks: capture, early stop and steering.

Hooks exist only inside the context managers here. Each context removes the
handles it registered in `finally`, so a forward pass that raises leaves no
hook behind, and nested contexts remove only their own.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from safety_lens_cli.layers import LayerStack, normalize_layer

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle


class _StopForward(Exception):
    """Raised by the hook on the deepest needed block to skip the rest of the model."""


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor `[batch, seq, hidden]` inside a block's output.

    Blocks return a bare tensor (Llama family, GPT-2, OPT, GPT-J and GPT-NeoX in
    transformers 5) or a tuple whose first item is the tensor (GPT-Neo, Falcon,
    MPT). Indexing `[0]` on a bare tensor would silently take batch row 0.
    """
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Unexpected decoder block output type {type(output).__name__}.")


def replace_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """Return `output` with its hidden state replaced, keeping the container type."""
    import torch

    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"Unexpected decoder block output type {type(output).__name__}.")


class ResidualCapture:
    """Captured block outputs of one forward pass.

    `states[layer]` is `[batch, seq, hidden]`, detached, in the model's dtype.
    Each forward pass replaces the previous one's states.
    """

    def __init__(self, layers: Sequence[int], stop_after_deepest: bool) -> None:
        self.layers = tuple(sorted(set(layers)))
        self.stop_after_deepest = stop_after_deepest
        self.states: dict[int, torch.Tensor] = {}
        self.stopped_early = False

    def forward(self, model: nn.Module, **inputs: Any) -> Any:
        """Run `model(**inputs)`; returns None when the pass stopped after the deepest layer."""
        self.states = {}
        self.stopped_early = False
        try:
            return model(**inputs)
        except _StopForward:
            self.stopped_early = True
            return None


@contextmanager
def capture_residual(
    stack: LayerStack, layers: Sequence[int], *, stop_after_deepest: bool = False
) -> Iterator[ResidualCapture]:
    """Capture the outputs of `layers` during forward passes run inside the block.

    With `stop_after_deepest`, the pass ends right after the deepest requested
    block, so later blocks and the LM head are never computed; use
    `ResidualCapture.forward` to run it, which absorbs the stop signal.
    """
    indices = [normalize_layer(i, stack.num_layers) for i in layers]
    capture = ResidualCapture(indices, stop_after_deepest)
    deepest = max(capture.layers)
    handles: list[RemovableHandle] = []

    def make_hook(layer: int) -> Any:
        # A factory binds `layer` per hook; a closure in the loop would see the last value.
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            capture.states[layer] = block_hidden(output).detach()
            if capture.stop_after_deepest and layer == deepest:
                raise _StopForward

        return hook

    try:
        for layer in capture.layers:
            handles.append(stack.blocks[layer].register_forward_hook(make_hook(layer)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


class Steering:
    """Vectors added to block outputs while the context is open.

    `positions` is a `[batch, seq]` boolean mask for the next forward pass;
    True marks positions that receive the vector. With None, every position
    does. Callers set it before each pass (for example to skip padding).
    """

    def __init__(self, additions: Mapping[int, torch.Tensor]) -> None:
        self.additions = dict(additions)
        self.positions: torch.Tensor | None = None


@contextmanager
def steer(stack: LayerStack, additions: Mapping[int, torch.Tensor]) -> Iterator[Steering]:
    """Add `additions[layer]` (`[hidden]`, already scaled) to the output of each block.

    Steering hooks are prepended, so a capture on the same block sees the
    steered stream. A zero vector registers no hook, so it is bitwise
    identical to not steering.
    """
    resolved = {normalize_layer(i, stack.num_layers): v for i, v in additions.items()}
    steering = Steering(resolved)
    handles: list[RemovableHandle] = []

    def make_hook(vector: torch.Tensor) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            import torch

            hidden = block_hidden(output)
            delta = vector.to(device=hidden.device, dtype=hidden.dtype)
            mask = steering.positions
            if mask is None:
                steered = hidden + delta
            else:
                if mask.shape != hidden.shape[:2]:
                    raise ValueError(
                        f"Steering mask shape {tuple(mask.shape)} does not match the block output "
                        f"{tuple(hidden.shape[:2])}."
                    )
                # where() leaves unsteered positions bitwise unchanged.
                steered = torch.where(mask.to(hidden.device)[..., None], hidden + delta, hidden)
            return replace_block_hidden(output, steered)

        return hook

    try:
        for layer, vector in resolved.items():
            if bool((vector != 0).any()):
                block = stack.blocks[layer]
                handles.append(block.register_forward_hook(make_hook(vector), prepend=True))
        yield steering
    finally:
        for handle in handles:
            handle.remove()


def accepts_position_ids(model: nn.Module) -> bool:
    cached = getattr(model, "_safety_lens_accepts_position_ids", None)
    if cached is None:
        cached = "position_ids" in inspect.signature(model.forward).parameters
        try:
            model._safety_lens_accepts_position_ids = cached  # type: ignore[assignment]
        except AttributeError:
            pass
    return bool(cached)


def cache_argument(model: nn.Module) -> str:
    """Name of the forward argument that takes the KV cache.

    transformers 5 calls it `cache` and deprecates `past_key_values`, which
    older versions use.
    """
    cached = getattr(model, "_safety_lens_cache_argument", None)
    if cached is None:
        params = inspect.signature(model.forward).parameters
        cached = "cache" if "cache" in params else "past_key_values"
        try:
            model._safety_lens_cache_argument = cached  # type: ignore[assignment]
        except AttributeError:
            pass
    return str(cached)


def position_ids_from_mask(attention_mask: torch.Tensor, new_tokens: int | None = None) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them.

    `attention_mask` is `[batch, past + new]`; the result covers the last
    `new_tokens` columns (all columns when None). Padded slots get position 0.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if new_tokens is not None:
        positions = positions[:, -new_tokens:]
    return positions


def model_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    past_key_values: Any = None,
    use_cache: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for a forward pass with padding-safe position ids.

    `attention_mask` spans the cached and the new tokens.
    """
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "use_cache": use_cache,
    }
    if past_key_values is not None:
        inputs[cache_argument(model)] = past_key_values
    if accepts_position_ids(model):
        inputs["position_ids"] = position_ids_from_mask(attention_mask, input_ids.shape[1])
    return inputs
