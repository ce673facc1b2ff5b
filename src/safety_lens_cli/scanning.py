"""Score input records on persona vectors, streaming, in length-sorted batches.

`scan_records` reads records in chunks of `batch_size * chunk_batches` records
(or `chunk_tokens` tokens, whichever comes first) and encodes them the way the
model would see them. Each chunk is scored with one
call to `read_pooled`, which reads every persona and layer in the same forward
pass per batch and stops the pass after the deepest layer needed. Results come
back in input order, one per input item, and only one chunk is held at a time.

`score_chunk` is the scoring step on its own; it takes a model and its vectors,
so a caller can run the same records through two models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from safety_lens_cli.activations import PaddingSide, Position, check_position, read_pooled
from safety_lens_cli.errors import InputError, RuntimeFailure, UsageError
from safety_lens_cli.inputs import InputItem, InputProblem, InputRecord
from safety_lens_cli.layers import normalize_layer
from safety_lens_cli.projection import PersonaScore, PersonaVector
from safety_lens_cli.rendering import Encoded, Rendering, choose_rendering, encode_conversation, encode_prompt

if TYPE_CHECKING:
    from safety_lens_cli.models import LoadedModel

log = logging.getLogger(__name__)

# Truncation warnings logged one by one before they are only counted.
MAX_TRUNCATION_WARNINGS = 10
# Larger chunks sort by length over more records and so pad less: on 1,000
# prompts of 40 to 115 tokens (bench/scan_throughput.py), batches of 16 carry
# 2.9% padding with chunks of 256 records and 0.7% with 1,024. The token cap
# bounds the memory a chunk takes when inputs are long or batches large.
DEFAULT_CHUNK_BATCHES = 64
DEFAULT_CHUNK_TOKENS = 262_144

try:
    from jinja2 import TemplateError
except ImportError:  # jinja2 comes with transformers' chat templates; without it no template runs
    TemplateError = InputError  # type: ignore[assignment,misc]

# Errors that concern one input, not the model: bad turns, or a chat template
# that raises for this conversation (for example roles that do not alternate).
_TEMPLATE_ERRORS: tuple[type[Exception], ...] = (InputError, TemplateError)


@dataclass(frozen=True)
class ScanOptions:
    """Settings for encoding and batching records.

    `position` overrides where activations are read (default: the last token
    of a prompt, the mean over the final assistant turn of a conversation).
    With `truncate`, inputs longer than the model context keep their last
    tokens; without it they become problems. `stop_on_error` ends the scan at
    the first problem, after the results of the lines before it.
    """

    batch_size: int = 16
    chunk_batches: int = DEFAULT_CHUNK_BATCHES
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    position: Position | None = None
    raw: bool = False
    truncate: bool = True
    padding_side: PaddingSide = "right"
    stop_on_error: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"Invalid --batch-size {self.batch_size}: use a positive integer.")
        for name in ("chunk_batches", "chunk_tokens"):
            value = getattr(self, name)
            if value < 1:
                raise UsageError(f"Invalid {name} {value}: use a positive integer.")
        if self.position is not None:
            check_position(self.position)


@dataclass(frozen=True)
class ScoreColumn:
    """One score in every output record.

    `key` is the persona name, or `persona@layer` when a persona is read at
    several layers, so keys are unique.
    """

    key: str
    vector: PersonaVector
    layer: int


@dataclass(frozen=True)
class EncodedRecord:
    """A record's token ids, the position to read, and its length before truncation."""

    record: InputRecord
    encoded: Encoded
    position: Position
    truncated_from: int | None = None


@dataclass(frozen=True)
class ScoredLine:
    """Scores of one input record, keyed like `ScoreColumn.key`."""

    record: InputRecord
    scores: dict[str, PersonaScore]
    truncated_from: int | None = None


LineResult = ScoredLine | InputProblem


