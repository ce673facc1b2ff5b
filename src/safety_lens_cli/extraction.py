"""Extract persona vectors from contrastive stimuli, with calibration and quality figures.

All personas and layers are read in one batched pass over the stimuli, so a
forward pass per batch serves every (persona, layer) at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from safety_lens_cli.activations import POSITIONS, Position, check_position, read_pooled
from safety_lens_cli.errors import PersonaError, UsageError
from safety_lens_cli.metrics import accuracy, auroc, cohens_d, mean_std
from safety_lens_cli.projection import Calibration, PersonaVector, project, unit_and_norm
from safety_lens_cli.rendering import Encoded, Rendering, choose_rendering, encode_conversation, encode_text

if TYPE_CHECKING:
    import torch

    from safety_lens_cli.models import LoadedModel
    from safety_lens_cli.persona_schema import Persona

log = logging.getLogger(__name__)

Method = Literal["mean-diff", "pca"]
METHODS: tuple[Method, ...] = ("mean-diff", "pca")
# Layers whose cross-validated AUROC is within this margin of the best count as tied.
AUTO_AUROC_MARGIN = 0.01
AUTO_RULE = (
    f"highest cross-validated AUROC; among layers within {AUTO_AUROC_MARGIN} of it, the largest "
    "Cohen's d; then the lowest layer"
)


@dataclass(frozen=True)
class ExtractionOptions:
    """Extraction settings; `position` None reads role stimuli at the response, plain ones at the last token."""

    method: Method = "mean-diff"
    position: Position | None = None
    folds: int = 5
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"Invalid --method '{self.method}': use one of {', '.join(METHODS)}.")
        if self.position is not None:
            check_position(self.position)
        if self.folds < 2:
            raise UsageError(f"Invalid number of folds {self.folds}: use 2 or more.")


@dataclass
class Stimuli:
    """Encoded stimuli of one persona, with the position each is read at."""

    positive: list[Encoded]
    negative: list[Encoded]
    pair_positions: list[Position]
    eval_items: list[Encoded]
    eval_positions: list[Position]
    eval_labels: list[int]
    position_label: str  # stored in the registry key


@dataclass
class LayerResult:
    """A vector at one layer and the figures that say how well it separates the stimuli."""

    persona: str
    layer: int
    unit: torch.Tensor  # [hidden] float32
    raw_norm: float
    residual_norm: float
    calibration: Calibration
    quality: dict[str, Any]

    def to_vector(self, object_id: str | None = None, metadata: dict[str, Any] | None = None) -> PersonaVector:
        return PersonaVector(
            persona=self.persona,
            layer=self.layer,
            unit=self.unit,
            calibration=self.calibration,
            raw_norm=self.raw_norm,
            residual_norm=self.residual_norm,
            object_id=object_id,
            metadata=metadata or {},
        )


@dataclass
class PersonaExtraction:
    persona: Persona
    position_label: str
    rendering: Rendering
    layers: dict[int, LayerResult] = field(default_factory=dict)


def _default_position(persona: Persona, plain: bool, override: Position | None) -> Position:
    if override is not None:
        return override
    if persona.default_position is not None and not (plain and persona.default_position == "response-mean"):
        return persona.default_position  # type: ignore[return-value]
    return "last" if plain else "response-mean"


def position_label(persona: Persona, override: Position | None) -> str:
    """Return the position recorded in the registry key: one name, or `a+b` for mixed plain and role pairs."""
    labels = sorted({_default_position(persona, p.is_plain, override) for p in persona.pairs})
    return "+".join(labels)


def encode_stimuli(lm: LoadedModel, persona: Persona, rendering: Rendering, override: Position | None) -> Stimuli:
    """Encode a persona's pairs and eval items as the model reads them."""
    tokenizer = lm.tokenizer

    def encode(system: str | None, user: str | None, response: str) -> Encoded:
        if user is None:
            return encode_text(tokenizer, response)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": response},
        ]
        return encode_conversation(tokenizer, messages, rendering)

    positive, negative, positions = [], [], []
    for pair in persona.pairs:
        position = _default_position(persona, pair.is_plain, override)
        if pair.is_plain and position == "response-mean":
            raise PersonaError(
                f"{persona.source}:{pair.line}: a plain-text pair has no response to average over: "
                "use --position last or mean."
            )
        positive.append(encode(pair.system, pair.user, pair.positive))
        negative.append(encode(pair.system, pair.user, pair.negative))
        positions.append(position)

    eval_items, eval_positions, labels = [], [], []
    for item in persona.eval_items:
        position = _default_position(persona, item.is_plain, override)
        if item.is_plain and position == "response-mean":
            position = "last"
        text = item.text if item.is_plain else item.response
        assert text is not None  # guaranteed by the schema check
        eval_items.append(encode(item.system, item.user, text))
        eval_positions.append(position)
        labels.append(item.label)
    return Stimuli(positive, negative, positions, eval_items, eval_positions, labels, position_label(persona, override))


