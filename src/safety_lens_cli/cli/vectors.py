"""`safety-lens vectors`: list, inspect, check, delete and move stored persona vectors.

The registry core imports torch, so each command imports the core inside its
body to keep `safety-lens --help` fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import click
import typer
from rich.table import Column, Table

from safety_lens_cli.cli.common import (
    JsonOption,
    RegistryOption,
    err_console,
    handle_errors,
    out_console,
    print_json,
)
from safety_lens_cli.errors import IntegrityError, RegistryError, SafetyLensError, UsageError

if TYPE_CHECKING:
    from safety_lens_cli.registry import Registry, RegistryEntry
    from safety_lens_cli.registry_ops import Plan
    from safety_lens_cli.registry_transfer import TransferResult

vectors_app = typer.Typer(
    name="vectors",
    help="List, inspect, check, delete, export and import stored persona vectors.",
    no_args_is_help=True,
)

PersonaFilter = Annotated[
    Optional[str], typer.Option("--persona", "-p", help="Only vectors of this persona name.", show_default=False)
]
LayerFilter = Annotated[
    Optional[int], typer.Option("--layer", "-l", help="Only vectors of this 0-based block index.", show_default=False)
]
FingerprintFilter = Annotated[
    Optional[str],
    typer.Option("--model-fingerprint", help="Only vectors extracted from this model fingerprint.", show_default=False),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the plan and delete nothing.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking for confirmation.")]

SHORT_ID = 12


def register(app: typer.Typer) -> None:
    app.add_typer(vectors_app, name="vectors")


def _open_registry(root: Path | None) -> Registry:
    from safety_lens_cli.registry import Registry

    return Registry(root)


def _format_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _listing_fields(entry: RegistryEntry) -> dict[str, Any]:
    """Read the model id and cross-validated AUROC from the object header, when present."""
    from safety_lens_cli.vector_file import read_file_metadata

    try:
        metadata = read_file_metadata(entry.object_path)
    except SafetyLensError as exc:
        err_console.print(f"Warning: cannot read {entry.object_path}: {exc}", markup=False)
        return {"model_id": None, "cv_auroc": None}
    quality = metadata.get("quality")
    cv_auroc = quality.get("cv_auroc") if isinstance(quality, dict) else None
    return {"model_id": metadata.get("model_id"), "cv_auroc": cv_auroc}


@vectors_app.command("list")
@handle_errors
def list_vectors(
    persona: PersonaFilter = None,
    layer: LayerFilter = None,
    model_fingerprint: FingerprintFilter = None,
    registry: RegistryOption = None,
    json_output: JsonOption = False,
) -> None:
    """List stored vectors as a table (or JSON with --json)."""
    store = _open_registry(registry)
    entries = store.find(model_fingerprint=model_fingerprint, persona=persona, layer=layer)
    rows = [{**entry.to_dict(), **_listing_fields(entry)} for entry in entries]
    if json_output:
        print_json(rows)
        return
    if not rows:
        err_console.print(f"No stored vectors match in {store.root}.", markup=False)
        return

    table = Table(
        Column("ID", no_wrap=True, min_width=SHORT_ID),
        "Persona",
        Column("Layer", justify="right"),
        "Method",
        "Position",
        Column("Model", overflow="fold"),
        Column("CV AUROC", justify="right"),
    )
    for row in rows:
        model = row["model_id"] or row["model_fingerprint"][:SHORT_ID]
        auroc = f"{row['cv_auroc']:.3f}" if isinstance(row["cv_auroc"], (int, float)) else "-"
        table.add_row(
            row["object_id"][:SHORT_ID], row["persona"], str(row["layer"]), row["method"], row["position"], model, auroc
        )
    out_console.print(table)
    err_console.print(f"{len(rows)} vectors in {store.root}", markup=False)


@vectors_app.command("show")
@handle_errors
def show_vector(
    vector_id: Annotated[
        str, typer.Argument(metavar="ID", help="Object id or a unique prefix of at least 6 hex digits.")
    ],
    registry: RegistryOption = None,
    json_output: JsonOption = False,
) -> None:
    """Print one vector's metadata after checking its hash."""
    store = _open_registry(registry)
    stored = store.load(vector_id)
    refs = [str(entry.ref_path) for entry in store.entries() if entry.object_id == stored.object_id]
    document = {
        "object_id": stored.object_id,
        "path": str(stored.path),
        "hidden_size": stored.hidden_size,
        "norm": float(stored.vector.norm()),
        "refs": refs,
        "metadata": stored.metadata,
    }
    if json_output:
        print_json(document)
        return
    for name in ("object_id", "path", "hidden_size", "norm"):
        typer.echo(f"{name}: {document[name]}")
    typer.echo(f"refs: {', '.join(refs) if refs else '(none; `safety-lens vectors gc` would remove it)'}")
    typer.echo("metadata:")
    for name, value in sorted(stored.metadata.items()):
        typer.echo(f"  {name}: {json.dumps(value, sort_keys=True)}")


@vectors_app.command("verify")
@handle_errors
def verify_registry(registry: RegistryOption = None, json_output: JsonOption = False) -> None:
    """Check every object's SHA-256 and every ref; exit 3 when a problem is found."""
    store = _open_registry(registry)
    problems = store.verify()
    if json_output:
        print_json({"registry": str(store.root), "problems": [problem.to_dict() for problem in problems]})
    else:
        for problem in problems:
            typer.echo(f"{problem.path}: {problem.kind}: {problem.message}")
    if problems:
        err_console.print(f"{len(problems)} problems found in {store.root}.", markup=False)
        raise typer.Exit(IntegrityError.exit_code)
    err_console.print(
        f"Registry {store.root} is valid: {len(store.object_ids())} objects, {len(store.ref_paths())} refs.",
        markup=False,
    )


