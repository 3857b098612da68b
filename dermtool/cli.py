"""The `dermtool` command line: thin typer commands that validate paths and call the core."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dermtool import __version__
from dermtool.errors import InputError

app = typer.Typer(
    name="dermtool",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="Segment and classify dermoscopy images of skin lesions (ISIC 2017 conventions).\n\n"
    "Pipeline: [bold]preprocess[/] → [bold]train[/] → [bold]infer[/] → [bold]score[/].",
)
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one sentence (no traceback) and exit with `code`."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dermtool {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """dermtool command line."""
