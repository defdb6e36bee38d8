"""spec/invariants.md and the tests cannot drift apart: every invariant has tests, every named test exists,
and every test named after an invariant (test_<ID>_...) is listed under it."""

from __future__ import annotations

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| ([A-Z]\d+) \| (.+?) \| (.*?) \|$")


def invariants() -> dict[str, list[str]]:
    table = {}
    for line in (ROOT / "spec" / "invariants.md").read_text(encoding="utf-8").splitlines():
        found = ROW.match(line)
        if found:
            table[found.group(1)] = [t.strip() for t in found.group(3).split(",") if t.strip()]
    return table


def test_every_invariant_has_a_test_and_every_named_test_exists():
    table = invariants()
    assert {"M1", "M2", "M3", "M4", "M5", "S1", "S2", "Q1", "Q2", "Q3", "Q4", "Q5", "Q6", "Q7"} <= set(table)
    for ident, tests in table.items():
        assert tests, f"invariant {ident} has no test"
        for test in tests:
            path, _, name = test.partition("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, name, None)), f"{ident}: {test} does not exist"


def test_every_test_named_after_an_invariant_is_listed_under_it():
    table = invariants()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name in re.findall(r"^def (test_([A-Z]\d+)_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE):
            test, ident = name
            assert ident in table, f"{path.name}::{test} names invariant {ident}, which spec/invariants.md lacks"
            assert f"tests/{path.name}::{test}" in table[ident], f"{test} is not listed under {ident}"
