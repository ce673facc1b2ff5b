"""Check and convert what Python API callers pass: token ids, texts, vectors and layer indices.

The API accepts the loose inputs of the earlier `safety_lens` library (a
tensor, nested lists, a string) and turns them into the core's `Encoded`
items, so every read goes through `activations.read_pooled` like the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

from safety_lens_cli.errors import InputError, UsageError
from safety_lens_cli.layers import normalize_layer
from safety_lens_cli.rendering import Encoded, encode_text

if TYPE_CHECKING:
    from torch import nn

    from safety_lens_cli.models import LoadedModel

# A text, one sequence of token ids, or several (a 2-D tensor or a list of rows).
TokenInput = Union[str, torch.Tensor, Sequence[int], Sequence[Sequence[int]], Sequence[str]]


@dataclass(frozen=True)
class Sequences:
    """Encoded inputs, and whether the caller passed several, so results come back as a list."""

    items: list[Encoded]
    several: bool


def check_layer(layer_idx: object, num_layers: int, name: str = "layer_idx") -> int:
    """Return `layer_idx` as a block index in 0..num_layers-1. Negative values count from the end."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
        raise UsageError(f"Invalid {name} {layer_idx!r}: expected an int block index (negative counts from the end).")
    return normalize_layer(layer_idx, num_layers)


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"Invalid batch_size {batch_size!r}: use a positive int.")
    return batch_size


def check_texts(texts: object, name: str) -> list[str]:
    """Return a non-empty list of non-blank strings, or raise naming the argument."""
    if isinstance(texts, str):
        raise UsageError(f"{name} is a single string: pass a list of texts, for example [{texts[:30]!r}].")
    if not isinstance(texts, Sequence) or not texts:
        raise UsageError(f"{name} must be a non-empty list of strings, got {describe_value(texts)}.")
    checked: list[str] = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageError(f"{name}[{index}] must be a string, got {type(text).__name__}.")
        if not text.strip():
            raise UsageError(f"{name}[{index}] is empty: pass texts with content.")
        checked.append(text)
    return checked


def check_direction(vector: object, hidden_size: int, name: str = "vector") -> torch.Tensor:
    """Return `vector` as a detached float32 tensor `[hidden]`, or raise saying which shape is expected."""
    if not isinstance(vector, torch.Tensor):
        hint = ""
        if isinstance(vector, tuple):
            hint = " (a tuple: take the tensor out of it first)"
        raise UsageError(f"Invalid {name}: expected a torch.Tensor of shape [{hidden_size}], got {describe_value(vector)}{hint}.")
    if vector.dim() != 1 or vector.shape[0] != hidden_size:
        raise UsageError(
            f"Invalid {name} of shape {list(vector.shape)}: expected [{hidden_size}], the model's hidden size."
        )
    if vector.is_complex() or not bool(torch.isfinite(vector.detach()).all()):
        raise UsageError(f"Invalid {name}: it contains non-finite or complex values.")
    return vector.detach().float()


