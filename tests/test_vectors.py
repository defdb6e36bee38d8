"""Run an implementation against every conformance vector of spec/vectors/ through a scripted fake.

The implementation is selfmoa by default; point it at your own module with SELFMOA_IMPL=my_module (it must
offer moa, self_moa and self_moa_seq with selfmoa's keyword arguments, a ModelError accepting
(message, model=..., status=...), and results with .answer; see spec/vectors.md and spec/exercises.md).

The fake answers each request by looking it up by (model, n, seed, the references it shows), never by
arrival order, so concurrency cannot change what it answers. The references are read with the rule of
spec/wire.md section 6 (tests/fakes.py), written apart from selfmoa so that this test does not trust the
implementation's parser.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import json
import os
import pathlib
import re
import sys
import threading

import pytest

from tests import protocol
from tests.fakes import references_in  # wire.md section 6, read without trusting the implementation

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = sorted((ROOT / "spec" / "vectors").glob("*.json"))
IMPL = os.environ.get("SELFMOA_IMPL", "selfmoa")
impl = protocol.load(IMPL)  # a module, or cmd:COMMAND (spec/protocol.md)
LAST = re.compile(r"\n<<<end of response (\d+), key ([0-9a-f]{8})>>>\s*\Z")




def without_thoughts(text: str) -> str:
    """A reply without the <think>...</think> thoughts that open it (wire.md section 2), written from the spec."""
    rest = text.lstrip(" \t\r\n")
    if not rest.startswith("<think>"):
        return text
    while rest.startswith("<think>"):
        end = rest.find("</think>", len("<think>"))
        rest = "" if end < 0 else rest[end + len("</think>"):].lstrip(" \t\r\n")
    return rest


def stripped(text: str, messages) -> str:
    """A reply without its opening thoughts and the marker lines of the block its request showed (wire.md
    sections 2 and 6)."""
    text = without_thoughts(text)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    found = LAST.search(system)
    if not found:
        return text
    key = found.group(2)
    marker = re.compile(rf"[ \t]*<{{0,3}}[ \t]*(end of )?response \d+( of \d+)?, key {key}[ \t]*>{{0,3}}[ \t\r]*")
    return "\n".join(line for line in text.split("\n") if not marker.fullmatch(line))


def key(model, n, seed, references) -> tuple:
    return (model, n, seed, tuple(references))


class ScriptedModel:
    """A completion function that answers from a vector's script and checks every request against it."""

    def __init__(self, vector: dict, implementation=None):
        self.impl = impl if implementation is None else implementation
        self.script = {key(r["model"], r["n"], r["seed"], r["references"]): r for r in vector["requests"]}
        self.seen: list[tuple] = []
        self.problems: list[str] = []
        # Texts a request may show: the given samples, and whatever the fake has already answered.
        self.shown_so_far = set(vector["params"].get("samples", [])) | set(references_in(vector["prompt"]))
        self.lock = threading.Lock()

    def __call__(self, request):
        messages = [dict(m) for m in request.messages]
        asked = key(request.model, request.n, request.seed, references_in(messages))
        with self.lock:
            self.seen.append(asked)
            entry = self.script.get(asked)
            if entry is None:
                self.problems.append(f"unexpected request {asked}")
            else:
                early = [t for t in asked[3] if t not in self.shown_so_far]
                if early:
                    self.problems.append(f"{asked[:3]} shows {early!r} before any reply held it")
                if messages != entry["messages"]:
                    self.problems.append(f"{asked[:3]}: messages differ from the vector's (wire.md section 6)\n"
                                         f"  sent:     {messages!r}\n  expected: {entry['messages']!r}")
                if (request.temperature, request.max_tokens) != (entry["temperature"], entry["max_tokens"]):
                    self.problems.append(f"{asked[:3]}: temperature, max_tokens = "
                                         f"{(request.temperature, request.max_tokens)}, expected "
                                         f"{(entry['temperature'], entry['max_tokens'])}")
                if (getattr(request, "stream", None) is not None) != entry["stream"]:
                    self.problems.append(f"{asked[:3]}: {'no ' if entry['stream'] else ''}stream expected "
                                         "(only the final aggregation is streamed, methods.md section 3)")
                if getattr(request, "stop", None) != entry["stop"]:
                    self.problems.append(f"{asked[:3]}: stop={request.stop!r}; the methods never set it")
                if "replies" in entry:  # a later request may show a reply, without echoed marker lines
                    self.shown_so_far.update(stripped(reply, messages) for reply in entry["replies"] if reply)
        assert entry is not None, f"unexpected request {asked}; the vector expects {list(self.script)}"
        if "error" in entry:
            raise self.impl.ModelError(entry["error"]["message"], model=request.model, status=entry["error"]["status"])
        if "bug" in entry:
            raise bug(entry["bug"])
        for piece in entry.get("pieces", []) if request.stream is not None else []:
            request.stream(piece)
        return list(entry["replies"])


