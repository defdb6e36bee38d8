"""spec/ and the tests cannot drift apart.

spec/invariants.md holds one table row per invariant: | ID | statement | tests |, the tests written as
`tests/test_x.py::test_name`, comma-separated. These tests fail when an invariant has no (passing-kind)
test, when a named test does not exist, when a test named after an invariant (test_<ID>_...) is not listed
under it, when a row is malformed (so it cannot silently drop out of the table), or when a link in spec/
points nowhere.
"""

from __future__ import annotations

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"
ROW = re.compile(r"^\| ([A-Z]\d+) \| ([^|]+?) \| ([^|]*?) \|$")
TEST = re.compile(r"^tests/(test_\w+)\.py::(test_\w+)$")
NAMED_AFTER = re.compile(r"^\s*(?:async\s+)?def (test_([A-Z]\d+)_\w*)\s*\(", re.MULTILINE)
PAPER = [f"M{i}" for i in range(1, 6)] + ["S1", "S2"] + [f"Q{i}" for i in range(1, 8)]


def invariants() -> dict[str, list[str]]:
    """ID -> the tests named for it, from the table of spec/invariants.md (every table row must parse)."""
    table: dict[str, list[str]] = {}
    rows = [line for line in (SPEC / "invariants.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("|")]
    assert rows[:2] == ["| ID | statement | tests |", "|---|---|---|"], "the table header changed"
    for line in rows[2:]:
        found = ROW.match(line)
        assert found, f"malformed row in spec/invariants.md: {line!r}"
        ident, _, tests = found.groups()
        assert ident not in table, f"invariant {ident} appears twice"
        table[ident] = [t.strip() for t in tests.split(",") if t.strip()]
    return table


def resolve(test: str):
    """The test function a `tests/test_x.py::test_name` entry names (by importing its module), or None."""
    found = TEST.match(test)
    assert found, f"{test!r} is not of the form tests/test_x.py::test_name"
    module = importlib.import_module(f"tests.{found.group(1)}")
    function = getattr(module, found.group(2), None)
    return function if callable(function) else None


def is_xfail(function) -> bool:
    return any(mark.name == "xfail" for mark in getattr(function, "pytestmark", []))


def test_every_invariant_has_a_test_and_every_named_test_exists():
    table = invariants()
    missing = [ident for ident in PAPER if ident not in table]
    assert not missing, f"spec/invariants.md lacks the paper's invariants {missing} (methods.md sections 1-3)"
    for ident, tests in table.items():
        assert tests, f"invariant {ident} has no test"
        functions = [resolve(test) for test in tests]
        for test, function in zip(tests, functions):
            assert function is not None, f"{ident}: {test} does not exist"
        assert any(not is_xfail(f) for f in functions), f"invariant {ident} is checked only by expected failures"


def test_every_test_named_after_an_invariant_is_listed_under_it():
    table = invariants()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for test, ident in NAMED_AFTER.findall(path.read_text(encoding="utf-8")):
            assert ident in table, f"{path.name}::{test} names invariant {ident}, which spec/invariants.md lacks"
            assert f"tests/{path.name}::{test}" in table[ident], f"{path.name}::{test} is not listed under {ident}"


def test_links_in_spec_point_to_files_that_exist():
    for page in sorted(SPEC.glob("*.md")):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_sends_readers_to_spec():
    assert "(spec/)" in (ROOT / "README.md").read_text(encoding="utf-8")
