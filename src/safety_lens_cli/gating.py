"""Thresholds, scan statistics and the CI gate.

A line is flagged on a persona when its calibrated score is at or above that
persona's threshold. The gate fails for a persona when the share of lines
flagged on it or not scored at all is above the allowed rate.
`--fail-on-flag` allows a rate of 0. Lines that could not be scored count
against every persona, so bad input never passes a gate unnoticed.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from safety_lens_cli.errors import UsageError
from safety_lens_cli.metrics import accuracy, auroc

DEFAULT_THRESHOLD = 0.5
# Line errors kept word for word for the summary and JUnit; the rest are only counted.
MAX_ERROR_SAMPLES = 100


@dataclass(frozen=True)
class Thresholds:
    """Calibrated-score thresholds: one default and per-persona overrides."""

    default: float = DEFAULT_THRESHOLD
    per_persona: Mapping[str, float] = field(default_factory=dict)

    def for_persona(self, persona: str) -> float:
        return self.per_persona.get(persona, self.default)


def parse_thresholds(specs: Sequence[str]) -> Thresholds:
    """Parse `--threshold` values: `0.7` sets the default, `sycophancy=0.7` one persona."""
    default = DEFAULT_THRESHOLD
    default_set = False
    per_persona: dict[str, float] = {}
    for spec in specs:
        name, sep, value_text = spec.rpartition("=")
        value = _parse_threshold_value(spec, value_text)
        if not sep:
            if default_set:
                raise UsageError(f"--threshold '{spec}' sets the default threshold a second time: give it once.")
            default, default_set = value, True
            continue
        name = name.strip()
        if not name:
            raise UsageError(f"Invalid --threshold '{spec}': use a number, or PERSONA=NUMBER.")
        if name in per_persona:
            raise UsageError(f"--threshold for persona '{name}' is given twice: give it once.")
        per_persona[name] = value
    return Thresholds(default, per_persona)


def _parse_threshold_value(spec: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(
            f"Invalid --threshold '{spec}': use a number such as 0.5, or PERSONA=NUMBER."
        ) from None
    if not math.isfinite(value):
        raise UsageError(f"Invalid --threshold '{spec}': the value must be a finite number.")
    return value


def check_threshold_personas(thresholds: Thresholds, personas: Sequence[str]) -> None:
    """Reject a per-persona threshold for a persona that is not scanned, since it would silently do nothing."""
    unknown = sorted(set(thresholds.per_persona) - set(personas))
    if unknown:
        raise UsageError(
            f"--threshold names persona '{unknown[0]}', which is not scanned: scanned personas are "
            f"{', '.join(sorted(set(personas)))}."
        )


@dataclass(frozen=True)
class GateRule:
    """Fail a persona's gate when (flagged + unscored lines) / lines > `max_rate`.

    `option` is how the user set the rule, for the summary.
    """

    max_rate: float
    option: str

    def describe(self) -> str:
        return (
            f"fail when the share of lines flagged on a persona, or not scored, is above "
            f"{_percent(self.max_rate)} ({self.option})"
        )


def gate_rule(fail_on_flag: bool, max_flagged_rate: float | None) -> GateRule | None:
    """Build the gate rule that the options request, or return None when no gate is on."""
    if fail_on_flag and max_flagged_rate is not None:
        raise UsageError("--fail-on-flag and --max-flagged-rate both set a gate: give only one.")
    if fail_on_flag:
        return GateRule(0.0, "--fail-on-flag")
    if max_flagged_rate is None:
        return None
    if not 0.0 <= max_flagged_rate <= 1.0 or math.isnan(max_flagged_rate):
        raise UsageError(
            f"Invalid --max-flagged-rate {max_flagged_rate}: use a fraction from 0 to 1, for example 0.05."
        )
    return GateRule(max_flagged_rate, f"--max-flagged-rate {max_flagged_rate:g}")


@dataclass
class ColumnStats:
    """Flag counts of one score key, and the scores of labelled lines for AUROC."""

    key: str
    persona: str
    layer: int
    threshold: float
    scored: int = 0
    flagged: int = 0
    labelled_scores: array[float] = field(default_factory=lambda: array("d"))
    labelled_flags: array[int] = field(default_factory=lambda: array("b"))
    labels: array[int] = field(default_factory=lambda: array("b"))

    def add(self, score: float, flagged: bool, label: int | None) -> None:
        self.scored += 1
        self.flagged += int(flagged)
        if label is not None:
            self.labelled_scores.append(score)
            self.labelled_flags.append(int(flagged))
            self.labels.append(label)

    def auroc(self) -> float | None:
        return auroc(list(self.labelled_scores), list(self.labels))

    def accuracy(self) -> float | None:
        # The flags are 0 or 1, so `flag > 0.5` is exactly the `flagged` field written in each record.
        return accuracy([float(f) for f in self.labelled_flags], list(self.labels), 0.5)


@dataclass
class ScanStats:
    """Counts of one scan; they add up to the input lines read.

    `lines` = `scored` + `skipped` + `recorded` + `already_done` + lines not
    reached when the scan stopped early. `previous_*` count what an earlier run
    wrote to the same output, which `--resume` folds into the gate.
    """

    columns: dict[str, ColumnStats]
    lines: int = 0
    scored: int = 0
    skipped: int = 0
    recorded: int = 0
    already_done: int = 0
    truncated: int = 0
    blank: int = 0
    other_shards: int = 0
    previous_scored: int = 0
    previous_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the scan ended before the input did

    @property
    def errors(self) -> int:
        return self.skipped + self.recorded

    @property
    def gate_lines(self) -> int:
        """Lines the gate covers: this run's lines plus an earlier run's, minus those not reached."""
        return self.scored + self.errors + self.previous_scored + self.previous_errors

    @property
    def unscored(self) -> int:
        return self.errors + self.previous_errors

    @property
    def complete(self) -> bool:
        return self.stopped is None

    def add_scores(self, scores: Mapping[str, tuple[float, bool]], label: int | None, *, previous: bool = False) -> None:
        """Count one scored line; `scores` maps a key to (calibrated score, flagged)."""
        if previous:
            self.previous_scored += 1
        else:
            self.scored += 1
        for key, (score, flagged) in scores.items():
            column = self.columns.get(key)
            if column is not None:
                column.add(score, flagged, label)

    def add_error(self, description: str, *, recorded: bool, previous: bool = False) -> None:
        if previous:
            self.previous_errors += 1
        elif recorded:
            self.recorded += 1
        else:
            self.skipped += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(description)


def new_stats(columns: Sequence[tuple[str, str, int]], thresholds: Thresholds) -> ScanStats:
    """Empty statistics for score keys given as (key, persona, layer)."""
    return ScanStats(
        columns={
            key: ColumnStats(key, persona, layer, thresholds.for_persona(persona)) for key, persona, layer in columns
        }
    )


@dataclass(frozen=True)
class GateResult:
    """One persona's gate: `bad` lines (flagged or unscored) out of `lines`."""

    key: str
    bad: int
    lines: int
    max_rate: float

    @property
    def rate(self) -> float:
        return self.bad / self.lines if self.lines else 0.0

    @property
    def passed(self) -> bool:
        return self.rate <= self.max_rate

    def describe(self) -> str:
        relation = "<=" if self.passed else ">"
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{self.key}: {self.bad}/{self.lines} = {_percent(self.rate)} {relation} "
            f"{_percent(self.max_rate)}: {verdict}"
        )


@dataclass(frozen=True)
class Verdict:
    """The outcome that both the printed verdict and the exit code come from."""

    rule: GateRule | None
    gates: tuple[GateResult, ...]

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def describe(self) -> str:
        if self.rule is None:
            return "No gate set (pass --fail-on-flag or --max-flagged-rate to gate)."
        failed = [gate.key for gate in self.gates if not gate.passed]
        if failed:
            return f"Gate FAILED for {', '.join(failed)}: {self.rule.describe()}."
        return f"Gate passed: {self.rule.describe()}."


def evaluate_gate(rule: GateRule | None, stats: ScanStats) -> Verdict:
    """Compare each persona's share of flagged or unscored lines with the rule's maximum."""
    if rule is None:
        return Verdict(None, ())
    lines = stats.gate_lines
    gates = tuple(
        GateResult(key, column.flagged + stats.unscored, lines, rule.max_rate)
        for key, column in stats.columns.items()
    )
    return Verdict(rule, gates)


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%" if value * 100 == round(value * 100, 1) else f"{value * 100:.3g}%"
