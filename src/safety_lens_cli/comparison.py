"""Compare a candidate checkpoint with its baseline along the baseline's persona vectors.

Every input is read by both models and scored on the same vectors (those of
the baseline), so the per-line difference measures how far fine-tuning moved
the candidate's activations along each trait direction. Shifts are on the
calibrated scale: a shift of 1 is the distance between the vector's negative
and positive stimulus means on the baseline.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safety_lens_cli.errors import ModelMismatchError, UsageError
from safety_lens_cli.gating import Thresholds
from safety_lens_cli.inputs import InputItem, InputProblem, InputRecord
from safety_lens_cli.metrics import ShiftStatistics, paired_shift
from safety_lens_cli.projection import PersonaScore
from safety_lens_cli.scan_output import result_record
from safety_lens_cli.scanning import ScanOptions, ScoreColumn, ScoredLine, scan_records

if TYPE_CHECKING:
    from safety_lens_cli.models import LoadedModel

log = logging.getLogger(__name__)

# With the baseline loaded, the candidate is loaded beside it only when its
# size (taken equal to the baseline's) times this margin, which leaves room
# for activations, fits in the memory still available on the device.
MEMORY_MARGIN = 1.25
SEQUENTIAL_RULE = (
    f"sequential when the baseline's parameter bytes x {MEMORY_MARGIN} exceed the memory still available "
    "after loading it (MemAvailable on CPU, free CUDA memory on GPU)"
)
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class PairedLine:
    """One input scored by both models on the same vectors."""

    record: InputRecord
    candidate: dict[str, PersonaScore]
    baseline: dict[str, PersonaScore]
    truncated_from: int | None = None

    def shift(self, key: str) -> float:
        return self.candidate[key].score - self.baseline[key].score


PairedResult = PairedLine | InputProblem


@dataclass(frozen=True)
class ModelShape:
    """What must match for a candidate to be read along a baseline's vectors."""

    model_id: str
    architecture: str
    num_layers: int
    hidden_size: int

    @classmethod
    def of(cls, lm: LoadedModel) -> ModelShape:
        return cls(lm.model_id, type(lm.model).__name__, lm.num_layers, lm.hidden_size)

    def describe(self) -> str:
        return f"'{self.model_id}' ({self.architecture}, {self.num_layers} blocks, hidden size {self.hidden_size})"


def check_same_shape(baseline: ModelShape, candidate: ModelShape) -> None:
    """Raise unless the candidate has the baseline's architecture, block count and hidden size."""
    if (baseline.architecture, baseline.num_layers, baseline.hidden_size) != (
        candidate.architecture,
        candidate.num_layers,
        candidate.hidden_size,
    ):
        raise ModelMismatchError(
            f"Candidate {candidate.describe()} does not match baseline {baseline.describe()}: "
            "compare checkpoints of the same architecture."
        )


def parameter_bytes(lm: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in lm.model.parameters())


def available_memory(device: str) -> int | None:
    """Bytes free for a second model on `device`, or None when unknown."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def needs_sequential(baseline: LoadedModel) -> bool:
    """Apply `SEQUENTIAL_RULE` with the baseline loaded; unknown memory means sequential."""
    available = available_memory(str(baseline.device))
    return available is None or parameter_bytes(baseline) * MEMORY_MARGIN > available


def _paired(base: ScoredLine | InputProblem, cand: ScoredLine | InputProblem) -> PairedResult:
    if isinstance(base, InputProblem):
        return base
    if isinstance(cand, InputProblem):
        return cand
    return PairedLine(base.record, cand.scores, base.scores, cand.truncated_from)


def _chunks(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    chunk: list[InputItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def compare_in_memory(
    baseline: LoadedModel,
    candidate: LoadedModel,
    columns: Sequence[ScoreColumn],
    items: Iterable[InputItem],
    options: ScanOptions,
) -> Iterator[PairedResult]:
    """Read each chunk of inputs with both models loaded at once, in input order."""
    check_same_shape(ModelShape.of(baseline), ModelShape.of(candidate))
    size = options.batch_size * options.chunk_batches
    for chunk in _chunks(items, size):
        base = list(scan_records(baseline, columns, chunk, options))
        cand = list(scan_records(candidate, columns, chunk, options))
        for pair in zip(base, cand):
            result = _paired(*pair)
            yield result
            if options.stop_on_error and isinstance(result, InputProblem):
                return
        if len(base) < len(chunk):  # the baseline pass stopped at a problem
            return


def _dump(result: ScoredLine | InputProblem) -> str:
    if isinstance(result, InputProblem):
        return json.dumps({"problem": [result.line, result.id, result.message]})
    scores = {k: [s.raw, s.score, s.layer] for k, s in result.scores.items()}
    return json.dumps({"line": result.record.line, "scores": scores}, allow_nan=True)


def _load(text: str) -> tuple[int, dict[str, PersonaScore] | InputProblem]:
    data = json.loads(text)
    if "problem" in data:
        line, record_id, message = data["problem"]
        return line, InputProblem(line, record_id, message)
    scores = {k: PersonaScore(raw=v[0], score=v[1], layer=v[2]) for k, v in data["scores"].items()}
    return data["line"], scores


def compare_sequential(
    baseline: LoadedModel,
    load_candidate: Callable[[], LoadedModel],
    columns: Sequence[ScoreColumn],
    read_items: Callable[[], Iterable[InputItem]],
    options: ScanOptions,
    *,
    temp_dir: Path | None = None,
) -> Iterator[PairedResult]:
    """Scan with the baseline, free it, then scan with the candidate.

    Baseline results stream through a temporary JSONL file, so memory contains
    one model and one chunk at a time. `read_items` is called twice and must
    yield the same items each time. The caller's reference to `baseline`
    must be dropped too for its memory to be returned.
    """
    with tempfile.TemporaryDirectory(dir=temp_dir, prefix="safety-lens-compare-") as folder:
        path = Path(folder) / "baseline.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for result in scan_records(baseline, columns, read_items(), options):
                out.write(_dump(result) + "\n")
        baseline_shape = ModelShape.of(baseline)
        _free(baseline)
        del baseline

        candidate = load_candidate()
        check_same_shape(baseline_shape, ModelShape.of(candidate))
        with open(path, encoding="utf-8") as stored:
            for cand in scan_records(candidate, columns, read_items(), options):
                text = stored.readline()
                if not text:
                    break
                line, base = _load(text)
                if isinstance(base, InputProblem):
                    result: PairedResult = base
                elif isinstance(cand, InputProblem):
                    result = cand
                else:
                    if line != cand.record.line:
                        raise UsageError(
                            f"The input changed between the two passes (line {line} against {cand.record.line}): "
                            "compare from a file that is not being written to."
                        )
                    result = PairedLine(cand.record, cand.scores, base, cand.truncated_from)
                yield result
                if options.stop_on_error and isinstance(result, InputProblem):
                    return


def _free(lm: LoadedModel) -> None:
    """Release the model's weights; callers must drop their own references as well."""
    import torch

    # Moving to the meta device drops the weight storages even while other
    # references to the module object remain.
    lm.model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def paired_record(line: PairedLine, thresholds: Thresholds, columns: Sequence[ScoreColumn]) -> dict[str, Any]:
    """Build the candidate's scan record with each persona's baseline scores and shift added."""
    record = result_record(ScoredLine(line.record, line.candidate, line.truncated_from), thresholds, columns)
    for column in columns:
        base = line.baseline[column.key]
        cand = line.candidate[column.key]
        entry = record["scores"][column.key]
        entry["baseline"] = {
            "raw": base.raw,
            "score": base.score,
            "flagged": base.flagged(thresholds.for_persona(column.vector.persona)),
        }
        entry["shift"] = {"raw": cand.raw - base.raw, "score": cand.score - base.score}
    return record