def bug(described: dict) -> Exception:
    """The exception a vector's `bug` reply raises: of the type it names (a builtin, or one made up)."""
    kind = getattr(builtins, described["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = type(described["type"], (Exception,), {})
    return kind(described["message"])


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path):
    replay(impl, path)


ADAPTER = f"cmd:{sys.executable} tests/selfmoa_adapter.py"


@pytest.mark.skipif(IMPL.startswith("cmd:"), reason="the implementation under test already speaks the protocol")
def test_every_vector_through_the_protocol_with_selfmoas_adapter():
    """spec/protocol.md cannot rot: selfmoa, behind the adapter shipped in tests/, passes every vector over
    the protocol (one process for all of them), as any other implementation is checked."""
    adapter = protocol.load(ADAPTER)
    for path in VECTORS:
        replay(adapter, path)


def replay(impl, path: pathlib.Path) -> None:
    """Run one vector against an implementation (a module, or a program over spec/protocol.md)."""
    vector = load(path)
    fake = ScriptedModel(vector, impl)
    method = getattr(impl, vector["method"])
    expected = vector["expected"]
    params, pieces = dict(vector["params"]), []
    if params.pop("stream", False):  # the caller gives a stream function; what it receives is checked
        params["stream"] = pieces.append
    if "error" in expected:
        with pytest.raises(Exception) as caught:
            method(vector["prompt"], complete=fake, **params)
        error = caught.value
        kind = expected["bug"]["type"] if expected["error"] == "bug" else expected["error"]
        assert type(error).__name__ == kind, f"raised {type(error).__name__}: {error}"
        for text in expected["match"]:
            assert text in str(error), f"the message should contain {text!r}: {error}"
        if "message" in expected:  # the whole message, where the spec fixes it (methods.md section 6)
            assert str(error) == expected["message"]
        if expected["error"] == "ConfigError":  # methods.md section 4: the message starts `name=value: `
            assert str(error).startswith(expected["match"][0] + ": "), f"should start {expected['match'][0]!r}"
        if hasattr(error, "failures"):
            assert len(error.failures) == expected["failures"]
        if getattr(error, "partial", None) is not None and hasattr(error.partial, "requests"):
            assert error.partial.requests == expected["requests"]
        trace = getattr(getattr(error, "partial", None), "trace", None)
    else:
        result = method(vector["prompt"], complete=fake, **params)
        assert result.answer == expected["answer"]
        for count in ("calls", "requests"):
            if hasattr(result, count):
                assert getattr(result, count) == expected[count], f"{count}"
        if "rounds" in expected and isinstance(getattr(result, "params", None), dict) and "rounds" in result.params:
            assert result.params["rounds"] == expected["rounds"]
        trace = getattr(result, "trace", None)
        if "streamed" in expected:
            assert "".join(pieces) == expected["streamed"], "what the stream function received"
    assert not fake.problems, "\n".join(fake.problems)
    assert sorted(fake.seen, key=repr) == sorted(fake.script, key=repr), "every request once, and nothing else"
    if trace is not None:  # a trace, when the implementation keeps one, lists the requests in spec order
        fields = ("role", "layer", "round", "model", "n", "seed", "carried")
        assert [tuple(getattr(call, f) for f in fields) for call in trace] == \
               [tuple(r[f] for f in fields) for r in vector["requests"]]
        recorded = ("indices", "references", "outputs", "error")  # methods.md section 7
        for number, (call, entry) in enumerate(zip(trace, vector["requests"])):
            got = {f: getattr(call, f) for f in recorded}
            assert got == entry["trace"], f"trace entry {number}: {got} != the vector's {entry['trace']}"


def test_there_are_vectors_for_every_required_case():
    names = {p.stem for p in VECTORS}
    assert {"moa-2-layer", "moa-3-layer", "self-moa-n6", "seq-n-below-window", "seq-n-equals-window-plus-one",
            "seq-last-round-partial", "seq-carry-window-minus-one", "moa-failed-proposer", "moa-min-ok-not-met",
            "moa-existing-system-message", "self-moa-n-ignored", "seq-worked-example"} <= names


def make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "spec" / "vectors" / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generator_shares_no_code_with_selfmoa_or_the_tests():
    """make_vectors.py is a second statement of the rules: it imports the standard library only."""
    tree = ast.parse((ROOT / "spec" / "vectors" / "make_vectors.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_the_vector_files_are_what_the_generator_writes():
    """spec/vectors/*.json equal what make_vectors.py writes from the rules (and wire.md's instruction)."""
    generator = make_vectors()
    built = {item["name"]: generator.render(item) for item in generator.build()}
    on_disk = {p.stem: p.read_text(encoding="utf-8") for p in VECTORS}
    assert built.keys() == on_disk.keys()
    for name in built:
        assert built[name] == on_disk[name], f"{name}.json is stale: run python3 spec/vectors/make_vectors.py"


def test_each_vector_states_the_papers_counts():
    """Paper counting: 2-layer with 6 proposers = 7 calls, 3-layer = 13, Self-MoA n=6 = 7, Seq = n + T."""
    by_name = {p.stem: load(p) for p in VECTORS}
    assert by_name["moa-2-layer"]["expected"]["calls"] == 7
    assert by_name["moa-3-layer"]["expected"]["calls"] == 13
    assert by_name["self-moa-n6"]["expected"]["calls"] == 7
    worked = by_name["seq-worked-example"]
    assert worked["expected"]["calls"] == 10 + 3 and worked["expected"]["rounds"] == 3


def test_every_vector_is_a_step_of_the_course_and_the_course_names_no_other():
    """spec/exercises.md names each vector in the step that teaches it, and only vectors that exist; so does
    the table of spec/vectors.md."""
    names = {p.stem for p in VECTORS}
    for page in ("exercises.md", "vectors.md"):
        text = (ROOT / "spec" / page).read_text(encoding="utf-8")
        named = set(re.findall(r"`((?:moa|self-moa|seq)-[a-z0-9-]+)`", text))
        assert names <= named, f"spec/{page} never names {sorted(names - named)}"
        assert named <= names, f"spec/{page} names vectors that do not exist: {sorted(named - names)}"
