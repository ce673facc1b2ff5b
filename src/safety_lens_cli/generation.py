"""A decoding loop with the KV cache, residual capture and position-aware steering.

`decode` runs one forward pass over the left-padded prompt batch, then one pass
per new token that feeds only that token and reuses the cache, so the prefix
is never recomputed. Every pass captures the requested layers, and a new
token's residual is read in the pass that feeds it back as input. That is the
activation a scan of the prompt plus the generated text up to and including
the token reads at its last position. The last token therefore costs one more
forward pass, whose logits are not used.

Steering positions are token indices within a row, counted over real tokens
from 0 at the first prompt token: the cache length plus the local index, not
the column in the padded batch. Pad slots never receive a steering vector, so
a row gets the same ids in a batch as on its own.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import secrets
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from safety_lens_cli.activations import pad_batch
from safety_lens_cli.errors import InputError, RuntimeFailure, UsageError
from safety_lens_cli.hooks import (
    ResidualCapture,
    Steering,
    capture_residual,
    model_inputs,
    position_ids_from_mask,
    steer,
)
from safety_lens_cli.layers import normalize_layer

if TYPE_CHECKING:
    import torch
    from torch import nn

    from safety_lens_cli.models import LoadedModel

log = logging.getLogger(__name__)

SteerPositions = Literal["all", "prompt", "response"]
STEER_POSITIONS: tuple[SteerPositions, ...] = ("all", "prompt", "response")
StopReason = Literal["eos", "max_new_tokens"]


def check_steer_positions(value: str) -> SteerPositions:
    if value not in STEER_POSITIONS:
        raise UsageError(f"Invalid --steer-positions '{value}': use one of {', '.join(STEER_POSITIONS)}.")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Sampling:
    """Next-token choice: greedy when `temperature` is 0, else sampling.

    `top_p` keeps the smallest set of most likely tokens whose probabilities
    sum to at least `top_p` (nucleus sampling). `seed` seeds one
    `torch.Generator` per row, so a sampled run repeats exactly.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"Invalid --temperature {self.temperature}: use 0 (greedy) or a positive number.")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise UsageError(f"Invalid --top-p {self.top_p}: use a number in (0, 1].")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


@dataclass(frozen=True)
class DecodeStep:
    """One forward pass that fed a new token to each active row.

    `step` is the 0-based index of the new token. `token_ids` is `[batch]`,
    with the pad id in rows that had already finished. `active` marks the
    rows that fed a real token, and `finished` those whose generation ends
    with it. `states[layer]` is `[batch, hidden]` (float32, CPU), the residual
    at the fed token.
    """

    step: int
    token_ids: torch.Tensor
    active: torch.Tensor
    finished: torch.Tensor
    states: dict[int, torch.Tensor]


@dataclass
class DecodeResult:
    """Generated ids per row, why each row stopped, and the prompt's last-token residuals.

    `prompt_states[layer]` is `[batch, hidden]` (float32, CPU) at the last
    prompt token of each row. `token_states[layer]` is `[batch, steps, hidden]`
    when `decode` was asked to keep it (else empty), and row `r` is valid for
    its first `len(generated[r])` steps, zero after.
    """

    generated: list[list[int]]
    stop_reasons: list[StopReason]
    prompt_states: dict[int, torch.Tensor] = field(default_factory=dict)
    token_states: dict[int, torch.Tensor] = field(default_factory=dict)


