"""Per-token persona scores of generated text, with optional steering.

`generate_trajectories` runs `generation.decode` on a batch of prompts and
scores them on every persona vector. The prompt scan reads the last prompt
token, where a scan of the prompt reads it. Each generated token is read at
the position where it is fed back as input. `trajectory_document` turns one
result into the JSON object that `safety-lens generate` prints and that
`report.render_report` draws.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safety_lens_cli.errors import UsageError
from safety_lens_cli.generation import (
    DecodeStep,
    Sampling,
    SteerPositions,
    StopReason,
    check_steer_positions,
    decode,
)
from safety_lens_cli.layers import normalize_layer
from safety_lens_cli.projection import PersonaScore, PersonaVector
from safety_lens_cli.scanning import ScoreColumn, score_columns

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from safety_lens_cli.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteeringTerm:
    """One `--steer PERSONA=COEF`: the block output at `vector.layer` gets `coefficient * residual_norm * unit` added.

    Scaling by the vector's mean residual-stream norm makes a coefficient
    mean the same fraction of the stream across models and layers.
    """

    vector: PersonaVector
    coefficient: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.coefficient):
            raise UsageError(f"Invalid steering coefficient {self.coefficient} for '{self.vector.persona}'.")

    @property
    def scale(self) -> float:
        return self.coefficient * self.vector.residual_norm

    def addition(self) -> torch.Tensor:
        """Build the `[hidden]` float32 vector added to the residual stream."""
        return (self.vector.unit.float() * self.scale).contiguous()

    def as_dict(self, positions: SteerPositions) -> dict[str, Any]:
        return {
            "persona": self.vector.persona,
            "coefficient": self.coefficient,
            "layer": self.vector.layer,
            "scale": self.scale,
            "residual_norm": self.vector.residual_norm,
            "object_id": self.vector.object_id,
            "positions": positions,
        }


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings shared by every prompt of a run.

    `steer_positions` defaults to `response`: only generated tokens are
    steered, so the first new token is still chosen from the unsteered prompt.
    """

    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    steer_positions: SteerPositions = "response"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"Invalid --max-new-tokens {self.max_new_tokens}: use a positive integer.")
        if self.batch_size < 1:
            raise UsageError(f"Invalid --batch-size {self.batch_size}: use a positive integer.")
        check_steer_positions(self.steer_positions)


@dataclass(frozen=True)
class GeneratedToken:
    """One new token, the text it adds, and its scores keyed like `ScoreColumn.key`.

    `position` is the token's index in its row, counting prompt tokens from 0.
    `text` is empty for a token that ends inside a multi-byte character; the
    next token's text then carries the whole character. `special` marks
    tokenizer special tokens such as EOS, whose text is their name.
    """

    id: int
    text: str
    position: int
    scores: dict[str, PersonaScore]
    special: bool = False


@dataclass(frozen=True)
class Trajectory:
    """The generation for one prompt and its scores, token by token.

    `seed` is the sampling seed of this row, or None for greedy decoding.
    """

    prompt_ids: tuple[int, ...]
    prompt_scan: dict[str, PersonaScore]
    tokens: tuple[GeneratedToken, ...]
    text: str
    stop_reason: StopReason
    seed: int | None = None

    def mean_score(self, key: str) -> float:
        """Mean calibrated score of the generated tokens on one column; NaN without tokens."""
        values = [token.scores[key].score for token in self.tokens]
        return sum(values) / len(values) if values else math.nan


