"""Every command's --help as printed at 100 columns: no `<bool>` / `<str>` type labels."""

from __future__ import annotations

import re

import pytest

from tests.cli.test_cli import edgekit

COMMANDS = ["export", "run", "validate", "build", "doctor", "bench", "package", "inspect", "verify", "keygen",
            "serve", "profiles list", "profiles show"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_type_labels(command):
    result = edgekit(*command.split(), "--help", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    assert not re.findall(r"<(bool|str|int|float|path)>", result.stdout), result.stdout
    for line in result.stdout.splitlines():
        if re.search(r"│\s+--(help|json|force)\s", line):  # flags take no value: nothing between flag and help
            assert re.search(r"--(help|json|force)\s{2,}[A-Z][a-z]", line), line


def test_options_that_take_a_value_say_what_kind():
    result = edgekit("bench", "--help", env={"COLUMNS": "100"})
    assert re.search(r"--output\s+-o\s+FILE\s+Write the JSON report to FILE", result.stdout), result.stdout
    assert re.search(r"--runs\s+INT\s", result.stdout) and re.search(r"--profile\s+TEXT\s", result.stdout)


def test_readme_cross_references_point_the_right_way():
    """"see X below" / "see X above" in the README: X starts a heading or paragraph on that side."""
    from tests.cli.test_cli import ROOT

    lines = (ROOT / "README.md").read_text().splitlines()
    refs = [(i, m.group(1), m.group(2)) for i, line in enumerate(lines)
            for m in re.finditer(r"see (\w+) (below|above)", line)]
    assert refs
    for at, name, way in refs:
        starts = [i for i, line in enumerate(lines) if re.match(rf"(#+ )?{name}\b", line)]
        assert starts, name
        assert any((i > at) if way == "below" else (i < at) for i in starts), (name, way, at, starts)
