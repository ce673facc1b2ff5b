"""The `safety-lens` command: the root Typer app and its sub-commands."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from safety_lens_cli import __version__
from safety_lens_cli.cli.common import configure_logging

app = typer.Typer(
    name="safety-lens",
    help="Read how a causal language model computes: extract persona vectors and "
    "project prompts onto them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"safety-lens {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    ctx.obj = {"debug": debug, "verbose": verbose}
    configure_logging(verbose)


# Each module registers its commands on `app`; they import the core lazily.
_COMMAND_MODULES = (
    "safety_lens_cli.cli.inspect_layers",
    "safety_lens_cli.cli.extract",
    "safety_lens_cli.cli.scan",
    "safety_lens_cli.cli.generate",
    "safety_lens_cli.cli.personas",
    "safety_lens_cli.cli.vectors",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()