def encode_inputs(lm: LoadedModel, input_ids: TokenInput, attention_mask: object = None) -> Sequences:
    """Turn the accepted input forms into `Encoded` items, checking ids and lengths.

    A string is tokenized like `tokenizer(text)` (plain text with the
    tokenizer's usual special tokens, no chat template). With an attention
    mask, positions where it is 0 are dropped from each row, so padding on
    either side is never read.
    """
    if isinstance(input_ids, str):
        if attention_mask is not None:
            raise UsageError("attention_mask applies to token ids, not to a string.")
        if not input_ids.strip():
            raise UsageError("The text is empty: pass a text with content.")
        return _checked(lm, [encode_text(lm.tokenizer, input_ids)], several=False)
    if isinstance(input_ids, torch.Tensor):
        rows = _tensor_rows(input_ids, attention_mask)
        return _checked(lm, [Encoded(tuple(row)) for row in rows], several=input_ids.dim() == 2 and len(rows) > 1)
    if isinstance(input_ids, Sequence) and input_ids:
        if all(isinstance(text, str) for text in input_ids):
            if attention_mask is not None:
                raise UsageError("attention_mask applies to token ids, not to strings.")
            texts = check_texts(input_ids, "input_ids")
            return _checked(lm, [encode_text(lm.tokenizer, t) for t in texts], several=len(texts) > 1)
        if all(_is_int(token) for token in input_ids):
            rows = _apply_mask([list(input_ids)], attention_mask)  # type: ignore[arg-type]
            return _checked(lm, [Encoded(tuple(rows[0]))], several=False)
        if all(isinstance(row, (Sequence, torch.Tensor)) and not isinstance(row, str) for row in input_ids):
            rows = [_row_list(row, index) for index, row in enumerate(input_ids)]
            rows = _apply_mask(rows, attention_mask)
            return _checked(lm, [Encoded(tuple(row)) for row in rows], several=len(rows) > 1)
    raise UsageError(
        "Invalid input_ids: pass a string, a 1-D or 2-D tensor of token ids, a list of ints, "
        f"a list of lists of ints, or a list of strings; got {describe_value(input_ids)}."
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def describe_value(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    if isinstance(value, (list, tuple)) and not value:
        return f"an empty {type(value).__name__}"
    return type(value).__name__


def _row_list(row: object, index: int) -> list[int]:
    if isinstance(row, torch.Tensor):
        if row.dim() != 1 or row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
            raise UsageError(f"Invalid input_ids[{index}]: expected a 1-D integer tensor, got {describe_value(row)}.")
        return [int(t) for t in row.tolist()]
    values = list(row)  # type: ignore[call-overload]
    if not all(_is_int(token) for token in values):
        raise UsageError(f"Invalid input_ids[{index}]: expected a list of int token ids.")
    return values


def _tensor_rows(ids: torch.Tensor, attention_mask: object) -> list[list[int]]:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UsageError(f"Invalid input_ids: expected integer token ids, got {describe_value(ids)}.")
    if ids.dim() not in (1, 2):
        raise UsageError(f"Invalid input_ids of shape {list(ids.shape)}: expected [seq] or [batch, seq].")
    rows = ids.reshape(1, -1) if ids.dim() == 1 else ids
    return _apply_mask(rows.tolist(), attention_mask)


def _apply_mask(rows: list[list[int]], attention_mask: object) -> list[list[int]]:
    """Drop the positions where the mask is 0. Without a mask, every position is read."""
    if attention_mask is None:
        return rows
    try:
        mask = torch.as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(
            f"Invalid attention_mask: expected a tensor or a rectangular list of 0/1, got {describe_value(attention_mask)}."
        ) from None
    if mask.dim() == 1:
        mask = mask.reshape(1, -1)
    if mask.dim() != 2 or mask.shape[0] != len(rows) or any(mask.shape[1] != len(row) for row in rows):
        raise UsageError(
            f"attention_mask of shape {list(mask.shape)} does not match input_ids: give one 0/1 value per token."
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise UsageError("Invalid attention_mask: values must be 0 (padding) or 1 (token).")
    return [[token for token, keep in zip(row, keeps) if keep] for row, keeps in zip(rows, mask.tolist())]


def _checked(lm: LoadedModel, items: list[Encoded], *, several: bool) -> Sequences:
    if not items:
        raise UsageError("input_ids contains no sequences: pass at least one row of token ids.")
    vocab = _vocab_size(lm.model)
    limit = lm.context_length
    for index, item in enumerate(items):
        if not item.input_ids:
            raise InputError(f"Input row {index} has no tokens to read: pass at least one token id.")
        if vocab is not None:
            bad = [t for t in item.input_ids if not 0 <= t < vocab]
            if bad:
                raise UsageError(
                    f"Input row {index} has token id {bad[0]} outside the vocabulary (0 to {vocab - 1}): "
                    "encode the text with this model's tokenizer."
                )
        if limit is not None and len(item) > limit:
            raise UsageError(
                f"Input row {index} has {len(item)} tokens, more than the model's context of {limit}: shorten it."
            )
    return Sequences(items, several)


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except NotImplementedError:
        return None
    size = getattr(embeddings, "num_embeddings", None)
    return size if isinstance(size, int) else None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run forward passes in eval mode (no dropout), then restore each module's own training flag."""
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise UsageError(f"Invalid threshold {threshold!r}: use a finite number such as 0.5.")
    return float(threshold)


def check_scores(scan: object) -> dict[str, float]:
    """Return `{persona: score}` as plain floats, or raise naming the first bad entry."""
    if not isinstance(scan, Mapping):
        raise UsageError(f"Invalid scan: expected a dict of persona name to score, got {describe_value(scan)}.")
    scores: dict[str, float] = {}
    for persona, value in scan.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " Pass result['scan'] from scan_and_generate." if "scan" in scan else ""
            raise UsageError(f"Invalid score for {persona!r}: expected a number, got {type(value).__name__}.{hint}")
        if not math.isfinite(value):
            raise UsageError(f"Invalid score for {persona!r}: {value} is not finite.")
        scores[str(persona)] = float(value)
    return scores
