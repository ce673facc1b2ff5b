"""Tests of the content-addressed vector registry, including real concurrent processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safety_lens_cli import registry_ops
from safety_lens_cli.errors import (
    IntegrityError,
    ModelMismatchError,
    RegistryError,
    UsageError,
    VectorNotFoundError,
)
from safety_lens_cli.registry import (
    FORMAT_VERSION,
    Registry,
    StoredVector,
    VectorKey,
    check_compatible,
    resolve_registry_root,
)

STIMULUS = "ab" * 32


def unit_vector(seed: int, hidden: int = 16) -> torch.Tensor:
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def make_key(persona: str = "evil", layer: int = 3, fingerprint: str = "fp-a") -> VectorKey:
    return VectorKey(
        model_fingerprint=fingerprint,
        layer=layer,
        persona=persona,
        stimulus_sha256=STIMULUS,
        method="mean_diff",
        position="response_mean",
    )


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def age_file(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


# -- location and keys -------------------------------------------------------


def test_root_explicit_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETY_LENS_HOME", str(tmp_path / "env"))
    assert resolve_registry_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETY_LENS_HOME", str(tmp_path / "env"))
    assert resolve_registry_root(None) == tmp_path / "env"
    assert Registry().root == tmp_path / "env"


def test_root_default_in_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFETY_LENS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_registry_root(None) == tmp_path / ".cache" / "safety-lens"


def test_key_digest_is_sha256_of_canonical_json() -> None:
    key = make_key()
    canonical = json.dumps(
        {
            "layer": 3,
            "method": "mean_diff",
            "model_fingerprint": "fp-a",
            "persona": "evil",
            "position": "response_mean",
            "stimulus_sha256": STIMULUS,
        },
        separators=(",", ":"),
    )
    assert key.digest() == hashlib.sha256(canonical.encode()).hexdigest()
    assert make_key(layer=4).digest() != key.digest()


@pytest.mark.parametrize(
    "field, value",
    [("layer", -1), ("layer", True), ("layer", "3"), ("persona", ""), ("method", None)],
)
def test_key_rejects_invalid_field(field: str, value: object) -> None:
    fields = make_key().to_dict()
    fields[field] = value
    with pytest.raises(UsageError, match=field):
        VectorKey(**fields)


# -- put, get, load ----------------------------------------------------------


def test_put_get_round_trip(registry: Registry) -> None:
    key = make_key()
    vector = unit_vector(1)
    stored = registry.put(key, vector, {"layer": 3, "coef": 4.0, "note": None, "quality": {"cv_auroc": 0.93}})

    loaded = registry.get(key)
    assert loaded is not None
    assert loaded.object_id == stored.object_id
    assert loaded.path == registry.objects_dir / f"{stored.object_id}.safetensors"
    assert bits(loaded.vector) == bits(vector)
    assert loaded.vector.dtype == torch.float32
    assert loaded.metadata == stored.metadata
    assert loaded.metadata["coef"] == 4.0
    assert type(loaded.metadata["coef"]) is float
    assert loaded.metadata["note"] is None
    assert loaded.metadata["format_version"] == FORMAT_VERSION
    assert loaded.key == key
    assert loaded.layer == 3
    assert loaded.persona == "evil"
    assert loaded.hidden_size == 16
    assert loaded.quality == {"cv_auroc": 0.93}
    assert loaded.calibration is None
    assert hashlib.sha256(loaded.path.read_bytes()).hexdigest() == stored.object_id


def test_put_is_deterministic(registry: Registry) -> None:
    key = make_key()
    first = registry.put(key, unit_vector(1), {"b": 1, "a": [1, 2]})
    ref_path = registry.ref_path(key)
    ref_before = ref_path.read_bytes()
    time.sleep(1.1)  # the ref's created time has 1 s resolution
    second = registry.put(key, unit_vector(1), {"a": [1, 2], "b": 1})
    assert first.object_id == second.object_id
    assert len(registry.object_ids()) == 1
    assert ref_path.read_bytes() == ref_before


def test_put_new_vector_repoints_ref(registry: Registry) -> None:
    key = make_key()
    old = registry.put(key, unit_vector(1), {})
    new = registry.put(key, unit_vector(2), {})
    assert old.object_id != new.object_id
    loaded = registry.get(key)
    assert loaded is not None
    assert loaded.object_id == new.object_id
    assert [entry.object_id for entry in registry.entries()] == [new.object_id]
    assert [item.object_id for item in registry.plan_gc().objects] == [old.object_id]


def test_put_converts_half_precision_to_float32(registry: Registry) -> None:
    vector = unit_vector(5).to(torch.bfloat16)
    stored = registry.put(make_key(), vector, {})
    assert stored.vector.dtype == torch.float32
    assert torch.equal(stored.vector, vector.float())


@pytest.mark.parametrize(
    "vector, message",
    [
        (torch.ones(4), "norm is 2"),
        (torch.ones(2, 2) / 2, "1-D"),
        (torch.tensor([float("nan"), 1.0]), "NaN"),
        (torch.tensor([1, 0]), "float"),
        (torch.zeros(0), "non-empty"),
    ],
)
def test_put_rejects_invalid_vector(registry: Registry, vector: torch.Tensor, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        registry.put(make_key(), vector, {})
    assert not registry.root.exists() or registry.object_ids() == []


def test_put_rejects_conflicting_key_field(registry: Registry) -> None:
    with pytest.raises(UsageError, match="'layer'"):
        registry.put(make_key(layer=3), unit_vector(1), {"layer": 5})
    stored = registry.put(make_key(layer=3), unit_vector(1), {"layer": 3})
    assert stored.metadata["layer"] == 3


def test_get_missing_key_returns_none(registry: Registry) -> None:
    assert registry.get(make_key()) is None
    registry.put(make_key(layer=1), unit_vector(1), {})
    assert registry.get(make_key(layer=2)) is None


def test_load_by_prefix(registry: Registry) -> None:
    stored = registry.put(make_key(), unit_vector(1), {})
    for text in (stored.object_id, stored.object_id[:6], stored.object_id[:10].upper()):
        assert registry.load(text).object_id == stored.object_id


@pytest.mark.parametrize("text", ["abc", "../../etc/passwd", "..%2f", "zzzzzzzz", "abcdef/..", "a" * 65, ""])
def test_load_rejects_invalid_id(registry: Registry, text: str) -> None:
    registry.put(make_key(), unit_vector(1), {})
    with pytest.raises(UsageError, match="Invalid vector id"):
        registry.load(text)


def test_object_path_rejects_non_hex(registry: Registry) -> None:
    with pytest.raises(UsageError):
        registry.object_path("../" + "a" * 61)


def test_load_unknown_id_not_found(registry: Registry) -> None:
    stored = registry.put(make_key(), unit_vector(1), {})
    other = "0" * 64 if not stored.object_id.startswith("0") else "f" * 64
    with pytest.raises(VectorNotFoundError, match=other[:6]):
        registry.load(other[:6])


def test_load_ambiguous_prefix_lists_matches(registry: Registry) -> None:
    registry.objects_dir.mkdir(parents=True)
    first = "abcdef" + "0" * 58
    second = "abcdef" + "1" * 58
    for object_id in (first, second):
        (registry.objects_dir / f"{object_id}.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match="ambiguous") as excinfo:
        registry.load("abcdef")
    assert first in str(excinfo.value)
    assert second in str(excinfo.value)


def test_flipped_byte_raises_integrity_error(registry: Registry) -> None:
    key = make_key()
    stored = registry.put(key, unit_vector(1), {})
    flip_byte(stored.path)

    with pytest.raises(IntegrityError) as excinfo:
        registry.load(stored.object_id[:8])
    message = str(excinfo.value)
    assert str(stored.path) in message
    assert f"safety-lens vectors rm {stored.object_id[:12]}" in message
    assert "safety-lens extract" in message
    with pytest.raises(IntegrityError):
        registry.get(key)

    problems = registry.verify()
    assert [(problem.kind, problem.path) for problem in problems] == [("hash_mismatch", stored.path)]


def test_put_repairs_corrupt_object(registry: Registry) -> None:
    key = make_key()
    stored = registry.put(key, unit_vector(1), {})
    flip_byte(stored.path)
    registry.put(key, unit_vector(1), {})
    assert registry.verify() == []
    loaded = registry.get(key)
    assert loaded is not None
    assert bits(loaded.vector) == bits(unit_vector(1))


def test_get_treats_dangling_ref_as_absent(registry: Registry) -> None:
    key = make_key()
    stored = registry.put(key, unit_vector(1), {})
    stored.path.unlink()
    assert registry.get(key) is None
    registry.put(key, unit_vector(1), {})
    assert registry.get(key) is not None


def test_get_invalid_ref_raises(registry: Registry) -> None:
    key = make_key()
    registry.put(key, unit_vector(1), {})
    registry.ref_path(key).write_text("{not json")
    with pytest.raises(RegistryError, match="Invalid ref file"):
        registry.get(key)


def test_entries_and_find(registry: Registry) -> None:
    a = registry.put(make_key("evil", 3, "fp-a"), unit_vector(1), {})
    b = registry.put(make_key("evil", 5, "fp-a"), unit_vector(2), {})
    c = registry.put(make_key("sycophantic", 3, "fp-b"), unit_vector(3), {})

    entries = registry.entries()
    assert [entry.object_id for entry in entries] == [a.object_id, b.object_id, c.object_id]
    assert entries[0].size == a.path.stat().st_size
    assert entries[0].created is not None
    assert entries[0].created.endswith("Z")

    assert [e.object_id for e in registry.find(persona="evil")] == [a.object_id, b.object_id]
    assert [e.object_id for e in registry.find(layer=3)] == [a.object_id, c.object_id]
    assert [e.object_id for e in registry.find(model_fingerprint="fp-b")] == [c.object_id]
    assert registry.find(persona="evil", layer=3, model_fingerprint="fp-b") == []


def test_entries_of_missing_registry_is_empty(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "absent")
    assert registry.entries() == []
    assert registry.verify() == []
    assert registry.plan_gc().is_empty
    assert not registry.root.exists()


# -- verify ------------------------------------------------------------------


def test_verify_reports_each_problem_kind(registry: Registry) -> None:
    good = registry.put(make_key("good"), unit_vector(1), {})
    missing = registry.put(make_key("missing"), unit_vector(2), {})
    missing.path.unlink()
    broken_ref = registry.refs_dir / ("0" * 64 + ".json")
    broken_ref.write_text("[]")
    stray = registry.objects_dir / ".abc.safetensors.x1.tmp"
    stray.write_bytes(b"partial")
    age_file(stray, 2 * 3600)
    fresh = registry.refs_dir / ".def.json.x2.tmp"
    fresh.write_bytes(b"in progress")
    unexpected = registry.objects_dir / "notes.txt"
    unexpected.write_text("hello")

    found = {(problem.kind, problem.path) for problem in registry.verify()}
    assert found == {
        ("missing_object", registry.ref_path(make_key("missing"))),
        ("invalid_ref", broken_ref),
        ("stray_temp_file", stray),
        ("unexpected_file", unexpected),
    }
    assert registry.get(make_key("good")) is not None
    assert good.path.exists()


def test_verify_reports_ref_pointing_at_other_key(registry: Registry) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    registry.put(make_key("b"), unit_vector(2), {})
    ref_b = registry.ref_path(make_key("b"))
    document = json.loads(ref_b.read_text())
    document["object_id"] = a.object_id
    ref_b.write_text(json.dumps(document))

    problems = registry.verify()
    assert [(problem.kind, problem.path) for problem in problems] == [("key_mismatch", ref_b)]
    with pytest.raises(IntegrityError, match="another key"):
        registry.get(make_key("b"))


def test_verify_reports_unreadable_object(registry: Registry) -> None:
    from safety_lens_cli.vector_file import serialize

    data = serialize({"not_vector": torch.ones(2)}, {"layer": 1})
    object_id = hashlib.sha256(data).hexdigest()
    registry.objects_dir.mkdir(parents=True)
    path = registry.objects_dir / f"{object_id}.safetensors"
    path.write_bytes(data)

    problems = registry.verify()
    assert [(problem.kind, problem.path) for problem in problems] == [("unreadable_object", path)]
    with pytest.raises(RegistryError, match="tensor named 'vector'"):
        registry.load(object_id)


# -- deletion plans ----------------------------------------------------------


def test_plan_remove_lists_refs_before_objects(registry: Registry) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    b = registry.put(make_key("b"), unit_vector(2), {})
    plan = registry.plan_remove([a.object_id[:8], b.object_id, a.object_id])
    assert [item.kind for item in plan.items] == ["ref", "ref", "object", "object"]
    assert [item.path for item in plan.objects] == [a.path, b.path]
    assert plan.total_bytes == sum(path.stat().st_size for path in (a.path, b.path)) + sum(
        registry.ref_path(make_key(name)).stat().st_size for name in ("a", "b")
    )


def test_plan_remove_deletes_nothing_until_applied(registry: Registry) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    before = sorted(p.name for p in registry.root.rglob("*"))
    plan = registry.plan_remove([a.object_id])
    assert not plan.is_empty
    assert sorted(p.name for p in registry.root.rglob("*")) == before


def test_apply_removes_refs_before_objects(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    keep = registry.put(make_key("keep"), unit_vector(2), {})
    order: list[str] = []
    original_unlink = registry_ops._unlink

    def recording_unlink(path: Path) -> bool:
        order.append(path.parent.name)
        return original_unlink(path)

    monkeypatch.setattr(registry_ops, "_unlink", recording_unlink)
    removed = registry.apply(registry.plan_remove([a.object_id]))

    assert order == ["refs", "objects"]
    assert removed == [registry.ref_path(make_key("a")), a.path]
    assert registry.get(make_key("a")) is None
    assert registry.get(make_key("keep")) is not None
    assert registry.object_ids() == [keep.object_id]
    assert registry.verify() == []


def test_remove_ignores_invalid_ref_copy(registry: Registry) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    # A copy under the wrong name fails the digest check, so it is an invalid ref.
    copied_ref = registry.refs_dir / ("0" * 64 + ".json")
    copied_ref.write_bytes(registry.ref_path(make_key("a")).read_bytes())
    plan = registry.plan_remove([a.object_id])
    assert [item.path for item in plan.refs] == [registry.ref_path(make_key("a"))]
    registry.apply(plan)
    assert not a.path.exists()
    assert [problem.kind for problem in registry.verify()] == ["invalid_ref"]


def test_plan_remove_rejects_bad_selectors(registry: Registry) -> None:
    registry.put(make_key("a"), unit_vector(1), {})
    with pytest.raises(UsageError, match="Invalid vector id"):
        registry.plan_remove(["../refs"])
    with pytest.raises(VectorNotFoundError):
        registry.plan_remove(["0123456789"])
    with pytest.raises(UsageError, match="No vector id"):
        registry.plan_remove([])


def test_plan_remove_of_dangling_ref(registry: Registry) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    a.path.unlink()
    plan = registry.plan_remove([a.object_id[:7]])
    assert [(item.kind, item.path) for item in plan.items] == [("ref", registry.ref_path(make_key("a")))]


def test_plan_gc_selects_garbage_only(registry: Registry) -> None:
    keep = registry.put(make_key("keep"), unit_vector(1), {})
    orphan = registry.put(make_key("orphan"), unit_vector(2), {})
    registry.ref_path(make_key("orphan")).unlink()
    dangling = registry.put(make_key("dangling"), unit_vector(3), {})
    dangling.path.unlink()
    old_temp = registry.objects_dir / ".x.safetensors.old.tmp"
    old_temp.write_bytes(b"x")
    age_file(old_temp, 3 * 3600)
    fresh_temp = registry.objects_dir / ".y.safetensors.new.tmp"
    fresh_temp.write_bytes(b"y")

    plan = registry.plan_gc()
    assert [(item.kind, item.path) for item in plan.items] == [
        ("ref", registry.ref_path(make_key("dangling"))),
        ("object", orphan.path),
        ("temp_file", old_temp),
    ]

    registry.apply(plan)
    assert registry.object_ids() == [keep.object_id]
    assert fresh_temp.exists()
    assert not old_temp.exists()
    assert registry.get(make_key("keep")) is not None
    assert registry.plan_gc().is_empty


def test_gc_keeps_object_of_invalid_ref(registry: Registry) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    ref = registry.ref_path(make_key("a"))
    document = json.loads(ref.read_text())
    document["format_version"] = "broken"
    ref.write_text(json.dumps(document))
    assert registry.plan_gc().objects == []
    assert a.path.exists()


def test_apply_keeps_object_referenced_after_planning(registry: Registry) -> None:
    key = make_key("a")
    stored = registry.put(key, unit_vector(1), {})
    registry.ref_path(key).unlink()
    plan = registry.plan_gc()
    assert [item.path for item in plan.objects] == [stored.path]

    registry.put(key, unit_vector(1), {})  # another process re-extracts the same vector
    assert registry.apply(plan) == []
    assert registry.get(key) is not None
    assert registry.verify() == []


def test_apply_keeps_ref_repointed_after_planning(registry: Registry) -> None:
    key = make_key("a")
    old = registry.put(key, unit_vector(1), {})
    plan = registry.plan_remove([old.object_id])
    new = registry.put(key, unit_vector(2), {})
    removed = registry.apply(plan)
    assert removed == [old.path]
    loaded = registry.get(key)
    assert loaded is not None
    assert loaded.object_id == new.object_id


# -- export and import -------------------------------------------------------


def test_export_import_round_trip(registry: Registry, tmp_path: Path) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {"quality": {"cv_auroc": 0.8}})
    b = registry.put(make_key("b", 7), unit_vector(2), {"calibration": {"threshold": 0.25}})
    registry.put(make_key("c"), unit_vector(3), {})
    export_dir = tmp_path / "export"

    results = registry.export(export_dir, registry.find(layer=3) + registry.find(persona="b"))
    assert sorted(result.status for result in results) == ["added", "added", "added"]
    exported = Registry(export_dir)
    assert exported.verify() == []
    assert len(exported.entries()) == 3
    assert (export_dir / "objects" / f"{a.object_id}.safetensors").read_bytes() == a.path.read_bytes()

    target = Registry(tmp_path / "ci-machine")
    imported = target.import_from(export_dir)
    assert [result.status for result in imported] == ["added"] * 3
    assert target.verify() == []
    assert [(e.key, e.object_id, e.created) for e in target.entries()] == [
        (e.key, e.object_id, e.created) for e in registry.entries()
    ]
    loaded_b = target.get(make_key("b", 7))
    assert loaded_b is not None
    assert bits(loaded_b.vector) == bits(b.vector)
    assert loaded_b.calibration == {"threshold": 0.25}

    again = target.import_from(export_dir)
    assert [result.status for result in again] == ["unchanged"] * 3


def test_import_keeps_local_ref_on_conflict(registry: Registry, tmp_path: Path) -> None:
    registry.put(make_key("a"), unit_vector(1), {})
    export_dir = tmp_path / "export"
    registry.export(export_dir, registry.entries())

    target = Registry(tmp_path / "target")
    local = target.put(make_key("a"), unit_vector(9), {})
    results = target.import_from(export_dir)
    assert [result.status for result in results] == ["conflict"]
    assert results[0].existing_object_id == local.object_id
    loaded = target.get(make_key("a"))
    assert loaded is not None
    assert loaded.object_id == local.object_id
    assert target.object_ids() == [local.object_id]


def test_import_rejects_corrupt_export_and_adds_nothing(registry: Registry, tmp_path: Path) -> None:
    registry.put(make_key("a"), unit_vector(1), {})
    bad = registry.put(make_key("b"), unit_vector(2), {})
    export_dir = tmp_path / "export"
    registry.export(export_dir, registry.entries())
    corrupt = export_dir / "objects" / f"{bad.object_id}.safetensors"
    flip_byte(corrupt)

    target = Registry(tmp_path / "target")
    with pytest.raises(IntegrityError) as excinfo:
        target.import_from(export_dir)
    assert str(corrupt) in str(excinfo.value)
    assert target.entries() == []
    assert target.object_ids() == []


def test_import_never_overwrites_different_local_object(registry: Registry, tmp_path: Path) -> None:
    stored = registry.put(make_key("a"), unit_vector(1), {})
    export_dir = tmp_path / "export"
    registry.export(export_dir, registry.entries())

    target = Registry(tmp_path / "target")
    target.objects_dir.mkdir(parents=True)
    local_object = target.objects_dir / f"{stored.object_id}.safetensors"
    local_object.write_bytes(b"local bytes")
    with pytest.raises(IntegrityError, match="was not overwritten"):
        target.import_from(export_dir)
    assert local_object.read_bytes() == b"local bytes"


def test_import_rejects_ref_with_foreign_key(registry: Registry, tmp_path: Path) -> None:
    a = registry.put(make_key("a"), unit_vector(1), {})
    registry.put(make_key("b"), unit_vector(2), {})
    export_dir = tmp_path / "export"
    registry.export(export_dir, registry.entries())
    ref_b = Registry(export_dir).ref_path(make_key("b"))
    document = json.loads(ref_b.read_text())
    document["object_id"] = a.object_id
    ref_b.write_text(json.dumps(document))

    target = Registry(tmp_path / "target")
    with pytest.raises(IntegrityError, match="another key"):
        target.import_from(export_dir)
    assert target.entries() == []


def test_import_from_non_registry_folder(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not found"):
        registry.import_from(tmp_path / "absent")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RegistryError, match="no refs/ folder"):
        registry.import_from(tmp_path / "plain")


def test_export_to_same_registry_rejected(registry: Registry) -> None:
    registry.put(make_key("a"), unit_vector(1), {})
    with pytest.raises(UsageError, match="same registry"):
        registry.export(registry.root, registry.entries())


# -- compatibility -----------------------------------------------------------


def stored_for(fingerprint: str, hidden: int) -> StoredVector:
    metadata = {**make_key(fingerprint=fingerprint).to_dict(), "format_version": FORMAT_VERSION}
    return StoredVector(object_id="ab" * 32, path=Path("x"), vector=unit_vector(1, hidden), metadata=metadata)


def test_check_compatible_accepts_same_model() -> None:
    check_compatible(stored_for("fp-a", 16), "fp-a", 16)


def test_check_compatible_rejects_other_fingerprint() -> None:
    with pytest.raises(ModelMismatchError) as excinfo:
        check_compatible(stored_for("fp-a", 16), "fp-b", 16)
    message = str(excinfo.value)
    assert "'fp-a'" in message
    assert "'fp-b'" in message
    assert "--allow-model-mismatch" in message
    check_compatible(stored_for("fp-a", 16), "fp-b", 16, allow_model_mismatch=True)


def test_check_compatible_rejects_hidden_size_even_when_allowed() -> None:
    with pytest.raises(ModelMismatchError) as excinfo:
        check_compatible(stored_for("fp-a", 16), "fp-b", 32, allow_model_mismatch=True)
    message = str(excinfo.value)
    assert "16" in message
    assert "32" in message
    assert "--allow-model-mismatch" in message


# -- real processes ----------------------------------------------------------

# Replaces the best-effort lock with a no-op, to show that correctness does not depend on it.
_DISABLE_LOCK = r"""
import contextlib
import safety_lens_cli.registry
import safety_lens_cli.registry_ops