def eos_token_ids(lm: LoadedModel) -> frozenset[int]:
    """End-of-sequence ids of the model's generation config and of its tokenizer."""
    ids: set[int] = set()
    config = getattr(lm.model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return frozenset(ids)


def steering_mask(
    attention_mask: torch.Tensor,
    new_tokens: int,
    prompt_lengths: torch.Tensor,
    positions: SteerPositions | Collection[int],
) -> torch.Tensor:
    """Positions `[batch, new_tokens]` that receive the steering vector in the next pass.

    `attention_mask` is `[batch, past + new]`. A token's position is its index
    among the real tokens of its row, so it counts the cache and ignores left
    padding. Pad slots are never selected. `prompt_lengths` is `[batch]`.
    An explicit collection selects those absolute positions only.
    """
    import torch

    index = position_ids_from_mask(attention_mask, new_tokens)  # [batch, new]
    real = attention_mask[:, -new_tokens:].bool()
    lengths = prompt_lengths.to(index.device)[:, None]
    if positions == "all":
        return real
    if positions == "prompt":
        return real & (index < lengths)
    if positions == "response":
        return real & (index >= lengths)
    if isinstance(positions, str):
        raise UsageError(f"Invalid steering positions '{positions}': use one of {', '.join(STEER_POSITIONS)}.")
    chosen = torch.tensor(sorted(int(p) for p in positions), dtype=index.dtype, device=index.device)
    return real & torch.isin(index, chosen)


def choose_next(
    logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Next token ids `[batch]` from last-position logits `[batch, vocab]`."""
    import torch

    if sampling.greedy:
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError("sampling needs one generator per row")
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # One generator per row, so a row samples the same tokens in any batch.
    rows = [torch.multinomial(probs[row], 1, generator=generators[row]) for row in range(probs.shape[0])]
    return torch.cat(rows)


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class _Runner:
    """Forward passes with capture and steering masks, shared by the cached and uncached loops."""

    def __init__(
        self,
        lm: LoadedModel,
        capture: ResidualCapture | None,
        steering: Steering,
        prompt_lengths: torch.Tensor,
        positions: SteerPositions | Collection[int],
    ) -> None:
        self.lm = lm
        self.capture = capture
        self.steering = steering
        self.prompt_lengths = prompt_lengths
        self.positions = positions
        params = inspect.signature(lm.model.forward).parameters
        self.logits_argument = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any, use_cache: bool
    ) -> tuple[torch.Tensor, Any, dict[int, torch.Tensor]]:
        """Return last-position logits `[batch, vocab]` (float32), the cache and the last-column states."""
        inputs = model_inputs(self.lm.model, ids, attention_mask, past_key_values=cache, use_cache=use_cache)
        if self.logits_argument is not None:
            inputs[self.logits_argument] = 1
        self.steering.positions = steering_mask(attention_mask, ids.shape[1], self.prompt_lengths, self.positions)
        try:
            output = self.lm.model(**inputs)
        except (RuntimeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            raise RuntimeFailure(
                f"The forward pass failed during generation ({type(exc).__name__}: {first}): "
                "try a smaller batch, fewer --max-new-tokens or --device cpu."
            ) from exc
        states: dict[int, torch.Tensor] = {}
        if self.capture is not None:
            states = {layer: s[:, -1].float().cpu() for layer, s in self.capture.states.items()}
        return output.logits[:, -1, :].float(), _output_cache(output) if use_cache else None, states


def _check_lengths(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"Invalid --max-new-tokens {max_new_tokens}: use a positive integer.")
    if not prompts:
        raise UsageError("No prompts to generate from.")
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"Prompt {row + 1} encodes to no tokens: pass a non-empty prompt.")
    limit = lm.context_length
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise UsageError(
            f"A prompt of {longest} tokens plus --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {limit} tokens: shorten the prompt or lower --max-new-tokens."
        )


def _generators(lm: LoadedModel, sampling: Sampling, seeds: Sequence[int] | None, rows: int) -> list[Any] | None:
    import torch

    if sampling.greedy:
        return None
    if seeds is None:
        base = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        seeds = [base + row for row in range(rows)]
    if len(seeds) != rows:
        raise ValueError("seeds must give one seed per prompt")
    return [torch.Generator(device=lm.device).manual_seed(int(seed)) for seed in seeds]


@contextlib.contextmanager
def _hooks(
    lm: LoadedModel, layers: Sequence[int], additions: Mapping[int, torch.Tensor]
) -> Iterator[tuple[ResidualCapture | None, Steering]]:
    # Steering hooks are prepended, so a capture on the same block reads the steered output.
    with steer(lm.layers, additions) as steering:
        if layers:
            with capture_residual(lm.layers, layers) as capture:
                yield capture, steering
        else:
            yield None, steering


def decode(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    layers: Sequence[int] = (),
    sampling: Sampling | None = None,
    steering: Mapping[int, torch.Tensor] | None = None,
    steer_positions: SteerPositions | Collection[int] = "response",
    seeds: Sequence[int] | None = None,
    eos_ids: Collection[int] | None = None,
    use_cache: bool = True,
    keep_token_states: bool = False,
    on_prompt: Callable[[dict[int, torch.Tensor]], None] | None = None,
    on_step: Callable[[DecodeStep], None] | None = None,
) -> DecodeResult:
    """Generate up to `max_new_tokens` per prompt, capturing `layers` at every token.

    `steering[layer]` is a `[hidden]` vector, already scaled, added to that
    block's output at the positions `steer_positions` selects. A row stops
    after an id in `eos_ids` (default: the model's EOS ids) or after
    `max_new_tokens`. `seeds` gives one sampling seed per row (default:
    `sampling.seed + row`). `use_cache=False` recomputes the whole sequence
    at every step; it exists as a reference for the cached path. With
    `keep_token_states`, the result keeps every new token's residuals.
    `on_prompt` gets the prompt's last-token states once the prompt is read,
    and `on_step` each `DecodeStep` as it happens.
    """
    import torch

    sampling = sampling or Sampling()
    _check_lengths(lm, prompts, max_new_tokens)
    layer_list = sorted({normalize_layer(i, lm.num_layers) for i in layers})
    additions = {normalize_layer(i, lm.num_layers): v for i, v in (steering or {}).items()}
    stop_ids = torch.tensor(sorted(eos_token_ids(lm) if eos_ids is None else set(eos_ids)), dtype=torch.long)
    batch = len(prompts)
    generators = _generators(lm, sampling, seeds, batch)

    ids, mask = pad_batch(prompts, lm.pad_token_id, "left", lm.device)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    generated: list[list[int]] = [[] for _ in range(batch)]
    stop_reasons: list[StopReason] = ["max_new_tokens"] * batch
    kept_states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layer_list} if keep_token_states else {}
    stop_ids = stop_ids.to(lm.device)

    with torch.inference_mode(), _hooks(lm, layer_list, additions) as (capture, steering_hooks):
        runner = _Runner(lm, capture, steering_hooks, prompt_lengths, steer_positions)
        logits, cache, prompt_states = runner.forward(ids, mask, None, use_cache)
        if on_prompt is not None:
            on_prompt(prompt_states)
        active = torch.ones(batch, dtype=torch.bool, device=lm.device)
        for step in range(max_new_tokens):
            fed = torch.where(active, choose_next(logits, sampling, generators), lm.pad_token_id)
            mask = torch.cat([mask, active.long()[:, None]], dim=1)
            ids = torch.cat([ids, fed[:, None]], dim=1)
            step_ids = fed[:, None] if use_cache else ids
            logits, cache, states = runner.forward(step_ids, mask, cache, use_cache)

            is_eos = torch.isin(fed, stop_ids) & active
            finished = is_eos | (active & (step + 1 == max_new_tokens))
            for row in torch.nonzero(active).flatten().tolist():
                generated[row].append(int(fed[row]))
                if bool(is_eos[row]):
                    stop_reasons[row] = "eos"
            for layer, kept in kept_states.items():
                kept.append(torch.where(active.cpu()[:, None], states[layer], 0.0))
            if on_step is not None:
                on_step(DecodeStep(step, fed.cpu(), active.cpu(), finished.cpu(), states))
            active = active & ~finished
            if not bool(active.any()):
                break

    return DecodeResult(
        generated=generated,
        stop_reasons=stop_reasons,
        prompt_states=prompt_states,
        token_states={layer: torch.stack(kept, dim=1) for layer, kept in kept_states.items()},
    )
