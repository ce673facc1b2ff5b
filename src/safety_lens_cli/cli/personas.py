"""`safety-lens personas`: list, show and validate persona stimulus sets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from safety_lens_cli.cli.common import JsonOption, err_console, handle_errors, out_console, print_json
from safety_lens_cli.errors import EXIT_USAGE, SafetyLensError
from safety_lens_cli.personas import (
    ENV_HOME,
    ENV_PERSONAS,
    Pair,
    Persona,
    PersonaFolder,
    PersonaSummary,
    list_personas,
    load_persona,
    persona_search_path,
)

personas_app = typer.Typer(
    name="personas",
    help="List, show and validate persona stimulus sets (YAML files).",
    no_args_is_help=True,
)

_FOLDER_LABELS = {
    "env": f"${ENV_PERSONAS}",
    "home": f"${ENV_HOME}/personas",
    "builtin": "built-in",
}

# Descriptions are a paragraph, so `list` shows only their start and `show` prints them whole.
_DESCRIPTION_CHARS = 60
_FIELD_STYLES = {"system": "dim", "user": "dim", "positive": "green", "negative": "red"}


def register(app: typer.Typer) -> None:
    app.add_typer(personas_app, name="personas")


@personas_app.command("list")
@handle_errors
def list_command(json_output: JsonOption = False) -> None:
    """List the personas in the search path, including files that fail to load."""
    summaries = list_personas()
    if json_output:
        print_json([_summary_record(summary) for summary in summaries])
        return

    table = Table(show_edge=False, header_style="bold")
    table.add_column("name", no_wrap=True)
    table.add_column("pairs", justify="right", no_wrap=True)
    table.add_column("eval items", justify="right", no_wrap=True)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("description")
    for summary in summaries:
        source = "built-in" if summary.builtin else str(summary.source)
        if summary.shadowed:
            source += " (shadowed)"
        if summary.ok:
            description = Text(_shorten(summary.description, _DESCRIPTION_CHARS))
            counts = (str(summary.n_pairs), str(summary.n_eval), str(summary.version))
        else:
            first_error = _first_error_line(summary.error or "", summary.source)
            description = Text(f"invalid: {first_error}", style="red")
            counts = ("-", "-", "-")
        table.add_row(summary.name, *counts, source, description)
    out_console.print(table)
    invalid = [summary for summary in summaries if not summary.ok]
    if invalid:
        err_console.print(
            f"{len(invalid)} persona file(s) are invalid. "
            "`safety-lens personas validate PATH` lists every error.",
            markup=False,
        )
    if not summaries:
        err_console.print("No persona files found. `safety-lens personas path` shows the folders searched.")


@personas_app.command("show")
@handle_errors
def show_command(
    name: Annotated[str, typer.Argument(help="Persona name, or path to a persona YAML file.")],
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=0, help="Number of pairs to show (0 shows all).")
    ] = 5,
    json_output: JsonOption = False,
) -> None:
    """Show a persona's metadata and its first pairs."""
    persona = load_persona(name)
    shown_pairs = persona.pairs if limit == 0 else persona.pairs[:limit]
    if json_output:
        record = _persona_record(persona)
        record["pairs"] = [_pair_record(index, pair) for index, pair in enumerate(shown_pairs)]
        print_json(record)
        return

    _print_persona(persona, shown_pairs)
    if len(shown_pairs) < len(persona.pairs):
        err_console.print(
            f"Showing {len(shown_pairs)} of {len(persona.pairs)} pairs. Pass --limit 0 for all.", markup=False
        )


@personas_app.command("validate")
@handle_errors
def validate_command(
    specs: Annotated[
        list[str], typer.Argument(help="Persona YAML files or persona names.", show_default=False)
    ],
    json_output: JsonOption = False,
) -> None:
    """Check persona files against the schema and list every error with its file and line.

    Exits with status 2 when any file is invalid.
    """
    records: list[dict[str, Any]] = []
    for spec in specs:
        try:
            persona = load_persona(spec)
        except SafetyLensError as exc:
            records.append({"spec": spec, "valid": False, "error": str(exc)})
            if not json_output:
                err_console.print(f"Error: {exc}", markup=False)
            continue
        records.append({"spec": spec, "valid": True, **_persona_record(persona)})
        if not json_output:
            out_console.print(
                f"OK {persona.name}: {len(persona.pairs)} pairs, {len(persona.eval_items)} eval items",
                markup=False,
            )

    invalid = sum(1 for record in records if not record["valid"])
    if json_output:
        print_json(records)
    if invalid:
        if not json_output:
            err_console.print(f"{invalid} of {len(records)} persona files are invalid.", markup=False)
        raise typer.Exit(EXIT_USAGE)


