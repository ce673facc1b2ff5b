"""`safety-lens scan --baseline-model`: the scan run extended to a candidate-versus-baseline comparison."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safety_lens_cli.cli.common import err_console
from safety_lens_cli.cli.inspect_layers import model_header
from safety_lens_cli.cli.scan import _ScanRun, _Source
from safety_lens_cli.errors import InputError

if TYPE_CHECKING:
    from safety_lens_cli.comparison import MaxShift, ShiftGate
    from safety_lens_cli.gating import GateRule, Verdict
    from safety_lens_cli.inputs import InputItem, ReadCounts
    from safety_lens_cli.models import LoadedModel
    from safety_lens_cli.scan_output import JsonlWriter
    from safety_lens_cli.scan_reports import SummaryContext


@dataclass(frozen=True)
class CompareVerdict:
    """The scan's threshold gate and the shift gates; the exit code comes from both."""

    scan: Verdict
    shifts: tuple[ShiftGate, ...]

    @property
    def passed(self) -> bool:
        return self.scan.passed and all(gate.passed for gate in self.shifts)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


class CompareRun(_ScanRun):
    """Reads every input with the baseline and the candidate along the baseline's vectors.

    Records are the candidate's scan records with `baseline` and `shift`
    added per persona. The summary adds each persona's mean shift with a
    bootstrap confidence interval and a paired t-test.
    """

    def __init__(
        self,
        baseline: LoadedModel,
        load_candidate: Callable[[], LoadedModel],
        candidate_info: dict[str, Any],
        sequential: bool,
        limits: MaxShift,
        seed: int,
        source: _Source,
        *args: Any,
    ) -> None:
        from safety_lens_cli.comparison import ShiftCollector

        super().__init__(baseline, *args)
        self.load_candidate = load_candidate
        self.candidate_info = candidate_info
        self.sequential = sequential
        self.source = source
        self.collector = ShiftCollector(self.columns, limits, seed)
        self.shift_gates: tuple[ShiftGate, ...] = ()

    def execute(self, source: _Source, rule: GateRule | None, summary: Path | None, junit: Path | None) -> CompareVerdict:  # type: ignore[override]
        verdict = super().execute(source, rule, summary, junit)
        return CompareVerdict(verdict, self.shift_gates)

    def _header_extra(self) -> dict[str, Any]:
        from safety_lens_cli.comparison import SEQUENTIAL_RULE

        return {
            "comparison": {
                "baseline": model_header(self.lm),
                "candidate": self.candidate_info,
                "vectors_from": "baseline",
                "shift": "candidate minus baseline, per persona, on the raw and calibrated scales",
                "sequential": self.sequential,
                "sequential_rule": SEQUENTIAL_RULE,
            }
        }

    def _consume(
        self, items: Iterator[InputItem], writer: JsonlWriter | None, advance: Callable[[ReadCounts], None], counts: ReadCounts
    ) -> InputError | None:
        from safety_lens_cli.comparison import PairedLine, compare_in_memory, compare_sequential, paired_record
        from safety_lens_cli.inputs import InputProblem
        if self.sequential:
            # The first pass consumes `items` (which counts the lines); the
            # second reads the same source again without counting.
            from safety_lens_cli.inputs import ReadCounts

            passes = iter([items, self.source.items(ReadCounts())])
            results = compare_sequential(self.lm, self.load_candidate, self.columns, lambda: next(passes), self.options)
        else:
            results = compare_in_memory(self.lm, self.load_candidate(), self.columns, items, self.options)

        for result in results:
            if isinstance(result, InputProblem):
                stop = self._handle_problem(result, writer)
                if stop is not None:
                    return stop
            else:
                assert isinstance(result, PairedLine)
                record = paired_record(result, self.thresholds, self.columns)
                self._handle_record(record, writer, result.record.label, result.truncated_from)
                self.collector.add(result)
            advance(counts)
        return None

    def _report(self, verdict: Verdict, context: SummaryContext, summary: Path | None, junit: Path | None) -> None:
        from safety_lens_cli.scan_reports import (
            append_github_summary,
            junit_xml,
            summary_markdown,
            summary_text,
            write_report,
        )

        self.shift_gates = tuple(self.collector.gates()) if self.stats.complete else ()
        text = summary_text(self.stats, verdict, context)
        text += "\n" + "\n".join(self._shift_lines())
        err_console.print(text, markup=False)
        markdown = summary_markdown(self.stats, verdict, context) + "\n" + self._shift_markdown()
        if summary is not None:
            write_report(summary, markdown)
        append_github_summary(markdown)
        if junit is not None:
            write_report(junit, self._junit(junit_xml(self.stats, verdict, context)))

    def _shift_lines(self) -> list[str]:
        candidate = self.candidate_info.get("model_id")
        lines = [f"Shift of candidate '{candidate}' against baseline '{self.lm.model_id}' (calibrated scale):"]
        if not self.shift_gates:
            return [*lines, "  not computed: the comparison did not complete."]
        lines += [f"  {gate.describe()}" for gate in self.shift_gates]
        gated = [gate for gate in self.shift_gates if gate.gated]
        if gated:
            failed = [gate.key for gate in gated if not gate.passed]
            verdict = f"Shift gate FAILED for {', '.join(failed)}." if failed else "Shift gate passed."
            lines.append(
                f"{verdict} Rule: fail when the lower end of the 95% bootstrap CI of the mean shift exceeds --max-shift."
            )
        return lines

    def _shift_markdown(self) -> str:
        out = ["### Baseline comparison", "", f"Candidate `{self.candidate_info.get('model_id')}` against baseline `{self.lm.model_id}`, along the baseline's vectors; shift = candidate - baseline on the calibrated scale.", ""]
        if not self.shift_gates:
            return "\n".join([*out, "Not computed: the comparison did not complete.", ""])
        out += ["| persona | lines | mean shift | 95% CI | paired t-test p | max shift | result |", "|---|---|---|---|---|---|---|"]
        for gate in self.shift_gates:
            s = gate.stats
            p = f"{s.p_value:.3g}" if s.p_value is not None else "-"
            limit = f"{gate.limit:g}" if gate.limit is not None else "-"
            if not gate.gated:
                result = "no gate"
            else:
                result = "passed" if gate.passed else "FAILED"
            out.append(f"| {gate.key} | {s.n} | {s.mean:+.4f} | [{s.ci_low:+.4f}, {s.ci_high:+.4f}] | {p} | {limit} | {result} |")
        out.append("")
        return "\n".join(out) + "\n"

    def _junit(self, xml_text: str) -> str:
        root = ET.fromstring(xml_text.split("?>", 1)[1] if xml_text.startswith("<?xml") else xml_text)
        suite = root.find("testsuite")
        assert suite is not None
        failures = int(suite.get("failures", "0"))
        errors = int(suite.get("errors", "0"))
        for gate in self.shift_gates:
            case = ET.SubElement(suite, "testcase", classname="safety-lens.scan.shift", name=gate.key)
            if gate.gated and not gate.passed:
                ET.SubElement(case, "failure", message=gate.describe(), type="shift")
                failures += 1
            ET.SubElement(case, "system-out").text = gate.describe()
        if not self.shift_gates and self.collector.limits.enabled:
            case = ET.SubElement(suite, "testcase", classname="safety-lens.scan.shift", name="comparison")
            ET.SubElement(case, "error", message="Comparison incomplete", type="incomplete")
            errors += 1
        tests = len(suite.findall("testcase"))
        for element in (suite, root):
            element.set("tests", str(tests))
            element.set("failures", str(failures))
            element.set("errors", str(errors))
        ET.indent(root)
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def comparison_run(
    baseline: LoadedModel,
    candidate_request: Any,
    source: _Source,
    max_shift: list[str],
    sequential: bool | None,
    seed: int,
    *scan_args: Any,
) -> CompareRun:
    """Build the comparison run: decide sequential mode and make the input readable twice."""
    import dataclasses
    import sys

    from safety_lens_cli.comparison import needs_sequential, parse_max_shift, spool_stdin
    from safety_lens_cli.errors import ModelLoadError, RuntimeFailure
    from safety_lens_cli.models import load_model, resolve_source, source_fingerprint

    limits = parse_max_shift(max_shift)
    candidate_source = resolve_source(candidate_request.model)
    info = {
        "model_id": candidate_source.display_id,
        "fingerprint": source_fingerprint(candidate_source),
        "revision": candidate_request.revision,
    }
    if sequential is None:
        sequential = needs_sequential(baseline)
        if sequential:
            err_console.print("The candidate would not fit beside the baseline: scanning one model at a time.", markup=False)
    if sequential and source.texts is None and source.path is None:
        spooled = spool_stdin(sys.stdin.buffer)
        source = dataclasses.replace(source, path=spooled)

    def load_candidate() -> LoadedModel:
        try:
            return load_model(candidate_request)
        except ModelLoadError as exc:
            raise RuntimeFailure(str(exc)) from exc

    return CompareRun(baseline, load_candidate, info, sequential, limits, seed, source, *scan_args)
