"""The JSON Lines that `scan` writes, and reading them back for `--resume`.

An output starts with one header line, `{"header": {...}}`, naming the model
fingerprint, the vectors and thresholds. Then each input line gets one object,
in input order, with `line` as its first key:

    {"line": 3, "id": "a", "scores": {"sycophancy": {"raw": ..., "score": ...,
     "layer": 14, "flagged": false}}, "flagged": false}
    {"line": 4, "id": 4, "error": "invalid JSON (...)"}

Each line is written with one `write` call and flushed, so a killed run
leaves complete lines and at most one partial last line, which resume cuts off.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from safety_lens_cli.errors import InputError, RuntimeFailure, UsageError
from safety_lens_cli.gating import ScanStats, Thresholds
from safety_lens_cli.inputs import InputProblem, RecordId
from safety_lens_cli.scanning import ScanOptions, ScoreColumn, ScoredLine

log = logging.getLogger(__name__)

SCHEMA = "safety-lens.scan"
SCHEMA_VERSION = 1
# Header fields that must match for `--resume` to append to an existing output,
# because they change the scores or flags. Paths into nested objects use dots.
RESUME_FIELDS = ("schema", "version", "model.fingerprint", "model.dtype", "rendering", "position", "vectors")


def header_record(
    *,
    model: Mapping[str, Any],
    rendering: str,
    columns: Sequence[ScoreColumn],
    thresholds: Thresholds,
    options: ScanOptions,
) -> dict[str, Any]:
    """Build the first output line, which names what every record's scores were computed with.

    `model` describes the loaded model and must contain at least `fingerprint`
    and `dtype`.
    """
    return {
        "header": {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "model": dict(model),
            "rendering": rendering,
            "position": options.position or "auto",
            "truncate": options.truncate,
            "vectors": [
                {
                    "key": column.key,
                    "persona": column.vector.persona,
                    "layer": column.layer,
                    "object_id": column.vector.object_id,
                    "threshold": thresholds.for_persona(column.vector.persona),
                }
                for column in columns
            ],
        }
    }


def result_record(line: ScoredLine, thresholds: Thresholds, columns: Sequence[ScoreColumn]) -> dict[str, Any]:
    """Build the record of one scored line; `flagged` is true when any persona's score reaches its threshold."""
    record = line.record
    scores: dict[str, dict[str, Any]] = {}
    for column in columns:
        score = line.scores[column.key]
        scores[column.key] = {
            "raw": score.raw,
            "score": score.score,
            "layer": score.layer,
            "flagged": score.flagged(thresholds.for_persona(column.vector.persona)),
        }
    out: dict[str, Any] = {
        "line": record.line,
        "id": record.id,
        "scores": scores,
        "flagged": any(entry["flagged"] for entry in scores.values()),
    }
    if record.label is not None:
        out["label"] = record.label
    if line.truncated_from is not None:
        out["truncated_from_tokens"] = line.truncated_from
    if record.meta is not None:
        out["meta"] = record.meta
    return out


def error_record(problem: InputProblem) -> dict[str, Any]:
    return {"line": problem.line, "id": problem.id, "error": problem.message}


