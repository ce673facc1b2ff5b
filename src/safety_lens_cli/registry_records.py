"""Records of the vector registry: keys, ref files, stored vectors and their checks.

A ref file is small JSON naming one key and the object id it points to. An
object is a vector file whose metadata repeats the key fields, so a ref that
points to the wrong object is detectable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from safety_lens_cli.errors import InputError, ModelMismatchError, RegistryError, UsageError
from safety_lens_cli.vector_file import TEMP_SUFFIX, canonical_json, deserialize, sha256_hex

# Version of the object metadata and ref file layout. Readers reject newer versions.
FORMAT_VERSION = 1
# Shorter prefixes would often be ambiguous in a registry of a few thousand vectors.
MIN_ID_PREFIX = 6
VECTOR_TENSOR = "vector"
KEY_FIELDS = ("model_fingerprint", "layer", "persona", "stimulus_sha256", "method", "position")

_HEX_RE = re.compile(r"[0-9a-f]+")
_OBJECT_ID_RE = re.compile(r"[0-9a-f]{64}")


def is_object_id(text: str) -> bool:
    return _OBJECT_ID_RE.fullmatch(text) is not None


def normalize_id_prefix(text: str) -> str:
    """Lower-case an object id or prefix, raising UsageError unless it is 6 to 64 hex digits.

    Only hex digits are accepted, so an id can never name a path outside the registry.
    """
    prefix = text.strip().lower()
    if not (MIN_ID_PREFIX <= len(prefix) <= 64 and _HEX_RE.fullmatch(prefix)):
        raise UsageError(
            f"Invalid vector id '{text}': expected {MIN_ID_PREFIX} to 64 hex digits. "
            "List the ids with `safety-lens vectors list`."
        )
    return prefix


def is_temp_name(name: str) -> bool:
    """Tell whether a file name is one of `write_atomic`'s temp files."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


@dataclass(frozen=True)
class VectorKey:
    """Identity of a stored vector: the model, block, persona, stimuli, method and token position it came from."""

    model_fingerprint: str
    layer: int  # 0-based decoder block index, never negative
    persona: str
    stimulus_sha256: str
    method: str
    position: str

    def __post_init__(self) -> None:
        for name in KEY_FIELDS:
            value = getattr(self, name)
            if name == "layer":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise UsageError(
                        f"Invalid layer {value!r} in vector key: expected a 0-based block index (int >= 0)."
                    )
            elif not isinstance(value, str) or not value:
                raise UsageError(f"Invalid {name} {value!r} in vector key: expected a non-empty string.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VectorKey:
        """Build a key from a mapping that contains at least the key fields; other entries are ignored."""
        missing = [name for name in KEY_FIELDS if name not in data]
        if missing:
            raise UsageError(f"Vector key is missing the fields {', '.join(missing)}.")
        return cls(**{name: data[name] for name in KEY_FIELDS})

    def digest(self) -> str:
        """Return the SHA-256 hex digest of the key's canonical JSON, which names its ref file."""
        return sha256_hex(canonical_json(self.to_dict()).encode("ascii"))


@dataclass
class StoredVector:
    """A vector loaded from the registry, with the metadata stored next to it."""

    object_id: str
    path: Path
    vector: torch.Tensor  # [hidden] float32, unit norm
    metadata: dict[str, Any]

    @property
    def key(self) -> VectorKey:
        return VectorKey.from_dict(self.metadata)

    @property
    def model_fingerprint(self) -> str:
        return str(self.metadata["model_fingerprint"])

    @property
    def layer(self) -> int:
        return int(self.metadata["layer"])

    @property
    def persona(self) -> str:
        return str(self.metadata["persona"])

    @property
    def method(self) -> str:
        return str(self.metadata["method"])

    @property
    def position(self) -> str:
        return str(self.metadata["position"])

    @property
    def hidden_size(self) -> int:
        return int(self.vector.shape[0])

    @property
    def calibration(self) -> Any:
        return self.metadata.get("calibration")

    @property
    def quality(self) -> Any:
        return self.metadata.get("quality")


@dataclass(frozen=True)
class RegistryEntry:
    """One ref of the registry: a key and the object it points to."""

    key: VectorKey
    object_id: str
    object_path: Path
    ref_path: Path
    size: int | None  # bytes of the object file; None when the object is missing
    created: str | None  # ISO 8601 UTC time the ref was first written

    @property
    def persona(self) -> str:
        return self.key.persona

    @property
    def layer(self) -> int:
        return self.key.layer

    @property
    def model_fingerprint(self) -> str:
        return self.key.model_fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {
            "object_id": self.object_id,
            **self.key.to_dict(),
            "object_path": str(self.object_path),
            "ref_path": str(self.ref_path),
            "size": self.size,
            "created": self.created,
        }


@dataclass(frozen=True)
class RefRecord:
    """The parsed content of one ref file."""

    key: VectorKey
    object_id: str
    created: str | None = None  # ISO 8601 UTC time the ref was first written


def ref_bytes(record: RefRecord) -> bytes:
    document = {
        "format_version": FORMAT_VERSION,
        "key": record.key.to_dict(),
        "object_id": record.object_id,
        "created": record.created,
    }
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("utf-8")


def parse_ref(data: bytes, path: Path) -> RefRecord:
    """Parse and check one ref file, raising RegistryError naming `path` when it is invalid."""
    try:
        document = json.loads(data.decode("utf-8"))
        if not isinstance(document, dict):
            raise ValueError("expected a JSON object")
        version = document.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"format_version {version!r} is not supported by this safety-lens (max {FORMAT_VERSION})")
        key = VectorKey.from_dict(document.get("key") or {})
        object_id = document.get("object_id")
        if not isinstance(object_id, str) or not is_object_id(object_id):
            raise ValueError(f"object_id {object_id!r} is not a SHA-256 hex digest")
        created = document.get("created")
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise RegistryError(f"Invalid ref file '{path}': {exc}.") from exc
    if path.stem != key.digest():
        raise RegistryError(f"Invalid ref file '{path}': its name does not match the digest of the key it contains.")
    return RefRecord(key=key, object_id=object_id, created=created if isinstance(created, str) else None)


