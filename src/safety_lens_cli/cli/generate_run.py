"""The work of `safety-lens generate` once its options are checked: vectors, generation and output.

`GenerateRun` keeps what is fixed for one command and writes the JSON
object, the JSON Lines records or the terminal view. Nothing here imports
torch at module level, so `safety-lens --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from safety_lens_cli.cli.common import err_console, out_console
from safety_lens_cli.cli.inspect_layers import model_header
from safety_lens_cli.errors import UsageError

if TYPE_CHECKING:
    from safety_lens_cli.cli.generate import SteerSpec
    from safety_lens_cli.inputs import InputProblem, InputRecord
    from safety_lens_cli.models import LoadedModel
    from safety_lens_cli.projection import PersonaVector
    from safety_lens_cli.scanning import ScoreColumn
    from safety_lens_cli.trajectory import GenerationOptions, SteeringTerm, Trajectory

log = logging.getLogger(__name__)

# Bad --input lines reported one by one on stderr before they are only counted.
MAX_LINE_WARNINGS = 20


class VectorLookup:
    """Resolve scored and steering vectors through the registry, extracting missing ones."""

    def __init__(self, lm: LoadedModel, layers: tuple[str, ...], registry: Path | None, extract: bool) -> None:
        self.lm = lm
        self.layers = layers
        self.registry = registry
        self.extract = extract

    def resolve(
        self, personas: Sequence[str], vector_ids: tuple[str, ...] = (), layers: tuple[str, ...] | None = None
    ) -> list[PersonaVector]:
        from safety_lens_cli.vector_lookup import VectorRequest, resolve_vectors

        request = VectorRequest(
            personas=tuple(personas),
            layers=self.layers if layers is None else layers,
            registry=self.registry,
            extract_missing=self.extract,
            vector_ids=vector_ids,
        )
        return list(resolve_vectors(self.lm, request, notify=lambda note: err_console.print(note, markup=False)))

    def steering_term(self, spec: SteerSpec, scored: Sequence[PersonaVector]) -> SteeringTerm:
        """Find the one vector to steer along for `spec`, reusing a scored vector when it matches."""
        from safety_lens_cli.layers import normalize_layer
        from safety_lens_cli.trajectory import SteeringTerm

        layer = None if spec.layer is None else normalize_layer(spec.layer, self.lm.num_layers)
        matches = [v for v in scored if v.persona == spec.persona and (layer is None or v.layer == layer)]
        if not matches:
            layers = (str(layer),) if layer is not None else None
            matches = self.resolve([spec.persona], layers=layers)
        if len(matches) != 1:
            found = ", ".join(str(v.layer) for v in matches) or "none"
            raise UsageError(
                f"--steer '{spec}' needs one vector but persona '{spec.persona}' has vectors at layers {found}: "
                f"pick one with --steer {spec.persona}@LAYER={spec.coefficient:g}."
            )
        return SteeringTerm(matches[0], spec.coefficient)


def print_setup(run: GenerateRun) -> None:
    """Print the model, the scored vectors and the steering terms on stderr."""
    lines = [f"{run.lm.model_id}  fingerprint {run.lm.fingerprint}"]
    for column in run.columns:
        object_id = (column.vector.object_id or "unsaved")[:12]
        lines.append(f"score {column.key}: layer {column.layer}, vector {object_id}")
    for term in run.steering:
        lines.append(
            f"steer {term.vector.persona}: {term.coefficient:+g} x residual norm {term.vector.residual_norm:.2f} "
            f"at layer {term.vector.layer}, {run.options.steer_positions} positions"
        )
    err_console.print("\n".join(lines), markup=False)


@dataclass(frozen=True)
class _EncodedLine:
    """An --input line ready to generate from; `number` is its 1-based line number."""

    id: str | int
    number: int
    messages: list[dict[str, str]]
    ids: list[int]


class GenerateRun:
    """Everything fixed for one command: model, columns, steering and options."""

    def __init__(
        self,
        lm: LoadedModel,
        columns: list[ScoreColumn],
        steering: list[SteeringTerm],
        options: GenerationOptions,
        threshold: float,
    ) -> None:
        from safety_lens_cli.rendering import choose_rendering

        self.lm = lm
        self.columns = columns
        self.steering = steering
        self.options = options
        self.threshold = threshold
        self.rendering = choose_rendering(lm.tokenizer)
        self.model = model_header(lm)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        from safety_lens_cli.rendering import encode_prompt

        return list(encode_prompt(self.lm.tokenizer, messages, self.rendering).input_ids)

    def document(self, trajectory: Trajectory, messages: list[dict[str, str]], record_id: Any = None) -> dict[str, Any]:
        from safety_lens_cli.trajectory import trajectory_document

        return trajectory_document(
            trajectory,
            columns=self.columns,
            steering=self.steering,
            options=self.options,
            model=self.model,
            messages=messages,
            threshold=self.threshold,
            record_id=record_id,
            prompt_text=str(self.lm.tokenizer.decode(list(trajectory.prompt_ids), skip_special_tokens=False)),
        )

    def single(self, prompt: str, system: str | None, *, interactive: bool, output: Path | None) -> dict[str, Any]:
        from safety_lens_cli.trajectory import generate_trajectories

        messages = _messages(prompt, system)
        ids = self.encode(messages)
        if interactive:
            trajectory = self._live(ids)
        else:
            with err_console.status("Generating", spinner="dots"):
                trajectory = generate_trajectories(
                    self.lm, [ids], self.columns, steering=self.steering, options=self.options
                )[0]
        document = self.document(trajectory, messages)
        if output is not None:
            with _open_output(output) as handle:
                handle.write(_dumps(document, indent=2) + "\n")
        elif not interactive:
            sys.stdout.write(_dumps(document, indent=2) + "\n")
            sys.stdout.flush()
        return document

    def _live(self, ids: list[int]) -> Trajectory:
        from rich.live import Live

        from safety_lens_cli.cli.generate_view import GenerationView
        from safety_lens_cli.trajectory import generate_trajectories

        view = GenerationView([c.key for c in self.columns], self.threshold)
        with Live(view, console=out_console, auto_refresh=False, transient=True) as live:

            def show_scan(_row: int, scores: Any) -> None:
                view.prompt_scan = scores
                live.refresh()

            def show_token(_row: int, token: Any) -> None:
                view.add(token)
                live.refresh()

            trajectory = generate_trajectories(
                self.lm,
                [ids],
                self.columns,
                steering=self.steering,
                options=self.options,
                on_prompt_scan=show_scan,
                on_token=show_token,
            )[0]
        view.finish(trajectory)
        out_console.print(view)
        return trajectory

    def many(
        self, source: str, system: str | None, output: Path | None, *, keep: bool
    ) -> tuple[list[dict[str, Any]], int]:
        """Generate for every line of `source`, writing JSON Lines as each batch finishes.

        Returns the generation objects (only when `keep`, for the report) and
        the number of lines that could not be used.
        """
        from safety_lens_cli.inputs import InputProblem, read_records
        from safety_lens_cli.trajectory import generate_trajectories

        documents: list[dict[str, Any]] = []
        problems = 0
        done = 0
        with _open_output(output) as handle:
            for chunk in _chunks(read_records(source), self.options.batch_size):
                slots: list[_EncodedLine | InputProblem] = []
                for item in chunk:
                    slots.append(item if isinstance(item, InputProblem) else self._encode_record(item, system))
                encoded = [slot for slot in slots if not isinstance(slot, InputProblem)]
                trajectories = iter(
                    generate_trajectories(
                        self.lm,
                        [line.ids for line in encoded],
                        self.columns,
                        steering=self.steering,
                        options=self.options,
                        rows=[line.number - 1 for line in encoded],
                    )
                )
                for slot in slots:
                    if isinstance(slot, InputProblem):
                        problems += 1
                        if problems <= MAX_LINE_WARNINGS:
                            log.warning("%s", slot.describe())
                        if problems == MAX_LINE_WARNINGS:
                            log.warning("Further bad lines are not shown one by one; the output has an error record each.")
                        record = {"id": slot.id, "line": slot.line, "error": slot.message}
                    else:
                        record = self.document(next(trajectories), slot.messages, record_id=slot.id)
                        if keep:
                            documents.append(record)
                    handle.write(_dumps(record) + "\n")
                handle.flush()
                done += len(chunk)
                err_console.print(f"Processed {done} input line(s)", markup=False)
        return documents, problems

    def _encode_record(self, record: InputRecord, system: str | None) -> _EncodedLine | InputProblem:
        from safety_lens_cli.inputs import InputProblem

        messages = list(record.chat)
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        try:
            ids = self.encode(messages)
        except _template_errors() as exc:
            return InputProblem(record.line, record.id, f"the chat template failed: {exc}")
        if not ids:
            return InputProblem(record.line, record.id, "the input encodes to no tokens")
        limit = self.lm.context_length
        if limit is not None and len(ids) + self.options.max_new_tokens > limit:
            return InputProblem(
                record.line,
                record.id,
                f"the prompt has {len(ids)} tokens; with --max-new-tokens {self.options.max_new_tokens} "
                f"it exceeds the model's context of {limit}",
            )
        return _EncodedLine(record.id, record.line, messages, ids)


def _template_errors() -> tuple[type[Exception], ...]:
    """Return the errors that concern one input: invalid turns, or a chat template that raises for them."""
    from safety_lens_cli.errors import InputError

    try:
        from jinja2 import TemplateError
    except ImportError:  # without jinja2 no chat template runs
        return (InputError,)
    return (InputError, TemplateError)


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": prompt}]


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _dumps(document: Any, indent: int | None = None) -> str:
    return json.dumps(document, indent=indent, ensure_ascii=False, allow_nan=False)


@contextmanager
def _open_output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    try:
        handle = open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--output file '{path}' cannot be opened for writing: {exc.strerror}.") from None
    with handle:
        yield handle