@personas_app.command("path")
@handle_errors
def path_command(json_output: JsonOption = False) -> None:
    """Print the folders searched for persona names, first match first."""
    folders = persona_search_path()
    if json_output:
        print_json([_folder_record(folder) for folder in folders])
        return
    for folder in folders:
        note = _FOLDER_LABELS[folder.kind] + ("" if folder.exists else ", missing")
        out_console.print(f"{folder.path}  ({note})", markup=False)


def _shorten(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: max_chars - 1].rstrip() + "…"


def _first_error_line(error: str, source: Path) -> str:
    """Return the first specific error, without the file path that the source column already shows."""
    lines = error.splitlines()
    # A schema error message is a header line followed by one indented line per error.
    first = lines[1].strip() if len(lines) > 1 else lines[0]
    prefix = f"{source}:"
    if first.startswith(prefix):
        first = "line " + first[len(prefix) :]
    return first


def _print_persona(persona: Persona, shown_pairs: tuple[Pair, ...]) -> None:
    kind = "built-in" if persona.builtin else "user file"
    role_pairs = sum(1 for pair in persona.pairs if not pair.is_plain)
    labels = Counter(item.label for item in persona.eval_items)

    header = Text()
    header.append(persona.name, style="bold")
    header.append(f" ({kind}, version {persona.version})")
    out_console.print(header)
    out_console.print(f"source: {persona.source}", markup=False)
    out_console.print(f"description: {persona.description}", markup=False)
    out_console.print(f"default position: {persona.default_position or 'not set'}", markup=False)
    out_console.print(f"stimulus sha256: {persona.stimulus_sha256}", markup=False)
    out_console.print(
        f"pairs: {len(persona.pairs)} ({role_pairs} role, {len(persona.pairs) - role_pairs} plain)",
        markup=False,
    )
    out_console.print(
        f"eval items: {len(persona.eval_items)} ({labels[1]} with label 1, {labels[0]} with label 0)",
        markup=False,
    )

    for index, pair in enumerate(shown_pairs):
        out_console.print()
        out_console.print(Text(f"pairs[{index}] (line {pair.line})", style="bold"))
        fields = (
            ("system", pair.system),
            ("user", pair.user),
            ("positive", pair.positive),
            ("negative", pair.negative),
        )
        for label, value in fields:
            if value is None:
                continue
            line = Text(f"  {label}: ", style=_FIELD_STYLES[label])
            line.append(value)
            out_console.print(line)


def _summary_record(summary: PersonaSummary) -> dict[str, Any]:
    return {
        "name": summary.name,
        "source": str(summary.source),
        "builtin": summary.builtin,
        "shadowed": summary.shadowed,
        "valid": summary.ok,
        "n_pairs": summary.n_pairs if summary.ok else None,
        "n_eval": summary.n_eval if summary.ok else None,
        "version": summary.version,
        "description": summary.description if summary.ok else None,
        "error": summary.error,
    }


def _persona_record(persona: Persona) -> dict[str, Any]:
    labels = Counter(item.label for item in persona.eval_items)
    return {
        "name": persona.name,
        "description": persona.description,
        "version": persona.version,
        "default_position": persona.default_position,
        "builtin": persona.builtin,
        "source": str(persona.source),
        "stimulus_sha256": persona.stimulus_sha256,
        "n_pairs": len(persona.pairs),
        "n_eval": len(persona.eval_items),
        "eval_labels": {"0": labels[0], "1": labels[1]},
    }


def _pair_record(index: int, pair: Pair) -> dict[str, Any]:
    record: dict[str, Any] = {"index": index, "line": pair.line}
    for key in ("system", "user", "positive", "negative"):
        value = getattr(pair, key)
        if value is not None:
            record[key] = value
    return record


def _folder_record(folder: PersonaFolder) -> dict[str, Any]:
    return {"path": str(folder.path), "kind": folder.kind, "exists": folder.exists}
