"""`SafetyLens`: extraction, projection and persona scans from Python, on the CLI's core.

Every read goes through `activations.read_pooled`, every direction through
`extraction.compute_direction` and `layer_result`, every built-in persona
vector through `vector_lookup.resolve_vectors` (registry first, extracted once
and stored otherwise), and `quick_scan` through `scanning.scan_records`, which
is what `safety-lens scan` runs. The same model, layer, persona and text
therefore give the same numbers here and on the command line.

Two scales appear, as in the rest of safety-lens:

- raw: the dot product of a residual-stream activation with a vector;
- score: the raw value calibrated on the vector's own stimuli, where 0 is the
  mean of the negative stimuli and 1 the mean of the positive ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch

from safety_lens_cli.activations import read_pooled
from safety_lens_cli.api_inputs import (
    TokenInput,
    check_batch_size,
    check_direction,
    check_layer,
    check_texts,
    encode_inputs,
    eval_mode,
)
from safety_lens_cli.api_vectors import load_vector, load_vector_metadata, save_vector
from safety_lens_cli.errors import InputError, UsageError
from safety_lens_cli.extraction import ExtractionOptions, choose_auto_layer, layer_result
from safety_lens_cli.projection import Calibration, PersonaVector, project
from safety_lens_cli.rendering import Encoded

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from safety_lens_cli.models import LoadedModel

log = logging.getLogger(__name__)

# The personas of the earlier `safety_lens` library, scanned when none are named.
DEFAULT_PERSONAS: tuple[str, ...] = ("sycophancy", "deception", "refusal")
TextPosition = Literal["last", "mean"]
_AUTO = "auto"


class SafetyLens:
    """Read a causal LM's residual stream and project it on persona vectors.

    Layer `L` is the output of decoder block `L` (0-based), that is
    `output_hidden_states[L + 1]` in transformers; negative indices count from
    the end. Inputs are read on the model's device in its dtype, and pooled
    activations are projected in float32.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        registry: str | os.PathLike[str] | None = None,
        batch_size: int = 16,
        layers_path: str | None = None,
    ) -> None:
        """Wrap a model and tokenizer loaded by the caller.

        `registry` is the vector registry folder (default `$SAFETY_LENS_HOME`,
        else `~/.cache/safety-lens`), shared with the CLI. `batch_size` is the
        number of texts per forward pass. `layers_path` names the decoder
        block list (e.g. `model.layers`) when it cannot be found automatically.
        A tokenizer without a pad token gets its EOS token as pad token.
        """
        from safety_lens_cli.models import wrap_model

        self._setup(wrap_model(model, tokenizer, layers_path=layers_path), registry, batch_size)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        layers_path: str | None = None,
        registry: str | os.PathLike[str] | None = None,
        batch_size: int = 16,
    ) -> SafetyLens:
        """Load a model the way `safety-lens --model` does (default: the SmolLM2 GGUF).

        The model then has the CLI's fingerprint, so vectors that `safety-lens
        extract` stored for it are reused, and the other way round.
        """
        from safety_lens_cli.models import ModelRequest, load_model

        request = ModelRequest(
            model=model,
            revision=revision,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            layers_path=layers_path,
        )
        return cls.from_loaded(load_model(request), registry=registry, batch_size=batch_size)

    @classmethod
    def from_loaded(
        cls, lm: LoadedModel, *, registry: str | os.PathLike[str] | None = None, batch_size: int = 16
    ) -> SafetyLens:
        """Wrap a `LoadedModel` from `safety_lens_cli.models`, keeping its fingerprint."""
        lens = cls.__new__(cls)
        lens._setup(lm, registry, batch_size)
        return lens

    def _setup(self, lm: LoadedModel, registry: str | os.PathLike[str] | None, batch_size: int) -> None:
        self._lm = lm
        self._registry = Path(registry).expanduser() if registry is not None else None
        self._batch_size = check_batch_size(batch_size)
        # Persona vectors already resolved, by (persona spec, layer or "auto").
        self._vectors: dict[tuple[str, int | str], PersonaVector] = {}
        self.last_extraction: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"SafetyLens(model={self._lm.model_id!r}, layers={self.num_layers}, hidden_size={self.hidden_size})"

    @property
    def model(self) -> PreTrainedModel:
        return self._lm.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._lm.tokenizer

    @property
    def num_layers(self) -> int:
        return self._lm.num_layers

    @property
    def hidden_size(self) -> int:
        return self._lm.hidden_size

    @property
    def device(self) -> torch.device:
        return self._lm.device

    @property
    def fingerprint(self) -> str:
        """Registry name of the exact weights; computed on first use (SHA-256 of the parameters for a model you loaded)."""
        return self._lm.fingerprint

    # Extraction

    def extract_persona_vector(
        self,
        pos_texts: Sequence[str],
        neg_texts: Sequence[str],
        layer_idx: int | None,
        *,
        position: TextPosition = "last",
    ) -> torch.Tensor:
        """Return the unit mean-difference direction `[hidden]` (float32, on the model's device).

        Each text is tokenized as plain text and read at its last token (or
        averaged over all tokens with `position="mean"`). The direction is
        mean(positive) - mean(negative), so counts may differ and the order
        of the texts does not matter. `layer_idx=None` picks the layer as
        `safety-lens extract --layer auto` does. The layer, calibration and
        quality figures are kept in `last_extraction`.
        """
        return self.extract_persona(pos_texts, neg_texts, layer_idx, position=position)["vector"]

    def extract_persona(
        self,
        pos_texts: Sequence[str],
        neg_texts: Sequence[str],
        layer_idx: int | None = None,
        *,
        name: str = "custom",
        position: TextPosition = "last",
    ) -> dict[str, Any]:
        """Extract a direction like `extract_persona_vector` and return it with its calibration.

        Returns a dict, also stored in `last_extraction`, with these keys:
        `persona`, `layer`, `vector` (unit, float32 `[hidden]`), `position`,
        `calibration` (`pos_mean`, `pos_std`, `neg_mean` and `neg_std` of the
        stimuli's raw projections), `quality` (Cohen's d, cross-validated
        AUROC and accuracy), `raw_norm` (length of the mean difference),
        `residual_norm` (mean residual-stream norm at the layer) and
        `object_id` (None, as the vector is not stored).
        """
        positive = check_texts(pos_texts, "pos_texts")
        negative = check_texts(neg_texts, "neg_texts")
        if position not in ("last", "mean"):
            raise UsageError(f"Invalid position {position!r}: use 'last' or 'mean' for plain texts.")
        if layer_idx is None:
            layers = list(range(self.num_layers))
        else:
            layers = [check_layer(layer_idx, self.num_layers)]
        items = encode_inputs(self._lm, positive + negative).items

        norms: dict[int, torch.Tensor] = {}
        with eval_mode(self._lm.model):
            pooled = read_pooled(self._lm, items, position, layers, batch_size=self._batch_size, token_norms=norms)
        options = ExtractionOptions(position=position, batch_size=self._batch_size)
        count = len(positive)
        results = {
            layer: layer_result(name, layer, states[:count], states[count:], float(norms[layer].mean()), options)
            for layer, states in pooled.items()
        }
        chosen = layers[0] if layer_idx is not None else choose_auto_layer({k: r.quality for k, r in results.items()})
        result = results[chosen]
        vector = result.to_vector(metadata={"position": position, "quality": result.quality})
        self.last_extraction = self._vector_record(vector)
        return self.last_extraction

    # Projection

    def scan(
        self,
        input_ids: TokenInput,
        vector: torch.Tensor,
        layer_idx: int,
        *,
        attention_mask: torch.Tensor | Sequence[Sequence[int]] | None = None,
    ) -> float | list[float]:
        """Project the last token's residual at `layer_idx` on `vector`, on the raw scale.

        The result is the dot product with `vector` as given, not
        normalised, so for a unit vector from `extract_persona_vector` it is
        the length of the activation along the direction. One sequence (a
        string, a 1-D tensor or list of ints, or a 2-D input with one row)
        returns a float, and several rows return a list of floats. A string
        is tokenized as plain text, like `tokenizer(text)`. With
        `attention_mask`, the last token is the last position whose mask is 1,
        so padding on either side is never read. Convert to the calibrated
        scale with `calibrated_score`.
        """
        direction = check_direction(vector, self.hidden_size)
        layer = check_layer(layer_idx, self.num_layers)
        sequences = encode_inputs(self._lm, input_ids, attention_mask)
        pooled = self._read(sequences.items, [layer])
        raws = [float(v) for v in project(pooled[layer], direction).tolist()]
        return raws if sequences.several else raws[0]

    def scan_all_layers(
        self,
        input_ids: TokenInput,
        vectors: Mapping[int, torch.Tensor],
        *,
        attention_mask: torch.Tensor | Sequence[Sequence[int]] | None = None,
    ) -> dict[int, float] | dict[int, list[float]]:
        """Project the last token on one vector per layer, from one forward pass per batch.

        Returns `{layer: raw projection}` with the caller's layer keys, on the
        raw scale of `scan`; each value is a list when several rows are given.
        The pass stops after the deepest layer asked for.
        """
        if not isinstance(vectors, Mapping) or not vectors:
            raise UsageError("vectors must be a non-empty dict of layer index to vector tensor.")
        layers = {key: check_layer(key, self.num_layers, "layer key") for key in vectors}
        directions = {key: check_direction(v, self.hidden_size, f"vector for layer {key}") for key, v in vectors.items()}
        sequences = encode_inputs(self._lm, input_ids, attention_mask)
        pooled = self._read(sequences.items, sorted(set(layers.values())))
        result: dict[int, Any] = {}
        for key, layer in layers.items():
            raws = [float(v) for v in project(pooled[layer], directions[key]).tolist()]
            result[key] = raws if sequences.several else raws[0]
        return result

    @overload
    @staticmethod
    def calibrated_score(raw: float, calibration: Mapping[str, float]) -> float: ...

    @overload
    @staticmethod
    def calibrated_score(raw: Sequence[float], calibration: Mapping[str, float]) -> list[float]: ...

    @staticmethod
    def calibrated_score(raw: float | Sequence[float], calibration: Mapping[str, float]) -> float | list[float]:
        """Map raw projections to the calibrated scale: 0 is the negative stimuli's mean, 1 the positive's.

        `calibration` is the `calibration` dict of `last_extraction` or
        `persona_vector(...)`.
        """
        try:
            scale = Calibration.from_dict(calibration)
        except (KeyError, TypeError, ValueError):
            raise UsageError(
                "Invalid calibration: expected a dict with pos_mean, pos_std, neg_mean and neg_std, "
                "such as last_extraction['calibration']."
            ) from None
        if isinstance(raw, Sequence):
            return [scale.score(float(value)) for value in raw]
        return scale.score(float(raw))

    # Built-in personas

    @overload
    def quick_scan(
        self, text: str, layer_idx: int | None = None, persona_names: Sequence[str] | None = None
    ) -> dict[str, float]: ...

    @overload
    def quick_scan(
        self, text: list[str] | tuple[str, ...], layer_idx: int | None = None, persona_names: Sequence[str] | None = None
    ) -> list[dict[str, float]]: ...

    def quick_scan(
        self,
        text: str | Sequence[str],
        layer_idx: int | None = None,
        persona_names: Sequence[str] | None = None,
    ) -> dict[str, float] | list[dict[str, float]]:
        """Score a prompt on persona vectors: `{persona: calibrated score}`.

        The text is read as `safety-lens scan --text` reads it: one user turn
        rendered with the chat template, at the last token. `layer_idx=None`
        uses the auto layer; `persona_names` defaults to sycophancy,
        deception and refusal, and also takes persona YAML paths. Vectors come
        from the registry, or are extracted once and stored, and are then kept
        by this object. A list of texts returns a list of dicts.
        """
        detailed = self.quick_scan_detailed(text, layer_idx, persona_names)
        rows = detailed if isinstance(detailed, list) else [detailed]
        scores = [{persona: float(entry["score"]) for persona, entry in row.items()} for row in rows]
        return scores if isinstance(detailed, list) else scores[0]

    @overload
    def quick_scan_detailed(
        self, text: str, layer_idx: int | None = None, persona_names: Sequence[str] | None = None
    ) -> dict[str, dict[str, Any]]: ...

    @overload
    def quick_scan_detailed(
        self, text: list[str] | tuple[str, ...], layer_idx: int | None = None, persona_names: Sequence[str] | None = None
    ) -> list[dict[str, dict[str, Any]]]: ...

    def quick_scan_detailed(
        self,
        text: str | Sequence[str],
        layer_idx: int | None = None,
        persona_names: Sequence[str] | None = None,
    ) -> dict[str, dict[str, Any]] | list[dict[str, dict[str, Any]]]:
        """Like `quick_scan`, with `{persona: {"raw", "score", "layer", "object_id"}}` per text.

        `raw` is the projection on the persona's unit vector, `score` the
        calibrated value, and `object_id` the registry id of the vector.
        """
        from safety_lens_cli.inputs import InputProblem, InputRecord
        from safety_lens_cli.scanning import ScanOptions, scan_records

        several = not isinstance(text, str)
        texts = check_texts(text, "text") if several else check_texts([text], "text")
        vectors = self._persona_vectors(persona_names, layer_idx)
        records = [InputRecord(id=number, line=number, text=t) for number, t in enumerate(texts, start=1)]
        with eval_mode(self._lm.model):
            results = list(scan_records(self._lm, vectors, records, ScanOptions(batch_size=self._batch_size)))
        object_ids = {vector.persona: vector.object_id for vector in vectors}
        rows: list[dict[str, dict[str, Any]]] = []
        for result in results:
            if isinstance(result, InputProblem):
                raise InputError(f"Text {result.line} cannot be scanned: {result.message}.")
            rows.append({key: {**s.as_dict(), "object_id": object_ids[key]} for key, s in result.scores.items()})
        return rows if several else rows[0]

    def persona_vector(self, persona: str, layer_idx: int | None = None) -> dict[str, Any]:
        """Return the vector `quick_scan` uses for one persona, as a dict like `last_extraction`.

        The dict also has `object_id`, the registry id. `layer_idx=None` is the auto layer.
        """
        return self._vector_record(self._persona_vectors([persona], layer_idx)[0])

    def _persona_vectors(self, persona_names: Sequence[str] | None, layer_idx: int | None) -> list[PersonaVector]:
        from safety_lens_cli.vector_lookup import VectorRequest, resolve_vectors

        if persona_names is None:
            names = list(DEFAULT_PERSONAS)
        elif isinstance(persona_names, str):
            names = [persona_names]
        else:
            names = check_texts(persona_names, "persona_names")
        names = list(dict.fromkeys(names))
        layer: int | str = _AUTO if layer_idx is None else check_layer(layer_idx, self.num_layers)
        missing = [name for name in names if (name, layer) not in self._vectors]
        if missing:
            request = VectorRequest(
                personas=tuple(missing),
                layers=() if layer == _AUTO else (str(layer),),
                registry=self._registry,
                batch_size=self._batch_size,
            )
            with eval_mode(self._lm.model):
                found = resolve_vectors(self._lm, request, notify=lambda message: log.info("%s", message))
            # One vector per persona, in request order, for a single layer or the auto layer.
            for name, vector in zip(missing, found):
                self._vectors[(name, layer)] = vector
        return [self._vectors[(name, layer)] for name in names]

    def _vector_record(self, vector: PersonaVector) -> dict[str, Any]:
        return {
            "persona": vector.persona,
            "layer": vector.layer,
            "vector": vector.unit.float().to(self.device),
            "position": vector.metadata.get("position"),
            "calibration": vector.calibration.as_dict(),
            "quality": vector.metadata.get("quality"),
            "raw_norm": vector.raw_norm,
            "residual_norm": vector.residual_norm,
            "object_id": vector.object_id,
        }

    def _read(self, items: list[Encoded], layers: list[int]) -> dict[int, torch.Tensor]:
        with eval_mode(self._lm.model):
            return read_pooled(self._lm, items, "last", layers, batch_size=self._batch_size)

    # Vector files: functions of `api_vectors`, callable without a model as `SafetyLens.save_vector(...)`.

    save_vector = staticmethod(save_vector)
    load_vector = staticmethod(load_vector)
    load_vector_metadata = staticmethod(load_vector_metadata)
