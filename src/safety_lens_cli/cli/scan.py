"""`safety-lens scan`: score prompts or conversations on persona vectors, with a CI gate.

Exit codes: 0 gate passed or no gate, 1 gate failed, 2 usage or input error,
3 model or runtime error, or a scan that did not complete.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from safety_lens_cli.cli.common import (
    DeviceOption,
    DtypeOption,
    LayerOption,
    LayersPathOption,
    ModelOption,
    PersonaOption,
    RegistryOption,
    RevisionOption,
    TrustRemoteCodeOption,
    err_console,
    handle_errors,
    model_request,
    out_console,
)
from safety_lens_cli.cli.inspect_layers import model_header
from safety_lens_cli.errors import InputError, ModelLoadError, RuntimeFailure, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import IO

    from safety_lens_cli.gating import GateRule, ScanStats, Thresholds, Verdict
    from safety_lens_cli.inputs import InputItem, InputProblem, ReadCounts, Shard
    from safety_lens_cli.models import LoadedModel
    from safety_lens_cli.projection import PersonaVector
    from safety_lens_cli.scan_output import JsonlWriter
    from safety_lens_cli.scan_reports import SummaryContext
    from safety_lens_cli.scanning import ScanOptions, ScoreColumn

    Advance = Callable[[ReadCounts], None]

log = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip", "record")
FORMAT_CHOICES = ("jsonl", "text", "table")
# Problem lines reported one by one on stderr before they are only counted.
MAX_LINE_WARNINGS = 20

TextOption = Annotated[
    Optional[list[str]],
    typer.Option("--text", "-t", help="A prompt to scan. Repeat for several; replaces --input.", show_default=False),
]
InputOption = Annotated[
    Optional[str],
    typer.Option(
        "--input",
        "-i",
        help="JSON Lines file to scan, or - for stdin. Default: stdin when it is not a terminal.",
        show_default=False,
    ),
]
FormatOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--format",
        "-f",
        help="jsonl: JSON Lines in and out (default). text: one prompt per plain input line. "
        "table: a table on stdout instead of JSON Lines. Give text and table together for both.",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    app.command("scan")(scan)


@dataclass(frozen=True)
class _Formats:
    input: str
    table: bool


def _parse_formats(values: list[str] | None) -> _Formats:
    values = values or []
    unknown = [v for v in values if v not in FORMAT_CHOICES]
    if unknown:
        raise UsageError(f"Invalid --format '{unknown[0]}': use jsonl, text or table.")
    inputs = [v for v in values if v != "table"]
    if len(set(inputs)) > 1:
        raise UsageError("--format jsonl and --format text both set the input format: give one.")
    return _Formats(input=inputs[0] if inputs else "jsonl", table="table" in values)


@handle_errors
def scan(
    text: TextOption = None,
    input_path: InputOption = None,
    formats: FormatOption = None,
    field: Annotated[
        Optional[str],
        typer.Option("--field", help="JSON field holding the prompt (a string) or chat turns (a list).", show_default=False),
    ] = None,
    keep_fields: Annotated[
        bool, typer.Option("--keep-fields", help="Copy the line's other fields into each record under 'meta'.")
    ] = False,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write JSON Lines records to this file instead of stdout.", show_default=False),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Append to an existing --output, skipping ids already in it.")
    ] = False,
    model: ModelOption = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
    layers_path: LayersPathOption = None,
    persona: PersonaOption = None,
    layer: LayerOption = None,
    vector: Annotated[
        Optional[list[str]],
        typer.Option("--vector", help="Registry object id (or unique prefix) of a vector to use. Repeatable.", show_default=False),
    ] = None,
    registry: RegistryOption = None,
    no_extract: Annotated[
        bool, typer.Option("--no-extract", help="Fail instead of extracting vectors missing from the registry.")
    ] = False,
    position: Annotated[
        Optional[str],
        typer.Option(
            "--position",
            help="Tokens to read: last, mean or response-mean. Default: last for prompts, "
            "response-mean for conversations ending with an assistant turn.",
            show_default=False,
        ),
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Tokenize the text as is, without the chat template.")] = False,
    no_truncate: Annotated[
        bool, typer.Option("--no-truncate", help="Reject inputs longer than the model context instead of keeping their end.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Inputs per forward pass.", min=1)] = 16,
    threshold: Annotated[
        Optional[list[str]],
        typer.Option(
            "--threshold",
            help="Calibrated score at or above which a line is flagged: a number for all personas "
            "(default 0.5), or PERSONA=NUMBER. Repeatable.",
            show_default=False,
        ),
    ] = None,
    fail_on_flag: Annotated[
        bool, typer.Option("--fail-on-flag", help="Gate: exit 1 when any line is flagged or not scored.")
    ] = False,
    max_flagged_rate: Annotated[
        Optional[float],
        typer.Option(
            "--max-flagged-rate",
            help="Gate: exit 1 when a persona's share of flagged or unscored lines (0 to 1) is above this.",
            show_default=False,
        ),
    ] = None,
    on_error: Annotated[
        str,
        typer.Option("--on-error", help="On a bad input line: fail (stop, exit 2), skip (warn) or record (write an error record)."),
    ] = "fail",
    shard: Annotated[
        Optional[str],
        typer.Option("--shard", help="Scan only lines I, I+N, I+2N, ... as shard I/N (I counts from 0).", show_default=False),
    ] = None,
    summary: Annotated[
        Optional[Path], typer.Option("--summary", help="Write the summary as Markdown to this file.", show_default=False)
    ] = None,
    junit: Annotated[
        Optional[Path], typer.Option("--junit", help="Write JUnit XML with one test case per persona gate.", show_default=False)
    ] = None,
    baseline_model: Annotated[
        Optional[str],
        typer.Option(
            "--baseline-model",
            help="Compare --model (the candidate) with this baseline along the baseline's vectors: "
            "Hub id, save_pretrained folder or .gguf file.",
            show_default=False,
        ),
    ] = None,
    baseline_revision: Annotated[
        Optional[str], typer.Option("--baseline-revision", help="Hub revision of --baseline-model.", show_default=False)
    ] = None,
    max_shift: Annotated[
        Optional[list[str]],
        typer.Option(
            "--max-shift",
            help="Gate: exit 1 when the lower end of the 95% CI of the mean calibrated shift (candidate minus "
            "baseline) exceeds this; a number for all personas, or PERSONA=NUMBER. Repeatable.",
            show_default=False,
        ),
    ] = None,
    sequential: Annotated[
        Optional[bool],
        typer.Option(
            "--sequential/--in-memory",
            help="Load the two models one after the other, or both at once. Default: sequential only when "
            "the second model would not fit in the memory left.",
            show_default=False,
        ),
    ] = None,
    bootstrap_seed: Annotated[
        int, typer.Option("--bootstrap-seed", help="Seed of the bootstrap confidence interval of the shift.")
    ] = 0,
) -> None:
    """Score prompts or conversations on persona vectors, one JSON record per input line.

    Exit codes: 0 gate passed or no gate, 1 gate failed, 2 usage or input error,
    3 model or runtime error or an incomplete scan.
    """
    from safety_lens_cli.activations import check_position
    from safety_lens_cli.gating import gate_rule, parse_thresholds
    from safety_lens_cli.inputs import parse_shard

    fmt = _parse_formats(formats)
    if on_error not in ON_ERROR_CHOICES:
        raise UsageError(f"Invalid --on-error '{on_error}': use fail, skip or record.")
    if position is not None:
        check_position(position)
    thresholds = parse_thresholds(threshold or [])
    rule = gate_rule(fail_on_flag, max_flagged_rate)
    shard_spec = parse_shard(shard) if shard is not None else None
    if resume and output is None:
        raise UsageError("--resume appends to an existing file: pass it with --output FILE.")
    if not persona and not vector:
        raise UsageError("No persona to scan: pass --persona NAME (repeatable) or --vector ID.")
    source = _input_source(text, input_path, fmt, field, keep_fields, shard_spec)

    from safety_lens_cli.models import load_model

    if baseline_model is None and (max_shift or sequential is not None or baseline_revision):
        raise UsageError("--max-shift, --sequential and --baseline-revision need --baseline-model.")
    candidate_request = model_request(model, revision, device, dtype, trust_remote_code, layers_path)
    if baseline_model is not None:
        if resume:
            raise UsageError("--resume is not supported with --baseline-model: run the comparison again.")
        if fmt.table:
            raise UsageError("--format table is not supported with --baseline-model: read the JSON Lines records.")
        model = baseline_model
        revision = baseline_revision
    try:
        lm = load_model(model_request(model, revision, device, dtype, trust_remote_code, layers_path))
    except ModelLoadError as exc:
        # A model that cannot be loaded is a runtime failure for a scan, so CI can tell it from bad input.
        raise RuntimeFailure(str(exc)) from exc

    from safety_lens_cli.vector_lookup import VectorRequest, resolve_vectors

    request = VectorRequest(
        personas=tuple(persona or ()),
        layers=tuple(layer or ()),
        registry=registry,
        extract_missing=not no_extract,
        vector_ids=tuple(vector or ()),
        batch_size=batch_size,
    )
    vectors = resolve_vectors(lm, request, notify=lambda note: err_console.print(note, markup=False))

    from safety_lens_cli.scanning import ScanOptions

    options = ScanOptions(
        batch_size=batch_size,
        position=position,  # type: ignore[arg-type]  # checked above
        raw=raw,
        truncate=not no_truncate,
        stop_on_error=on_error == "fail",
    )
    if baseline_model is not None:
        from safety_lens_cli.cli.scan_compare import comparison_run

        run: _ScanRun = comparison_run(
            lm, candidate_request, source, max_shift or [], sequential, bootstrap_seed,
            vectors, options, thresholds, on_error, fmt, output, resume,
        )
        source = run.source  # type: ignore[attr-defined]  # stdin may be spooled to a file
    else:
        run = _ScanRun(lm, vectors, options, thresholds, on_error, fmt, output, resume)
    verdict = run.execute(source, rule, summary, junit)
    raise typer.Exit(verdict.exit_code)


@dataclass
class _Source:
    """Input source: a name for the summary, and a reader that yields the input items."""

    name: str
    path: Path | None
    texts: list[str] | None
    fmt: str
    field: str | None
    keep_fields: bool
    shard: Shard | None

    def items(self, counts: ReadCounts) -> Iterator[InputItem]:
        from safety_lens_cli.inputs import read_records, records_from_texts

        if self.texts is not None:
            for item in records_from_texts(self.texts):
                counts.lines += 1
                yield item
            return
        yield from read_records(
            self.path if self.path is not None else "-",
            fmt=self.fmt,  # type: ignore[arg-type]  # checked by _parse_formats
            field=self.field,
            keep_fields=self.keep_fields,
            shard=self.shard,
            counts=counts,
        )


def _input_source(
    texts: list[str] | None, input_path: str | None, fmt: _Formats, field: str | None, keep_fields: bool, shard: Shard | None
) -> _Source:
    if fmt.input == "text" and (field is not None or keep_fields):
        raise UsageError("--field and --keep-fields apply to JSON Lines input, not --format text.")
    if texts:
        if input_path is not None:
            raise UsageError("Pass either --text or --input, not both.")
        if shard is not None:
            raise UsageError("--shard splits an --input file: it does not apply to --text.")
        return _Source("--text", None, list(texts), fmt.input, None, False, None)
    if input_path is None:
        if sys.stdin.isatty():
            raise UsageError("No input: pass --input FILE, --input - for stdin, or --text PROMPT.")
        input_path = "-"
    if input_path == "-":
        return _Source("<stdin>", None, None, fmt.input, field, keep_fields, shard)
    path = Path(input_path)
    if not path.is_file():
        raise InputError(f"Input file '{path}' not found: check the path given to --input.")
    return _Source(str(path), path, None, fmt.input, field, keep_fields, shard)


class _ScanRun:
    """One scan from records to output, summary and verdict."""

    def __init__(
        self,
        lm: LoadedModel,
        vectors: Sequence[PersonaVector],
        options: ScanOptions,
        thresholds: Thresholds,
        on_error: str,
        fmt: _Formats,
        output: Path | None,
        resume: bool,
    ) -> None:
        from safety_lens_cli.gating import check_threshold_personas, new_stats
        from safety_lens_cli.scanning import RecordEncoder, score_columns

        self.lm = lm
        self.options = options
        self.thresholds = thresholds
        self.on_error = on_error
        self.fmt = fmt
        self.output = output
        self.resume = resume
        self.columns: list[ScoreColumn] = score_columns(lm, vectors)
        check_threshold_personas(thresholds, [c.vector.persona for c in self.columns])
        self.encoder = RecordEncoder(lm, options)
        self.stats: ScanStats = new_stats([(c.key, c.vector.persona, c.layer) for c in self.columns], thresholds)
        self.table_rows: list[list[str]] = []
        self.warnings = 0

    def execute(self, source: _Source, rule: GateRule | None, summary: Path | None, junit: Path | None) -> Verdict:
        from safety_lens_cli.gating import evaluate_gate
        from safety_lens_cli.inputs import ReadCounts
        from safety_lens_cli.scan_reports import SummaryContext

        counts = ReadCounts()
        context = SummaryContext(self.lm.model_id, source.name, str(source.shard) if source.shard else None)
        writer, handle, done_ids = self._open_writer()
        failure: BaseException | None = None
        try:
            with _progress(source.path) as advance:
                items = _skip_done(source.items(counts), done_ids, self.stats)
                failure = self._consume(items, writer, advance, counts)
        except BaseException as exc:  # recorded in the summary, then raised again below
            failure = exc
            self.stats.stopped = _stop_reason(exc)
        finally:
            if handle is not None:
                handle.close()
        self.stats.lines = counts.lines
        self.stats.blank = counts.blank
        self.stats.other_shards = counts.other_shards
        if self.fmt.table:
            _print_table(self.columns, self.table_rows)
        verdict = evaluate_gate(rule, self.stats)
        self._report(verdict, context, summary, junit)
        if failure is not None:
            raise failure
        return verdict

    def _open_writer(self) -> tuple[JsonlWriter | None, IO[str] | None, set[str]]:
        from safety_lens_cli.scan_output import (
            JsonlWriter,
            check_resume_header,
            fold_previous,
            header_record,
            open_output,
            read_resume_state,
        )

        header = header_record(
            model=model_header(self.lm),
            rendering=self.encoder.rendering.kind,
            columns=self.columns,
            thresholds=self.thresholds,
            options=self.options,
        )
        header["header"].update(self._header_extra())
        if self.output is None:
            if self.fmt.table:
                return None, None, set()
            writer = JsonlWriter(sys.stdout)
            writer.write(header)
            return writer, None, set()
        state = read_resume_state(self.output) if self.resume else None
        if state is not None:
            check_resume_header(state, header)
            fold_previous(state, self.stats)
        handle = open_output(self.output, state)
        writer = JsonlWriter(handle)
        if state is None or state.header is None:
            writer.write(header)
        return writer, handle, state.done_ids if state is not None else set()

    def _header_extra(self) -> dict[str, Any]:
        """Fields a subclass adds to the header record."""
        return {}

    def _consume(
        self, items: Iterator[InputItem], writer: JsonlWriter | None, advance: Advance, counts: ReadCounts
    ) -> InputError | None:
        """Write a record per result; return the error that stopped the scan under `--on-error fail`."""
        from safety_lens_cli.inputs import InputProblem
        from safety_lens_cli.scan_output import result_record
        from safety_lens_cli.scanning import scan_records

        for result in scan_records(self.lm, self.columns, items, self.options, encoder=self.encoder):
            if isinstance(result, InputProblem):
                stop = self._handle_problem(result, writer)
                if stop is not None:
                    return stop
            else:
                record = result_record(result, self.thresholds, self.columns)
                self._handle_record(record, writer, result.record.label, result.truncated_from)
            advance(counts)
        return None

    def _handle_problem(self, problem: InputProblem, writer: JsonlWriter | None) -> InputError | None:
        """Apply --on-error to a bad line; return the error that stops the scan under `fail`."""
        from safety_lens_cli.scan_output import error_record

        if self.on_error == "fail":
            self.stats.add_error(problem.describe(), recorded=False)
            self.stats.stopped = f"stopped at {problem.describe()}"
            return InputError(
                f"{problem.describe()}. The lines before it were scanned; pass --on-error skip or "
                "--on-error record to go on past bad lines."
            )
        recorded = self.on_error == "record"
        if recorded and writer is not None:
            writer.write(error_record(problem))
        self.stats.add_error(problem.describe(), recorded=recorded)
        self._warn(f"{problem.describe()} ({'recorded' if recorded else 'skipped'})")
        return None

    def _handle_record(
        self, record: dict[str, Any], writer: JsonlWriter | None, label: int | None, truncated_from: int | None
    ) -> None:
        """Write a scored line's record and count it in the statistics."""
        if writer is not None:
            writer.write(record)
        scores = {key: (entry["score"], entry["flagged"]) for key, entry in record["scores"].items()}
        self.stats.add_scores(scores, label)
        self.stats.truncated += int(truncated_from is not None)
        if self.fmt.table:
            self.table_rows.append(_table_row(record, self.columns))

    def _warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_LINE_WARNINGS:
            log.warning(message)
        if self.warnings == MAX_LINE_WARNINGS:
            log.warning("Further bad lines are not shown one by one; the summary counts them.")

    def _report(self, verdict: Verdict, context: SummaryContext, summary: Path | None, junit: Path | None) -> None:
        from safety_lens_cli.scan_reports import (
            append_github_summary,
            junit_xml,
            summary_markdown,
            summary_text,
            write_report,
        )

        err_console.print(summary_text(self.stats, verdict, context), markup=False)
        markdown = summary_markdown(self.stats, verdict, context)
        if summary is not None:
            write_report(summary, markdown)
        append_github_summary(markdown)
        if junit is not None:
            write_report(junit, junit_xml(self.stats, verdict, context))


