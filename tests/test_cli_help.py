"""Every command's --help shows every option's help text whole.

Typer renders help through rich markup, where "[word]" is a style tag and silently disappears:
"needs the [pretrained] extra" printed as "needs the  extra". Help strings escape a literal
bracket as "\\[".
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from dermtool.cli import app

COMMAND = typer.main.get_command(app)
NAMES = sorted(COMMAND.commands)


def squeezed(text: str) -> str:
    """The text without whitespace or the help panel's borders, so line wrapping does not matter."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


def as_shown(help_text: str) -> str:
    """What rich shows for a help string: escaped brackets literal, markup tags gone."""
    text = re.sub(r"(?<!\\)\[/?(bold|italic|dim|red|green|yellow|cyan|magenta|blue)?\]", "", help_text)
    return text.replace("\\[", "[")


def test_the_commands_are_found():
    assert {"preprocess", "train", "infer", "score"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_option_help_is_printed_whole(name):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0, result.output
    shown = squeezed(result.output)
    params = [p for p in COMMAND.commands[name].params if getattr(p, "help", None)]
    assert params, f"{name} has no documented options"
    for param in params:
        assert squeezed(as_shown(param.help)) in shown, f"{name} {param.name}: help text cut in --help"


def test_a_bracket_needs_its_escape_to_survive():
    # the check above can fail: an unescaped tag-like bracket vanishes from the rendered help
    probe = typer.Typer(rich_markup_mode="rich")

    @probe.command()
    def run(x: int = typer.Option(0, help="needs the [pretrained] extra")):
        """Probe."""

    output = CliRunner().invoke(probe, ["--help"], env={"COLUMNS": "300"}).output
    assert squeezed("needs the [pretrained] extra") not in squeezed(output)
