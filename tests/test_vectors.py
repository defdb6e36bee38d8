"""Run an implementation against every conformance vector of spec/vectors/ through a scripted fake.

The implementation is selfmoa by default; a student points it at their own module with
SELFMOA_IMPL=my_module (it must offer moa, self_moa and self_moa_seq with selfmoa's signatures and return an
object with .answer, or raise an exception whose class is named as the vector expects).

The fake answers each request by looking it up by (model, n, seed, references shown), so the order in which
concurrent calls arrive cannot change anything; the references are read with the rule of spec/wire.md
section 6, written again here so that this test does not trust the implementation's own parser.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import threading

import pytest

VECTORS = sorted((pathlib.Path(__file__).resolve().parent.parent / "spec" / "vectors").glob("*.json"))
impl = importlib.import_module(os.environ.get("SELFMOA_IMPL", "selfmoa"))
FIRST = re.compile(r"^<<<response 1 of (\d+), key ([0-9a-f]{8})>>>$", re.MULTILINE)


def references_in(messages) -> tuple[list[str], str]:
    """The references of a request, and its system text before the block ('' if none)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    found = FIRST.search(system)
    if not found:
        return [], system
    count, key = int(found.group(1)), found.group(2)
    refs = []
    for i in range(1, count + 1):
        begin = f"<<<response {i} of {count}, key {key}>>>\n"
        end = f"\n<<<end of response {i}, key {key}>>>"
        start = system.index(begin)
        refs.append(system[start + len(begin):system.index(end, start + len(begin) - 1)])
    return refs, system


class ScriptedModel:
    def __init__(self, vector):
        self.vector = vector
        self.expected = {self.key(r["model"], r["n"], r["seed"], r["references"]): r for r in vector["requests"]}
        self.seen: list[tuple] = []
        self.lock = threading.Lock()

    @staticmethod
    def key(model, n, seed, references):
        return (model, n, seed, tuple(references))

    def __call__(self, request):
        refs, system = references_in(list(request.messages))
        key = self.key(request.model, request.n, request.seed, refs)
        with self.lock:
            self.seen.append(key)
        assert key in self.expected, f"unexpected request {key}; expected one of {list(self.expected)}"
        entry = self.expected[key]
        assert request.temperature == entry["temperature"]
        # Everything but the system block passes through unchanged (M3).
        prompt = self.vector["prompt"]
        rest = list(request.messages[1:]) if refs and prompt[0]["role"] != "system" else list(request.messages)
        if refs:
            if prompt[0]["role"] == "system":
                assert system.startswith(prompt[0]["content"] + "\n\n") and rest[1:] == prompt[1:]
            else:
                assert rest == prompt
        else:
            assert list(request.messages) == prompt
        if "error" in entry:
            raise impl.ModelError(entry["error"]["message"], model=request.model, status=entry["error"]["status"])
        return list(entry["replies"])


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path):
    vector = json.loads(path.read_text())
    fake = ScriptedModel(vector)
    method = getattr(impl, vector["method"])
    params = dict(vector["params"])
    expected = vector["expected"]
    if "error" in expected:
        with pytest.raises(Exception) as caught:
            method(vector["prompt"], complete=fake, **params)
        assert type(caught.value).__name__ == expected["error"] and expected["match"] in str(caught.value)
    else:
        result = method(vector["prompt"], complete=fake, **params)
        assert result.answer == expected["answer"]
        if hasattr(result, "calls"):
            assert (result.calls, result.requests) == (expected["calls"], expected["requests"])
    assert sorted(fake.seen) == sorted(fake.expected), "every expected request exactly once, nothing else"
    carried = {fake.key(r["model"], r["n"], r["seed"], r["references"]): r["carried"] for r in vector["requests"]}
    for key in fake.seen:
        refs = list(key[3])
        if carried[key]:
            assert refs[:carried[key]] == [refs[0]] * carried[key]


def test_there_are_vectors_for_every_required_case():
    names = {p.stem for p in VECTORS}
    assert {"moa-2-layer", "moa-3-layer", "self-moa-n6", "seq-n-below-window", "seq-n-equals-window-plus-one",
            "seq-last-round-partial", "seq-carry-window-minus-one", "moa-failed-proposer", "moa-min-ok-not-met",
            "moa-existing-system-message", "self-moa-n-ignored"} <= names