@contextlib.contextmanager
def _no_lock(root, *, shared, timeout_s=0.0):
    yield False

def disable_lock():
    safety_lens_cli.registry.registry_lock = _no_lock
    safety_lens_cli.registry_ops.registry_lock = _no_lock
"""

_WORKER = (
    _DISABLE_LOCK
    + r"""
import sys
import torch
from pathlib import Path
from safety_lens_cli.registry import Registry, VectorKey

root, worker, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if sys.argv[4] == "unlocked":
    disable_lock()
registry = Registry(root)

def unit(seed):
    vector = torch.randn(16, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()

def key(persona, layer):
    return VectorKey("fp-a", layer, persona, "ab" * 32, "mean_diff", "response_mean")

for round_index in range(rounds):
    for shared in range(3):
        registry.put(key("shared", shared), unit(100 + shared), {"round": "same", "quality": {"cv_auroc": 0.9}})
    registry.put(key(f"own-{worker}", round_index), unit(1000 * worker + round_index), {"worker": worker})
    registry.put(key("contested", 0), unit(500 + worker), {"worker": worker})
    for shared in range(3):
        loaded = registry.get(key("shared", shared))
        if loaded is not None and not torch.equal(loaded.vector, unit(100 + shared)):
            sys.exit(f"worker {worker}: shared {shared} read back wrong values")
(root.parent / f"done-{worker}").touch()
print("ok")
"""
)

_COLLECTOR = (
    _DISABLE_LOCK
    + r"""
import sys, time
from pathlib import Path
from safety_lens_cli.registry import Registry

root, workers = Path(sys.argv[1]), int(sys.argv[2])
if sys.argv[3] == "unlocked":
    disable_lock()
registry = Registry(root)
deadline = time.monotonic() + 240
# Collect garbage until every worker has finished writing.
while time.monotonic() < deadline:
    if all((root.parent / f"done-{worker}").exists() for worker in range(workers)):
        break
    registry.apply(registry.plan_gc())
print("ok")
"""
)


def _run_processes(commands: list[list[str]]) -> None:
    processes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert stdout.strip() == "ok", stderr


def _check_after_concurrent_writes(root: Path, workers: int, rounds: int) -> None:
    registry = Registry(root)
    assert registry.verify() == []
    for shared in range(3):
        loaded = registry.get(make_key("shared", shared))
        assert loaded is not None
        assert bits(loaded.vector) == bits(unit_vector(100 + shared))
    for worker in range(workers):
        for round_index in range(rounds):
            loaded = registry.get(make_key(f"own-{worker}", round_index))
            assert loaded is not None, (worker, round_index)
            assert bits(loaded.vector) == bits(unit_vector(1000 * worker + round_index))
            assert loaded.metadata["worker"] == worker
    contested = registry.get(make_key("contested", 0))
    assert contested is not None
    assert bits(contested.vector) == bits(unit_vector(500 + contested.metadata["worker"]))
    assert len(registry.entries()) == 3 + workers * rounds + 1
    leftovers = [path for path in root.rglob("*.tmp")]
    assert leftovers == []


@pytest.mark.slow
def test_concurrent_writers_keep_registry_valid(tmp_path: Path) -> None:
    # Writers take the lock shared, so they never wait for each other. They run
    # unlocked here anyway, to show that atomic renames alone keep the registry valid.
    root = tmp_path / "shared-registry"
    workers, rounds = 4, 25
    worker_script = tmp_path / "worker.py"
    worker_script.write_text(_WORKER)
    reader_script = tmp_path / "reader.py"
    reader_script.write_text(_READER)
    commands = [
        [sys.executable, str(worker_script), str(root), str(w), str(rounds), "unlocked"] for w in range(workers)
    ]
    commands.append([sys.executable, str(reader_script), str(root), str(workers)])
    _run_processes(commands)
    _check_after_concurrent_writes(root, workers, rounds)


@pytest.mark.slow
@pytest.mark.parametrize("locking", ["locked", "unlocked"])
def test_concurrent_writers_and_gc(tmp_path: Path, locking: str) -> None:
    root = tmp_path / "shared-registry"
    workers, rounds = 3, 20
    worker_script = tmp_path / "worker.py"
    worker_script.write_text(_WORKER)
    collector_script = tmp_path / "collector.py"
    collector_script.write_text(_COLLECTOR)
    commands = [[sys.executable, str(worker_script), str(root), str(w), str(rounds), locking] for w in range(workers)]
    commands.append([sys.executable, str(collector_script), str(root), str(workers), locking])
    _run_processes(commands)
    _check_after_concurrent_writes(root, workers, rounds)
    # Only the contested key's losing objects may remain as garbage.
    assert len(Registry(root).plan_gc().objects) <= workers - 1


_READER = r"""
import sys, time
import torch
from pathlib import Path
from safety_lens_cli.registry import Registry, VectorKey

root, workers = Path(sys.argv[1]), int(sys.argv[2])
registry = Registry(root)
keys = [VectorKey("fp-a", shared, "shared", "ab" * 32, "mean_diff", "response_mean") for shared in range(3)]
keys.append(VectorKey("fp-a", 0, "contested", "ab" * 32, "mean_diff", "response_mean"))
reads = 0
deadline = time.monotonic() + 240
# Read while the workers write: every read must return nothing or a whole, valid vector.
while time.monotonic() < deadline:
    if all((root.parent / f"done-{worker}").exists() for worker in range(workers)):
        break
    for key in keys:
        loaded = registry.get(key)
        if loaded is not None:
            assert loaded.vector.shape == (16,)
            reads += 1
print("ok")
sys.stderr.write(f"{reads} reads\n")
"""


_PUT_ONCE = r"""
import sys, torch
from pathlib import Path
from safety_lens_cli.registry import Registry, VectorKey
vector = torch.randn(64, generator=torch.Generator().manual_seed(4))
meta = {f"field{i}": {"value": i / 3, "tags": ["x"] * i} for i in range(30)}
meta.update(coef=4.0, note=None, quality={"cv_auroc": 0.87})
key = VectorKey("fp-a", 12, "evil", "ab" * 32, "mean_diff", "response_mean")
stored = Registry(Path(sys.argv[1])).put(key, vector / vector.norm(), meta)
print(stored.object_id)
"""


def test_put_is_deterministic_across_processes(tmp_path: Path) -> None:
    ids = []
    for seed in ("0", "123"):
        root = tmp_path / f"registry-{seed}"
        result = subprocess.run(
            [sys.executable, "-c", _PUT_ONCE, str(root)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        ids.append(result.stdout.strip())
    assert len(ids[0]) == 64
    assert ids[0] == ids[1]
    first = (tmp_path / "registry-0" / "objects" / f"{ids[0]}.safetensors").read_bytes()
    second = (tmp_path / "registry-123" / "objects" / f"{ids[1]}.safetensors").read_bytes()
    assert first == second
