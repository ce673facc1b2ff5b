"""Deletion plans of a vector registry and their application.

Deletion is two steps: a plan lists what would go and why, and `apply_plan`
removes refs before objects. `apply_plan` re-reads the refs before each
deletion, so a ref or object that another process changed after planning is
kept.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safety_lens_cli.errors import RegistryError, UsageError
from safety_lens_cli.registry import Registry
from safety_lens_cli.registry_lock import registry_lock
from safety_lens_cli.registry_records import is_object_id
from safety_lens_cli.registry_verify import TEMP_GRACE_S, temp_files, valid_refs
from safety_lens_cli.vector_file import TEMP_SUFFIX

logger = logging.getLogger(__name__)

PlanItemKind = Literal["ref", "object", "temp_file"]


@dataclass(frozen=True)
class PlanItem:
    """One file a plan would delete."""

    kind: PlanItemKind
    path: Path
    reason: str
    object_id: str | None = None  # the object a ref points to, or the object's own id
    size: int = 0  # bytes
    only_if_object_missing: bool = False  # for gc's dangling refs: keep the ref if its object reappears

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "reason": self.reason,
            "object_id": self.object_id,
            "size": self.size,
        }


@dataclass(frozen=True)
class Plan:
    """Files to delete, applied by `apply_plan` in the order refs, objects, temp files."""

    items: tuple[PlanItem, ...] = ()

    @property
    def refs(self) -> list[PlanItem]:
        return [item for item in self.items if item.kind == "ref"]

    @property
    def objects(self) -> list[PlanItem]:
        return [item for item in self.items if item.kind == "object"]

    @property
    def temp_files(self) -> list[PlanItem]:
        return [item for item in self.items if item.kind == "temp_file"]

    @property
    def is_empty(self) -> bool:
        return not self.items

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {"items": [item.to_dict() for item in self.items], "total_bytes": self.total_bytes}


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _referenced_ids(registry: Registry) -> set[str]:
    """Collect the object ids that any ref names, reading invalid refs leniently.

    An invalid ref that still names an object protects that object from gc,
    because the user may repair the ref rather than re-extract.
    """
    ids = set()
    for path in registry.ref_paths():
        try:
            document = json.loads(path.read_bytes())
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        object_id = document.get("object_id") if isinstance(document, dict) else None
        if isinstance(object_id, str) and is_object_id(object_id):
            ids.add(object_id)
    return ids


def plan_remove(registry: Registry, selectors: Sequence[str]) -> Plan:
    """Plan the deletion of the objects with these ids or unique prefixes and of every ref to them."""
    if not selectors:
        raise UsageError("No vector id given. List the ids with `safety-lens vectors list`.")
    refs = valid_refs(registry)
    candidates = set(registry.object_ids()) | {record.object_id for _, record in refs}

    selected: list[str] = []
    for selector in selectors:
        object_id = registry.resolve_id(selector, candidates=candidates)
        if object_id not in selected:
            selected.append(object_id)

    ref_items = []
    object_items = []
    for object_id in selected:
        for path, record in refs:
            if record.object_id == object_id:
                reason = f"{record.key.persona} layer {record.key.layer} ({record.key.method}, {record.key.position})"
                ref_items.append(PlanItem("ref", path, reason, object_id=object_id, size=_file_size(path)))
        object_path = registry.object_path(object_id)
        if object_path.exists():
            object_items.append(
                PlanItem("object", object_path, "selected by id", object_id=object_id, size=_file_size(object_path))
            )
    return Plan(tuple(ref_items + object_items))


def plan_gc(registry: Registry) -> Plan:
    """Plan the deletion of refs to missing objects, unreferenced objects and temp files older than an hour."""
    # Refs are listed before objects: a writer creates the object before the
    # ref, so a ref listed first has its object in the later listing unless it
    # really is missing.
    refs = valid_refs(registry)
    referenced = _referenced_ids(registry)
    present = set(registry.object_ids())

    ref_items = [
        PlanItem(
            "ref",
            path,
            f"points to missing object {record.object_id[:12]}",
            object_id=record.object_id,
            size=_file_size(path),
            only_if_object_missing=True,
        )
        for path, record in refs
        if record.object_id not in present
    ]
    object_items = []
    for object_id in sorted(present - referenced):
        path = registry.object_path(object_id)
        object_items.append(PlanItem("object", path, "no ref points to it", object_id=object_id, size=_file_size(path)))
    temp_items = [
        PlanItem("temp_file", path, f"leftover temp file, {age / 3600:.1f} h old", size=_file_size(path))
        for path, age in temp_files(registry)
        if age >= TEMP_GRACE_S
    ]
    return Plan(tuple(ref_items + object_items + temp_items))


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise RegistryError(
            f"Cannot delete '{path}': {exc.strerror}. Check its permissions and run the command again."
        ) from exc
    return True


def _move_aside(path: Path) -> Path | None:
    """Rename `path` to a unique temp name next to it; return None when it is gone."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryError(
            f"Cannot delete '{path}': {exc.strerror}. Check its permissions and run the command again."
        ) from exc
    return aside


