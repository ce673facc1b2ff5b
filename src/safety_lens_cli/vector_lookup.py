"""Get persona vectors for a model: from the registry, or extracted once and stored.

Every command and the Python API go through `resolve_vectors`, so vectors are
never recomputed on each call and a stale hit is impossible: the registry key
holds the model fingerprint and the SHA-256 of the stimuli, and a vector whose
chat template hash differs from the tokenizer's is extracted again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safety_lens_cli import __version__
from safety_lens_cli.errors import VectorNotFoundError
from safety_lens_cli.extraction import (
    AUTO_RULE,
    ExtractionOptions,
    LayerResult,
    PersonaExtraction,
    choose_auto_layer,
    extract,
    position_label,
)
from safety_lens_cli.layers import parse_layer_specs
from safety_lens_cli.projection import Calibration, PersonaVector
from safety_lens_cli.rendering import choose_rendering

if TYPE_CHECKING:
    from safety_lens_cli.models import LoadedModel
    from safety_lens_cli.persona_schema import Persona
    from safety_lens_cli.registry import Registry, StoredVector, VectorKey

log = logging.getLogger(__name__)
Notify = Callable[[str], None]


@dataclass(frozen=True)
class VectorRequest:
    """Request for the vectors a command needs; each field maps to a CLI option."""

    personas: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()  # --layer specs; empty means auto
    method: str = "mean-diff"
    position: str | None = None
    registry: Path | None = None
    extract_missing: bool = True
    vector_ids: tuple[str, ...] = ()
    allow_model_mismatch: bool = False
    batch_size: int = 16
    folds: int = 5
    seed: int = 0
    force: bool = False  # extract again even when the registry has the vector

    def options(self) -> ExtractionOptions:
        return ExtractionOptions(
            method=self.method,  # type: ignore[arg-type]
            position=self.position,  # type: ignore[arg-type]
            folds=self.folds,
            seed=self.seed,
            batch_size=self.batch_size,
        )


@dataclass
class ResolvedPersona:
    """Result of `resolve_personas` for one persona: vectors found or extracted, and the auto choice."""

    persona: str
    vectors: list[PersonaVector]
    auto_layer: int | None = None  # set when the layer was chosen by the auto rule
    extracted_layers: list[int] = field(default_factory=list)
    qualities: dict[int, dict[str, Any]] = field(default_factory=dict)


def vector_from_stored(stored: StoredVector) -> PersonaVector:
    meta = stored.metadata
    return PersonaVector(
        persona=stored.persona,
        layer=stored.layer,
        unit=stored.vector,
        calibration=Calibration.from_dict(meta["calibration"]),
        raw_norm=float(meta.get("raw_norm", 0.0)),
        residual_norm=float(meta.get("residual_norm", 0.0)),
        object_id=stored.object_id,
        metadata=meta,
    )


def vector_metadata(lm: LoadedModel, extraction: PersonaExtraction, result: LayerResult, options: ExtractionOptions) -> dict[str, Any]:
    """Metadata stored with a vector. No times: the same extraction must give the same bytes."""
    persona = extraction.persona
    return {
        "model_id": lm.model_id,
        "revision": lm.revision,
        "module_path": lm.layers.module_path(result.layer),
        "hidden_size": lm.hidden_size,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "persona_version": persona.version,
        "rendering": extraction.rendering.as_metadata(),
        "calibration": result.calibration.as_dict(),
        "quality": result.quality,
        "raw_norm": result.raw_norm,
        "residual_norm": result.residual_norm,
        "extraction": {"folds": options.folds, "seed": options.seed, "auto_rule": AUTO_RULE},
        "tool_version": __version__,
    }


class AutoLayerSelections:
    """Store of the layers `--layer auto` chose, per (model, persona, stimuli, method, position).

    Stored beside the registry's refs as small JSON files named by the SHA-256
    of the canonical key, written through a temp file and `os.replace`. The
    choice can always be recomputed, so a missing or unreadable file only
    means extracting again.
    """

    def __init__(self, registry_root: Path) -> None:
        self.folder = registry_root / "selections"

    def _path(self, key: dict[str, Any]) -> Path:
        from safety_lens_cli.vector_file import canonical_json, sha256_hex

        return self.folder / (sha256_hex(canonical_json(key).encode("utf-8")) + ".json")

    def get(self, key: dict[str, Any]) -> int | None:
        import json

        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        layer = data.get("layer") if isinstance(data, dict) else None
        return layer if isinstance(layer, int) and not isinstance(layer, bool) else None

    def put(self, key: dict[str, Any], layer: int, qualities: dict[int, dict[str, Any]]) -> None:
        from safety_lens_cli.models import write_json_atomic

        document = {
            **key,
            "layer": layer,
            "rule": AUTO_RULE,
            "cv_auroc_by_layer": {str(k): q.get("cv_auroc") for k, q in sorted(qualities.items())},
        }
        write_json_atomic(self._path(key), document)


class VectorResolver:
    """Looks vectors up in one registry for one model, extracting the missing ones in one pass."""

    def __init__(self, lm: LoadedModel, request: VectorRequest, notify: Notify | None = None) -> None:
        from safety_lens_cli.registry import Registry

        self.lm = lm
        self.request = request
        self.options = request.options()
        self.registry: Registry = Registry(request.registry)
        self.notify = notify or (lambda message: log.info("%s", message))
        self.template_sha256 = choose_rendering(lm.tokenizer).template_sha256
        self.selections = AutoLayerSelections(self.registry.root)

    def key(self, persona: Persona, layer: int) -> VectorKey:
        from safety_lens_cli.registry import VectorKey

        return VectorKey(
            model_fingerprint=self.lm.fingerprint,
            layer=layer,
            persona=persona.name,
            stimulus_sha256=persona.stimulus_sha256,
            method=self.options.method,
            position=position_label(persona, self.options.position),
        )

    def lookup(self, persona: Persona, layer: int) -> PersonaVector | None:
        if self.request.force:
            return None
        stored = self.registry.get(self.key(persona, layer))
        if stored is None:
            return None
        rendering = stored.metadata.get("rendering") or {}
        if rendering.get("template_sha256") != self.template_sha256:
            log.info("Chat template changed since %s was stored; extracting again", stored.object_id[:12])
            return None
        return vector_from_stored(stored)

    def resolve(self, personas: Sequence[Persona]) -> list[ResolvedPersona]:
        spec = parse_layer_specs(self.request.layers, self.lm.num_layers)
        auto = spec == "auto"
        wanted = list(range(self.lm.num_layers)) if auto else list(spec)
        found: dict[str, dict[int, PersonaVector]] = {p.name: {} for p in personas}
        chosen: dict[str, int] = {}
        missing: dict[str, list[int]] = {}
        for persona in personas:
            if auto:
                layer = self.selections.get(self.selection_key(persona))
                vector = self.lookup(persona, layer) if layer is not None else None
                if vector is None:
                    missing[persona.name] = wanted
                else:
                    found[persona.name][layer] = vector  # type: ignore[index]
                    chosen[persona.name] = layer  # type: ignore[assignment]
                continue
            for layer in wanted:
                vector = self.lookup(persona, layer)
                if vector is None:
                    missing.setdefault(persona.name, []).append(layer)
                else:
                    found[persona.name][layer] = vector

        qualities: dict[str, dict[int, dict[str, Any]]] = {}
        if missing:
            self._check_may_extract(missing, auto)
            to_extract = [p for p in personas if p.name in missing]
            layers = sorted({layer for ls in missing.values() for layer in ls})
            names = ", ".join(p.name for p in to_extract)
            self.notify(
                f"Extracting {names} at {len(layers)} layer(s) on {self.lm.model_id}; "
                "stored vectors are reused next time."
            )
            for extraction in extract(self.lm, to_extract, layers, self.options):
                name = extraction.persona.name
                qualities[name] = {layer: r.quality for layer, r in extraction.layers.items()}
                store = missing[name]
                if auto:
                    chosen[name] = choose_auto_layer(qualities[name])
                    store = [chosen[name]]
                for layer in store:
                    result = extraction.layers[layer]
                    stored = self.registry.put(
                        self.key(extraction.persona, layer),
                        result.unit,
                        vector_metadata(self.lm, extraction, result, self.options),
                    )
                    found[name][layer] = vector_from_stored(stored)
                if auto:
                    self.selections.put(self.selection_key(extraction.persona), chosen[name], qualities[name])

        resolved = []
        for persona in personas:
            name = persona.name
            extracted = missing.get(name, []) if name in qualities else []
            if auto:
                vectors = [found[name][chosen[name]]]
            else:
                vectors = [found[name][layer] for layer in wanted]
            resolved.append(
                ResolvedPersona(name, vectors, chosen.get(name), list(extracted), qualities.get(name, {}))
            )
        return resolved

    def selection_key(self, persona: Persona) -> dict[str, Any]:
        key = self.key(persona, 0).to_dict()
        del key["layer"]
        return key

    def _check_may_extract(self, missing: dict[str, list[int]], auto: bool) -> None:
        if self.request.extract_missing:
            return
        name, layers = next(iter(missing.items()))
        layer_arg = "" if auto else " --layer " + " --layer ".join(str(layer) for layer in layers[:3])
        raise VectorNotFoundError(
            f"No stored vector for persona '{name}'{'' if auto else f' at layer {layers[0]}'} of model "
            f"'{self.lm.model_id}' (fingerprint {self.lm.fingerprint[:19]}): run "
            f"`safety-lens extract --persona {name}{layer_arg}` with the same --model first, or drop --no-extract."
        )

    def pinned(self) -> list[PersonaVector]:
        from safety_lens_cli.registry import check_compatible

        vectors = []
        for object_id in self.request.vector_ids:
            stored = self.registry.load(object_id)
            check_compatible(stored, self.lm.fingerprint, self.lm.hidden_size, self.request.allow_model_mismatch)
            vectors.append(vector_from_stored(stored))
        return vectors


def resolve_personas(
    lm: LoadedModel, request: VectorRequest, *, notify: Notify | None = None
) -> list[ResolvedPersona]:
    """Vectors per persona with the auto-layer choice and per-layer quality, for reports."""
    from safety_lens_cli.personas import load_persona

    personas = [load_persona(spec) for spec in request.personas]
    return VectorResolver(lm, request, notify).resolve(personas)


def resolve_vectors(lm: LoadedModel, request: VectorRequest, *, notify: Notify | None = None) -> list[PersonaVector]:
    """Return one PersonaVector per (persona, layer): pinned `--vector` ids first, then the personas."""
    resolver = VectorResolver(lm, request, notify)
    vectors = resolver.pinned()
    if request.personas:
        from safety_lens_cli.personas import load_persona

        personas = [load_persona(spec) for spec in request.personas]
        for resolved in resolver.resolve(personas):
            vectors.extend(resolved.vectors)
    if not vectors:
        raise VectorNotFoundError("No persona or vector given: pass --persona NAME (see `safety-lens personas list`) or --vector ID.")
    return vectors