class IncrementalText:
    """The text each new token adds, decoded from the whole sequence so far.

    Decoding one token alone loses leading spaces of SentencePiece tokenizers
    and splits multi-byte characters, so each token's text is the growth of
    the decoded sequence. Text that ends in U+FFFD (an incomplete UTF-8
    sequence) is held back until a later token completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int, final: bool = False) -> str:
        self.ids.append(token_id)
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        if text.endswith("\ufffd") and not final:
            return ""
        if text.startswith(self.emitted):
            piece = text[len(self.emitted) :]
        else:
            # The decoder rewrote earlier text (a rare normalisation), so fall back to the token on its own.
            piece = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
        self.emitted = text
        return piece


def resolve_columns(lm: LoadedModel, vectors: Sequence[PersonaVector] | Sequence[ScoreColumn]) -> list[ScoreColumn]:
    if vectors and all(isinstance(v, ScoreColumn) for v in vectors):
        return list(vectors)  # type: ignore[arg-type]
    return score_columns(lm, vectors)  # type: ignore[arg-type]


def steering_additions(lm: LoadedModel, steering: Sequence[SteeringTerm]) -> dict[int, torch.Tensor]:
    """Sum the scaled vectors per layer: `{layer: [hidden]}`."""
    additions: dict[int, torch.Tensor] = {}
    for term in steering:
        if term.vector.hidden_size != lm.hidden_size:
            raise UsageError(
                f"Steering vector for '{term.vector.persona}' has {term.vector.hidden_size} dimensions but "
                f"the model's hidden size is {lm.hidden_size}: extract it again for this model."
            )
        layer = normalize_layer(term.vector.layer, lm.num_layers)
        vector = term.addition()
        additions[layer] = additions[layer] + vector if layer in additions else vector
    return additions


def _score_row(columns: Sequence[ScoreColumn], states: Mapping[int, torch.Tensor], row: int) -> dict[str, PersonaScore]:
    scores: dict[str, PersonaScore] = {}
    for column in columns:
        raw = float(states[column.layer][row] @ column.vector.unit.float())
        scores[column.key] = PersonaScore(raw=raw, score=column.vector.calibration.score(raw), layer=column.layer)
    return scores


class _TokenRecorder:
    """Turn each decoding step into `GeneratedToken`s for one batch of prompts numbered `rows`."""

    def __init__(
        self,
        lm: LoadedModel,
        columns: Sequence[ScoreColumn],
        batch: Sequence[Sequence[int]],
        rows: Sequence[int],
        on_token: Callable[[int, GeneratedToken], None] | None,
    ) -> None:
        self.columns = columns
        self.prompt_lengths = [len(p) for p in batch]
        self.rows = list(rows)
        self.on_token = on_token
        self.texts = [IncrementalText(lm.tokenizer) for _ in batch]
        self.special_ids = frozenset(int(i) for i in lm.tokenizer.all_special_ids)
        self.tokens: list[list[GeneratedToken]] = [[] for _ in batch]

    def record(self, step: DecodeStep) -> None:
        for row in step.active.nonzero().flatten().tolist():
            token_id = int(step.token_ids[row])
            token = GeneratedToken(
                id=token_id,
                text=self.texts[row].push(token_id, final=bool(step.finished[row])),
                position=self.prompt_lengths[row] + step.step,
                scores=_score_row(self.columns, step.states, row),
                special=token_id in self.special_ids,
            )
            self.tokens[row].append(token)
            if self.on_token is not None:
                self.on_token(self.rows[row], token)


def generate_trajectories(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    vectors: Sequence[PersonaVector] | Sequence[ScoreColumn],
    *,
    steering: Sequence[SteeringTerm] = (),
    options: GenerationOptions | None = None,
    rows: Sequence[int] | None = None,
    on_prompt_scan: Callable[[int, dict[str, PersonaScore]], None] | None = None,
    on_token: Callable[[int, GeneratedToken], None] | None = None,
) -> list[Trajectory]:
    """Generate from each prompt (token ids) and score every token, in input order.

    Prompts run in batches of `options.batch_size`. `rows` numbers the
    prompts within the whole run (default 0, 1, ...). With sampling, row `r`
    uses seed `options.sampling.seed + r` (a random base seed when none is
    set), so a prompt samples the same tokens whatever its batch.
    `on_prompt_scan(r, scores)` is called once row `r`'s prompt has been read,
    and `on_token(r, token)` as soon as it gets a new token.
    """
    options = options or GenerationOptions()
    columns = resolve_columns(lm, vectors)
    additions = steering_additions(lm, steering)
    layers = sorted({column.layer for column in columns})
    rows = list(range(len(prompts))) if rows is None else list(rows)
    if len(rows) != len(prompts):
        raise ValueError("rows must number every prompt")
    sampling = options.sampling
    base_seed: int | None = None
    if not sampling.greedy:
        base_seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)

    results: list[Trajectory] = []
    for start in range(0, len(prompts), options.batch_size):
        batch = [list(p) for p in prompts[start : start + options.batch_size]]
        batch_rows = rows[start : start + options.batch_size]
        seeds = None if base_seed is None else [base_seed + row for row in batch_rows]
        recorder = _TokenRecorder(lm, columns, batch, batch_rows, on_token)

        def scan_prompt(states: dict[int, torch.Tensor], batch_rows: list[int] = batch_rows) -> None:
            if on_prompt_scan is not None:
                for index, row in enumerate(batch_rows):
                    on_prompt_scan(row, _score_row(columns, states, index))
        result = decode(
            lm,
            batch,
            max_new_tokens=options.max_new_tokens,
            layers=layers,
            sampling=sampling,
            steering=additions,
            steer_positions=options.steer_positions,
            seeds=seeds,
            on_prompt=scan_prompt,
            on_step=recorder.record,
        )
        for row, prompt in enumerate(batch):
            text = str(lm.tokenizer.decode(result.generated[row], skip_special_tokens=True))
            results.append(
                Trajectory(
                    prompt_ids=tuple(prompt),
                    prompt_scan=_score_row(columns, result.prompt_states, row),
                    tokens=tuple(recorder.tokens[row]),
                    text=text,
                    stop_reason=result.stop_reasons[row],
                    seed=None if seeds is None else seeds[row],
                )
            )
    return results


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity; a non-finite score is written as null."""
    return value if math.isfinite(value) else None