def _render_plan(plan: Plan) -> None:
    for item in plan.items:
        err_console.print(f"  {item.kind:<9} {item.path}  ({item.reason})", markup=False)
    err_console.print(f"{len(plan.items)} files, {_format_bytes(plan.total_bytes)} in all.", markup=False)


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _confirm(question: str) -> bool:
    """Ask on stderr; end of input or Ctrl-C counts as no."""
    # typer 0.29 raises its own Abort, which is not click's Abort.
    try:
        return typer.confirm(question, default=False, err=True)
    except (typer.Abort, click.exceptions.Abort):
        return False


def _confirm_and_apply(store: Registry, plan: Plan, *, dry_run: bool, yes: bool, json_output: bool) -> None:
    """Print the plan on stderr, ask for confirmation where needed, then apply it."""
    removed: list[Path] = []
    if plan.is_empty:
        err_console.print("Nothing to delete.", markup=False)
    else:
        err_console.print("Deletion plan:" if not dry_run else "Deletion plan (dry run):", markup=False)
        _render_plan(plan)
        if dry_run:
            err_console.print("Dry run: nothing deleted.", markup=False)
        else:
            if not yes and not _stdin_is_terminal():
                raise UsageError(
                    "Not deleting without confirmation because stdin is not a terminal. Pass --yes to delete."
                )
            if yes or _confirm(f"Delete these {len(plan.items)} files?"):
                removed = store.apply(plan)
                err_console.print(f"Deleted {len(removed)} files.", markup=False)
            else:
                err_console.print("Nothing deleted.", markup=False)
    if json_output:
        print_json({"dry_run": dry_run, "plan": plan.to_dict(), "removed": [str(path) for path in removed]})


@vectors_app.command("rm")
@handle_errors
def remove_vectors(
    vector_ids: Annotated[
        list[str], typer.Argument(metavar="ID...", help="Object ids or unique prefixes of at least 6 hex digits.")
    ],
    dry_run: DryRunOption = False,
    yes: YesOption = False,
    registry: RegistryOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete vectors and every ref to them."""
    store = _open_registry(registry)
    _confirm_and_apply(store, store.plan_remove(vector_ids), dry_run=dry_run, yes=yes, json_output=json_output)


@vectors_app.command("gc")
@handle_errors
def collect_garbage(
    dry_run: DryRunOption = False,
    yes: YesOption = False,
    registry: RegistryOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete unreferenced objects, refs to missing objects and temp files older than an hour."""
    store = _open_registry(registry)
    _confirm_and_apply(store, store.plan_gc(), dry_run=dry_run, yes=yes, json_output=json_output)


@vectors_app.command("path")
@handle_errors
def print_path(registry: RegistryOption = None) -> None:
    """Print the registry folder."""
    from safety_lens_cli.registry import resolve_registry_root

    typer.echo(str(resolve_registry_root(registry)))


def _report_transfer(results: list[TransferResult], destination: Path, json_output: bool) -> None:
    counts = {
        status: sum(result.status == status for result in results) for status in ("added", "unchanged", "conflict")
    }
    if json_output:
        print_json([result.to_dict() for result in results])
    err_console.print(
        f"{destination}: {counts['added']} added, {counts['unchanged']} already present, "
        f"{counts['conflict']} conflicts.",
        markup=False,
    )
    conflicts = [result for result in results if result.status == "conflict"]
    for result in conflicts:
        key = result.entry.key
        err_console.print(
            f"  kept {str(result.existing_object_id)[:SHORT_ID]} for {key.persona} layer {key.layer}, "
            f"skipped {result.entry.object_id[:SHORT_ID]}",
            markup=False,
        )
    if conflicts:
        raise RegistryError(
            f"{len(conflicts)} entries were not copied because {destination} already has another vector "
            "for the same key. Remove those with `safety-lens vectors rm ID` in the destination and run "
            "the command again to replace them."
        )


@vectors_app.command("export")
@handle_errors
def export_vectors(
    destination: Annotated[
        Path, typer.Argument(metavar="DEST", help="Folder to write (created if missing); a registry layout.")
    ],
    vector_ids: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="[ID...]", help="Only these ids or prefixes. Default: all that match the filters."),
    ] = None,
    persona: PersonaFilter = None,
    layer: LayerFilter = None,
    model_fingerprint: FingerprintFilter = None,
    registry: RegistryOption = None,
    json_output: JsonOption = False,
) -> None:
    """Copy stored vectors into a folder that `safety-lens vectors import` reads, e.g. on another CI machine."""
    store = _open_registry(registry)
    entries = store.find(model_fingerprint=model_fingerprint, persona=persona, layer=layer)
    if vector_ids:
        selected_ids = {
            store.resolve_id(vector_id, candidates=[entry.object_id for entry in entries]) for vector_id in vector_ids
        }
        entries = [entry for entry in entries if entry.object_id in selected_ids]
    if not entries:
        raise UsageError(f"No stored vectors in {store.root} match; nothing to export. See `safety-lens vectors list`.")
    _report_transfer(store.export(destination, entries), destination, json_output)


@vectors_app.command("import")
@handle_errors
def import_vectors(
    source: Annotated[Path, typer.Argument(metavar="SRC", help="Folder written by `safety-lens vectors export`.")],
    registry: RegistryOption = None,
    json_output: JsonOption = False,
) -> None:
    """Add the vectors of an exported folder to the registry, checking every hash first."""
    store = _open_registry(registry)
    _report_transfer(store.import_from(source), store.root, json_output)
