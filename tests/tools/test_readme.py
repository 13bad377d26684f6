"""The README's commands, as written: every `python -m ...` line in its code blocks names flags its command has.

Running them all would take hours (training, 200-image evaluations, full-size exports); their quick
mode here is argparse's own: each command line is parsed by the real command, which stops right
after parsing. A renamed or removed flag, or a module that moved, fails here.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys

import pytest

from tests.helpers import REPO

PLACEHOLDERS = ("<", "path/to/")


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith("python -m ") or any(p in line for p in PLACEHOLDERS):
                continue  # prose, Python code, or a command with a placeholder to fill in
            words = shlex.split(line, comments=True)
            if words[2] != "pytest":
                commands.append(words)
    return commands


class Parsed(Exception):
    """Raised by the patched parse_args: the command accepted its arguments."""


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    modules = {words[2] for words in COMMANDS}
    assert {"runtime", "export.build", "reference.evaluate", "reference.train", "benchmarks.compare"} <= modules


# runpy notes that the benchmarks package imported the module it is asked to run; harmless here
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w[2:5]) for w in COMMANDS])
def test_readme_command_parses(words, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
    with pytest.raises(Parsed):
        runpy.run_module(words[2], run_name="__main__", alter_sys=False)
