"""README's Layout section names every module of the three packages, and names nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("privdistill", "site_agent", "coordinator")


def layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Layout\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def package_bullets(section: str) -> dict[str, str]:
    """Each package's bullet (with its sub-bullets) from the Layout section."""
    out: dict[str, str] = {}
    for pkg in PACKAGES:
        m = re.search(rf"^- `{pkg}/`.*?(?=^- `|\Z)", section, flags=re.S | re.M)
        assert m, f"README Layout has no bullet for {pkg}/"
        out[pkg] = m.group(0)
    return out


def test_every_module_is_named_and_every_name_exists() -> None:
    bullets = package_bullets(layout_section())
    for pkg in PACKAGES:
        here = {p.name for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"}
        here |= {p.name + "/" for p in (ROOT / pkg).iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
        named = set(re.findall(r"`([a-z_]+(?:\.py|/))`", bullets[pkg])) - {f"{pkg}/"}
        named = {n for n in named if "/" not in n.rstrip("/")}
        assert here - named == set(), f"{pkg}: modules missing from README's Layout section"
        assert {n for n in named if n.endswith((".py", "/"))} - here == set(), f"{pkg}: Layout names what is not there"
