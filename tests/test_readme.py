"""The README's promises: the two commands, a CLI section that matches the parser."""

from pathlib import Path

import pytest

from pipeline.cli import COMMAND_MODULES, usage_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_gives_the_two_commands():
    head = README[:800]
    assert "make run" in head and "make test" in head and "make test-fast" in head


@pytest.mark.slow
def test_readme_cli_section_matches_the_parser():
    # Regenerate with: python -c "from pipeline.cli import usage_markdown; print(usage_markdown())"
    section = README.split("<!-- CLI-START -->")[1].split("<!-- CLI-END -->")[0].strip()
    assert section == usage_markdown()
    for module in COMMAND_MODULES:
        assert module.split(".")[1].replace("ingest", "import-photos") in section