def compute_direction(positive: torch.Tensor, negative: torch.Tensor, method: Method) -> torch.Tensor:
    """Unnormalised direction `[hidden]` from positive `[n, hidden]` and negative `[m, hidden]` activations.

    `mean-diff` is mean(positive) - mean(negative), in float64 so it does not
    depend on the order of the stimuli. `pca` is the first right singular
    vector of the uncentred paired differences (so a consistent shift
    dominates it), with its sign and length taken from the mean difference.
    """
    import torch

    mean_diff = positive.double().mean(0) - negative.double().mean(0)
    if method == "mean-diff":
        return mean_diff.float()
    if positive.shape[0] != negative.shape[0]:
        raise UsageError("Method 'pca' needs paired stimuli (as many positive as negative): use mean-diff.")
    differences = positive.double() - negative.double()
    _, _, vh = torch.linalg.svd(differences, full_matrices=False)
    component = vh[0]
    along = float(component @ mean_diff)
    if along < 0:
        component, along = -component, -along
    return (component * along).float()


def cross_validate(
    positive: torch.Tensor,
    negative: torch.Tensor,
    method: Method,
    folds: int,
    seed: int,
    *,
    random_direction: bool = False,
) -> tuple[float | None, float | None]:
    """Mean test-fold AUROC and accuracy, folding by pair index so both sides of a pair stay together.

    With `random_direction`, each fold uses a random unit vector whose sign is
    fitted on the training folds: the chance baseline for the same data.
    """
    import torch

    n = min(positive.shape[0], negative.shape[0])
    folds = min(folds, n)
    if folds < 2:
        return None, None
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    aucs, accs = [], []
    for k in range(folds):
        test = order[k::folds]
        train = torch.cat([order[j::folds] for j in range(folds) if j != k])
        if random_direction:
            direction = torch.randn(positive.shape[1], generator=generator)
            if float((positive[train].mean(0) - negative[train].mean(0)) @ direction) < 0:
                direction = -direction
        else:
            direction = compute_direction(positive[train], negative[train], method)
        if float(direction.norm()) == 0:
            continue
        unit = direction / direction.norm()
        train_pos, train_neg = project(positive[train], unit).tolist(), project(negative[train], unit).tolist()
        threshold = (sum(train_pos) / len(train_pos) + sum(train_neg) / len(train_neg)) / 2
        test_pos, test_neg = project(positive[test], unit).tolist(), project(negative[test], unit).tolist()
        scores, labels = test_pos + test_neg, [1] * len(test_pos) + [0] * len(test_neg)
        fold_auc = auroc(scores, labels)
        if fold_auc is not None:
            aucs.append(fold_auc)
        fold_acc = accuracy(scores, labels, threshold)
        if fold_acc is not None:
            accs.append(fold_acc)
    return (sum(aucs) / len(aucs) if aucs else None), (sum(accs) / len(accs) if accs else None)


