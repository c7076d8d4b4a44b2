"""The README says what the code does: its settings table is the one the code generates."""

import re

from dockercoins_tools.cli import settings_table
from tests.support import ROOT


def test_readme_settings_table_matches_the_settings_classes() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- settings:begin[^\n]*-->\n(.*?)<!-- settings:end -->", readme, re.S)
    assert found, "README lost its settings markers"
    assert found.group(1).strip() == settings_table().strip(), (
        "README's settings table is stale: paste the output of `dockercoins settings`"
    )
