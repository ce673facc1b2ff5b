"""Scan summaries for people and CI: plain text, Markdown and JUnit XML.

All three are rendered from the same `ScanStats` and `Verdict`, so the counts,
rates and gate outcome agree wherever they are read.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from safety_lens_cli.errors import UsageError
from safety_lens_cli.gating import ColumnStats, ScanStats, Verdict

GITHUB_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
JUNIT_SUITE = "safety-lens scan"


@dataclass(frozen=True)
class SummaryContext:
    """Names shown in the summary besides the counts: the model and the input."""

    model_id: str
    input_name: str
    shard: str | None = None


def count_line(stats: ScanStats) -> str:
    """Describe the line counts in one sentence; they add up to the input lines."""
    parts = [f"{stats.scored} scored"]
    if stats.already_done:
        parts.append(f"{stats.already_done} already in the output")
    parts.append(f"{stats.errors} not scored ({stats.skipped} skipped, {stats.recorded} recorded as errors)")
    not_reached = stats.lines - stats.scored - stats.errors - stats.already_done
    if not_reached:
        parts.append(f"{not_reached} not reached")
    text = f"{_count(stats.lines, 'input line')}: " + ", ".join(parts) + "."
    extras = []
    if stats.blank:
        extras.append(f"{_count(stats.blank, 'blank line')} ignored")
    if stats.other_shards:
        extras.append(f"{_count(stats.other_shards, 'line')} left to other shards")
    if stats.truncated:
        extras.append(f"{_count(stats.truncated, 'input')} truncated to the model context")
    if stats.previous_scored or stats.previous_errors:
        extras.append(
            f"the output already held {stats.previous_scored} scored and {stats.previous_errors} error "
            "records, included in the rates and the gate"
        )
    if extras:
        text += " " + "; ".join(extras).capitalize() + "."
    return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _rate(column: ColumnStats) -> str:
    if column.scored == 0:
        return "-"
    return f"{column.flagged / column.scored * 100:.1f}%"


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def column_rows(stats: ScanStats) -> list[list[str]]:
    """Rows of the per-persona table: key, layer, threshold, flagged, rate, AUROC, accuracy, labelled."""
    rows = []
    for column in stats.columns.values():
        rows.append(
            [
                column.key,
                str(column.layer),
                f"{column.threshold:g}",
                f"{column.flagged}/{column.scored}",
                _rate(column),
                _metric(column.auroc()),
                _metric(column.accuracy()),
                str(len(column.labels)),
            ]
        )
    return rows


COLUMN_HEADERS = ["persona", "layer", "threshold", "flagged", "flagged rate", "AUROC", "accuracy", "labelled"]


def status_line(stats: ScanStats, verdict: Verdict | None) -> str:
    if not stats.complete:
        return f"Scan incomplete: {stats.stopped}. Gate not evaluated."
    if verdict is None:
        return "No gate set (pass --fail-on-flag or --max-flagged-rate to gate)."
    return verdict.describe()


def summary_text(stats: ScanStats, verdict: Verdict | None, context: SummaryContext) -> str:
    """Render the summary that is printed on stderr at the end of a scan."""
    lines = [f"Scan of {context.input_name} with {context.model_id}" + (f", shard {context.shard}" if context.shard else "")]
    lines.append(count_line(stats))
    widths = [max(len(row[i]) for row in [COLUMN_HEADERS, *column_rows(stats)]) for i in range(len(COLUMN_HEADERS))]
    for row in [COLUMN_HEADERS, *column_rows(stats)]:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.append("Flagged rates are over scored lines; AUROC and accuracy over scored lines with a label.")
    if stats.error_samples:
        lines.append(f"Lines not scored ({stats.errors + stats.previous_errors}):")
        lines.extend(f"  {sample}" for sample in stats.error_samples[:10])
        hidden = stats.errors + stats.previous_errors - min(len(stats.error_samples), 10)
        if hidden > 0:
            lines.append(f"  ... and {hidden} more")
    if verdict is not None and verdict.gates and stats.complete:
        lines.append("Gates:")
        lines.extend(f"  {gate.describe()}" for gate in verdict.gates)
    lines.append(status_line(stats, verdict))
    return "\n".join(lines)


def summary_markdown(stats: ScanStats, verdict: Verdict | None, context: SummaryContext) -> str:
    """Render the summary as Markdown, for `--summary` and GitHub's step summary."""
    if not stats.complete:
        title = "incomplete"
    elif verdict is None or verdict.rule is None:
        title = "no gate"
    else:
        title = "passed" if verdict.passed else "failed"
    out = [f"## safety-lens scan: {title}", ""]
    out.append(f"Input `{context.input_name}`, model `{context.model_id}`" + (f", shard {context.shard}" if context.shard else "") + ".")
    out.append("")
    out.append(count_line(stats))
    out.append("")
    out.append("| " + " | ".join(COLUMN_HEADERS) + " |")
    out.append("|" + "---|" * len(COLUMN_HEADERS))
    for row in column_rows(stats):
        out.append("| " + " | ".join(_md_cell(cell) for cell in row) + " |")
    out.append("")
    if verdict is not None and verdict.gates and stats.complete:
        out.extend(f"- {_md_cell(gate.describe())}" for gate in verdict.gates)
        out.append("")
    out.append(f"**{_md_cell(status_line(stats, verdict))}**")
    if stats.error_samples:
        out.append("")
        out.append("<details><summary>Lines not scored</summary>")
        out.append("")
        out.extend(f"- {_md_cell(sample)}" for sample in stats.error_samples)
        hidden = stats.errors + stats.previous_errors - len(stats.error_samples)
        if hidden > 0:
            out.append(f"- ... and {hidden} more")
        out.append("")
        out.append("</details>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def junit_xml(stats: ScanStats, verdict: Verdict | None, context: SummaryContext) -> str:
    """Render JUnit XML: one test case per persona gate, plus one for lines that could not be scored.

    A failed gate is a `<failure>`. Unscored lines and an incomplete scan are
    `<error>`s, because they are problems with the run, not with the model.
    """
    suite = ET.Element("testsuite", name=JUNIT_SUITE)
    failures = 0
    errors = 0
    gates = {gate.key: gate for gate in verdict.gates} if verdict is not None else {}
    for key, column in stats.columns.items():
        case = ET.SubElement(suite, "testcase", classname="safety-lens.scan.gate", name=key)
        gate = gates.get(key)
        rate = _rate(column)
        detail = f"{column.flagged}/{column.scored} scored lines flagged ({rate}) at threshold {column.threshold:g}"
        if not stats.complete:
            ET.SubElement(case, "error", message=f"Scan incomplete: {stats.stopped}", type="incomplete")
            errors += 1
        elif gate is not None and not gate.passed:
            assert verdict is not None and verdict.rule is not None
            failure = ET.SubElement(case, "failure", message=gate.describe(), type="gate")
            failure.text = f"{detail}. Rule: {verdict.rule.describe()}."
            failures += 1
        system_out = ET.SubElement(case, "system-out")
        system_out.text = detail + (f"; {gate.describe()}" if gate is not None else "; no gate set")

    unscored = stats.errors + stats.previous_errors
    input_case = ET.SubElement(suite, "testcase", classname="safety-lens.scan.input", name="unscored lines")
    if unscored:
        error = ET.SubElement(
            input_case, "error", message=f"{_count(unscored, 'input line')} could not be scored", type="input"
        )
        listed = "\n".join(stats.error_samples)
        hidden = unscored - len(stats.error_samples)
        error.text = listed + (f"\n... and {hidden} more" if hidden > 0 else "")
        errors += 1

    suite.set("tests", str(len(stats.columns) + 1))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", "0")
    root = ET.Element("testsuites", name=JUNIT_SUITE, tests=suite.get("tests", "0"), failures=str(failures), errors=str(errors))
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_report(path: Path, text: str, *, append: bool = False) -> None:
    try:
        with open(path, "a" if append else "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise UsageError(f"Report file '{path}' cannot be written: {exc.strerror}.") from None


def append_github_summary(markdown: str) -> Path | None:
    """Append to `$GITHUB_STEP_SUMMARY` when GitHub Actions sets it; returns the file written."""
    target = os.environ.get(GITHUB_SUMMARY_ENV, "").strip()
    if not target:
        return None
    path = Path(target)
    write_report(path, markdown, append=True)
    return path