def _skip_done(items: Iterator[InputItem], done_ids: set[str], stats: ScanStats) -> Iterator[InputItem]:
    from safety_lens_cli.scan_output import id_key

    for item in items:
        if done_ids and id_key(item.id) in done_ids:
            stats.already_done += 1
            continue
        yield item


def _stop_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"stopped by an error: {text}"


@contextmanager
def _progress(path: Path | None) -> Iterator[Advance]:
    """Show a progress bar over the input's bytes when stderr is a terminal, else do nothing."""
    if not err_console.is_terminal:
        yield lambda counts: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    total = path.stat().st_size if path is not None else None
    columns = [TextColumn("Scanning"), BarColumn(), TextColumn("{task.fields[lines]} lines"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("scan", total=total, lines=0)

        def advance(counts: ReadCounts) -> None:
            progress.update(task, completed=counts.bytes_read, lines=counts.lines)

        yield advance


def _table_row(record: dict[str, Any], columns: list[ScoreColumn]) -> list[str]:
    cells = [str(record["line"]), str(record["id"])]
    for column in columns:
        entry = record["scores"][column.key]
        cells.append(f"{entry['score']:.3f}" + (" *" if entry["flagged"] else ""))
    cells.append("yes" if record["flagged"] else "")
    return cells


def _print_table(columns: list[ScoreColumn], rows: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold", caption="* score at or above the threshold")
    table.add_column("line", justify="right")
    table.add_column("id")
    for column in columns:
        table.add_column(f"{column.key} (L{column.layer})", justify="right")
    table.add_column("flagged")
    for row in rows:
        table.add_row(*row)
    out_console.print(table)