def layer_result(
    persona: str,
    layer: int,
    positive: torch.Tensor,
    negative: torch.Tensor,
    residual_norm: float,
    options: ExtractionOptions,
    eval_states: torch.Tensor | None = None,
    eval_labels: Sequence[int] = (),
) -> LayerResult:
    """Vector, calibration and quality figures for one persona at one layer."""
    import torch

    unit, raw_norm = unit_and_norm(compute_direction(positive, negative, options.method), residual_norm)
    pos_raw, neg_raw = project(positive, unit).tolist(), project(negative, unit).tolist()
    pos_mean, pos_std = mean_std(pos_raw)
    neg_mean, neg_std = mean_std(neg_raw)
    calibration = Calibration(pos_mean, pos_std, neg_mean, neg_std)
    cv_auroc, cv_accuracy = cross_validate(positive, negative, options.method, options.folds, options.seed)
    random_auroc, random_accuracy = cross_validate(
        positive, negative, options.method, options.folds, options.seed, random_direction=True
    )
    generator = torch.Generator().manual_seed(options.seed + layer)
    random_unit = torch.randn(positive.shape[1], generator=generator)
    random_unit = random_unit / random_unit.norm()
    random_d = cohens_d(project(positive, random_unit).tolist(), project(negative, random_unit).tolist())
    quality: dict[str, Any] = {
        "n_pairs": int(min(positive.shape[0], negative.shape[0])),
        "cohens_d": cohens_d(pos_raw, neg_raw),
        "cv_auroc": cv_auroc,
        "cv_accuracy": cv_accuracy,
        "cv_folds": options.folds,
        "random_cv_auroc": random_auroc,
        "random_cv_accuracy": random_accuracy,
        "random_cohens_d": abs(random_d) if random_d is not None else None,
        "n_eval": len(eval_labels),
        "eval_auroc": None,
        "eval_accuracy": None,
    }
    if eval_states is not None and len(eval_labels):
        raws = project(eval_states, unit).tolist()
        quality["eval_auroc"] = auroc(raws, list(eval_labels))
        quality["eval_accuracy"] = accuracy([calibration.score(r) for r in raws], list(eval_labels), 0.5)
    return LayerResult(persona, layer, unit, raw_norm, residual_norm, calibration, quality)


def extract(
    lm: LoadedModel,
    personas: Sequence[Persona],
    layers: Sequence[int],
    options: ExtractionOptions | None = None,
) -> list[PersonaExtraction]:
    """Extract every persona at every layer from one batched read of all stimuli."""
    import torch

    options = options or ExtractionOptions()
    rendering = choose_rendering(lm.tokenizer)
    stimuli = [encode_stimuli(lm, p, rendering, options.position) for p in personas]

    items: list[Encoded] = []
    positions: list[Position] = []
    spans: list[tuple[int, int, int, int]] = []  # start of positives, negatives, eval, end
    for s in stimuli:
        start = len(items)
        items += s.positive + s.negative + s.eval_items
        positions += s.pair_positions + s.pair_positions + s.eval_positions
        spans.append((start, start + len(s.positive), start + 2 * len(s.positive), len(items)))
    log.info(
        "Reading %d stimuli of %d persona(s) at %d layer(s)", len(items), len(personas), len(set(layers))
    )
    norms: dict[int, torch.Tensor] = {}
    pooled = read_pooled(lm, items, positions, layers, batch_size=options.batch_size, token_norms=norms)

    results = []
    for persona, s, (a, b, c, d) in zip(personas, stimuli, spans):
        extraction = PersonaExtraction(persona, s.position_label, rendering)
        for layer, states in pooled.items():
            residual_norm = float(norms[layer][a:c].mean())
            extraction.layers[layer] = layer_result(
                persona.name, layer, states[a:b], states[b:c], residual_norm, options, states[c:d], s.eval_labels
            )
        results.append(extraction)
    return results


def choose_auto_layer(qualities: dict[int, dict[str, Any]]) -> int:
    """Apply `AUTO_RULE` to per-layer quality figures."""
    if not qualities:
        raise UsageError("No layers to choose from.")

    def value(q: dict[str, Any], name: str) -> float:
        v = q.get(name)
        return float(v) if isinstance(v, (int, float)) else float("-inf")

    best = max(value(q, "cv_auroc") for q in qualities.values())
    tied = [layer for layer, q in qualities.items() if value(q, "cv_auroc") >= best - AUTO_AUROC_MARGIN]
    return min(tied, key=lambda layer: (-value(qualities[layer], "cohens_d"), layer))


__all__ = [
    "AUTO_RULE",
    "METHODS",
    "POSITIONS",
    "ExtractionOptions",
    "LayerResult",
    "PersonaExtraction",
    "choose_auto_layer",
    "compute_direction",
    "cross_validate",
    "extract",
    "layer_result",
]
