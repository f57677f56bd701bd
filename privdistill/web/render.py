"""Jinja2 rendering shared by the web pages and the files privdistill writes (report.html): the template
environment over the shared templates and its ``num`` filter, and the flattening of nested results into rows."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape

WEB = files("privdistill.web")
SHARED_TEMPLATES = Path(str(WEB / "templates"))
PAGES_CSS = Path(str(WEB / "static" / "pages.css"))


def num(v: Any) -> str:
    """A value for a table cell: floats to 4 significant digits, None as a dash, anything else as it prints."""
    if v is None:
        return "—"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as sorted ("a.b.c", value) rows; an empty dict is one row."""
    rows: list[tuple[str, Any]] = []
    for k in sorted(d, key=str):
        v = d[k]
        if isinstance(v, dict) and v:
            rows += flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def environment(app_templates: Path | None = None) -> Environment:
    """A Jinja2 environment over an app's own templates, then the shared ones (base.html, login.html, report.html);
    autoescaping on for HTML, the ``num`` filter."""
    dirs = [FileSystemLoader(str(app_templates))] if app_templates is not None else []
    env = Environment(loader=ChoiceLoader([*dirs, FileSystemLoader(str(SHARED_TEMPLATES))]),
                      autoescape=select_autoescape(["html"]))
    env.filters["num"] = num
    return env
