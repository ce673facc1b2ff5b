"""`LensHooks`: capture decoder block outputs while a `with` block runs the model."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import TYPE_CHECKING

from safety_lens_cli.api_inputs import check_layer
from safety_lens_cli.errors import UsageError
from safety_lens_cli.hooks import ResidualCapture, capture_residual
from safety_lens_cli.layers import find_layer_stack

if TYPE_CHECKING:
    import torch
    from torch import nn


class LensHooks:
    """Forward hooks on decoder blocks that exist only inside a `with` block.

    Inside the block, each forward pass of `model` stores the output of the
    chosen blocks in `activations`: `{layer: [batch, seq, hidden]}`, detached,
    in the model's dtype, keyed by the indices as given (negative indices
    count from the end). Each pass replaces the previous one's tensors, and
    they stay readable after the block. On exit, also through an exception,
    every hook this object registered is removed.

    Layer `L` is the output of block `L`, that is `output_hidden_states[L + 1]`.
    """

    def __init__(self, model: nn.Module, layer_idx: int | Sequence[int], *, layers_path: str | None = None) -> None:
        self._stack = find_layer_stack(model, layers_path)
        self._single = not isinstance(layer_idx, Sequence)
        keys = [layer_idx] if self._single else list(layer_idx)  # type: ignore[list-item]
        if not keys:
            raise UsageError("layer_idx is an empty list: pass an int or a list of block indices.")
        self._layers = {key: check_layer(key, self._stack.num_layers) for key in keys}
        self._capture: ResidualCapture | None = None
        self._exit_stack: ExitStack | None = None

    def __enter__(self) -> LensHooks:
        if self._exit_stack is not None:
            raise UsageError("This LensHooks is already active: leave its `with` block before entering it again.")
        exit_stack = ExitStack()
        self._capture = exit_stack.enter_context(capture_residual(self._stack, sorted(set(self._layers.values()))))
        self._exit_stack = exit_stack
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        exit_stack, self._exit_stack = self._exit_stack, None
        if exit_stack is not None:
            exit_stack.close()

    @property
    def active(self) -> bool:
        """Whether the hooks are registered, that is, the `with` block is running."""
        return self._exit_stack is not None

    @property
    def activations(self) -> dict[int, torch.Tensor]:
        """Captured block outputs `{layer: [batch, seq, hidden]}` of the latest forward pass."""
        states = self._capture.states if self._capture is not None else {}
        return {key: states[layer] for key, layer in self._layers.items() if layer in states}

    @property
    def activation(self) -> torch.Tensor:
        """The captured output `[batch, seq, hidden]` when one int layer was given."""
        if not self._single:
            raise UsageError("activation needs a single layer_idx: read activations[layer] for several layers.")
        key = next(iter(self._layers))
        captured = self.activations
        if key not in captured:
            raise UsageError(
                f"No activation captured at layer {key}: run a forward pass of the model inside `with LensHooks(...)`."
            )
        return captured[key]