def _remove_dangling_ref(registry: Registry, item: PlanItem) -> bool:
    """Delete a ref planned as dangling unless its object has been written since planning.

    The ref is moved aside before the object is checked, and `Registry.store`
    re-checks its ref after writing. A writer that re-creates the object
    therefore either finds the ref gone and writes it again, or is found here.
    """
    aside = _move_aside(item.path)
    if aside is None:
        return False
    if item.object_id is not None and registry.object_path(item.object_id).exists():
        try:
            # A hard link restores the ref without replacing one a writer wrote meanwhile.
            os.link(aside, item.path)
        except FileExistsError:
            pass
        except OSError:
            # NOTE: without hard links (some network or FAT file systems) a ref that a
            # writer creates between this check and the rename is replaced by the old copy.
            if not item.path.exists():
                os.replace(aside, item.path)
        _unlink(aside)
        logger.warning("Keeping ref %s: its object %s exists again", item.path, item.object_id)
        return False
    _unlink(aside)
    return True


def _remove_unreferenced_object(registry: Registry, item: PlanItem) -> bool:
    """Delete a planned object unless a valid ref names it once it has been moved aside.

    Moving the object to a temp name before reading the refs closes the race
    with `Registry.store`, which re-checks the object after writing its ref.
    Only valid refs count, because they are what a writer creates, and an
    object the user selected stays removable when an invalid ref names it.
    """
    aside = _move_aside(item.path)
    if aside is None:
        return False
    referenced = {record.object_id for _, record in valid_refs(registry)}
    if item.object_id in referenced:
        os.replace(aside, item.path)
        logger.warning("Keeping object %s: a ref points to it again", item.path)
        return False
    _unlink(aside)
    return True


def apply_plan(registry: Registry, plan: Plan) -> list[Path]:
    """Delete the files of `plan`, refs first, and return the paths actually removed.

    Another process may have changed a ref or referenced an object since the
    plan was made. Such a ref or object is kept, and a warning is logged.
    """
    removed: list[Path] = []
    with registry_lock(registry.root, shared=False):
        for item in plan.refs:
            current = registry.read_ref(item.path, missing_ok=True, invalid_ok=True)
            if current is not None and current.object_id != item.object_id:
                logger.warning("Keeping ref %s: it now points to %s", item.path, current.object_id)
                continue
            if item.only_if_object_missing:
                deleted = _remove_dangling_ref(registry, item)
            else:
                deleted = _unlink(item.path)
            if deleted:
                removed.append(item.path)

        for item in plan.objects:
            if _remove_unreferenced_object(registry, item):
                removed.append(item.path)

        for item in plan.temp_files:
            if _unlink(item.path):
                removed.append(item.path)
    for path in removed:
        logger.debug("Removed %s", path)
    return removed