@dataclass(frozen=True)
class MaxShift:
    """`--max-shift` limits on the calibrated scale: one default and per-persona overrides."""

    default: float | None = None
    per_persona: Mapping[str, float] = field(default_factory=dict)

    def for_persona(self, persona: str) -> float | None:
        return self.per_persona.get(persona, self.default)

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.per_persona)


def parse_max_shift(specs: Sequence[str]) -> MaxShift:
    """Parse `--max-shift` values: `0.1` for every persona, `sycophancy=0.1` for one."""
    default: float | None = None
    per_persona: dict[str, float] = {}
    for spec in specs:
        name, sep, text = spec.rpartition("=")
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"Invalid --max-shift '{spec}': use a number, or PERSONA=NUMBER.") from None
        if not math.isfinite(value):
            raise UsageError(f"Invalid --max-shift '{spec}': the limit must be a finite number.")
        if not sep:
            if default is not None:
                raise UsageError(f"--max-shift '{spec}' sets the default limit a second time: give it once.")
            default = value
        elif not name.strip():
            raise UsageError(f"Invalid --max-shift '{spec}': use a number, or PERSONA=NUMBER.")
        else:
            per_persona[name.strip()] = value
    return MaxShift(default, per_persona)


@dataclass
class ShiftGate:
    """One persona's shift statistics and, when a limit is set, its gate result."""

    key: str
    persona: str
    stats: ShiftStatistics
    limit: float | None

    @property
    def gated(self) -> bool:
        return self.limit is not None

    @property
    def passed(self) -> bool:
        """Fails when the lower end of the confidence interval exceeds the limit."""
        if self.limit is None:
            return True
        if self.stats.n == 0:
            return False
        return not self.stats.ci_low > self.limit

    def describe(self) -> str:
        s = self.stats
        interval = f"[{s.ci_low:+.4f}, {s.ci_high:+.4f}]" if s.n else "[n/a]"
        p = f", paired t-test p={s.p_value:.3g}" if s.p_value is not None else ""
        text = f"{self.key}: mean shift {s.mean:+.4f}, {int(s.confidence * 100)}% CI {interval} over {s.n} lines{p}"
        if self.limit is None:
            return text
        verdict = "PASS" if self.passed else "FAIL"
        return f"{text}; {verdict} (fails when the CI lower end > {self.limit:g})"


class ShiftCollector:
    """Accumulates per-persona shifts over paired lines for the summary and the gate."""

    def __init__(self, columns: Sequence[ScoreColumn], limits: MaxShift, seed: int = 0) -> None:
        self.columns = list(columns)
        self.limits = limits
        self.seed = seed
        self.shifts: dict[str, list[float]] = {c.key: [] for c in columns}

    def add(self, line: PairedLine) -> None:
        for key in self.shifts:
            self.shifts[key].append(line.shift(key))

    def gates(self) -> list[ShiftGate]:
        return [
            ShiftGate(
                key=column.key,
                persona=column.vector.persona,
                stats=paired_shift(self.shifts[column.key], resamples=BOOTSTRAP_RESAMPLES, seed=self.seed),
                limit=self.limits.for_persona(column.vector.persona),
            )
            for column in self.columns
        ]


def spool_stdin(stream: Any, folder: Path | None = None) -> Path:
    """Copy a stream to a temporary file so that a sequential comparison can read it twice."""
    fd, name = tempfile.mkstemp(dir=folder, prefix="safety-lens-input-", suffix=".jsonl")
    with os.fdopen(fd, "wb") as out:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
    return Path(name)