class JsonlWriter:
    """Write one JSON object per line, whole and flushed."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.written = 0

    def write(self, document: Mapping[str, Any]) -> None:
        text = json.dumps(document, ensure_ascii=False, allow_nan=False) + "\n"
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            raise RuntimeFailure(
                f"The output was closed by the reading process after {self.written} lines."
            ) from None
        self.written += 1


def id_key(record_id: RecordId) -> str:
    """Key for comparing ids across runs; `1` and `"1"` stay different."""
    return json.dumps(record_id)


@dataclass
class ResumeState:
    """Contents of an existing output that `--resume` needs.

    `valid_bytes` is the length of its complete lines; anything after it is a
    partial line from a killed run.
    """

    path: Path
    header: dict[str, Any] | None = None
    done_ids: set[str] = field(default_factory=set)
    results: int = 0
    errors: int = 0
    valid_bytes: int = 0
    size: int = 0

    @property
    def has_partial_line(self) -> bool:
        return self.size > self.valid_bytes


def read_resume_state(path: Path) -> ResumeState:
    """Read the ids already written to `path`; a missing or empty file means none."""
    state = ResumeState(path)
    if not path.exists():
        return state
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InputError(f"Output '{path}' cannot be read for --resume: {exc.strerror}.") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            state.size += len(raw)
            if not raw.endswith(b"\n"):
                break  # a partial last line: ignored, and cut off before appending
            _add_line(state, raw, number)
            state.valid_bytes += len(raw)
    return state


def _add_line(state: ResumeState, raw: bytes, number: int) -> None:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(
            f"Output '{state.path}' line {number} is not valid JSON, so --resume cannot tell which lines "
            "are done: fix or remove that line, or start a new output."
        ) from None
    if not isinstance(document, dict):
        raise InputError(f"Output '{state.path}' line {number} is not a JSON object: it is not a scan output.")
    if "header" in document:
        if number != 1:
            raise InputError(f"Output '{state.path}' has a second header at line {number}: it is not one scan's output.")
        state.header = document["header"]
        return
    if state.header is None:
        raise InputError(
            f"Output '{state.path}' does not start with a safety-lens scan header: pass another --output."
        )
    if "id" not in document or not ("scores" in document or "error" in document):
        raise InputError(f"Output '{state.path}' line {number} is not a scan record: pass another --output.")
    state.done_ids.add(id_key(document["id"]))
    if "error" in document:
        state.errors += 1
    else:
        state.results += 1


def check_resume_header(state: ResumeState, header: Mapping[str, Any]) -> None:
    """Reject resuming an output written with another model, vectors, thresholds or reading position."""
    if state.header is None:
        return
    current = header["header"]
    for name in RESUME_FIELDS:
        before, now = _lookup(state.header, name), _lookup(current, name)
        if before != now:
            raise UsageError(
                f"Cannot --resume '{state.path}': it was written with a different {name} "
                f"({json.dumps(before)[:120]} there, {json.dumps(now)[:120]} now). "
                "Scan into a new --output, or rerun with the same model, vectors, thresholds and position."
            )


def _lookup(document: Mapping[str, Any], dotted: str) -> Any:
    value: Any = document
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def fold_previous(state: ResumeState, stats: ScanStats) -> None:
    """Count the records an earlier run wrote, so the summary and gate cover the whole output."""
    if state.results == 0 and state.errors == 0:
        return
    with open(state.path, "rb") as handle:
        remaining = state.valid_bytes
        for raw in handle:
            if remaining <= 0:
                break
            remaining -= len(raw)
            document = json.loads(raw)
            if "header" in document:
                continue
            if "error" in document:
                stats.add_error(f"line {document.get('line')}: {document['error']}", recorded=True, previous=True)
                continue
            scores = {
                key: (float(entry["score"]), bool(entry["flagged"]))
                for key, entry in document.get("scores", {}).items()
            }
            label = document.get("label")
            stats.add_scores(scores, label if label in (0, 1) else None, previous=True)


def open_output(path: Path, state: ResumeState | None) -> IO[str]:
    """Open `--output` for writing; with a resume state, cut off a partial last line and append."""
    if state is None:
        return _open(path, "w")
    if state.has_partial_line:
        log.warning(
            "Output '%s' ends with a partial line (%d bytes) from an interrupted run; removed it before appending.",
            path,
            state.size - state.valid_bytes,
        )
        os.truncate(path, state.valid_bytes)
    return _open(path, "a")


def _open(path: Path, mode: str) -> IO[str]:
    try:
        return open(path, mode, encoding="utf-8", newline="\n")
    except OSError as exc:
        raise UsageError(f"Output '{path}' cannot be opened for writing: {exc.strerror}.") from None