def stored_vector_from_bytes(object_id: str, path: Path, data: bytes) -> StoredVector:
    """Decode an object's bytes, raising RegistryError naming `path` when it is not a stored vector."""
    try:
        tensors, metadata = deserialize(data, str(path))
    except InputError as exc:
        raise RegistryError(f"{exc} Remove it with `safety-lens vectors rm {object_id[:12]}`.") from exc
    vector = tensors.get(VECTOR_TENSOR)
    problem = None
    if vector is None or vector.ndim != 1 or vector.dtype != torch.float32:
        problem = f"expected a 1-D float32 tensor named '{VECTOR_TENSOR}'"
    elif not isinstance(metadata.get("format_version"), int) or metadata["format_version"] > FORMAT_VERSION:
        problem = f"format_version {metadata.get('format_version')!r} is not supported (max {FORMAT_VERSION})"
    else:
        try:
            VectorKey.from_dict(metadata)
        except UsageError as exc:
            problem = str(exc)
    if problem is not None or vector is None:
        raise RegistryError(
            f"Invalid stored vector '{path}': {problem}. Remove it with `safety-lens vectors rm {object_id[:12]}`."
        )
    return StoredVector(object_id=object_id, path=path, vector=vector, metadata=metadata)


def check_compatible(
    stored: StoredVector, model_fingerprint: str, hidden_size: int, allow_model_mismatch: bool = False
) -> None:
    """Raise ModelMismatchError unless `stored` can be used with the given model.

    A different hidden size always fails because the projection cannot be
    computed. A different fingerprint fails unless `allow_model_mismatch`,
    because a vector from another model (even a fine-tune of the same
    architecture) may point in a meaningless direction.
    """
    if stored.hidden_size != hidden_size:
        raise ModelMismatchError(
            f"Vector {stored.object_id[:12]} has hidden size {stored.hidden_size} but the model has hidden size "
            f"{hidden_size}; --allow-model-mismatch cannot bridge this. Extract the vector for this model with "
            "`safety-lens extract`."
        )
    if stored.model_fingerprint != model_fingerprint and not allow_model_mismatch:
        raise ModelMismatchError(
            f"Vector {stored.object_id[:12]} was extracted from model fingerprint '{stored.model_fingerprint}', "
            f"not '{model_fingerprint}'. Extract it for this model with `safety-lens extract`, "
            "or pass --allow-model-mismatch to use it anyway."
        )
