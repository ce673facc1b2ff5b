"""Content-addressed store of persona vectors on disk.

Layout under the registry root:

    objects/<sha256 of the file bytes>.safetensors   one vector file each
    refs/<sha256 of the canonical key JSON>.json     key fields -> object id
    .lock                                            best-effort lock file

Every file is written to a unique temp file in its folder and moved into
place with `os.replace`, so readers never see a partial file. One ref file per
key means concurrent writers of different keys never touch the same file, and
writers of the same key replace each other's ref whole. Objects are named by
the hash of their bytes, so two writers of the same object write identical
bytes. Deletion removes refs before objects, so a crash between the two
leaves an unreferenced object for `gc`, not a ref to a missing object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safety_lens_cli.errors import IntegrityError, RegistryError, UsageError, VectorNotFoundError
from safety_lens_cli.registry_lock import registry_lock
from safety_lens_cli.registry_records import (
    FORMAT_VERSION,
    KEY_FIELDS,
    MIN_ID_PREFIX,
    VECTOR_TENSOR,
    RefRecord,
    RegistryEntry,
    StoredVector,
    VectorKey,
    check_compatible,
    is_object_id,
    normalize_id_prefix,
    parse_ref,
    ref_bytes,
    stored_vector_from_bytes,
)
from safety_lens_cli.vector_file import (
    VECTOR_SUFFIX,
    decode_metadata,
    encode_metadata,
    serialize,
    sha256_hex,
    write_atomic,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from safety_lens_cli.registry_ops import Plan
    from safety_lens_cli.registry_transfer import TransferResult
    from safety_lens_cli.registry_verify import Problem

__all__ = [
    "FORMAT_VERSION",
    "KEY_FIELDS",
    "MIN_ID_PREFIX",
    "VECTOR_TENSOR",
    "Registry",
    "RegistryEntry",
    "StoredVector",
    "VectorKey",
    "check_compatible",
    "resolve_registry_root",
]

logger = logging.getLogger(__name__)

HOME_ENV = "SAFETY_LENS_HOME"
OBJECTS_DIR = "objects"
REFS_DIR = "refs"
REF_SUFFIX = ".json"
# Maximum allowed distance of a stored vector's L2 norm from 1.
NORM_TOLERANCE = 1e-3
# Rounds of re-checking an object and its ref against a concurrent gc before giving up.
_MAX_STORE_CHECKS = 100


def resolve_registry_root(explicit: Path | None = None) -> Path:
    """Return the registry folder: `explicit`, else `$SAFETY_LENS_HOME`, else `~/.cache/safety-lens`."""
    if explicit is not None:
        return Path(explicit).expanduser().absolute()
    env_root = os.environ.get(HOME_ENV)
    if env_root:
        return Path(env_root).expanduser().absolute()
    return Path.home() / ".cache" / "safety-lens"


def _unit_float32(vector: torch.Tensor) -> torch.Tensor:
    """Return `vector` as a CPU float32 copy, raising UsageError unless it is a finite 1-D unit vector."""
    if not isinstance(vector, torch.Tensor):
        raise UsageError(f"Invalid vector: expected a torch.Tensor, got {type(vector).__name__}.")
    if vector.ndim != 1 or vector.numel() == 0 or not vector.is_floating_point():
        raise UsageError(
            f"Invalid vector of shape {tuple(vector.shape)} and dtype {vector.dtype}: "
            "expected a non-empty 1-D float tensor."
        )
    values = vector.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    if not bool(torch.isfinite(values).all()):
        raise UsageError("Invalid vector: it contains NaN or infinite values.")
    norm = float(values.norm())
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise UsageError(f"Invalid vector: its L2 norm is {norm:.6g}, expected 1. Store `vector / vector.norm()`.")
    return values


def _merged_metadata(key: VectorKey, metadata: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(metadata)
    own_fields = {**key.to_dict(), "format_version": FORMAT_VERSION}
    for name, value in own_fields.items():
        if name in merged and merged[name] != value:
            raise UsageError(
                f"Metadata field '{name}' is {merged[name]!r} but the registry sets it to {value!r}; "
                "remove it from the metadata."
            )
    merged.update(own_fields)
    # Round-trip through JSON so the returned metadata equals what a later load returns.
    return decode_metadata(encode_metadata(merged))


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Registry:
    """The vector registry at `root` (default from `resolve_registry_root`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = resolve_registry_root(root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    @property
    def objects_dir(self) -> Path:
        return self.root / OBJECTS_DIR

    @property
    def refs_dir(self) -> Path:
        return self.root / REFS_DIR

    def object_path(self, object_id: str) -> Path:
        if not is_object_id(object_id):
            raise UsageError(f"Invalid object id '{object_id}': expected 64 lower-case hex digits.")
        return self.objects_dir / f"{object_id}{VECTOR_SUFFIX}"

    def ref_path(self, key: VectorKey) -> Path:
        return self.refs_dir / f"{key.digest()}{REF_SUFFIX}"

    # -- writing -----------------------------------------------------------

    def put(self, key: VectorKey, vector: torch.Tensor, metadata: Mapping[str, Any]) -> StoredVector:
        """Store `vector` with `metadata` under `key` and return it as loaded back.

        The object bytes depend only on the vector, the key and the metadata,
        so storing the same input twice yields the same object id.
        """
        values = _unit_float32(vector)
        merged = _merged_metadata(key, metadata)
        data = serialize({VECTOR_TENSOR: values}, merged)
        object_id = sha256_hex(data)
        path = self.store(RefRecord(key=key, object_id=object_id, created=_utc_now()), data, repair=True)
        logger.debug("Stored %s layer %d as %s", key.persona, key.layer, object_id)
        return StoredVector(object_id=object_id, path=path, vector=values, metadata=merged)

    def store(self, record: RefRecord, data: bytes, *, repair: bool) -> Path:
        """Write the object `data`, then the ref of `record`, and return the object path.

        A concurrent `gc` may delete the object while no ref names it yet, or
        the ref while its object looks missing. `apply_plan` moves a file aside
        before checking the other file, and this method re-checks both after
        writing until neither was missing. Once it returns, each check that
        `gc` makes for one file therefore finds the other.
        NOTE: this holds against one `gc` at a time; two concurrent `gc` runs
        are kept apart only by the best-effort lock.
        """
        with registry_lock(self.root, shared=True):
            path = self.write_object(record.object_id, data, repair=repair)
            ref_path = self.write_ref(record)
            for _ in range(_MAX_STORE_CHECKS):
                rewritten = False
                if not path.exists():
                    write_atomic(path, data)
                    rewritten = True
                if not ref_path.exists():
                    write_atomic(ref_path, ref_bytes(record))
                    rewritten = True
                if not rewritten:
                    return path
                logger.debug("A concurrent gc deleted %s or %s; wrote it again", path, ref_path)
        raise RegistryError(
            f"Vector {record.object_id[:12]} was deleted {_MAX_STORE_CHECKS} times while it was stored in {self.root}. "
            "Wait for `safety-lens vectors gc` to finish and run the command again."
        )

    def write_object(self, object_id: str, data: bytes, *, repair: bool) -> Path:
        """Write `data` as object `object_id` unless the identical file already exists.

        An existing file with other bytes is corrupt, since its name is the hash
        of the right bytes. With `repair` it is replaced, else IntegrityError.
        """
        path = self.object_path(object_id)
        try:
            existing = path.read_bytes()
        except FileNotFoundError:
            existing = None
        if existing == data:
            return path
        if existing is not None:
            if not repair:
                raise IntegrityError(
                    f"Object '{path}' exists with bytes that do not match its hash, so it was not overwritten. "
                    f"Run `safety-lens vectors verify`, then `safety-lens vectors rm {object_id[:12]}`."
                )
            logger.warning("Replacing corrupt object %s with freshly computed bytes", path)
        write_atomic(path, data)
        return path

    def write_ref(self, record: RefRecord) -> Path:
        """Point the ref of `record.key` at `record.object_id`, keeping the file when it already does."""
        path = self.ref_path(record.key)
        current = self.read_ref(path, missing_ok=True, invalid_ok=True)
        if current is not None and current.object_id == record.object_id:
            return path
        write_atomic(path, ref_bytes(record))
        return path

    # -- reading -----------------------------------------------------------

    def read_ref(self, path: Path, *, missing_ok: bool = False, invalid_ok: bool = False) -> RefRecord | None:
        """Parse one ref file; `missing_ok` and `invalid_ok` turn those failures into None."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise VectorNotFoundError(f"Ref file not found: '{path}'.") from None
        try:
            return parse_ref(data, path)
        except RegistryError:
            if invalid_ok:
                logger.warning("Ignoring invalid ref file %s", path)
                return None
            raise

    def read_object_bytes(self, object_id: str) -> bytes:
        """Read an object's bytes, raising IntegrityError when they do not hash to `object_id`."""
        path = self.object_path(object_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VectorNotFoundError(
                f"Object '{path}' not found. Run `safety-lens vectors gc` to drop refs to it, "
                "then re-run `safety-lens extract`."
            ) from None
        except OSError as exc:
            raise RegistryError(f"Cannot read object '{path}': {exc.strerror}.") from exc
        actual = sha256_hex(data)
        if actual != object_id:
            raise IntegrityError(
                f"Object '{path}' is corrupt: its SHA-256 is {actual}, expected {object_id}. "
                f"Run `safety-lens vectors rm {object_id[:12]}` and re-run `safety-lens extract`; "
                "`safety-lens vectors verify` checks the whole registry."
            )
        return data

    def load_object(self, object_id: str) -> StoredVector:
        data = self.read_object_bytes(object_id)
        return stored_vector_from_bytes(object_id, self.object_path(object_id), data)

    def get(self, key: VectorKey) -> StoredVector | None:
        """Load the vector stored under `key`, or return None when there is none.

        A ref whose object is missing counts as no vector, so re-running the
        extraction repairs it. A corrupt object raises IntegrityError.
        """
        record = self.read_ref(self.ref_path(key), missing_ok=True)
        if record is None:
            return None
        try:
            stored = self.load_object(record.object_id)
        except VectorNotFoundError:
            logger.warning(
                "Ref %s points to missing object %s; treating it as absent", self.ref_path(key), record.object_id
            )
            return None
        if stored.key != key:
            raise IntegrityError(
                f"Ref '{self.ref_path(key)}' points to object '{stored.path}' whose metadata has another key. "
                "Run `safety-lens vectors verify`."
            )
        return stored

    def object_ids(self) -> list[str]:
        """Return the ids of all object files, sorted."""
        if not self.objects_dir.is_dir():
            return []
        ids = []
        for path in self.objects_dir.iterdir():
            if path.name.endswith(VECTOR_SUFFIX) and is_object_id(path.name[: -len(VECTOR_SUFFIX)]):
                ids.append(path.name[: -len(VECTOR_SUFFIX)])
        return sorted(ids)

    def resolve_id(self, id_or_prefix: str, *, candidates: Iterable[str] | None = None) -> str:
        """Expand a unique id prefix of at least 6 hex digits to a full object id."""
        prefix = normalize_id_prefix(id_or_prefix)
        pool = self.object_ids() if candidates is None else sorted(set(candidates))
        matches = [object_id for object_id in pool if object_id.startswith(prefix)]
        if not matches:
            raise VectorNotFoundError(
                f"No stored vector has id '{id_or_prefix}' in {self.root}. "
                "List the ids with `safety-lens vectors list`."
            )
        if len(matches) > 1:
            raise UsageError(
                f"Vector id prefix '{id_or_prefix}' is ambiguous; it matches {', '.join(matches)}. Use more digits."
            )
        return matches[0]

    def load(self, object_id_or_prefix: str) -> StoredVector:
        """Load the object with this id or unique prefix, re-checking its SHA-256."""
        return self.load_object(self.resolve_id(object_id_or_prefix))

    def ref_paths(self) -> list[Path]:
        if not self.refs_dir.is_dir():
            return []
        return sorted(
            path for path in self.refs_dir.iterdir() if path.suffix == REF_SUFFIX and not path.name.startswith(".")
        )

    def entries(self) -> list[RegistryEntry]:
        """List every valid ref, sorted by persona, layer and object id; invalid refs are skipped with a warning."""
        result = []
        for ref_path in self.ref_paths():
            record = self.read_ref(ref_path, missing_ok=True, invalid_ok=True)
            if record is None:
                continue
            object_path = self.object_path(record.object_id)
            try:
                size: int | None = object_path.stat().st_size
            except FileNotFoundError:
                size = None
            result.append(
                RegistryEntry(
                    key=record.key,
                    object_id=record.object_id,
                    object_path=object_path,
                    ref_path=ref_path,
                    size=size,
                    created=record.created,
                )
            )
        result.sort(
            key=lambda entry: (entry.key.persona, entry.key.layer, entry.key.model_fingerprint, entry.object_id)
        )
        return result

    def find(
        self,
        model_fingerprint: str | None = None,
        persona: str | None = None,
        layer: int | None = None,
        method: str | None = None,
        position: str | None = None,
    ) -> list[RegistryEntry]:
        """List the entries whose key fields equal every filter that is not None."""
        filters = {
            "model_fingerprint": model_fingerprint,
            "persona": persona,
            "layer": layer,
            "method": method,
            "position": position,
        }
        active = {name: value for name, value in filters.items() if value is not None}
        return [
            entry
            for entry in self.entries()
            if all(getattr(entry.key, name) == value for name, value in active.items())
        ]

    # -- checks, deletion and transfer, implemented in registry_verify, registry_ops and registry_transfer

    def verify(self) -> list[Problem]:
        from safety_lens_cli.registry_verify import verify

        return verify(self)

    def plan_remove(self, selectors: Sequence[str]) -> Plan:
        from safety_lens_cli.registry_ops import plan_remove

        return plan_remove(self, selectors)

    def plan_gc(self) -> Plan:
        from safety_lens_cli.registry_ops import plan_gc

        return plan_gc(self)

    def apply(self, plan: Plan) -> list[Path]:
        from safety_lens_cli.registry_ops import apply_plan

        return apply_plan(self, plan)

    def export(self, dest_dir: Path, entries: Sequence[RegistryEntry]) -> list[TransferResult]:
        from safety_lens_cli.registry_transfer import export_entries

        return export_entries(self, Path(dest_dir), entries)

    def import_from(self, src_dir: Path) -> list[TransferResult]:
        from safety_lens_cli.registry_transfer import import_registry

        return import_registry(self, Path(src_dir))