def score_columns(lm: LoadedModel, vectors: Sequence[PersonaVector]) -> list[ScoreColumn]:
    """Check vectors against the model and name their scores."""
    if not vectors:
        raise UsageError("No persona vectors to scan with: pass --persona NAME or --vector ID.")
    seen: set[tuple[str, int]] = set()
    layers_per_persona: dict[str, int] = {}
    normalized: list[tuple[PersonaVector, int]] = []
    for vector in vectors:
        layer = normalize_layer(vector.layer, lm.num_layers)
        if vector.hidden_size != lm.hidden_size:
            raise UsageError(
                f"Vector for '{vector.persona}' at layer {layer} has {vector.hidden_size} dimensions but "
                f"the model's hidden size is {lm.hidden_size}: extract it again for this model."
            )
        if (vector.persona, layer) in seen:
            raise UsageError(
                f"Two vectors for persona '{vector.persona}' at layer {layer}: pin one with --vector."
            )
        seen.add((vector.persona, layer))
        layers_per_persona[vector.persona] = layers_per_persona.get(vector.persona, 0) + 1
        normalized.append((vector, layer))
    return [
        ScoreColumn(
            key=vector.persona if layers_per_persona[vector.persona] == 1 else f"{vector.persona}@{layer}",
            vector=vector,
            layer=layer,
        )
        for vector, layer in normalized
    ]


class RecordEncoder:
    """Turn records into token ids with the model's rendering, truncating to its context."""

    def __init__(self, lm: LoadedModel, options: ScanOptions) -> None:
        self.tokenizer = lm.tokenizer
        self.rendering: Rendering = choose_rendering(lm.tokenizer, options.raw)
        self.context_length = lm.context_length
        self.options = options
        self.truncated = 0

    def encode(self, record: InputRecord) -> EncodedRecord | InputProblem:
        messages = record.chat
        ends_with_response = record.messages is not None and messages[-1]["role"] == "assistant"
        position: Position = self.options.position or ("response-mean" if ends_with_response else "last")
        if position == "response-mean" and not ends_with_response:
            return InputProblem(
                record.line,
                record.id,
                "position 'response-mean' needs messages that end with an assistant turn",
            )
        try:
            if ends_with_response:
                encoded = encode_conversation(self.tokenizer, messages, self.rendering)
            else:
                encoded = encode_prompt(self.tokenizer, messages, self.rendering)
        except _TEMPLATE_ERRORS as exc:
            return InputProblem(record.line, record.id, str(exc).rstrip("."))
        if not encoded.input_ids:
            return InputProblem(record.line, record.id, "the input encodes to no tokens")
        return self._fit_context(record, encoded, position)

    def _fit_context(self, record: InputRecord, encoded: Encoded, position: Position) -> EncodedRecord | InputProblem:
        limit = self.context_length
        length = len(encoded)
        if limit is None or length <= limit:
            return EncodedRecord(record, encoded, position)
        if not self.options.truncate:
            return InputProblem(
                record.line,
                record.id,
                f"the input has {length} tokens, more than the model's context of {limit} "
                "(rejected because of --no-truncate)",
            )
        cut = length - limit
        span = encoded.response_span
        if span is not None:
            if span[1] - cut <= 0:
                return InputProblem(
                    record.line,
                    record.id,
                    f"the input has {length} tokens and truncating it to the model's context of {limit} "
                    "would remove the whole response",
                )
            span = (max(span[0] - cut, 0), span[1] - cut)
        self.truncated += 1
        if self.truncated <= MAX_TRUNCATION_WARNINGS:
            log.warning(
                "line %d: the input has %d tokens, more than the model's context of %d; "
                "kept the last %d tokens (pass --no-truncate to reject such lines)",
                record.line,
                length,
                limit,
                limit,
            )
            if self.truncated == MAX_TRUNCATION_WARNINGS:
                log.warning("Further truncation warnings are not shown; the summary counts them.")
        return EncodedRecord(record, Encoded(encoded.input_ids[cut:], span), position, truncated_from=length)


