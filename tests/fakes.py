"""Fakes at the seam: deterministic recording models, and a sequential reference implementation.

`impl` is the implementation under test: selfmoa, or the module named by SELFMOA_IMPL (spec/exercises.md).
`references_in` reads a request's references by the rule of spec/wire.md section 6, written again here so
that the tests do not trust the implementation's own reader.

`Recorder` is a completion function that records every Request it receives. Its replies are a pure
function of the request (sha256 over model, messages, temperature and the effective seed of each choice), so
a run's result cannot depend on thread scheduling unless the orchestrator lets it. It follows the seed
convention of spec/wire.md section 4: choice j of a request with seed S equals choice 0 with seed S + j.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time

import selfmoa
from tests import protocol

impl = protocol.load(os.environ.get("SELFMOA_IMPL", "selfmoa"))  # a module, or cmd:COMMAND (spec/protocol.md)
_LAST = re.compile(r"\n<<<end of response (\d+), key ([0-9a-f]{8})>>>\s*\Z")


def references_in(messages) -> list[str]:
    """The references a request shows: those of the block that ends its system message (wire.md section 6)."""
    messages = list(messages)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    found = _LAST.search(system)
    if not found:
        return []
    count, key = int(found.group(1)), found.group(2)
    refs, position = [], system.rindex(f"<<<response 1 of {count}, key {key}>>>\n")
    for i in range(1, count + 1):
        begin, end = f"<<<response {i} of {count}, key {key}>>>\n", f"\n<<<end of response {i}, key {key}>>>"
        start = system.index(begin, position)
        stop = system.index(end, start + len(begin) - 1)
        refs.append(system[start + len(begin):stop])
        position = stop + len(end)
    return refs


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class Recorder:
    """A fake model server at the seam.

    - honour_n: return n choices (True) or always one (False, like llama.cpp's server).
    - fail: model names, or (model, seed) pairs of proposal requests, whose calls raise ModelError; or a
      function of the Request saying whether it fails (a pure function: then timing cannot change it).
    - jitter: sleep up to this many seconds, chosen from the request hash, to shuffle completion order.
    - reverse: later proposer positions finish sooner (sleep decreasing with the seed).
    """

    def __init__(self, honour_n=True, fail=(), jitter=0.0, reverse=False):
        self.honour_n, self.jitter, self.reverse = honour_n, jitter, reverse
        self.fail, self.fails = (set(), fail) if callable(fail) else (set(fail), None)
        self.requests: list[selfmoa.Request] = []
        self._lock = threading.Lock()

    def text(self, request: selfmoa.Request, choice: int) -> str:
        seed = None if request.seed is None else request.seed + choice
        key = digest(request.model, list(request.messages), request.temperature, seed,
                     None if request.seed is not None else choice)
        return f"{request.model}/{seed}/{key[:12]}"

    def __call__(self, request: selfmoa.Request):
        with self._lock:
            self.requests.append(request)
        if self.jitter:
            key = digest(request.model, list(request.messages), request.seed)
            time.sleep(int(key[:4], 16) / 0xFFFF * self.jitter)
        if self.reverse and request.seed is not None:
            time.sleep(max(0.0, 0.02 - 0.002 * request.seed))
        if self.fails_on(request):
            raise impl.ModelError("scripted failure", model=request.model, status=500)
        count = request.n if self.honour_n else 1
        texts = [self.text(request, j) for j in range(count)]
        stream = getattr(request, "stream", None)
        if stream is not None:
            for text in texts:
                for piece in (text[:5], text[5:]):
                    stream(piece)
        if impl is not selfmoa:
            return texts  # spec/exercises.md: a completion function may return a list of texts
        return selfmoa.Reply(texts, ["stop"] * count, prompt_tokens=10, completion_tokens=3 * count)

    def fails_on(self, request) -> bool:
        """Whether this fake fails the request (a pure function of it)."""
        proposal = not references_in(request.messages)
        return request.model in self.fail or (proposal and (request.model, request.seed) in self.fail) or \
            (self.fails is not None and self.fails(request))

    def aggregator_requests(self) -> list[selfmoa.Request]:
        return [r for r in self.requests if references_in(r.messages)]


# --- A sequential reference implementation, written straight from spec/methods.md ---------------------


def reference_moa(fake: Recorder, messages, plan, aggregator, seed, temperature=0.7, agg_temperature=0.7,
                  instruction=selfmoa.DEFAULT_INSTRUCTION):
    """MoA with one request per proposer, one after another: the plain loop of the paper."""
    references: list[str] = []
    for layer in plan:
        prompt = selfmoa.inject_references(messages, references, instruction)
        references = [fake.text(selfmoa.Request(model, tuple(prompt), temperature, None, 1,
                                                None if seed is None else seed + j), 0)
                      for j, model in enumerate(layer)]
    final = selfmoa.inject_references(messages, references, instruction)
    return fake.text(selfmoa.Request(aggregator, tuple(final), agg_temperature, None, 1, seed), 0), final


def reference_seq(fake: Recorder, messages, samples, aggregator, window, carry, seed,
                  instruction=selfmoa.DEFAULT_INSTRUCTION):
    """Self-MoA-Seq over given samples: returns the final synthesis and every round's window."""
    windows, synthesis, position = [], None, 0
    while position < len(samples) or synthesis is None:
        take = window if synthesis is None else window - carry
        new = samples[position:position + take]
        if not new:
            break
        position += len(new)
        window_texts = ([] if synthesis is None else [synthesis] * carry) + list(new)
        windows.append(window_texts)
        prompt = selfmoa.inject_references(messages, window_texts, instruction)
        synthesis = fake.text(selfmoa.Request(aggregator, tuple(prompt), 0.7, None, 1, seed), 0)
    return synthesis, windows
