"""HTML pages from Jinja2 templates (dermtool/templates/): the infer report and the score page.

Both pages extend one base template, so they share a style and the research-only warning.
Pages are self-contained files: styles and scripts inline, images as relative links to files
written beside the page, nothing fetched from a network.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from dermtool import __version__
from dermtool.io import write_atomic

WARNING = "Research tool, not a medical device. Its output is not a diagnosis."


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    # StrictUndefined: a misspelt name in a template fails the tests instead of printing "".
    return Environment(loader=PackageLoader("dermtool", "templates"),
                       autoescape=select_autoescape(("html", "j2")), undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context) -> str:
    """The named template rendered with `context` plus the shared warning, version and date."""
    context.setdefault("warning", WARNING)
    context.setdefault("version", __version__)
    context.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return _environment().get_template(template).render(**context)


def write_page(path: Path, template: str, **context) -> Path:
    """Render a template into `path`, written under a temporary name and renamed. A path shown on
    the page whose name is not UTF-8 (a folder from a Latin-1 share) shows its odd bytes escaped
    (\\udce9), where it once stopped the page with a traceback."""
    path = Path(path)
    data = render(template, **context).encode("utf-8", "backslashreplace")
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path