def score_chunk(
    lm: LoadedModel,
    columns: Sequence[ScoreColumn],
    items: Sequence[EncodedRecord],
    *,
    batch_size: int,
    padding_side: PaddingSide = "right",
) -> list[ScoredLine | InputProblem]:
    """Score encoded records on every column with one batched read, in input order.

    A record whose activation is not finite becomes an `InputProblem`, since
    its scores would be meaningless and cannot be written as JSON numbers.
    """
    import torch

    if not items:
        return []
    layers = sorted({column.layer for column in columns})
    try:
        pooled = read_pooled(
            lm,
            [item.encoded for item in items],
            [item.position for item in items],
            layers,
            batch_size=batch_size,
            padding_side=padding_side,
        )
    except (RuntimeError, IndexError) as exc:
        first, last = items[0].record.line, items[-1].record.line
        raise RuntimeFailure(
            f"The forward pass failed on input lines {first} to {last} ({type(exc).__name__}: "
            f"{_first_line(exc)}): try a smaller --batch-size or --device cpu."
        ) from exc

    # One matrix product per layer: [n, hidden] @ [hidden, columns at that layer].
    raw_by_key: dict[str, list[float]] = {}
    for layer in layers:
        at_layer = [column for column in columns if column.layer == layer]
        units = torch.stack([column.vector.unit.float() for column in at_layer], dim=1)  # [hidden, k]
        raws = (pooled[layer] @ units).T.tolist()  # [k][n]
        for column, values in zip(at_layer, raws):
            raw_by_key[column.key] = values

    results: list[ScoredLine | InputProblem] = []
    for row, item in enumerate(items):
        scores: dict[str, PersonaScore] = {}
        bad_layer: int | None = None
        for column in columns:
            raw = raw_by_key[column.key][row]
            if not math.isfinite(raw):
                bad_layer = column.layer
                break
            scores[column.key] = PersonaScore(raw=raw, score=column.vector.calibration.score(raw), layer=column.layer)
        if bad_layer is not None:
            results.append(
                InputProblem(
                    item.record.line,
                    item.record.id,
                    f"the model produced a non-finite activation at layer {bad_layer}; try --dtype float32",
                )
            )
        else:
            results.append(ScoredLine(item.record, scores, item.truncated_from))
    return results


def scan_records(
    lm: LoadedModel,
    vectors: Sequence[PersonaVector] | Sequence[ScoreColumn],
    items: Iterable[InputItem],
    options: ScanOptions | None = None,
    *,
    encoder: RecordEncoder | None = None,
) -> Iterator[LineResult]:
    """Yield one `ScoredLine` or `InputProblem` per input item, in input order.

    With `options.stop_on_error`, the lines before the first problem are
    scored and yielded, then the problem, and the scan ends.
    """
    options = options or ScanOptions()
    columns = _as_columns(lm, vectors)
    encoder = encoder or RecordEncoder(lm, options)
    max_records = options.batch_size * options.chunk_batches
    source = iter(items)
    while True:
        slots, stopped = _read_chunk(source, encoder, max_records, options.chunk_tokens, options.stop_on_error)
        if not slots:
            return
        encoded = [slot for slot in slots if isinstance(slot, EncodedRecord)]
        scored = iter(score_chunk(lm, columns, encoded, batch_size=options.batch_size, padding_side=options.padding_side))
        for slot in slots:
            result = next(scored) if isinstance(slot, EncodedRecord) else slot
            yield result
            if options.stop_on_error and isinstance(result, InputProblem):
                return
        if stopped:
            return


def _read_chunk(
    source: Iterator[InputItem], encoder: RecordEncoder, max_records: int, max_tokens: int, stop_on_error: bool
) -> tuple[list[EncodedRecord | InputProblem], bool]:
    """Read items until a chunk limit is reached; the flag is True when reading stopped at a problem."""
    slots: list[EncodedRecord | InputProblem] = []
    tokens = 0
    for item in source:
        slot = item if isinstance(item, InputProblem) else encoder.encode(item)
        slots.append(slot)
        if stop_on_error and isinstance(slot, InputProblem):
            return slots, True
        if isinstance(slot, EncodedRecord):
            tokens += len(slot.encoded)
        if len(slots) >= max_records or tokens >= max_tokens:
            break
    return slots, False


def _as_columns(lm: LoadedModel, vectors: Sequence[PersonaVector] | Sequence[ScoreColumn]) -> list[ScoreColumn]:
    if vectors and all(isinstance(v, ScoreColumn) for v in vectors):
        return list(vectors)  # type: ignore[arg-type]
    return score_columns(lm, vectors)  # type: ignore[arg-type]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
