"""Tests of `safety-lens vectors` through Typer's CliRunner, on registries in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from safety_lens_cli.cli import vectors as vectors_cli
from safety_lens_cli.cli.app import app
from safety_lens_cli.registry import Registry, StoredVector, VectorKey

runner = CliRunner()

STIMULUS = "cd" * 32


def unit_vector(seed: int, hidden: int = 8) -> torch.Tensor:
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def make_key(persona: str, layer: int, fingerprint: str = "fp-small") -> VectorKey:
    return VectorKey(fingerprint, layer, persona, STIMULUS, "mean_diff", "response_mean")


def all_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def invoke(*args: str, input: str | None = None) -> Result:
    return runner.invoke(app, list(args), input=input)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture()
def stored(root: Path) -> dict[str, StoredVector]:
    registry = Registry(root)
    return {
        "evil": registry.put(
            make_key("evil", 3),
            unit_vector(1),
            {"model_id": "tiny/model", "quality": {"cv_auroc": 0.931}, "calibration": {"threshold": 0.2}},
        ),
        "evil5": registry.put(make_key("evil", 5), unit_vector(2), {"model_id": "tiny/model"}),
        "syco": registry.put(make_key("sycophantic", 3, "fp-other"), unit_vector(3), {"note": None}),
    }


# -- list, show, path --------------------------------------------------------


def test_list_table(root: Path, stored: dict[str, StoredVector]) -> None:
    result = invoke("vectors", "list", "--registry", str(root))
    assert result.exit_code == 0, result.stderr
    for vector in stored.values():
        assert vector.object_id[:12] in result.stdout
    assert "sycophantic" in result.stdout
    assert "tiny/model" in result.stdout
    assert "0.931" in result.stdout
    assert "3 vectors" in result.stderr
    assert "3 vectors" not in result.stdout


def test_list_json_fields(root: Path, stored: dict[str, StoredVector]) -> None:
    result = invoke("vectors", "list", "--registry", str(root), "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["object_id"] for row in rows] == [stored[name].object_id for name in ("evil", "evil5", "syco")]
    assert rows[0]["persona"] == "evil"
    assert rows[0]["layer"] == 3
    assert rows[0]["method"] == "mean_diff"
    assert rows[0]["position"] == "response_mean"
    assert rows[0]["model_id"] == "tiny/model"
    assert rows[0]["cv_auroc"] == 0.931
    assert rows[2]["cv_auroc"] is None
    assert rows[2]["model_fingerprint"] == "fp-other"


@pytest.mark.parametrize(
    "filters, expected",
    [
        (["--persona", "evil"], ["evil", "evil5"]),
        (["--layer", "3"], ["evil", "syco"]),
        (["--model-fingerprint", "fp-other"], ["syco"]),
        (["--persona", "evil", "--layer", "5"], ["evil5"]),
        (["--persona", "absent"], []),
    ],
)
def test_list_filters(root: Path, stored: dict[str, StoredVector], filters: list[str], expected: list[str]) -> None:
    result = invoke("vectors", "list", "--registry", str(root), "--json", *filters)
    assert result.exit_code == 0, result.stderr
    assert [row["object_id"] for row in json.loads(result.stdout)] == [stored[name].object_id for name in expected]


def test_list_empty_registry(root: Path) -> None:
    result = invoke("vectors", "list", "--registry", str(root))
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "No stored vectors" in result.stderr
    json_result = invoke("vectors", "list", "--registry", str(root), "--json")
    assert json.loads(json_result.stdout) == []


def test_show_json(root: Path, stored: dict[str, StoredVector]) -> None:
    vector = stored["evil"]
    result = invoke("vectors", "show", vector.object_id[:8], "--registry", str(root), "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["object_id"] == vector.object_id
    assert document["hidden_size"] == 8
    assert document["norm"] == pytest.approx(1.0, abs=1e-6)
    assert document["metadata"]["calibration"] == {"threshold": 0.2}
    assert document["metadata"]["layer"] == 3
    assert document["refs"] == [str(Registry(root).ref_path(make_key("evil", 3)))]


def test_show_text(root: Path, stored: dict[str, StoredVector]) -> None:
    result = invoke("vectors", "show", stored["syco"].object_id, "--registry", str(root))
    assert result.exit_code == 0, result.stderr
    assert f"object_id: {stored['syco'].object_id}" in result.stdout
    assert '  persona: "sycophantic"' in result.stdout
    assert "  note: null" in result.stdout


@pytest.mark.parametrize("bad_id", ["../../etc", "xyz123456", "abc"])
def test_show_rejects_invalid_id(root: Path, stored: dict[str, StoredVector], bad_id: str) -> None:
    result = invoke("vectors", "show", bad_id, "--registry", str(root))
    assert result.exit_code == 2
    assert "Invalid vector id" in result.stderr
    assert result.stdout == ""


def test_show_unknown_id(root: Path, stored: dict[str, StoredVector]) -> None:
    ids = [vector.object_id for vector in stored.values()]
    unknown = next(prefix for prefix in ("000000", "ffffff") if not any(i.startswith(prefix) for i in ids))
    result = invoke("vectors", "show", unknown, "--registry", str(root))
    assert result.exit_code == 2
    assert f"No stored vector has id '{unknown}'" in result.stderr


def test_path_option_and_env(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("vectors", "path", "--registry", str(root))
    assert result.exit_code == 0
    assert result.stdout.strip() == str(root)
    monkeypatch.setenv("SAFETY_LENS_HOME", str(tmp_path / "from-env"))
    env_result = invoke("vectors", "path")
    assert env_result.stdout.strip() == str(tmp_path / "from-env")


# -- verify ------------------------------------------------------------------


def test_verify_clean_registry(root: Path, stored: dict[str, StoredVector]) -> None:
    result = invoke("vectors", "verify", "--registry", str(root))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "3 objects, 3 refs" in result.stderr


def test_verify_flipped_byte_exits_3(root: Path, stored: dict[str, StoredVector]) -> None:
    path = stored["evil5"].path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    result = invoke("vectors", "verify", "--registry", str(root))
    assert result.exit_code == 3
    assert str(path) in result.stdout
    assert "hash_mismatch" in result.stdout
    assert f"safety-lens vectors rm {stored['evil5'].object_id[:12]}" in result.stdout
    assert "1 problems found" in result.stderr

    json_result = invoke("vectors", "verify", "--registry", str(root), "--json")
    assert json_result.exit_code == 3
    problems = json.loads(json_result.stdout)["problems"]
    assert [(problem["kind"], problem["path"]) for problem in problems] == [("hash_mismatch", str(path))]

    show = invoke("vectors", "show", stored["evil5"].object_id, "--registry", str(root))
    assert show.exit_code == 3
    assert "corrupt" in show.stderr


# -- rm and gc ---------------------------------------------------------------


def test_rm_dry_run_deletes_nothing(root: Path, stored: dict[str, StoredVector]) -> None:
    before = all_files(root)
    result = invoke("vectors", "rm", stored["evil"].object_id[:10], "--dry-run", "--registry", str(root))
    assert result.exit_code == 0, result.stderr
    assert all_files(root) == before
    assert str(stored["evil"].path) in result.stderr
    assert "nothing deleted" in result.stderr
    assert result.stdout == ""


def test_rm_without_yes_on_pipe_rejected(root: Path, stored: dict[str, StoredVector]) -> None:
    before = all_files(root)
    result = invoke("vectors", "rm", stored["evil"].object_id, "--registry", str(root))
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert all_files(root) == before


def test_rm_on_terminal_asks_first(
    root: Path, stored: dict[str, StoredVector], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vectors_cli, "_stdin_is_terminal", lambda: True)
    before = all_files(root)
    declined = invoke("vectors", "rm", stored["evil"].object_id, "--registry", str(root), input="n\n")
    assert declined.exit_code == 0
    assert "Delete these 2 files?" in declined.stderr
    assert all_files(root) == before
    assert "Nothing deleted" in declined.stderr

    end_of_input = invoke("vectors", "rm", stored["evil"].object_id, "--registry", str(root), input="")
    assert end_of_input.exit_code == 0
    assert all_files(root) == before

    accepted = invoke("vectors", "rm", stored["evil"].object_id, "--registry", str(root), input="y\n")
    assert accepted.exit_code == 0, accepted.stderr
    assert not stored["evil"].path.exists()
    assert "Deleted 2 files" in accepted.stderr


def test_rm_yes_removes_ref_and_object(root: Path, stored: dict[str, StoredVector]) -> None:
    result = invoke("vectors", "rm", stored["evil"].object_id[:8], "--yes", "--registry", str(root), "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    registry = Registry(root)
    assert document["removed"] == [str(registry.ref_path(make_key("evil", 3))), str(stored["evil"].path)]
    assert document["dry_run"] is False
    assert not stored["evil"].path.exists()
    assert registry.get(make_key("evil", 3)) is None
    assert registry.get(make_key("evil", 5)) is not None
    assert registry.verify() == []


def test_rm_rejects_path_like_id(root: Path, stored: dict[str, StoredVector]) -> None:
    before = all_files(root)
    result = invoke("vectors", "rm", "../refs", "--yes", "--registry", str(root))
    assert result.exit_code == 2
    assert "Invalid vector id" in result.stderr
    assert all_files(root) == before


def test_gc_dry_run_then_yes(root: Path, stored: dict[str, StoredVector]) -> None:
    registry = Registry(root)
    registry.ref_path(make_key("evil", 5)).unlink()
    orphan = stored["evil5"].path
    fresh_temp = registry.objects_dir / ".partial.safetensors.abc.tmp"
    fresh_temp.write_bytes(b"x")
    before = all_files(root)

    dry = invoke("vectors", "gc", "--dry-run", "--registry", str(root))
    assert dry.exit_code == 0, dry.stderr
    assert all_files(root) == before
    assert str(orphan) in dry.stderr
    assert "no ref points to it" in dry.stderr
    assert str(fresh_temp) not in dry.stderr

    result = invoke("vectors", "gc", "--yes", "--registry", str(root))
    assert result.exit_code == 0, result.stderr
    assert not orphan.exists()
    assert fresh_temp.exists()
    assert "Deleted 1 files" in result.stderr
    assert Registry(root).get(make_key("evil", 3)) is not None


def test_gc_removes_old_temp_file(root: Path, stored: dict[str, StoredVector]) -> None:
    old_temp = Registry(root).refs_dir / ".x.json.abc.tmp"
    old_temp.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old_temp, (two_hours_ago, two_hours_ago))
    result = invoke("vectors", "gc", "--yes", "--registry", str(root))
    assert result.exit_code == 0, result.stderr
    assert not old_temp.exists()


def test_gc_nothing_to_delete(root: Path, stored: dict[str, StoredVector]) -> None:
    result = invoke("vectors", "gc", "--registry", str(root))
    assert result.exit_code == 0
    assert "Nothing to delete" in result.stderr


# -- export and import -------------------------------------------------------


def test_export_import_round_trip(root: Path, stored: dict[str, StoredVector], tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    exported = invoke("vectors", "export", str(export_dir), "--persona", "evil", "--registry", str(root), "--json")
    assert exported.exit_code == 0, exported.stderr
    assert [row["status"] for row in json.loads(exported.stdout)] == ["added", "added"]
    assert "2 added" in exported.stderr

    target = tmp_path / "ci-registry"
    imported = invoke("vectors", "import", str(export_dir), "--registry", str(target))
    assert imported.exit_code == 0, imported.stderr
    assert "2 added, 0 already present, 0 conflicts" in imported.stderr
    registry = Registry(target)
    assert [entry.object_id for entry in registry.entries()] == [stored["evil"].object_id, stored["evil5"].object_id]
    loaded = registry.get(make_key("evil", 3))
    assert loaded is not None
    assert torch.equal(loaded.vector, stored["evil"].vector)

    verify = invoke("vectors", "verify", "--registry", str(target))
    assert verify.exit_code == 0


def test_export_selected_ids(root: Path, stored: dict[str, StoredVector], tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    result = invoke("vectors", "export", str(export_dir), stored["syco"].object_id[:9], "--registry", str(root))
    assert result.exit_code == 0, result.stderr
    assert [entry.object_id for entry in Registry(export_dir).entries()] == [stored["syco"].object_id]


def test_export_nothing_matches(root: Path, stored: dict[str, StoredVector], tmp_path: Path) -> None:
    result = invoke("vectors", "export", str(tmp_path / "export"), "--persona", "absent", "--registry", str(root))
    assert result.exit_code == 2
    assert "nothing to export" in result.stderr
    assert not (tmp_path / "export").exists()


def test_import_conflict_keeps_local(root: Path, stored: dict[str, StoredVector], tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    assert invoke("vectors", "export", str(export_dir), "--registry", str(root)).exit_code == 0
    target = Registry(tmp_path / "target")
    local = target.put(make_key("evil", 3), unit_vector(42), {})

    result = invoke("vectors", "import", str(export_dir), "--registry", str(target.root))
    assert result.exit_code == 2
    assert "2 added, 0 already present, 1 conflicts" in result.stderr
    assert local.object_id[:12] in result.stderr
    loaded = target.get(make_key("evil", 3))
    assert loaded is not None
    assert loaded.object_id == local.object_id


def test_import_corrupt_export_exits_3(root: Path, stored: dict[str, StoredVector], tmp_path: Path) -> None:
    export_dir = tmp_path / "export"
    assert invoke("vectors", "export", str(export_dir), "--registry", str(root)).exit_code == 0
    corrupt = export_dir / "objects" / f"{stored['syco'].object_id}.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"\x00")

    target = tmp_path / "target"
    result = invoke("vectors", "import", str(export_dir), "--registry", str(target))
    assert result.exit_code == 3
    assert str(corrupt) in result.stderr
    assert Registry(target).entries() == []


# -- startup -----------------------------------------------------------------


def test_vectors_module_does_not_import_torch() -> None:
    code = "import sys, safety_lens_cli.cli.vectors; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_vectors_help_lists_commands() -> None:
    result = invoke("vectors", "--help")
    assert result.exit_code == 0
    for command in ("list", "show", "verify", "rm", "gc", "path", "export", "import"):
        assert command in result.stdout
