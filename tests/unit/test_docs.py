"""The docs' reference pages are what the code makes of itself: a setting or a flag added,
changed or removed without `python -m parallama.reference docs/reference` fails here."""

from __future__ import annotations

import pytest

from parallama.reference import PAGES
from tests.docs import ROOT


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_reference_page_is_the_codes(name: str) -> None:
    page = ROOT / "docs" / "reference" / name
    assert page.read_text() == PAGES[name](), (
        f"docs/reference/{name} differs from the code: run python -m parallama.reference"
    )
