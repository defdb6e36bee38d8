"""spec/protocol.md: the harness, selfmoa's adapter, and mutants of selfmoa that the protocol suite must catch.

Each mutant is selfmoa.py with one mistake a port could make (issue 25's list), run behind the adapter
(tests/selfmoa_adapter.py --module MUTANT) and replayed against the conformance vectors over the protocol,
as any implementation in another language is checked. Every mutant must fail at least one vector. A mutation
that no longer applies to selfmoa.py (the code it changes was rewritten) fails loudly: update it here.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest

from tests import protocol
from tests.test_vectors import VECTORS, replay

ROOT = pathlib.Path(__file__).resolve().parent.parent
ADAPTER = f"{sys.executable} tests/selfmoa_adapter.py"

# name: [(a regular expression over selfmoa.py, what the mutant has instead), ...]; each must match exactly once.
MUTANTS = {
    "stream every round": [
        (r"call\.round \+ 1\), self\.source\.exhausted", "call.round + 1), True"),
    ],
    "carry after the new samples": [
        (r"shown = (\(\[\] if synthesis is None else \[synthesis\] \* carry\)) \+ (\[text for _, text in new\])",
         r"shown = \2 + \1"),
    ],
    "seeds off by one in the fallback": [
        (r"def ask\(start: int, size: int\) -> None:", "def ask(start: int, size: int, off: int = 0) -> None:"),
        (r"(seed = None if (\w+) is None else \2 \+ first \+ start)\n", r"\1 + off\n"),
        (r"ask\(missing, 1\)  #", "ask(missing, 1, 1)  #"),
    ],
    "trace in arrival order": [
        (r"trace = sorted\(self\.trace, key=Call\.sort_key\)", "trace = list(self.trace)"),
    ],
    "extra choices kept": [
        (r"for text in value\.texts\[:request\.n\]\]", "for text in value.texts]"),
    ],
    "echoed markers kept": [
        (r"if block is not None:  # a model may echo", "if False:  # a model may echo"),
    ],
    "thoughts kept": [
        (r"text, thought = split_thoughts\(text\)  #", "thought = False  #"),
    ],
}


def mutate(source: str, name: str) -> str:
    for pattern, mutated in MUTANTS[name]:
        source, count = re.subn(pattern, mutated, source)
        assert count == 1, (f"mutant {name!r}: {pattern!r} matches {count} times in selfmoa.py, not once; the code "
                            "it mutates changed, so update MUTANTS in tests/test_protocol.py")
    return source


@pytest.mark.parametrize("name", list(MUTANTS))
def test_every_mutant_is_caught_by_the_protocol_suite(name, tmp_path):
    """The mutant, behind the adapter, fails at least one vector replayed over the protocol."""
    path = tmp_path / "selfmoa.py"
    path.write_text(mutate((ROOT / "selfmoa.py").read_text(encoding="utf-8"), name), encoding="utf-8")
    mutant = protocol.Implementation(f"{ADAPTER} --module {path}", limit=10)  # the harness's settle, as in CI
    caught = []
    try:
        for vector in VECTORS:
            try:
                replay(mutant, vector)
            except (Exception, pytest.fail.Exception) as exc:  # pytest.raises without a raise is no Exception
                caught.append(f"{vector.stem}: {type(exc).__name__}: {str(exc)[:200]}")
                break
            if mutant._program is not None and mutant._program.process.poll() is not None:
                caught.append(f"{vector.stem}: the adapter died")
                break
    finally:
        mutant.close()
    assert caught, f"no vector catches the mutant {name!r}: the protocol suite misses that mistake"
    assert not any(sign in caught[0] for sign in ("exited", "must first say", "died")), \
        f"the mutant {name!r} did not even start, so nothing was checked: {caught[0]}"


def test_the_adapter_refuses_a_param_its_method_does_not_take():
    """An unknown param is refused loudly (kind unsupported), never dropped: the harness fails the test."""
    adapter = protocol.load(f"cmd:{ADAPTER}")
    with pytest.raises(protocol.ProtocolError, match="frobnicate"):
        adapter.moa("Q", ["a"], "z", complete=lambda request: "x", frobnicate=1)
    assert adapter.moa("Q", ["a"], "z", complete=lambda request: "x").answer == "x"  # the process lives on


def test_a_program_that_does_not_speak_the_protocol_is_a_clear_failure_not_a_hang(tmp_path):
    """A program that prints something else first, or exits, fails with what it did."""
    script = tmp_path / "wrong.py"
    script.write_text("print('hello')\n", encoding="utf-8")
    with pytest.raises(protocol.ProtocolError, match="not a JSON line"):
        protocol.Implementation(f"{sys.executable} {script}", limit=10).moa(
            "Q", ["a"], "z", complete=lambda request: "x")
    script.write_text("import sys\nprint('{\"type\": \"ready\", \"protocol\": 1}', flush=True)\nsys.stdin.readline()\n",
                      encoding="utf-8")
    with pytest.raises(protocol.ProtocolError, match="exited"):
        protocol.Implementation(f"{sys.executable} {script}", limit=10).moa(
            "Q", ["a"], "z", complete=lambda request: "x")


def test_a_request_id_used_twice_is_a_clear_failure(tmp_path):
    """Request ids are unique in the session (protocol.md section 5): a program that reuses one fails."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import json, sys\n"
        "print(json.dumps({'type': 'ready', 'protocol': 1}), flush=True)\n"
        "run = json.loads(sys.stdin.readline())['run']\n"
        "ask = {'type': 'complete', 'run': run, 'id': 7, 'model': 'a', 'messages': [{'role': 'user', 'content': 'Q'}],"
        " 'temperature': 0.7, 'max_tokens': None, 'n': 1, 'seed': None, 'stream': False, 'stop': None}\n"
        "print(json.dumps(ask), flush=True)\n"
        "sys.stdin.readline()\n"
        "print(json.dumps(ask), flush=True)\n"
        "sys.stdin.readline()\n", encoding="utf-8")
    program = protocol.Implementation(f"{sys.executable} {script}", limit=10)
    try:
        with pytest.raises(protocol.ProtocolError, match="unique"):
            program.moa("Q", ["a"], "z", complete=lambda request: "x")
    finally:
        program.close()


