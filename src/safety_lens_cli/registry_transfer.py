"""Export of registry entries to a registry-layout folder, and import from one.

An export is itself a registry (objects/ and refs/), so it can be copied to
another machine and imported there, or used directly with `--registry`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safety_lens_cli.errors import IntegrityError, RegistryError, UsageError
from safety_lens_cli.registry import Registry
from safety_lens_cli.registry_records import RefRecord, RegistryEntry, stored_vector_from_bytes

logger = logging.getLogger(__name__)

TransferStatus = Literal["added", "unchanged", "conflict"]


@dataclass(frozen=True)
class TransferResult:
    """Outcome of exporting or importing one entry; `entry` describes it in the destination."""

    entry: RegistryEntry
    status: TransferStatus
    existing_object_id: str | None = None  # for a conflict: the object the destination's ref keeps

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry.to_dict(), "status": self.status, "existing_object_id": self.existing_object_id}


def _check_distinct(registry: Registry, other: Path) -> None:
    if registry.root.resolve() == other.resolve():
        raise UsageError(f"Source and destination are the same registry '{registry.root}'. Choose another folder.")


def _store_all(dest: Registry, payload: Sequence[tuple[RefRecord, bytes]]) -> list[TransferResult]:
    """Add verified objects and refs to `dest`, skipping keys whose ref there names another object."""
    results = []
    for record, data in payload:
        entry = RegistryEntry(
            key=record.key,
            object_id=record.object_id,
            object_path=dest.object_path(record.object_id),
            ref_path=dest.ref_path(record.key),
            size=len(data),
            created=record.created,
        )
        current = dest.read_ref(entry.ref_path, missing_ok=True)
        if current is not None and current.object_id != record.object_id:
            logger.warning("Skipping %s: %s already points to %s", record.object_id, entry.ref_path, current.object_id)
            results.append(TransferResult(entry, "conflict", existing_object_id=current.object_id))
            continue
        dest.store(record, data, repair=False)
        results.append(TransferResult(entry, "added" if current is None else "unchanged"))
    return results


def _verified_payload(source: Registry, record: RefRecord) -> tuple[RefRecord, bytes]:
    data = source.read_object_bytes(record.object_id)
    stored = stored_vector_from_bytes(record.object_id, source.object_path(record.object_id), data)
    if stored.key != record.key:
        raise IntegrityError(
            f"Object '{stored.path}' has metadata for another key than its ref. Run `safety-lens vectors verify`."
        )
    return record, data


def export_entries(registry: Registry, dest_dir: Path, entries: Sequence[RegistryEntry]) -> list[TransferResult]:
    """Copy `entries` into `dest_dir` as a registry-layout folder, after checking every object's hash."""
    _check_distinct(registry, dest_dir)
    payload = [
        _verified_payload(registry, RefRecord(key=entry.key, object_id=entry.object_id, created=entry.created))
        for entry in entries
    ]
    return _store_all(Registry(dest_dir), payload)


def import_registry(registry: Registry, src_dir: Path) -> list[TransferResult]:
    """Add every entry of the registry-layout folder `src_dir` to `registry`.

    Every object is checked (hash, contents, key) before anything is written,
    so a damaged export adds nothing. An existing ref for the same key that
    names another object is kept and reported as a conflict.
    """
    source = Registry(src_dir)
    if not source.root.is_dir():
        raise RegistryError(f"Import folder '{source.root}' not found.")
    if not source.refs_dir.is_dir():
        raise RegistryError(
            f"'{source.root}' is not a registry export: it has no {source.refs_dir.name}/ folder. "
            "Create one with `safety-lens vectors export`."
        )
    _check_distinct(registry, source.root)
    records = [source.read_ref(path) for path in source.ref_paths()]
    payload = [_verified_payload(source, record) for record in records if record is not None]
    return _store_all(registry, payload)
