"""The docs' reference pages are what the code makes of itself: a setting or a flag added,
changed or removed without `python -m parallama.reference docs/reference` fails here."""

from __future__ import annotations

import pytest

from parallama.config import GatewaySettings
from parallama.reference import PAGES
from tests.docs import ROOT


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_reference_page_is_the_codes(name: str) -> None:
    page = ROOT / "docs" / "reference" / name
    assert page.read_text() == PAGES[name](), (
        f"docs/reference/{name} differs from the code: run python -m parallama.reference"
    )


def _guide_rows() -> dict[str, tuple[str, str]]:
    """The gateway guide's settings table: each setting's flag and default cells."""
    guide = (ROOT / "docs" / "guides" / "gateway.md").read_text()
    table = guide.split("## Settings", 1)[1].split("\n\n| setting | flag |", 1)[1]
    rows = {}
    for line in table.split("\n\n", 1)[0].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = (cells[1], cells[2].strip("`"))
    return rows


def test_the_gateway_guide_names_every_setting_with_the_codes_flag_and_default() -> None:
    """The guide's own table (its words, beside the generated reference) must not drift: a
    setting added without a row there, or a flag or default changed, fails here."""
    rows = _guide_rows()
    fields = GatewaySettings.model_fields
    assert sorted(rows) == sorted(fields)
    for name, field in fields.items():
        flag, default = rows[name]
        if name not in {"backends", "models"}:
            assert flag.startswith("`--") and flag.endswith(name.replace("_", "-") + "`"), flag
        if isinstance(field.default, bool):
            assert default == str(field.default).lower(), name
        elif isinstance(field.default, int | float):
            assert float(default) == field.default, (name, default)
        elif isinstance(field.default, str):
            assert default == field.default, (name, default)
