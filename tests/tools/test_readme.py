"""The README and the docs/ pages, as written: every `python -m ...` line in their code blocks names flags its command
has; the README is a front door (at most 300 lines) that links every docs/ page; every relative link resolves.

Running the commands would take hours (training, 200-image evaluations, full-size exports); their quick
mode here is argparse's own: each command line is parsed by the real command, which stops right
after parsing. A renamed or removed flag, or a module that moved, fails here.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PLACEHOLDERS = ("<", "path/to/")
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 300


def documented_commands(pages: list[Path] = [README, *DOCS]) -> list[tuple[str, list[str]]]:  # noqa: B006 (read only)
    """(page, words) for every `python -m` line in the pages' code blocks."""
    commands = []
    for page in pages:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if not line.startswith("python -m ") or any(p in line for p in PLACEHOLDERS):
                    continue  # prose, Python code, or a command with a placeholder to fill in
                words = shlex.split(line, comments=True)
                if words[2] != "pytest":
                    commands.append((page.relative_to(REPO).as_posix(), words))
    return commands


class Parsed(Exception):
    """Raised by the patched parse_args: the command accepted its arguments."""


COMMANDS = documented_commands()


def test_the_pages_have_commands_to_check():
    modules = {words[2] for _, words in COMMANDS}
    assert {"runtime", "export.build", "reference.evaluate", "reference.train", "benchmarks.compare", "serving"} <= modules
    assert {"runtime", "export.build", "reference.evaluate"} <= {words[2] for page, words in COMMANDS if page == "README.md"}


def test_the_readme_is_a_front_door_that_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    assert len(DOCS) >= 10
    unlinked = [p.name for p in DOCS if f"(docs/{p.name})" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


# runpy notes that the benchmarks package imported the module it is asked to run; harmless here
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("page, words", COMMANDS, ids=[f"{page}: {' '.join(w[2:5])}" for page, w in COMMANDS])
def test_documented_command_parses(page, words, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
    with pytest.raises(Parsed):
        runpy.run_module(words[2], run_name="__main__", alter_sys=False)
