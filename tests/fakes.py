"""Fakes at the seam: deterministic recording models, and a sequential reference implementation.

`Recorder` is a completion function that records every Request it receives. Its replies are a pure
function of the request (sha256 over model, messages, temperature and the effective seed of each choice), so
a run's result cannot depend on thread scheduling unless the orchestrator lets it. It follows the seed
convention of spec/wire.md section 4: choice j of a request with seed S equals choice 0 with seed S + j.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import selfmoa


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
        key = digest(request.model, list(request.messages), request.seed)
        if self.jitter:
            time.sleep(int(key[:4], 16) / 0xFFFF * self.jitter)
        if self.reverse and request.seed is not None:
            time.sleep(max(0.0, 0.02 - 0.002 * request.seed))
        proposal = not selfmoa.read_references(request.messages)
        if request.model in self.fail or (proposal and (request.model, request.seed) in self.fail) or \
                (self.fails is not None and self.fails(request)):
            raise selfmoa.ModelError("scripted failure", model=request.model, url="fake://", status=500)
        count = request.n if self.honour_n else 1
        texts = [self.text(request, j) for j in range(count)]
        if request.stream is not None:
            for text in texts:
                for piece in (text[:5], text[5:]):
                    request.stream(piece)
        return selfmoa.Reply(texts, ["stop"] * count, prompt_tokens=10, completion_tokens=3 * count)

    def aggregator_requests(self) -> list[selfmoa.Request]:
        return [r for r in self.requests if selfmoa.read_references(r.messages)]


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