def test_requests_open_together_are_answered_out_of_order():
    """The harness answers the requests an implementation has open at once newest first, so a port that
    relies on arrival order fails; selfmoa, sending six proposals at once, still passes (M2, T1)."""
    order = []

    def complete(request):
        order.append(request.seed)
        return f"p{request.seed}"

    adapter = protocol.Implementation(f"{ADAPTER}", settle=0.05, limit=10)
    try:
        result = adapter.moa("Q", list("abcdef"), "z", complete=complete, seed=0, use_n=False)
    finally:
        adapter.close()
    proposals = [seed for seed in order[:-1]]
    assert sorted(proposals) == list(range(6)) and proposals != sorted(proposals)
    assert [call.indices for call in result.trace] == [[j] for j in range(6)] + [[0]]
    assert json.dumps(result.trace[-1].references) == json.dumps(list(range(6)))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_each_question_a_port_asked_has_an_answer_whose_links_resolve():
    """spec/README.md answers the 25 questions of the port written from spec/ alone, one row each, linking to
    sections that exist, and naming only vectors that exist."""
    readme = (ROOT / "spec" / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Questions a second implementation asked"):]
    rows = [line for line in table.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [int(row.split("|")[1]) for row in rows] == list(range(1, 26))
    names = {path.stem for path in VECTORS}
    for row in rows:
        _, number, question, answer, where, _ = row.split("|")
        assert question.strip() and answer.strip() and "](" in where, f"question {number.strip()} lacks an answer"
        for name in re.findall(r"vector `([a-z0-9-]+)`", answer):
            assert name in names, f"question {number.strip()} names the vector {name}, which does not exist"
        for target, anchor in re.findall(r"\]\(([^)#]+)(?:#([^)]*))?\)", where):
            page = ROOT / "spec" / target
            assert page.exists(), f"question {number.strip()} links to {target}"
            if anchor:
                headings = [slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)]
                assert anchor in headings, f"question {number.strip()}: {target} has no section #{anchor}"


def test_a_run_that_breaks_off_does_not_leak_into_the_next(monkeypatch):
    """A run that ends with an error the spec knows leaves the program running for the next run; one that
    breaks off in the middle (here the harness fails while answering a request) ends the program, and the
    next run gets a fresh one instead of the broken run's stray lines."""
    adapter = protocol.Implementation(ADAPTER, limit=10)
    try:
        with pytest.raises(protocol.ProtocolError, match="frobnicate"):
            adapter.moa("Q", ["a"], "z", complete=lambda request: "x", frobnicate=1)
        first = adapter.program
        with pytest.raises(ZeroDivisionError):
            adapter.moa("Q", ["a", "b"], "z", complete=lambda request: 1 / 0, use_n=False)
        assert adapter.program is first
        with monkeypatch.context() as patch:
            patch.setattr(protocol._Run, "answer", lambda self, line: {}["the harness broke"])
            with pytest.raises(KeyError):
                adapter.moa("Q", ["a"], "z", complete=lambda request: "x")
        assert adapter._program is None and first.process.poll() is not None
        assert adapter.moa("Q", ["a"], "z", complete=lambda request: "fresh").answer == "fresh"
    finally:
        adapter.close()
