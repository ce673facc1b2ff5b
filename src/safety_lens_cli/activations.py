"""Read pooled residual-stream activations for many texts, batched.

This is the one hot path behind extraction, scanning and the Python API:
texts are sorted by length to cut padding, each batch runs one forward pass
that captures every requested layer and stops after the deepest one, and the
results come back in input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from safety_lens_cli.errors import InputError, UsageError
from safety_lens_cli.hooks import capture_residual, model_inputs
from safety_lens_cli.layers import normalize_layer
from safety_lens_cli.rendering import Encoded

if TYPE_CHECKING:
    import torch

    from safety_lens_cli.models import LoadedModel

Position = Literal["last", "mean", "response-mean"]
POSITIONS: tuple[Position, ...] = ("last", "mean", "response-mean")
PaddingSide = Literal["left", "right"]


def check_position(position: str) -> Position:
    if position not in POSITIONS:
        raise UsageError(f"Invalid --position '{position}': use one of {', '.join(POSITIONS)}.")
    return position  # type: ignore[return-value]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: PaddingSide, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to `[batch, max_len]` ids and attention mask."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if side == "left" else 0
        ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
    return ids.to(device), mask.to(device)


def pooling_weights(
    items: Sequence[Encoded], positions: Sequence[Position], width: int, side: PaddingSide
) -> torch.Tensor:
    """Per-row weights `[batch, width]` summing to 1 over the tokens each position reads."""
    import torch

    weights = torch.zeros((len(items), width), dtype=torch.float32)
    for row, (item, position) in enumerate(zip(items, positions)):
        offset = width - len(item) if side == "left" else 0
        if position == "last":
            start, end = len(item) - 1, len(item)
        elif position == "mean":
            start, end = 0, len(item)
        else:
            if item.response_span is None:
                raise InputError(
                    "Position 'response-mean' needs a conversation that ends with an assistant turn: "
                    "use --position last for a prompt."
                )
            start, end = item.response_span
        weights[row, offset + start : offset + end] = 1.0 / (end - start)
    return weights


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first."""
    if batch_size < 1:
        raise UsageError(f"Invalid --batch-size {batch_size}: use a positive integer.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def read_pooled(
    lm: LoadedModel,
    items: Sequence[Encoded],
    positions: Sequence[Position] | Position,
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    padding_side: PaddingSide = "right",
    token_norms: dict[int, torch.Tensor] | None = None,
) -> dict[int, torch.Tensor]:
    """Pooled activations `{layer: [n_items, hidden]}` (float32, CPU), in input order.

    When `token_norms` is a dict, it is filled with `{layer: [n_items]}`: the
    mean L2 norm of the residual stream over the tokens each item reads, which
    is the scale for steering coefficients.
    """
    import torch

    if not items:
        return {layer: torch.zeros((0, lm.hidden_size)) for layer in layers}
    if isinstance(positions, str):
        positions = [positions] * len(items)
    if len(positions) != len(items):
        raise ValueError("positions and items must have the same length")
    layer_list = sorted({normalize_layer(i, lm.num_layers) for i in layers})

    out = {layer: torch.empty((len(items), lm.hidden_size), dtype=torch.float32) for layer in layer_list}
    if token_norms is not None:
        token_norms.update({layer: torch.empty(len(items), dtype=torch.float32) for layer in layer_list})
    with torch.inference_mode(), capture_residual(lm.layers, layer_list, stop_after_deepest=True) as cap:
        for batch in length_sorted_batches([len(i) for i in items], batch_size):
            batch_items = [items[i] for i in batch]
            ids, mask = pad_batch([b.input_ids for b in batch_items], lm.pad_token_id, padding_side, lm.device)
            cap.forward(lm.model, **model_inputs(lm.model, ids, mask))
            weights = pooling_weights(batch_items, [positions[i] for i in batch], ids.shape[1], padding_side)
            index = torch.tensor(batch)
            for layer in layer_list:
                hidden = cap.states[layer].float().cpu()  # [batch, seq, hidden]
                out[layer][index] = torch.einsum("bs,bsh->bh", weights, hidden)
                if token_norms is not None:
                    token_norms[layer][index] = (weights * hidden.norm(dim=-1)).sum(-1)
    return out
