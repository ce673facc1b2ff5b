"""Persona vectors and the two scales every score is reported on.

`raw` is the dot product of an activation with the unit vector. `score` is
calibrated on the vector's own stimuli: 0 is the mean raw value of the
negative stimuli and 1 the mean of the positive ones, so a threshold of 0.5
sits halfway between them whatever the model or layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safety_lens_cli.errors import UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Calibration:
    """Projection statistics of the stimuli a vector was extracted from (raw scale)."""

    pos_mean: float
    pos_std: float
    neg_mean: float
    neg_std: float

    def score(self, raw: float) -> float:
        """Map a raw projection to the calibrated scale (0 = negative mean, 1 = positive mean)."""
        span = self.pos_mean - self.neg_mean
        if span == 0 or not math.isfinite(span):
            raise UsageError("Vector calibration has equal positive and negative means: re-extract it.")
        return (raw - self.neg_mean) / span

    def raw_at(self, score: float) -> float:
        """Return the raw projection that a calibrated score corresponds to."""
        return self.neg_mean + score * (self.pos_mean - self.neg_mean)

    def as_dict(self) -> dict[str, float]:
        return {"pos_mean": self.pos_mean, "pos_std": self.pos_std, "neg_mean": self.neg_mean, "neg_std": self.neg_std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(
            pos_mean=float(data["pos_mean"]),
            pos_std=float(data["pos_std"]),
            neg_mean=float(data["neg_mean"]),
            neg_std=float(data["neg_std"]),
        )


@dataclass(frozen=True)
class PersonaVector:
    """A unit direction at one layer, with what is needed to score and steer along it.

    `residual_norm` is the mean L2 norm of the residual stream at `layer` over
    the extraction stimuli's read tokens; a steering coefficient is multiplied
    by it so that the same coefficient means the same across models.
    """

    persona: str
    layer: int
    unit: torch.Tensor  # [hidden], float32, L2 norm 1
    calibration: Calibration
    raw_norm: float
    residual_norm: float
    object_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def hidden_size(self) -> int:
        return int(self.unit.shape[0])


@dataclass(frozen=True)
class PersonaScore:
    """One persona's score for one input."""

    raw: float
    score: float
    layer: int

    def flagged(self, threshold: float) -> bool:
        return self.score >= threshold

    def as_dict(self) -> dict[str, float | int]:
        return {"raw": self.raw, "score": self.score, "layer": self.layer}


def project(pooled: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Raw projections `[n]` of pooled activations `[n, hidden]` on a unit vector `[hidden]`."""
    return pooled.float() @ unit.float().to(pooled.device)


def score_pooled(
    pooled: Mapping[int, torch.Tensor], vectors: Sequence[PersonaVector]
) -> list[dict[str, PersonaScore]]:
    """Scores per input row: `[{persona: PersonaScore}]` from `{layer: [n, hidden]}`."""
    if not vectors:
        return []
    n = next(iter(pooled.values())).shape[0]
    rows: list[dict[str, PersonaScore]] = [{} for _ in range(n)]
    for vector in vectors:
        raws = project(pooled[vector.layer], vector.unit).tolist()
        for row, raw in zip(rows, raws):
            row[vector.persona] = PersonaScore(raw=raw, score=vector.calibration.score(raw), layer=vector.layer)
    return rows


# A direction shorter than this fraction of the residual-stream norm is float
# rounding between batched reads of equal texts, not a difference.
MIN_RELATIVE_NORM = 1e-6


def unit_and_norm(direction: torch.Tensor, reference_norm: float = 0.0) -> tuple[torch.Tensor, float]:
    """Normalise a direction `[hidden]`.

    Raises when it is zero, or no longer than `MIN_RELATIVE_NORM` times
    `reference_norm` (the residual-stream norm it was measured against).
    """
    norm = float(direction.float().norm())
    if norm == 0 or not math.isfinite(norm) or norm <= MIN_RELATIVE_NORM * reference_norm:
        raise UsageError(
            "The positive and negative stimuli give identical mean activations, so no direction "
            f"exists (difference {norm:.3g}): check that the persona's two sides differ."
        )
    return (direction.float() / norm).contiguous(), norm