def trajectory_document(
    trajectory: Trajectory,
    *,
    columns: Sequence[ScoreColumn],
    steering: Sequence[SteeringTerm],
    options: GenerationOptions,
    model: Mapping[str, Any],
    messages: Sequence[Mapping[str, str]],
    threshold: float,
    record_id: str | int | None = None,
    prompt_text: str | None = None,
) -> dict[str, Any]:
    """Build the JSON object of one generation, as `safety-lens generate` prints it.

    `prompt_text` is the prompt as the model reads it (after the chat template).
    """
    document: dict[str, Any] = {}
    if record_id is not None:
        document["id"] = record_id
    document.update(
        {
            "prompt": {
                "messages": [dict(m) for m in messages],
                "text": prompt_text,
                "tokens": len(trajectory.prompt_ids),
            },
            "text": trajectory.text,
            "stop_reason": trajectory.stop_reason,
            "prompt_scan": {
                key: {"raw": _finite(s.raw), "score": _finite(s.score), "layer": s.layer}
                for key, s in trajectory.prompt_scan.items()
            },
            "tokens": [
                {
                    "token": token.text,
                    "id": token.id,
                    "position": token.position,
                    "special": token.special,
                    "scores": {
                        key: {"raw": _finite(s.raw), "score": _finite(s.score)} for key, s in token.scores.items()
                    },
                }
                for token in trajectory.tokens
            ],
            "threshold": threshold,
            "model": dict(model),
            "vectors": [
                {
                    "key": column.key,
                    "persona": column.vector.persona,
                    "layer": column.layer,
                    "object_id": column.vector.object_id,
                }
                for column in columns
            ],
            "steering": [term.as_dict(options.steer_positions) for term in steering],
            "sampling": {
                **options.sampling.as_dict(),
                "seed": trajectory.seed,
                "max_new_tokens": options.max_new_tokens,
            },
        }
    )
    return document
