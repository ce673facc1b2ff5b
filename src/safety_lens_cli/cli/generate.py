"""`safety-lens generate`: generate text token by token and score every token on persona vectors.

On a terminal the tokens stream in a live view coloured by their score.
With --json, or when stdout is not a terminal, stdout gets one JSON object
(one JSON line per input line with --input). Exit codes: 0 done, 2 usage or
input error (also after all lines when some --input lines could not be used),
3 model or runtime error.
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from safety_lens_cli.cli.common import (
    DeviceOption,
    DtypeOption,
    JsonOption,
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
)
from safety_lens_cli.errors import EXIT_USAGE, UsageError

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


@dataclass(frozen=True)
class SteerSpec:
    """One parsed `--steer PERSONA[@LAYER]=COEF`."""

    persona: str
    coefficient: float
    layer: int | None = None

    def __str__(self) -> str:
        at = f"@{self.layer}" if self.layer is not None else ""
        return f"{self.persona}{at}={self.coefficient:g}"


def parse_steer(value: str) -> SteerSpec:
    """Parse `PERSONA=COEF` or `PERSONA@LAYER=COEF`, for example `refusal=4` or `refusal@12=-2.5`."""
    target, sep, number = value.rpartition("=")
    persona, at, layer_text = target.partition("@")
    hint = "use PERSONA=COEF or PERSONA@LAYER=COEF, for example refusal=4 or refusal@12=-2.5"
    if not sep or not persona.strip():
        raise UsageError(f"Invalid --steer '{value}': {hint}.")
    try:
        coefficient = float(number)
    except ValueError:
        raise UsageError(f"Invalid --steer '{value}': the coefficient '{number}' is not a number; {hint}.") from None
    if not math.isfinite(coefficient):
        raise UsageError(f"Invalid --steer '{value}': the coefficient must be a finite number.")
    layer: int | None = None
    if at:
        try:
            layer = int(layer_text)
        except ValueError:
            message = f"Invalid --steer '{value}': the layer '{layer_text}' is not an integer; {hint}."
            raise UsageError(message) from None
    return SteerSpec(persona.strip(), coefficient, layer)


@handle_errors
def generate(
    prompt: Annotated[
        Optional[str], typer.Option("--prompt", help="User message to answer.", show_default=False)
    ] = None,
    system: Annotated[
        Optional[str],
        typer.Option(
            "--system",
            help="System message before the prompt. With --input, added to lines that have no system turn.",
            show_default=False,
        ),
    ] = None,
    input_path: Annotated[
        Optional[str],
        typer.Option(
            "--input",
            "-i",
            help="JSON Lines file of prompts ('prompt', 'text' or 'messages' per line), or - for stdin.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Write the JSON object (JSON Lines with --input) to this file instead of stdout.",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        Optional[Path],
        typer.Option("--report", help="Write a self-contained HTML report to this file.", show_default=False),
    ] = None,
    persona: PersonaOption = None,
    layer: LayerOption = None,
    vector: Annotated[
        Optional[list[str]],
        typer.Option(
            "--vector", help="Registry object id (or unique prefix) of a vector to score. Repeatable.", show_default=False
        ),
    ] = None,
    registry: RegistryOption = None,
    no_extract: Annotated[
        bool, typer.Option("--no-extract", help="Fail instead of extracting vectors missing from the registry.")
    ] = False,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", min=1, help="Maximum number of tokens to generate per prompt.")
    ] = 64,
    temperature: Annotated[
        float,
        typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 always picks the most likely token."),
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p", help="Sample only from the most likely tokens whose probabilities sum to this (0 to 1)."
        ),
    ] = 1.0,
    seed: Annotated[
        Optional[int],
        typer.Option(
            "--seed",
            help="Sampling seed; input line N uses SEED + N - 1. Default: random, stored in the JSON output.",
            show_default=False,
        ),
    ] = None,
    steer: Annotated[
        Optional[list[str]],
        typer.Option(
            "--steer",
            help="PERSONA=COEF or PERSONA@LAYER=COEF: add COEF times the persona's unit vector, scaled by the "
            "mean residual-stream norm at its layer, to that layer's output. Repeatable.",
            show_default=False,
        ),
    ] = None,
    steer_positions: Annotated[
        str,
        typer.Option(
            "--steer-positions",
            help="Where steering applies: response (generated tokens only), prompt (prompt tokens only) or all.",
        ),
    ] = "response",
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            help="Calibrated score at or above which a token is flagged (0 and 1 are the stimulus means).",
        ),
    ] = 0.5,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Prompts generated together with --input.")
    ] = 8,
    model: ModelOption = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
    layers_path: LayersPathOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate an answer token by token and score each token on persona vectors, optionally steering."""
    from safety_lens_cli.generation import Sampling, check_steer_positions
    from safety_lens_cli.trajectory import GenerationOptions

    if (prompt is None) == (input_path is None):
        raise UsageError("Pass either --prompt TEXT or --input FILE (one of them, not both).")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty: pass the message to answer.")
    if not math.isfinite(threshold):
        raise UsageError(f"Invalid --threshold {threshold}: use a finite number such as 0.5.")
    specs = [parse_steer(s) for s in steer or []]
    personas = list(persona or [])
    if not personas and not vector:
        personas = list(dict.fromkeys(spec.persona for spec in specs))
    if not personas and not vector:
        raise UsageError("No persona to score: pass --persona NAME (repeatable), --vector ID or --steer PERSONA=COEF.")
    if report is not None and report.is_dir():
        raise UsageError(f"--report '{report}' is a folder: pass an HTML file path.")
    if report is not None and not report.parent.is_dir():
        raise UsageError(f"Report folder '{report.parent}' does not exist: create it or choose another --report path.")
    if temperature > 0 and seed is None:
        # One base seed for the whole run, so each line's recorded seed reproduces it.
        seed = secrets.randbits(62)
    options = GenerationOptions(
        max_new_tokens=max_new_tokens,
        sampling=Sampling(temperature=temperature, top_p=top_p, seed=seed),
        steer_positions=check_steer_positions(steer_positions),
        batch_size=batch_size,
    )
    if temperature == 0 and (top_p != 1.0 or seed is not None):
        log.warning("--top-p and --seed only apply to sampling: pass --temperature above 0 to sample.")

    from safety_lens_cli.cli.generate_run import GenerateRun, VectorLookup, print_setup
    from safety_lens_cli.models import load_model

    lm = load_model(model_request(model, revision, device, dtype, trust_remote_code, layers_path))
    lookup = VectorLookup(lm, tuple(layer or ()), registry, not no_extract)
    vectors = lookup.resolve(personas, tuple(vector or ()))
    steering = [lookup.steering_term(spec, vectors) for spec in specs]

    from safety_lens_cli.scanning import score_columns

    run = GenerateRun(lm, score_columns(lm, vectors), steering, options, threshold)
    print_setup(run)
    if prompt is not None:
        documents = [run.single(prompt, system, interactive=_stdout_is_terminal() and not as_json, output=output)]
        problems = 0
    else:
        assert input_path is not None  # exactly one of --prompt and --input, checked above
        documents, problems = run.many(input_path, system, output, keep=report is not None)
    if report is not None and documents:
        from safety_lens_cli.report import write_report

        write_report(report, documents)
        err_console.print(f"Report written to {report}", markup=False)
    elif report is not None:
        err_console.print("No input line could be generated, so no report was written.", markup=False)
    if problems:
        err_console.print(f"{problems} input line(s) could not be used; see the error records.", markup=False)
        raise typer.Exit(EXIT_USAGE)


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
