"""Checks of a whole vector registry: hashes, object contents, refs and leftover temp files."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safety_lens_cli.errors import RegistryError
from safety_lens_cli.registry import REF_SUFFIX, Registry
from safety_lens_cli.registry_records import (
    RefRecord,
    StoredVector,
    is_object_id,
    is_temp_name,
    parse_ref,
    stored_vector_from_bytes,
)
from safety_lens_cli.vector_file import VECTOR_SUFFIX, sha256_hex

# A temp file younger than this may belong to a write in progress, so verify and gc leave it alone.
TEMP_GRACE_S = 3600.0

ProblemKind = Literal[
    "hash_mismatch",
    "unreadable_object",
    "missing_object",
    "key_mismatch",
    "invalid_ref",
    "stray_temp_file",
    "unexpected_file",
]


@dataclass(frozen=True)
class Problem:
    """One defect found by `verify`, with the file it concerns and the repair to run."""

    kind: ProblemKind
    path: Path
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "message": self.message}


def temp_files(registry: Registry) -> list[tuple[Path, float]]:
    """List `write_atomic` temp files in the registry with their age in seconds."""
    now = time.time()
    found = []
    for folder in (registry.root, registry.objects_dir, registry.refs_dir):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not is_temp_name(path.name):
                continue
            try:
                found.append((path, now - path.stat().st_mtime))
            except FileNotFoundError:
                continue  # its writer renamed it while we listed
    return found


def valid_refs(registry: Registry) -> list[tuple[Path, RefRecord]]:
    """List the refs that parse and pass their checks, with their paths; invalid ones are skipped."""
    records = []
    for path in registry.ref_paths():
        record = registry.read_ref(path, missing_ok=True, invalid_ok=True)
        if record is not None:
            records.append((path, record))
    return records


def _check_object(path: Path, object_id: str) -> StoredVector | Problem:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Problem("unreadable_object", path, f"Cannot read the object: {exc.strerror}.")
    actual = sha256_hex(data)
    if actual != object_id:
        return Problem(
            "hash_mismatch",
            path,
            f"SHA-256 is {actual}, expected {object_id}. Run `safety-lens vectors rm {object_id[:12]}` "
            "and re-run `safety-lens extract`.",
        )
    try:
        return stored_vector_from_bytes(object_id, path, data)
    except RegistryError as exc:
        return Problem("unreadable_object", path, str(exc))


def verify(registry: Registry) -> list[Problem]:
    """Check every object's hash and contents, every ref, and look for stray temp files."""
    if not registry.root.is_dir():
        return []
    problems: list[Problem] = []

    for path, age in temp_files(registry):
        if age >= TEMP_GRACE_S:
            problems.append(
                Problem(
                    "stray_temp_file",
                    path,
                    f"Leftover temp file, {age / 3600:.1f} h old. Run `safety-lens vectors gc`.",
                )
            )

    valid_objects: dict[str, StoredVector] = {}
    present_objects: set[str] = set()
    if registry.objects_dir.is_dir():
        for path in sorted(registry.objects_dir.iterdir()):
            if is_temp_name(path.name):
                continue
            object_id = path.name[: -len(VECTOR_SUFFIX)] if path.name.endswith(VECTOR_SUFFIX) else ""
            if not is_object_id(object_id) or not path.is_file():
                problems.append(Problem("unexpected_file", path, "Not a registry object. Move it out of the registry."))
                continue
            present_objects.add(object_id)
            checked = _check_object(path, object_id)
            if isinstance(checked, Problem):
                problems.append(checked)
            else:
                valid_objects[object_id] = checked

    if registry.refs_dir.is_dir():
        for path in sorted(registry.refs_dir.iterdir()):
            if is_temp_name(path.name):
                continue
            if path.suffix != REF_SUFFIX or path.name.startswith(".") or not path.is_file():
                problems.append(Problem("unexpected_file", path, "Not a registry ref. Move it out of the registry."))
                continue
            try:
                record = parse_ref(path.read_bytes(), path)
            except (RegistryError, OSError) as exc:
                problems.append(
                    Problem("invalid_ref", path, f"{exc} Delete this file and re-run `safety-lens extract`.")
                )
                continue
            if record.object_id not in present_objects:
                problems.append(
                    Problem(
                        "missing_object",
                        path,
                        f"Points to missing object {record.object_id}. Run `safety-lens vectors gc` to drop the ref, "
                        "then re-run `safety-lens extract`.",
                    )
                )
                continue
            stored = valid_objects.get(record.object_id)
            if stored is not None and stored.key != record.key:
                problems.append(
                    Problem(
                        "key_mismatch",
                        path,
                        f"Points to object {record.object_id[:12]}, whose metadata has another key. "
                        "Delete this file and re-run `safety-lens extract`.",
                    )
                )
    return problems
