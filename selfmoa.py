#!/usr/bin/env python3
"""selfmoa: Mixture-of-Agents, Self-MoA and Self-MoA-Seq in one standard-library file.

This module is the reference implementation of the LLM ensembling methods of *Rethinking
Mixture-of-Agents: Is Mixing Different Large Language Models Beneficial?* (Li, Lin, Xia, Jin, 2025,
arXiv 2502.00674), built on *Mixture-of-Agents Enhances Large Language Model Capabilities* (Wang et al.,
2024, arXiv 2406.04692). It talks to any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang,
llama.cpp, Ollama, hosted APIs), each model on its own server if you like. Copy this one file into a
project and it works: it needs nothing outside the Python standard library (3.10 or newer).

The three methods
-----------------
**MoA** (Wang et al.): several *proposer* models answer the prompt; an *aggregator* model receives their
answers, numbered, in its system message and synthesizes one better answer. Layers stack: each proposer of
layer ``l`` sees the answers of layer ``l - 1``. Layers are counted as the papers count them, the aggregator
included: a 2-layer MoA is one layer of proposers plus the aggregator.

**Self-MoA** (Li et al.): the proposers are one single model, the best one, sampled ``n`` times at a
temperature above zero; the same model aggregates by default. Diversity comes from sampling one strong
model, not from mixing weaker ones, and the paper finds it wins in most settings (AlpacaEval 2.0 LC 65.7
vs 59.1 for mixed MoA; +3.8 points on average over MMLU, CRUX and MATH), because the aggregate is far more
sensitive to the *quality* of the proposals than to their *diversity*.

**Self-MoA-Seq** (Li et al.): a sequential Self-MoA for many samples. A sliding *window* of ``window``
responses is aggregated per round: round 1 aggregates the first ``window`` samples; every later round
aggregates the previous round's synthesis, repeated ``carry`` times to bias the aggregator towards it,
together with the next ``window - carry`` new samples (``seq_plan`` lists the windows). Each round starts
as soon as its samples exist, so samples can still be arriving. With ``n`` samples there are
``1 + ceil((n - window) / (window - carry))`` rounds (one if ``n <= window``) and ``n`` + rounds calls.

Public API
----------
==========================  =================================================================
``moa``                     Mixture-of-Agents over layers of (possibly different) proposers
``self_moa``                Self-MoA: ``n`` samples of one model, then one aggregation
``self_moa_seq``            Self-MoA-Seq: rounds over a sliding window with a carried synthesis
``HTTPClient``              the default completion function: OpenAI-compatible servers over HTTP
``Endpoint``                one server: base URL and the API key that belongs to it
``Request`` / ``Reply``     what crosses the seam between the methods and a model
``Result`` / ``Call``       the final answer, with a trace of every call made
``inject_references``       the aggregator prompt: messages + instruction + numbered references
``DEFAULT_INSTRUCTION``     the aggregator's instruction unless ``instruction=`` replaces it
``read_references``         the inverse: the references an aggregator prompt holds
``seq_plan``                Self-MoA-Seq's windows: per round, the carried copies and the new samples
``seq_rounds``              the number of Self-MoA-Seq rounds for ``n``, ``window``, ``carry``
``MAX_N``                   the most samples asked for in one request (16)
``read_items``              read and check a batch input file (JSONL or a JSON list)
``check_items``             check batch items given as Python objects
``vendi_score``             the diversity of a set of outputs (Vendi score)
``run_batch``               many prompts, concurrently, written out line by line, resumable
``ModelServer``             the methods as models behind an OpenAI-compatible endpoint (``selfmoa serve``)
``main``                    the command line
==========================  =================================================================

The three methods at a glance (the arguments after ``prompt`` and the models are keywords)::

    moa(prompt, proposers, aggregator, *, complete, layers=2, min_ok=1, seed=None, temperature=0.7, ...)
    self_moa(prompt, model, *, complete, n=6, aggregator=model, layers=2, min_ok=1, seed=None, ...)
    self_moa_seq(prompt, model, *, complete, n=6 (or samples=...), window=6, carry=3, min_ok=1, ...)

Errors form one small tree, rooted in ``SelfMoAError``::

    SelfMoAError
     +-- ConfigError            a bad argument, flag or input file (also a ValueError)
     +-- ModelError             a model call failed for good: model, url, status, body, attempts
     +-- NotEnoughProposals     fewer than ``min_ok`` proposers of a layer succeeded

An error raised after work began carries that work as ``error.partial`` (a ``Result`` whose trace lists
every request sent: a run waits for the requests it has issued before it raises).

Usage
-----
A model is anything that takes a ``Request`` and returns text: ``HTTPClient`` for real servers, or a plain
function in tests and lessons. Here is a toy model that reports what it saw:

>>> def toy(request):
...     refs = read_references(request.messages)
...     return f"{request.model} read {len(refs)} responses" if refs else f"{request.model} draft"
>>> result = moa("Name a prime.", proposers=["a", "b", "c"], aggregator="z", complete=toy)
>>> result.answer
'z read 3 responses'
>>> [(call.role, call.model) for call in result.trace]
[('proposer', 'a'), ('proposer', 'b'), ('proposer', 'c'), ('aggregator', 'z')]

Self-MoA asks one model for ``n`` samples, then aggregates them. The samples go in one request with ``n``;
``toy`` returns a single text, as a server that ignores ``n`` does, so the missing samples are asked for one
by one (sample ``i`` with seed ``seed + i``):

>>> result = self_moa("Name a prime.", "a", n=4, complete=toy, seed=7)
>>> result.answer, result.calls, result.requests
('a read 4 responses', 5, 5)
>>> [(call.indices, call.n, call.seed) for call in result.trace]
[([0, 1, 2, 3], 4, 7), ([1], 1, 8), ([2], 1, 9), ([3], 1, 10), ([0], 1, 7)]

Self-MoA-Seq aggregates 10 samples through a window of 6 that carries the synthesis 3 times:

>>> result = self_moa_seq("Name a prime.", "a", n=10, window=6, carry=3, complete=toy)
>>> [(call.round, call.carried, call.references) for call in result.trace if call.role == "aggregator"]
[(1, 0, [0, 1, 2, 3, 4, 5]), (2, 3, [6, 7, 8]), (3, 3, [9])]
>>> seq_rounds(30, window=6, carry=3)
9

Against a real server, pass an ``HTTPClient``; give each model its own endpoint where needed::

    client = HTTPClient("http://localhost:8000/v1",                    # vLLM, serving "qwen"
                        endpoints={"gpt-4o": Endpoint("https://api.openai.com/v1", api_key=KEY)})
    print(self_moa("Explain RAID 5.", "qwen", n=6, complete=client).answer)
    client = HTTPClient(["http://gpu0:8000/v1", "http://gpu1:8000/v1"])  # replicas: calls spread over both

On the command line (``python3 selfmoa.py --help`` for every flag)::

    selfmoa --base-url http://localhost:8000/v1 -m qwen "Explain RAID 5."
    selfmoa --method moa -p qwen -p llama -p mistral -a qwen "Explain RAID 5."
    selfmoa --method self-moa-seq -m qwen -n 30 --window 6 --carry 3 --json "Explain RAID 5."
    selfmoa -m qwen -i prompts.jsonl -o answers.jsonl          # batch; re-run to resume
    selfmoa serve --base-url http://localhost:8000/v1 --port 8080   # "self-moa/qwen" is now a model

The exact behaviour (invariants, wire format, prompt format) is specified in the ``spec/`` folder of the
project; the tests check every invariant by name.

Licence: MIT. Copyright (c) 2026 the selfmoa authors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import email.utils
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import itertools
import json
import math
import os
import queue
import random
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

__version__ = "0.2.0"
__all__ = [  # noqa: RUF022 (plain sorted(), as tests/test_smoke.py checks)
    "Call",
    "ConfigError",
    "DEFAULT_INSTRUCTION",
    "Endpoint",
    "HTTPClient",
    "MAX_N",
    "ModelError",
    "ModelServer",
    "NotEnoughProposals",
    "Reply",
    "Request",
    "Result",
    "SelfMoAError",
    "check_items",
    "inject_references",
    "main",
    "moa",
    "read_items",
    "read_references",
    "run_batch",
    "self_moa",
    "self_moa_seq",
    "seq_plan",
    "seq_rounds",
    "vendi_score",
]


# ======================================================================================================
# Errors
# ======================================================================================================


class SelfMoAError(Exception):
    """The root of every error selfmoa raises on purpose.

    ``partial`` holds the work done before the error (a ``Result`` whose trace lists every call made), or
    ``None`` when nothing had been done yet.
    """

    partial: Result | None = None


class ConfigError(SelfMoAError, ValueError):
    """A bad argument, command-line flag or input file. The message names it and says how to fix it."""


class ModelError(SelfMoAError):
    """A model call that failed for good (retries, if any, are spent).

    Carries ``model``, ``url`` (the endpoint, without credentials), ``status`` (the HTTP status, or
    ``None`` when no response came), ``body`` (the start of the server's reply), ``attempts`` and
    ``retryable`` (whether the last failure was of a kind worth retrying later).
    """

    def __init__(self, message: str, *, model: str = "", url: str = "", status: int | None = None,
                 body: str = "", attempts: int = 1, retryable: bool = False):
        self.message, self.model, self.url, self.status = message, model, url, status
        self.body, self.attempts, self.retryable = body, attempts, retryable
        super().__init__(message)

    def __str__(self) -> str:
        where = f"model {self.model!r}" + (f" at {self.url}" if self.url else "")
        status = f"HTTP {self.status}: " if self.status is not None else ""
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        body = f"; server said: {self.body}" if self.body else ""
        return f"{where}: {status}{self.message}{tries}{body}"


class NotEnoughProposals(SelfMoAError):
    """Fewer than ``min_ok`` proposers of a layer (or samples of Self-MoA-Seq) succeeded.

    ``failures`` lists the ``ModelError`` of each failed proposer, in configuration order.
    """

    def __init__(self, message: str, failures: Sequence[ModelError] = ()):
        self.failures = list(failures)
        super().__init__(message)


def _check(ok: bool, name: str, value: Any, why: str, fix: str) -> None:
    """Refuse a bad public argument, naming it, its value, the reason and the fix."""
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}; {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ======================================================================================================
# The aggregator prompt
# ======================================================================================================
#
# An aggregator (and every proposer from layer 2 on) receives the caller's messages with an instruction
# and the numbered references added to the system message. Each reference sits between two marker lines
# that carry a key found in none of the texts, so no proposer output, whatever it contains, can fake
# where a reference begins or ends. spec/wire.md section 6 fixes this format to the byte.

DEFAULT_INSTRUCTION = (
    "Several AI assistants have answered the latest user message. Their responses are listed below. "
    "Synthesize them into one response of the highest quality. Weigh each response critically: some may "
    "be wrong, biased or incomplete, so do not simply copy any one of them. Give a single reply that is "
    "accurate, complete and well organised, and that follows the user's instructions."
)
REFERENCES_HEADER = "Responses from models:"

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = str | Sequence[Message]


def as_messages(prompt: Prompt) -> list[Message]:
    """Turn a prompt into chat messages, checking their shape.

    >>> as_messages("Hi")
    [{'role': 'user', 'content': 'Hi'}]
    """
    if isinstance(prompt, str):
        _check(prompt.strip() != "", "prompt", prompt, "the prompt is empty", "pass the question to ask")
        return [{"role": "user", "content": prompt}]
    _check(isinstance(prompt, Sequence) and len(prompt) > 0, "prompt", prompt,
           "a prompt is a string or a non-empty list of chat messages", 'pass "text" or [{"role": "user", ...}]')
    messages = []
    for i, message in enumerate(prompt):
        _check(isinstance(message, Mapping) and isinstance(message.get("role"), str)
               and isinstance(message.get("content"), str), f"prompt[{i}]", message,
               "each message needs a string 'role' and a string 'content'",
               'write it as {"role": "user", "content": "..."}')
        messages.append(dict(message))
    return messages


def reference_key(texts: Sequence[str]) -> str:
    """The 8-hex-digit key of a reference block: derived from the texts, and found in none of them.

    >>> reference_key(["4", "5"])
    'a45a6337'
    """
    joined = "\0".join(texts)
    for counter in itertools.count():
        key = hashlib.sha256(f"{joined}\0{counter}".encode()).hexdigest()[:8]
        if not any(key in text for text in texts):
            return key
    raise AssertionError("unreachable")  # pragma: no cover


def format_references(references: Sequence[str], instruction: str | None = None) -> str:
    """The system-message block: the instruction (``DEFAULT_INSTRUCTION`` if None), a header, then each
    reference between its markers.

    >>> print(format_references(["Paris.", "Lyon."], instruction="Combine these."))
    Combine these.
    <BLANKLINE>
    Responses from models:
    <BLANKLINE>
    <<<response 1 of 2, key 29d190ab>>>
    Paris.
    <<<end of response 1, key 29d190ab>>>
    <BLANKLINE>
    <<<response 2 of 2, key 29d190ab>>>
    Lyon.
    <<<end of response 2, key 29d190ab>>>
    """
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    key, count = reference_key(references), len(references)
    blocks = [f"<<<response {i} of {count}, key {key}>>>\n{text}\n<<<end of response {i}, key {key}>>>"
              for i, text in enumerate(references, 1)]
    return f"{instruction}\n\n{REFERENCES_HEADER}\n\n" + "\n\n".join(blocks)


def inject_references(messages: Sequence[Message], references: Sequence[str],
                      instruction: str | None = None) -> list[Message]:
    """A new message list: ``messages`` with the instruction and references in the system message.

    An existing system message gets the block appended after a blank line; otherwise one system message
    is put first. The other messages pass through unchanged, and ``messages`` itself is never modified.
    With no references, the messages come back as they are (a copy).

    >>> inject_references([{"role": "user", "content": "Q"}], ["A1"], "Merge.")[0]["content"][:32]
    'Merge.\\n\\nResponses from models:\\n\\n'
    >>> inject_references([{"role": "system", "content": "Be brief."}], ["A1"], "Merge.")[0]["content"][:18]
    'Be brief.\\n\\nMerge.\\n'
    """
    out = [dict(message) for message in messages]
    if not references:
        return out
    block = format_references(references, instruction)
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}"
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


_LAST_LINE = re.compile(r"\n<<<end of response (\d+), key ([0-9a-f]{8})>>>\s*\Z")


def _block_key(system: str) -> tuple[int, str] | None:
    """(N, K) of the reference block that ends ``system``, or None when it ends with none."""
    found = _LAST_LINE.search(system)
    return (int(found.group(1)), found.group(2)) if found else None


def read_references(prompt: str | Sequence[Message]) -> list[str]:
    """The references of the block that ends an aggregator prompt (a system text or a message list), in order.

    The block is the one ``inject_references`` added last, so references the caller's messages or the
    instruction already held (a prompt built by another MoA) are not read as this prompt's.

    >>> read_references(inject_references([{"role": "user", "content": "Q"}], ["x", "<<<end of response 1"]))
    ['x', '<<<end of response 1']
    >>> upstream = inject_references([{"role": "user", "content": "Q"}], ["old"])
    >>> read_references(inject_references(upstream, ["new 1", "new 2"]))
    ['new 1', 'new 2']
    >>> read_references([{"role": "user", "content": "no references here"}])
    []
    """
    if not isinstance(prompt, str):
        system = [m["content"] for m in prompt[:1] if m.get("role") == "system"]
        prompt = system[0] if system else ""
    found = _block_key(prompt)
    if found is None:
        return []
    count, key = found
    # No reference holds the key, so the last "response 1" line with it opens this block, whatever came before.
    position = prompt.rfind(f"<<<response 1 of {count}, key {key}>>>\n")
    references = []
    for i in range(1, count + 1):
        begin = f"<<<response {i} of {count}, key {key}>>>\n"
        end = f"\n<<<end of response {i}, key {key}>>>"
        start = prompt.find(begin, position) if position >= 0 else -1
        stop = prompt.find(end, start + len(begin) - 1) if start >= 0 else -1
        if start < 0 or stop < 0:
            return []
        references.append(prompt[start + len(begin):stop])
        position = stop + len(end)
    return references


def _marker(key: str) -> re.Pattern:
    """A marker line of the block with ``key``, also as a model echoes it (fewer angle brackets, spaces)."""
    return re.compile(rf"[ \t]*<{{0,3}}[ \t]*(?:end of )?response \d+(?: of \d+)?, key {key}[ \t]*>{{0,3}}[ \t\r]*")


def _strip_markers(text: str, key: str) -> str:
    """``text`` without the marker lines of the prompt (block key ``key``) it answers: a model may echo them.

    >>> _strip_markers("Paris.\\n<<<end of response 2, key 29d190ab>>", "29d190ab")
    'Paris.'
    """
    marker = _marker(key)
    return "\n".join(line for line in text.split("\n") if not marker.fullmatch(line))


# ======================================================================================================
# The seam: every model call goes through one completion function
# ======================================================================================================
#
# A completion function takes a Request and returns a Reply, a string or a list of strings. It may return
# fewer texts than request.n (some servers ignore n); the methods then ask for each missing sample in a
# request of its own. It signals a failed call by raising ModelError; anything else it raises is treated
# as a bug and propagates. HTTPClient is the completion function for real servers.


MAX_N = 16  # samples asked for in one request at most (servers cap n: OpenAI at 128, some far lower)


@dataclasses.dataclass(frozen=True)
class Request:
    """One chat-completion request, as the methods hand it to the completion function."""

    model: str
    messages: tuple  # of Message dicts; never mutated
    temperature: float = 0.7
    max_tokens: int | None = None
    n: int = 1
    seed: int | None = None
    stream: Callable[[str], None] | None = dataclasses.field(default=None, compare=False, repr=False)
    stop: tuple[str, ...] | None = None  # stop sequences (serve sets them on the final aggregation only)


@dataclasses.dataclass
class Reply:
    """What a completion function returns: one text per choice, with what the server reported.

    ``texts[i]`` is the text of sample ``i`` of the request, or ``None`` where the server gave no usable
    text for that position (the methods then ask for it again on its own, as for a missing one).
    """

    texts: list[str | None]
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    retries: int = 0
    url: str | None = None


def _as_reply(value: Any, request: Request) -> Reply:
    """Normalise what a completion function returned; refuse anything that is not text."""
    if isinstance(value, str):
        value = Reply([value])
    elif isinstance(value, (list, tuple)) and all(text is None or isinstance(text, str) for text in value):
        value = Reply(list(value))
    if not isinstance(value, Reply) or not all(text is None or isinstance(text, str) for text in value.texts):
        raise TypeError(f"a completion function must return a Reply, a str or a list of str (None where a "
                        f"choice has no usable text), "
                        f"not {type(value).__name__} (model {request.model!r})")
    if not value.texts or value.texts[0] is None and request.n == 1:
        raise ModelError("the reply holds no text", model=request.model, url=value.url or "")
    value.texts = [text if text is None else _clean(text) for text in value.texts[:request.n]]
    value.finish_reasons = (list(value.finish_reasons) + [None] * request.n)[:len(value.texts)]
    return value


# ======================================================================================================
# Results and traces
# ======================================================================================================


@dataclasses.dataclass
class Call:
    """One request in a trace: who was asked, what went in, what came out, and what it cost.

    ``indices`` are the proposer positions (MoA) or sample numbers (Self-MoA-Seq) the request asked for
    (``outputs`` holds fewer when the server ignored ``n``; the rest then have requests of their own);
    ``references`` the positions, in the previous layer, of the responses it was shown, in order (for a
    Self-MoA-Seq round: the numbers of the new samples); ``carried`` how many copies of the previous
    round's synthesis came first. Token counts are ``None`` when the server did not report them.
    """

    role: str  # "proposer" or "aggregator"
    layer: int
    model: str
    indices: list[int]
    references: list[int] = dataclasses.field(default_factory=list)
    round: int | None = None
    carried: int = 0
    n: int = 1
    seed: int | None = None
    temperature: float = 0.7
    max_tokens: int | None = None
    outputs: list[str | None] = dataclasses.field(default_factory=list)
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency: float = 0.0
    retries: int = 0
    url: str | None = None
    error: str | None = None

    def sort_key(self) -> tuple:
        """Trace order: by layer, round, proposers before the aggregator, position; never by timing."""
        return (self.layer, self.round or 0, self.role == "aggregator", self.indices[0] if self.indices else 0,
                -self.n)


@dataclasses.dataclass
class Result:
    """The final answer of a method, with every call made (``trace``) and the totals.

    ``calls`` counts the generations the paper counts (each sample and each aggregation is one);
    ``requests`` counts HTTP requests (one request can carry ``n`` samples).
    """

    answer: str
    method: str
    trace: list[Call]
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(text is not None for call in self.trace for text in call.outputs)

    @property
    def requests(self) -> int:
        return len(self.trace)

    @property
    def usage(self) -> dict[str, int]:
        """Token totals over the trace; ``unreported`` counts requests whose server gave no usage."""
        prompt = sum(call.prompt_tokens or 0 for call in self.trace)
        completion = sum(call.completion_tokens or 0 for call in self.trace)
        unreported = sum(call.prompt_tokens is None and call.error is None for call in self.trace)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion, "unreported": unreported}

    def proposals(self) -> dict[int, list[str]]:
        """The outputs of each proposer layer, by layer number, in configuration (sample) order."""
        layers: dict[int, dict[int, str]] = {}
        for call in self.trace:
            if call.role == "proposer":
                layers.setdefault(call.layer, {}).update((i, text) for i, text in zip(call.indices, call.outputs)
                                                         if text is not None)
        return {layer: [outputs[i] for i in sorted(outputs)] for layer, outputs in sorted(layers.items())}

    def diversity(self) -> dict[int, float]:
        """The Vendi score of each proposer layer's outputs (see ``vendi_score``; O(n^3) in n outputs)."""
        return {layer: vendi_score(texts) for layer, texts in self.proposals().items() if texts}

    def to_dict(self, trace: bool = True, diversity: bool = False) -> dict[str, Any]:
        """Everything as plain JSON-serialisable data: without the trace if ``trace`` is false, and with
        ``diversity`` (each proposer layer's Vendi score, keyed by the layer number as a string) only if asked,
        as it costs more than the run itself for thousands of samples."""
        data: dict[str, Any] = {"answer": self.answer, "method": self.method, "params": self.params,
                                "calls": self.calls, "requests": self.requests,
                                "retries": sum(call.retries for call in self.trace), "usage": self.usage}
        if diversity:
            data["diversity"] = {str(layer): score for layer, score in self.diversity().items()}
        if trace:
            data["trace"] = [dataclasses.asdict(call) for call in self.trace]
        return data


# ======================================================================================================
# MoA: layers of proposers, then an aggregator
# ======================================================================================================


def moa(prompt: Prompt, proposers: Sequence[str] | Sequence[Sequence[str]], aggregator: str, *,
        complete: Callable[[Request], Any], layers: int | None = None, temperature: float = 0.7,
        max_tokens: int | None = None, aggregator_temperature: float = 0.7,
        aggregator_max_tokens: int | None = None, seed: int | None = None, min_ok: int = 1,
        concurrency: int = 8, instruction: str | None = None, use_n: bool = True,
        stream: Callable[[str], None] | None = None) -> Result:
    """Mixture-of-Agents: ``layers - 1`` layers of proposers, then one aggregator.

    ``proposers`` is the list of proposer models of every proposer layer (a model may appear several
    times), or a list of such lists, one per layer. ``layers`` counts the aggregator, as the papers do
    (default 2: one proposer layer and the aggregator). The proposers of a layer run concurrently (at most
    ``concurrency`` calls at once), and their answers are numbered in configuration order whatever order
    they finish in. A proposer that fails is dropped, the numbering staying contiguous; a layer with fewer
    than ``min_ok`` successes raises ``NotEnoughProposals``. Proposer ``j`` of a layer gets seed
    ``seed + j``; consecutive proposers of the same model share one request with ``n`` (at most ``MAX_N``
    per request; none with ``use_n=False``). ``instruction`` replaces ``DEFAULT_INSTRUCTION``. ``stream``
    receives the final answer's text pieces as they arrive.

    >>> moa("2+2?", ["a", "b"], "c", complete=lambda r: f"{r.model}:{len(read_references(r.messages))}",
    ...     layers=3).answer
    'c:2'

    A layer whose proposers all fail stops the run; the error keeps the requests already made:

    >>> def down(request):
    ...     raise ModelError("HTTP 404: no such model", model=request.model)
    >>> try:
    ...     moa("2+2?", ["x", "x"], "c", complete=down, use_n=False)
    ... except NotEnoughProposals as error:
    ...     print(error); print(error.partial.requests, "requests made")
    layer 1: only 0 of 2 proposers succeeded, fewer than min_ok=1. Failures: 2 x model 'x': HTTP 404: no such model
    2 requests made
    """
    messages = as_messages(prompt)
    plan = _proposer_plan(proposers, layers)
    settings = _settings(complete=complete, temperature=temperature, max_tokens=max_tokens,
                         aggregator_temperature=aggregator_temperature, aggregator_max_tokens=aggregator_max_tokens,
                         seed=seed, concurrency=concurrency, instruction=instruction, use_n=use_n, stream=stream)
    _check_moa(plan=plan, aggregator=aggregator, min_ok=min_ok)
    return _moa(messages, plan=plan, aggregator=aggregator, min_ok=min_ok, settings=settings, method="moa")


def _moa(messages: list[Message], *, plan: list[list[str]], aggregator: str, min_ok: int, settings: _Settings,
         method: str) -> Result:
    """The MoA layer loop, shared by ``moa`` and ``self_moa``: ``plan`` holds the models of each proposer layer."""
    params = {"proposers": plan, "aggregator": aggregator, "layers": len(plan) + 1, **settings.params(),
              "min_ok": min_ok}
    with _Run(settings, method=method, params=params) as run:
        references: list[str] = []  # the answers of the previous layer, in configuration order
        positions: list[int] = []  # where each of them stood in its layer
        for number, models in enumerate(plan, 1):
            # Layer 1 answers the prompt alone; layer l sees the answers of layer l-1, numbered in order.
            prompt_l = inject_references(messages, references, settings.instruction)
            outcomes = run.layer(number, models, prompt_l, shown=positions, remaining=len(plan) + 2 - number)
            # A proposer that failed is dropped and the survivors keep their order; too few stop the run.
            positions = _survivors(outcomes, layer=number, min_ok=min_ok)
            references = [outcome for outcome in outcomes if isinstance(outcome, str)]
        # The aggregator synthesizes the last layer's answers into the final answer.
        final = Call("aggregator", layer=len(plan) + 1, model=aggregator, indices=[0], references=positions)
        answer = run.aggregate(final, inject_references(messages, references, settings.instruction),
                               remaining=1, stream=settings.stream)
        return run.result(answer)


# ======================================================================================================
# Self-MoA: one model sampled n times, then aggregated
# ======================================================================================================


def self_moa(prompt: Prompt, model: str, *, complete: Callable[[Request], Any], n: int = 6,
             aggregator: str | None = None, layers: int = 2, temperature: float = 0.7,
             max_tokens: int | None = None, aggregator_temperature: float = 0.7,
             aggregator_max_tokens: int | None = None, seed: int | None = None, min_ok: int = 1,
             concurrency: int = 8, instruction: str | None = None, use_n: bool = True,
             stream: Callable[[str], None] | None = None) -> Result:
    """Self-MoA: ``n`` samples of ``model`` at ``temperature > 0``, aggregated by ``aggregator``.

    The aggregator is ``model`` itself unless given. This is exactly MoA whose proposer layers hold
    ``model`` ``n`` times, so it makes ``n + 1`` calls (``n`` per proposer layer); the ``n`` samples go in one
    request with ``n`` when the server honours it. Sample ``i`` has seed ``seed + i``.

    >>> self_moa("2+2?", "m", n=3, complete=lambda r: "4").calls
    4
    >>> self_moa("2+2?", "m", n=3, complete=lambda r: "4", temperature=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    selfmoa.ConfigError: temperature=0: ...; pass a temperature above 0 (the paper samples at 0.7)
    """
    messages = as_messages(prompt)
    _check_sampled(model=model, n=n, temperature=temperature, method="Self-MoA")
    plan = _proposer_plan([model] * n, layers)
    settings = _settings(complete=complete, temperature=temperature, max_tokens=max_tokens,
                         aggregator_temperature=aggregator_temperature, aggregator_max_tokens=aggregator_max_tokens,
                         seed=seed, concurrency=concurrency, instruction=instruction, use_n=use_n, stream=stream)
    aggregator = model if aggregator is None else aggregator
    _check_moa(plan=plan, aggregator=aggregator, min_ok=min_ok)
    return _moa(messages, plan=plan, aggregator=aggregator, min_ok=min_ok, settings=settings, method="self-moa")


# ======================================================================================================
# Self-MoA-Seq: rounds over a sliding window, carrying the synthesis
# ======================================================================================================


def seq_plan(n: int, window: int = 6, carry: int = 3) -> list[tuple[int, range]]:
    """Self-MoA-Seq's window plan for ``n`` samples: per round, the copies of the previous synthesis shown
    first, and the numbers of the new samples.

    Round 1 takes ``window`` samples; each later round shows the previous synthesis ``carry`` times, then
    the next ``window - carry`` samples (the last round may take fewer). Round ``t`` shows ``s<t-1>``:

    >>> for t, (carried, new) in enumerate(seq_plan(10, window=6, carry=3), 1):
    ...     print(t, " ".join([f"s{t - 1}"] * carried + [f"x{i}" for i in new]))
    1 x0 x1 x2 x3 x4 x5
    2 s1 s1 s1 x6 x7 x8
    3 s2 s2 s2 x9
    """
    _check_window(window, carry)
    _check(_is_int(n) and n >= 1, "n", n, "there must be at least one sample", "pass n >= 1")
    plan = [(0, range(min(n, window)))]
    for start in range(window, n, window - carry):
        plan.append((carry, range(start, min(n, start + window - carry))))
    return plan


def seq_rounds(n: int, window: int = 6, carry: int = 3) -> int:
    """The number of Self-MoA-Seq rounds (aggregation calls) for ``n`` samples: ``len(seq_plan(...))``.

    >>> [seq_rounds(n) for n in (1, 6, 7, 9, 10, 30)]
    [1, 1, 2, 2, 3, 9]
    """
    _check_window(window, carry)
    _check(_is_int(n) and n >= 1, "n", n, "there must be at least one sample", "pass n >= 1")
    return 1 if n <= window else 1 + math.ceil((n - window) / (window - carry))


def self_moa_seq(prompt: Prompt, model: str | None = None, *, complete: Callable[[Request], Any],
                 n: int | None = None, samples: Iterable[str] | None = None, window: int = 6, carry: int = 3,
                 aggregator: str | None = None, temperature: float = 0.7, max_tokens: int | None = None,
                 aggregator_temperature: float = 0.7, aggregator_max_tokens: int | None = None,
                 seed: int | None = None, min_ok: int = 1, concurrency: int = 8,
                 instruction: str | None = None, use_n: bool = True,
                 stream: Callable[[str], None] | None = None) -> Result:
    """Self-MoA-Seq: aggregate many samples of one model in rounds over a sliding window.

    Round 1 aggregates samples ``0 .. window-1``; round ``t >= 2`` aggregates the synthesis of round
    ``t - 1`` repeated ``carry`` times, then the next ``window - carry`` samples (the last round may have
    fewer; see ``seq_plan``). Every sample is shown as new in exactly one round, in order; the answer is
    the last synthesis.

    The samples are either generated (``model`` and ``n``, default 6; sample ``i`` has seed ``seed + i``;
    all are requested at once, and each round starts as soon as its own samples have arrived), or given
    as ``samples``: any iterable of strings, consumed lazily, so a generator still producing them works.
    The aggregator defaults to ``model``. Failed samples are skipped and recorded; fewer than ``min_ok``
    good samples raises ``NotEnoughProposals``.

    >>> r = self_moa_seq("Q", complete=lambda r: "s", samples=["a", "b", "c"], aggregator="m", window=2, carry=1)
    >>> [(call.round, call.carried, call.references) for call in r.trace]
    [(1, 0, [0, 1]), (2, 1, [2])]
    >>> self_moa_seq("Q", "m", complete=print, window=3, carry=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    selfmoa.ConfigError: carry=3: carry copies ... must fit in window=3; pass carry between 1 and 2 (default 3)
    """
    messages = as_messages(prompt)
    _check_window(window, carry)
    if samples is None:
        n = 6 if n is None else n
        _check_sampled(model=model, n=n, temperature=temperature, method="Self-MoA-Seq")
    else:
        _check_given(samples=samples, n=n)
    aggregator = model if aggregator is None else aggregator
    _check_model("aggregator", aggregator)
    settings = _settings(complete=complete, temperature=temperature, max_tokens=max_tokens,
                         aggregator_temperature=aggregator_temperature, aggregator_max_tokens=aggregator_max_tokens,
                         seed=seed, concurrency=concurrency, instruction=instruction, use_n=use_n, stream=stream)
    known = n if samples is None else (len(samples) if isinstance(samples, Sequence) else None)
    _check_min_ok_samples(min_ok, known)
    params = {"model": model, "aggregator": aggregator, "n": known, "window": window, "carry": carry,
              **settings.params(), "min_ok": min_ok}
    with _Run(settings, method="self-moa-seq", params=params) as run:
        # The samples: drawn from the model (all requested at once, each round's new ones in one request) or
        # the caller's, handed out in order as the rounds need them, failed ones skipped.
        source = (_Given(samples, min_ok=min_ok) if samples is not None else
                  _Generated(run, model=model, messages=messages, n=n, window=window, carry=carry, min_ok=min_ok))
        synthesis: str | None = None
        number = 0
        while True:
            # Round 1 takes a whole window of samples; every later round, the next window - carry.
            new = source.take(window if synthesis is None else window - carry)
            if not new:
                break
            number += 1
            # The window: the previous synthesis carry times, first, to bias the aggregator towards it;
            # then the new samples, in order.
            shown = ([] if synthesis is None else [synthesis] * carry) + [text for _, text in new]
            call = Call("aggregator", layer=2, model=str(aggregator), indices=[0], references=[i for i, _ in new],
                        round=number, carried=len(shown) - len(new))
            # Only the round known to be last (without waiting for another sample) is streamed.
            synthesis = run.aggregate(call, inject_references(messages, shown, settings.instruction),
                                      remaining=max(1, source.rounds - number + 1),
                                      stream=settings.stream if source.exhausted else None)
        assert synthesis is not None, "a source that yields no sample raises NotEnoughProposals"
        params["n"], params["rounds"] = source.count, number
        return run.result(synthesis)


########################################################################################################
#
#   EVERYTHING BELOW IS MACHINERY.
#
#   The methods above are the paper. What follows makes them run well: the bounded call pool that
#   runs a method's calls concurrently (and keeps traces in configuration order), the argument checks,
#   the HTTP client for real servers (the completion function behind the seam), the measures of
#   quality and diversity, batch runs, and the command line. None of it changes what a method computes.
#
########################################################################################################


# ======================================================================================================
# Running calls: a bounded pool, and one run's bookkeeping
# ======================================================================================================


class _Pool:
    """A fixed number of worker threads taking calls in priority order (lowest first, then FIFO).

    A call's priority puts first the call with the most calls still chained behind it (critical-path
    scheduling, Hu's rule, optimal for chains of equal-length calls), then earlier batch items, then
    earlier positions. So a batch starts every item's samples before any aggregation, and a Self-MoA-Seq
    round that is ready overtakes samples needed only by later rounds. Unlike ThreadPoolExecutor, a queued
    call can be overtaken.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, priority: tuple, fn: Callable, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:  # a late follow-up of a run that has already ended: never runs
                future.cancel()
                return future
            self._queue.put((priority, next(self._order), future, fn, args))
            if len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name=f"selfmoa-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 (handed to whoever waits on the future)
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel what is still queued and let the workers finish their current call and stop."""
        with self._lock:
            threads, self._threads, self._closed = self._threads, [], True
        while True:
            try:
                _, _, future, _, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        for _ in threads:
            self._queue.put(((math.inf,), next(self._order), None, None, None))


Outcome = str | ModelError  # a sample's text, or why it failed


@dataclasses.dataclass(frozen=True)
class _Params:
    """Sampling parameters of one role (proposers or aggregator)."""

    temperature: float
    max_tokens: int | None
    seed: int | None


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The checked arguments every method shares."""

    complete: Callable[[Request], Any]
    concurrency: int
    proposing: _Params
    aggregating: _Params
    instruction: str
    use_n: bool
    stream: Callable[[str], None] | None

    def params(self) -> dict[str, Any]:
        """The sampling arguments as a Result's ``params`` reports them."""
        return {"temperature": self.proposing.temperature, "max_tokens": self.proposing.max_tokens,
                "aggregator_temperature": self.aggregating.temperature,
                "aggregator_max_tokens": self.aggregating.max_tokens, "seed": self.proposing.seed}


class _Run:
    """One method run: the completion function, the pool, and the trace of every request sent.

    A run never stops early. Which requests it sends depends on the replies alone: a failure stops it from
    starting new layers or rounds, but every request already issued (and the follow-ups its reply calls
    for) is still sent and awaited before the error is raised, whatever the concurrency or the timing.
    So ``partial`` lists every request sent, each with its outcome. Use it as a context manager: an error
    leaving the block gets ``partial``; the run's own pool is shut down.
    """

    def __init__(self, settings: _Settings, *, method: str, params: dict):
        self.settings, self.method, self.params = settings, method, params
        self.pool, self._owned, self.priority, self._oldest_first = _start(settings.complete, settings.concurrency)
        self.trace: list[Call] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._open = 0  # requests queued or running, follow-ups included

    def __enter__(self) -> _Run:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        try:
            if isinstance(exc, Exception):  # not on Ctrl-C: then nothing more is awaited
                with self._idle:
                    self._idle.wait_for(lambda: self._open == 0)
                with contextlib.suppress(AttributeError):  # a foreign exception may refuse new attributes
                    exc.partial = self.result("")  # type: ignore[attr-defined]
        finally:
            if self._owned:
                self.pool.shutdown()

    def result(self, answer: str) -> Result:
        with self._lock:
            trace = sorted(self.trace, key=Call.sort_key)
        return Result(answer, self.method, trace, dict(self.params))

    def _submit(self, call: Call, remaining: int, task: Callable, *args: Any) -> concurrent.futures.Future:
        """Queue ``task(*args)``. ``remaining`` counts the calls chained after this one, itself included (the
        pool runs the longest chains first); within a run, aggregations go before proposals, then by position."""
        rank = (0, call.round or 0) if call.role == "aggregator" else (call.layer, call.indices[0])
        with self._lock:
            self._open += 1
        chain = (-remaining,)
        priority = self.priority + chain + rank if self._oldest_first else chain + self.priority + rank
        future = self.pool.submit(priority, task, *args)
        future.add_done_callback(self._closed)
        return future

    def _closed(self, _: concurrent.futures.Future) -> None:
        with self._idle:
            self._open -= 1
            if self._open == 0:
                self._idle.notify_all()

    def _call(self, call: Call, request: Request) -> Reply | ModelError:
        """Send one request and record it in the trace, whatever happens."""
        started = time.perf_counter()
        try:
            outcome: Reply | ModelError = _as_reply(self.complete(request), request)
        except ModelError as exc:
            outcome = exc
        except Exception as exc:  # a bug in the completion function: recorded, then it propagates
            call.error = f"{type(exc).__name__}: {exc}"
            self._record(call, started)
            raise
        if isinstance(outcome, ModelError):
            call.error, call.url = str(outcome), outcome.url or None
            call.retries = max(0, outcome.attempts - 1)
        else:
            block = _block_key(request.messages[0]["content"]) if request.messages[0]["role"] == "system" else None
            if block is not None:  # a model may echo the markers of the prompt it answers: they are no answer
                outcome.texts = [_strip_markers(text, block[1]) if isinstance(text, str) else text
                                 for text in outcome.texts]
            call.outputs, call.finish_reasons = outcome.texts, outcome.finish_reasons
            call.prompt_tokens, call.completion_tokens = outcome.prompt_tokens, outcome.completion_tokens
            call.retries, call.url = outcome.retries, outcome.url
        self._record(call, started)
        return outcome

    @property
    def complete(self) -> Callable[[Request], Any]:
        return self.settings.complete

    def _record(self, call: Call, started: float) -> None:
        call.latency = round(time.perf_counter() - started, 6)
        with self._lock:
            self.trace.append(call)

    def samples(self, *, model: str, messages: list[Message], first: int, count: int, layer: int,
                references: list[int], remaining: int) -> list[concurrent.futures.Future]:
        """Ask ``model`` for samples ``first .. first+count-1`` of one prompt: one future per sample,
        resolving to its ``Outcome`` (the text, or the ModelError that sample failed with).

        With ``use_n``, the samples go in requests of at most ``MAX_N``, each with ``n`` and seed ``S + i0``
        for its first sample ``i0``; any the server did not return are then asked for one by one, sample
        ``i`` with seed ``S + i`` (spec/wire.md section 4). Each future resolves as soon as its own sample
        exists.
        """
        params = self.settings.proposing
        slots: list[concurrent.futures.Future] = [concurrent.futures.Future() for _ in range(count)]
        frozen = tuple(messages)

        def ask(start: int, size: int) -> None:
            seed = None if params.seed is None else params.seed + first + start
            call = Call("proposer", layer=layer, model=model, indices=list(range(first + start, first + start + size)),
                        references=list(references), n=size, seed=seed, temperature=params.temperature,
                        max_tokens=params.max_tokens)
            request = Request(model=model, messages=frozen, temperature=params.temperature,
                              max_tokens=params.max_tokens, n=size, seed=seed)
            future = self._submit(call, remaining, answer, start, size, call, request)
            future.add_done_callback(lambda done: never_sent(start, size) if done.cancelled() else None)

        def answer(start: int, size: int, call: Call, request: Request) -> None:
            try:
                outcome = self._call(call, request)
            except BaseException as exc:  # a bug in the completion function: surface it to the waiter
                for slot in slots[start:start + size]:
                    slot.set_exception(exc)
                raise
            deliver(start, size, outcome)

        def deliver(start: int, size: int, outcome: Reply | ModelError) -> None:
            if isinstance(outcome, ModelError):
                for slot in slots[start:start + size]:
                    slot.set_result(outcome)
                return
            for offset, text in enumerate(outcome.texts):
                if text is None:
                    ask(start + offset, 1)  # no usable text at this position: asked for on its own
                else:
                    slots[start + offset].set_result(text)
            for missing in range(start + len(outcome.texts), start + size):
                ask(missing, 1)  # the server ignored n: one request per missing sample

        def never_sent(start: int, size: int) -> None:  # the pool was shut down (a batch interrupted)
            for slot in slots[start:start + size]:
                if not slot.done():
                    slot.set_exception(concurrent.futures.CancelledError())

        step = MAX_N if self.settings.use_n else 1
        for start in range(0, count, step):
            ask(start, min(step, count - start))
        return slots

    def layer(self, number: int, models: Sequence[str], messages: list[Message], *, shown: list[int],
              remaining: int) -> list[Outcome]:
        """Ask every proposer of one layer, concurrently; their outcomes in configuration order.

        Consecutive proposers of one model share requests with ``n`` (see ``samples``)."""
        slots: list[concurrent.futures.Future] = []
        for model, run_of in itertools.groupby(enumerate(models), key=lambda item: item[1]):
            positions = [position for position, _ in run_of]
            slots += self.samples(model=model, messages=messages, first=positions[0], count=len(positions),
                                  layer=number, references=shown, remaining=remaining)
        return [slot.result() for slot in slots]

    def aggregate(self, call: Call, messages: list[Message], *, remaining: int,
                  stream: Callable[[str], None] | None = None) -> str:
        """One aggregation call, waited for: its text, with any echoed marker line removed (also from what is
        streamed). A failure raises its ModelError."""
        params = self.settings.aggregating
        block = _block_key(messages[0]["content"])
        assert block is not None, "an aggregation always shows references"
        shown = None if stream is None else _MarkerFilter(stream, block[1])
        request = Request(model=call.model, messages=tuple(messages), temperature=params.temperature,
                          max_tokens=params.max_tokens, n=1, seed=params.seed, stream=shown)
        call.seed, call.temperature, call.max_tokens = params.seed, params.temperature, params.max_tokens
        outcome = self._submit(call, remaining, self._call, call, request).result()
        if isinstance(outcome, ModelError):
            raise outcome
        if shown is not None:
            shown.close()
        return outcome.texts[0]


def _survivors(outcomes: list[Outcome], *, layer: int, min_ok: int) -> list[int]:
    """The positions of the proposers of a layer that succeeded; fewer than ``min_ok`` is an error."""
    failures = [outcome for outcome in outcomes if isinstance(outcome, ModelError)]
    if len(outcomes) - len(failures) < min_ok:
        raise NotEnoughProposals(f"layer {layer}: only {len(outcomes) - len(failures)} of {len(outcomes)} proposers "
                                 f"succeeded, fewer than min_ok={min_ok}. Failures: {_failures_text(failures)}",
                                 failures)
    return [j for j, outcome in enumerate(outcomes) if not isinstance(outcome, ModelError)]


def _failures_text(failures: Sequence[ModelError]) -> str:
    """The failures' messages, ``; ``-separated, identical ones once with a count.

    >>> _failures_text([ModelError("HTTP 404", model="x")] * 3 + [ModelError("timed out", model="y")])
    "3 x model 'x': HTTP 404; model 'y': timed out"
    """
    counts: dict[str, int] = {}
    for failure in failures:
        counts[str(failure)] = counts.get(str(failure), 0) + 1
    return "; ".join(text if count == 1 else f"{count} x {text}" for text, count in counts.items())


class _Generated:
    """Self-MoA-Seq's samples drawn from the model: all requested at once, one request per round's new
    samples (so each round's arrive together), then handed out in sample order, failed ones skipped."""

    def __init__(self, run: _Run, *, model: str | None, messages: list[Message], n: int | None, window: int,
                 carry: int, min_ok: int):
        assert model is not None and n is not None
        plan = seq_plan(n, window, carry)
        self.n, self.min_ok, self.rounds = n, min_ok, len(plan)
        self.failures: list[ModelError] = []
        self.consumed = 0  # samples handed out or skipped so far
        self.slots = [slot for number, (_, new) in enumerate(plan, 1)  # these samples feed round `number`
                      for slot in run.samples(model=model, messages=messages, first=new.start, count=len(new),
                                              layer=1, references=[], remaining=len(plan) - number + 2)]

    @property
    def count(self) -> int:
        return self.n

    @property
    def exhausted(self) -> bool:
        return self.consumed == self.n

    def take(self, wanted: int) -> list[tuple[int, str]]:
        """The next ``wanted`` good samples (fewer at the end), each with its number."""
        new: list[tuple[int, str]] = []
        while len(new) < wanted and self.consumed < self.n:
            index, outcome = self.consumed, self.slots[self.consumed].result()
            self.consumed += 1
            if isinstance(outcome, ModelError):
                self.failures.append(outcome)
                if self.n - len(self.failures) < self.min_ok:
                    raise NotEnoughProposals(
                        f"only {self.n - len(self.failures)} of {self.n} samples can still succeed, fewer than "
                        f"min_ok={self.min_ok}. Failures: {_failures_text(self.failures)}", self.failures)
                continue
            new.append((index, outcome))
        return new


class _Given:
    """Self-MoA-Seq's samples given by the caller: any iterable of strings, pulled only when a round needs them."""

    def __init__(self, samples: Iterable[str], *, min_ok: int):
        self.known = len(samples) if isinstance(samples, Sequence) else None
        self.source, self.min_ok, self.rounds = iter(samples), min_ok, 0
        self.consumed, self.dry = 0, False

    @property
    def count(self) -> int:
        return self.consumed

    @property
    def exhausted(self) -> bool:
        """Whether the source is known to hold no more samples, found out without waiting for one."""
        return self.dry or (self.known is not None and self.consumed >= self.known)

    def take(self, wanted: int) -> list[tuple[int, str]]:
        new = []
        for text in itertools.islice(self.source, wanted):
            _check(isinstance(text, str), f"samples[{self.consumed}]", text, "a sample is a string of text",
                   "pass the sample texts")
            new.append((self.consumed, text))
            self.consumed += 1
        self.dry = self.dry or len(new) < wanted
        if self.exhausted and self.consumed < self.min_ok:  # checked before the round being filled is aggregated
            raise NotEnoughProposals(f"only {self.consumed} samples succeeded, fewer than min_ok={self.min_ok}"
                                     + ("; no samples were given" if self.consumed == 0 else ""))
        return new


class _MarkerFilter:
    """Passes a streamed answer on, without the marker lines that ``_strip_markers`` removes from the text.

    A line that could still become a marker is held back until it ends (or the stream does), so what is
    streamed is exactly the answer returned, whatever pieces the text arrives in.
    """

    _MARKER_CHARACTERS = frozenset("<> \t\r,endofrspky0123456789abcdef")

    def __init__(self, stream: Callable[[str], None], key: str):
        self.stream, self.key = stream, key
        self.line = ""  # the current line, while it could still be a marker
        self.passing = False  # the current line is known not to be a marker: passed on as it comes
        self.lines = 0  # lines passed on so far (each after the first is preceded by its line break)

    def __call__(self, piece: str) -> None:
        out = []
        for part in re.split(r"(\n)", piece):
            if part == "\n":
                out.append(self._end_line())
            elif self.passing:
                out.append(part)
            else:
                self.line += part
                if not all(c in self._MARKER_CHARACTERS or c.isdecimal() for c in self.line):  # \d: any digit
                    out.append(self._pass_line())
        if any(out):
            self.stream("".join(out))

    def _pass_line(self) -> str:
        text = ("\n" if self.lines else "") + self.line
        self.passing, self.line, self.lines = True, "", self.lines + 1
        return text

    def _end_line(self) -> str:
        text = "" if self.passing or _marker(self.key).fullmatch(self.line) else self._pass_line()
        self.passing, self.line = False, ""
        return text

    def close(self) -> None:
        """The stream ended: decide on its last line."""
        text = self._end_line()
        if text:
            self.stream(text)


# A batch (or a server) runs many method calls on one shared pool. It says so through this context
# variable rather than through a parameter, so that no private knob shows in a method's signature.
_SHARED_POOL: contextvars.ContextVar[tuple[_Pool, tuple, bool] | None] = contextvars.ContextVar(
    "selfmoa_shared_pool", default=None)


@contextlib.contextmanager
def _on_shared_pool(pool: _Pool, priority: tuple, *, oldest_first: bool = False) -> Iterator[None]:
    """Run the method calls made inside the block on ``pool``, ranked by ``priority`` (e.g. the item's position).

    A batch wants throughput: the pool runs the longest chains of calls first, whichever run they belong to.
    A server wants each answer soon: with ``oldest_first``, the calls of runs that started earlier go first.
    """
    token = _SHARED_POOL.set((pool, priority, oldest_first))
    try:
        yield
    finally:
        _SHARED_POOL.reset(token)


def _start(complete: Any, concurrency: int) -> tuple[_Pool, bool, tuple, bool]:
    """The pool to run on, whether this run owns it, the run's priority and whether older runs go first: a
    shared pool (a batch's, a server's), or a new one owned by this run."""
    _check(callable(complete), "complete", complete, "it is the completion function every call goes through",
           'pass complete=HTTPClient("http://host:port/v1"), or any function Request -> str')
    _check(_is_int(concurrency) and concurrency >= 1, "concurrency", concurrency,
           "it bounds how many calls run at once", "pass an integer >= 1")
    shared = _SHARED_POOL.get()
    return (shared[0], False, shared[1], shared[2]) if shared is not None else (_Pool(concurrency), True, (), False)


# --- Argument checks: every argument is checked before the first call ---------------------------------


def _check_sampling(temperature: Any, max_tokens: Any, prefix: str = "") -> None:
    _check(isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
           and 0 <= temperature <= 2, f"{prefix}temperature", temperature,
           "chat-completions servers accept 0 to 2", "pass a number between 0 and 2")
    _check(max_tokens is None or (_is_int(max_tokens) and max_tokens >= 1), f"{prefix}max_tokens", max_tokens,
           "it limits the tokens generated per reply", "pass an integer >= 1, or None for the server's default")


def _check_model(name: str, value: Any) -> None:
    _check(isinstance(value, str) and value.strip() != "", name, value, "a model name is a non-empty string",
           "pass the name the server knows the model by")


def _settings(*, complete: Any, temperature: Any, max_tokens: Any, aggregator_temperature: Any,
              aggregator_max_tokens: Any, seed: Any, concurrency: Any, instruction: Any, use_n: Any,
              stream: Any) -> _Settings:
    """The arguments every method shares, checked."""
    _check_sampling(temperature, max_tokens)
    _check_sampling(aggregator_temperature, aggregator_max_tokens, "aggregator_")
    _check(seed is None or _is_int(seed), "seed", seed, "sample i is drawn with seed + i",
           "pass an integer, or None")
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    _check(isinstance(instruction, str) and instruction.strip() != "", "instruction", instruction,
           "it tells the aggregator what to do with the references", "pass a non-empty string, or None")
    _check(stream is None or callable(stream), "stream", stream, "it receives the final answer's text pieces",
           "pass a function taking a str, or None")
    return _Settings(complete=complete, concurrency=concurrency,
                     proposing=_Params(temperature=temperature, max_tokens=max_tokens, seed=seed),
                     aggregating=_Params(temperature=aggregator_temperature, max_tokens=aggregator_max_tokens,
                                         seed=seed),
                     instruction=instruction, use_n=bool(use_n), stream=stream)


def _proposer_plan(proposers: Any, layers: Any) -> list[list[str]]:
    """One list of proposer models per proposer layer, from ``proposers`` (one list, or one per layer)."""
    _check(isinstance(proposers, Sequence) and not isinstance(proposers, str) and len(proposers) > 0,
           "proposers", proposers, "MoA needs at least one proposer", 'pass a list of model names, e.g. ["a", "b"]')
    if all(isinstance(p, Sequence) and not isinstance(p, str) for p in proposers):
        _check(layers is None or layers == len(proposers) + 1, "layers", layers,
               f"{len(proposers)} proposer layers plus the aggregator make {len(proposers) + 1} layers",
               f"pass layers={len(proposers) + 1} or leave it out")
        plan = [list(layer) for layer in proposers]
    else:
        layers = 2 if layers is None else layers
        _check(_is_int(layers) and layers >= 2, "layers", layers,
               "layers count the aggregator, so MoA has at least 2 (proposers, then the aggregator)",
               "pass layers=2 for one proposer layer")
        plan = [list(proposers)] * (layers - 1)
    for number, layer in enumerate(plan, 1):
        _check(len(layer) > 0, f"proposers (layer {number})", layer, "a proposer layer is empty",
               "give every layer at least one model")
        for model in layer:
            _check_model("proposer", model)
    return plan


def _check_moa(*, plan: list[list[str]], aggregator: Any, min_ok: Any) -> None:
    _check_model("aggregator", aggregator)
    smallest = min(len(layer) for layer in plan)
    _check(_is_int(min_ok) and 1 <= min_ok <= smallest, "min_ok", min_ok,
           f"it is the fewest proposers of a layer that must succeed, between 1 and the smallest layer "
           f"({smallest})", f"pass min_ok between 1 and {smallest}")


def _check_sampled(*, model: Any, n: Any, temperature: Any, method: str) -> None:
    """Self-MoA and a generated Self-MoA-Seq: one model, sampled n >= 1 times above temperature 0."""
    _check_model("model", model)
    _check(_is_int(n) and n >= 1, "n", n, f"{method} aggregates n samples", "pass n >= 1 (the paper uses 4 to 6)")
    _check(not (isinstance(temperature, (int, float)) and temperature <= 0),  # other bad values: _check_sampling
           "temperature", temperature, f"{method}'s diversity comes from sampling; at 0 every sample is the same",
           "pass a temperature above 0 (the paper samples at 0.7)")


def _check_window(window: Any, carry: Any) -> None:
    _check(_is_int(window) and window >= 2, "window", window,
           "each round must hold the carried synthesis and at least one new sample", "pass window >= 2 (default 6)")
    _check(_is_int(carry) and 1 <= carry < window, "carry", carry,
           f"carry copies of the synthesis plus at least one new sample must fit in window={window}",
           f"pass carry between 1 and {window - 1} (default 3)")


def _check_given(*, samples: Any, n: Any) -> None:
    _check(n is None, "n", n, "the samples were given, so there is nothing to generate",
           "pass either samples= or n=, not both")
    _check(isinstance(samples, Iterable) and not isinstance(samples, (str, bytes, Mapping)), "samples",
           samples, "it is an iterable of sample texts", 'pass a list or generator of strings')
    _check(not (isinstance(samples, Sequence) and len(samples) == 0), "samples", samples,
           "there is nothing to aggregate", "pass at least one sample text")


def _check_min_ok_samples(min_ok: Any, known: int | None) -> None:
    """Self-MoA-Seq's min_ok: 1..n for generated samples, 1..len(samples) for a list, >= 1 for a generator."""
    _check(_is_int(min_ok) and min_ok >= 1 and (known is None or min_ok <= known), "min_ok", min_ok,
           "it is the fewest samples that must succeed", f"pass min_ok between 1 and {known or 'the sample count'}")


# ======================================================================================================
# HTTPClient: the completion function for OpenAI-compatible servers
# ======================================================================================================

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_REPLY_BYTES = 32 * 2**20  # the largest reply body read (HTTPClient's max_reply_bytes); a stream counts whole
MAX_EVENT_LINE = 2**20  # the longest line of a streamed reply (one event)
MAX_ERROR_BYTES = 2**16  # how much of an error reply is read; the rest is dropped with its connection
SHOWN_MESSAGE, SHOWN_BODY = 600, 500  # characters of server text kept in a ModelError's message and body

_SURROGATES = re.compile("[\ud800-\udfff]")  # unpaired halves (json.loads joins the pairs)
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # shown to a terminal, they could rewrite what it shows


def _clean(text: str) -> str:
    """Text from a server with lone surrogates (which no encoder accepts) replaced by U+FFFD.

    >>> _clean("ok \\ud83d!")
    'ok \\ufffd!'
    """
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def _printable_ascii(text: str) -> bool:
    return all("!" <= char <= "~" for char in text)


def _origin(url: Any) -> str:
    """What of a URL may be shown when refusing it: its scheme and host, never user, password, path or query."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except (TypeError, ValueError, AttributeError):
        return "(not shown)"
    if "@" in url:  # a password holding "/" or "?" fools the parser into taking the user for the host
        return "(not shown)"
    return f"{parts.scheme}://{host[:100]}" if host and parts.scheme else "(not shown)"


def _url_problem(url: Any) -> str | None:
    """Why ``url`` cannot be a base URL, or None if it can."""
    if not isinstance(url, str):
        return f"it is a {type(url).__name__}, not a string"
    if not _printable_ascii(url):
        return "it holds a space, a control character or a non-ASCII character (percent-encode them)"
    if "@" in url.partition("?")[0]:
        return ("it holds credentials (user:password@), which selfmoa never sends (give a key as api_key, "
                "--api-key or $SELFMOA_API_KEY_<MODEL>)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "it is not a valid URL, or its port is not a number from 1 to 65535"
    if parts.scheme not in ("http", "https"):
        return "it is not an http(s) URL"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "its port is not a number from 1 to 65535"
    return None


def _key_problem(key: Any) -> str | None:
    """Why ``key`` cannot be sent as a bearer token, or None if it can (the key itself is never shown)."""
    if key is None:
        return None
    if not isinstance(key, str):
        return f"an API key is a string, not a {type(key).__name__}"
    if not _printable_ascii(key):
        return ("the key holds a space, a control character or a non-ASCII character (a key read from a file "
                "often ends in \\n or \\r)")
    return None


_SECRET_PARAMETER = re.compile(r"key|token|secret|sig|pass|auth", re.IGNORECASE)  # query names that hold a key


class Endpoint:
    """One OpenAI-compatible server: its base URL (ending in ``/v1``) and the API key that belongs to it.

    The key is sent to this URL only, and never shown: not in ``repr``, traces or error messages. A URL
    with credentials in it (``http://user:key@host/v1``) is refused: pass the key as ``api_key``. A query
    string (``?api-version=...``) is sent with every request but never shown.

    >>> Endpoint("http://localhost:8080/v1", api_key="sk-secret")
    Endpoint('http://localhost:8080/v1', api_key='***')
    >>> Endpoint("http://me:sk-secret@localhost:8080/v1?key=sk-secret")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    selfmoa.ConfigError: base_url='(not shown)': it holds credentials (user:password@), which ...
    """

    __slots__ = ("base_url", "api_key", "_parts")

    def __init__(self, base_url: str, api_key: str | None = None):
        problem = _url_problem(base_url)
        _check(problem is None, "base_url", _origin(base_url), problem or "", "pass a URL like http://localhost:8000/v1")
        problem = _key_problem(api_key)
        _check(problem is None, "api_key", "***", problem or "", "pass the key alone, stripped of whitespace")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self._parts = urllib.parse.urlsplit(self.base_url)

    def __repr__(self) -> str:
        key = ", api_key='***'" if self.api_key else ""
        return f"Endpoint({_public_url(self.base_url)!r}{key})"

    @property
    def url(self) -> str:
        """The chat-completions URL, without credentials: safe to show."""
        return _public_url(self.base_url) + "/chat/completions"

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never be shown: the key, and the values of the URL's query parameters that carry one
        (``?api-key=...``, as Azure takes its key; any name with key, token, secret, sig, pass or auth in it).

        >>> Endpoint("https://x.example/v1?api-version=2024-06-01&api-key=abcdef123456", "sk-1234").secrets
        ('sk-1234', 'abcdef123456')
        """
        values = [value for name, value in urllib.parse.parse_qsl(self._parts.query)
                  if value and _SECRET_PARAMETER.search(name)]
        return tuple(dict.fromkeys(([self.api_key] if self.api_key else []) + values))


def _public_url(url: str) -> str:
    """A URL with any user:password and query string removed, so that it can be shown.

    >>> _public_url("https://user:pw@example.com:8443/v1?api-key=s")
    'https://example.com:8443/v1'
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _NoDelay:
    """http.client sends a request's headers and body in two writes; with Nagle's algorithm on, the second
    can wait for the server's delayed ACK (tens of milliseconds). TCP_NODELAY sends both at once."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
        # kept: http.client drops .sock while a read-to-close reply still reads from it
        self.socket = self.sock  # type: ignore[attr-defined]


class _HTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


def _shut(connection: http.client.HTTPConnection) -> None:
    """Wake whatever thread is blocked reading ``connection``: its read ends at once (the socket is dead)."""
    sock = getattr(connection, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS


class _Retry(Exception):
    """Internal: a failure worth retrying (a 429, a 5xx, a timeout, a dropped or truncated reply)."""

    def __init__(self, message: str, status: int | None = None, body: str = "",
                 retry_after: float | None = None, stale: bool = False, down: bool = False):
        super().__init__(message)
        self.message, self.status, self.body = message, status, body
        self.retry_after, self.stale, self.down = retry_after, stale, down  # down: refused, or no such host


class _Attempt:
    """Internal: one attempt in flight, which the deadline watchdog or ``abort()`` may cut off."""

    __slots__ = ("connection", "deadline", "expired", "shown")

    def __init__(self, connection: http.client.HTTPConnection, deadline: float):
        self.connection, self.deadline, self.expired = connection, deadline, False
        self.shown = False  # whether streamed text was passed on (then the attempt cannot be retried)


COOL_AFTER = 3  # failures in a row that take a replica out for HTTPClient's cooldown (a refusal: at once)


class _Server:
    """Internal: what the client knows of one server: calls in flight, failures in a row, when its
    cool-down ends, and the requests it was sent (and how many failed) for the summary."""

    __slots__ = ("url", "in_flight", "failures", "cool_until", "requests", "failed")

    def __init__(self, url: str):
        self.url, self.in_flight, self.failures, self.cool_until, self.requests, self.failed = url, 0, 0, 0.0, 0, 0


class HTTPClient:
    """A completion function that calls ``POST {base_url}/chat/completions`` over HTTP(S).

    - ``base_url`` / ``api_key``: the default endpoint; ``endpoints`` maps a model name to its own
      ``Endpoint`` (or a URL string), so a local vLLM model and a hosted model can be mixed. A key is only
      ever sent to the endpoint it was given with.
    - Replicas: ``base_url`` may be a list (of URLs, each with ``api_key``, or of ``Endpoint``), and an
      ``endpoints`` value a list of endpoints: several servers of the same model. Each call goes to the
      replica with the fewest calls in flight (ties in turn); a request carrying ``n`` samples goes to one
      replica. ``max_in_flight`` caps the calls in flight per server (calls wait for a free slot). A replica
      that refuses a connection, or fails ``COOL_AFTER`` times in a row, is left alone for ``cooldown``
      seconds (then tried again; one more failure sends it back). A call that fails on one replica is sent
      at once to another that is not cooling down and has not failed it, without waiting and without
      spending a retry; when there is none, the usual retry (with backoff) follows, on all of them again.
      ``servers()`` counts the requests each server got.
    - Connections are kept alive and shared: an idle connection to a host is reused by whichever thread
      calls next (at most ``max_idle`` idle ones per host).
    - Time: ``timeout`` bounds connecting and each wait for data (a silent server); ``deadline`` bounds a
      whole attempt, from connecting to the last byte of the reply (a server that drips its reply).
    - Size: a reply body over ``max_reply_bytes`` (a stream counted whole), or a streamed line over
      ``MAX_EVENT_LINE`` bytes, is a ModelError; bodies are read piece by piece, whatever Content-Length says.
    - 408, 409, 429 and 5xx replies, timeouts, the deadline, refused, dropped or truncated connections are
      retried up to ``retries`` times with exponential backoff and full jitter (``backoff`` doubling up to
      ``max_backoff`` seconds), waiting at least what ``Retry-After`` asks (unless that exceeds
      ``max_retry_after``, which fails at once). Other 4xx replies fail at once. A failure raises
      ``ModelError`` (whatever the server sent), never returns ``None``.
    - ``n > 1`` is sent as one request. Choices are placed by their ``index``; a position without a usable
      text (no choice, ``content: null``, a repeated index) is ``None`` in ``Reply.texts``, and the methods
      ask for that sample again on its own. Lone surrogates in a text become U+FFFD.
    - With ``request.stream`` set, the reply is streamed (server-sent events) and each text piece is
      passed to ``request.stream`` as it arrives.
    - ``abort()`` ends every call in flight at once and makes later calls fail (the command line's Ctrl-C).
    """

    def __init__(self, base_url: str | Endpoint | Sequence[str | Endpoint] | None = None,
                 api_key: str | None = None, *,
                 endpoints: Mapping[str, Endpoint | str | Sequence[Endpoint | str]] | None = None,
                 timeout: float = 120.0,
                 deadline: float = 600.0, retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retry_after: float = 120.0, max_idle: int = 64, max_reply_bytes: int = MAX_REPLY_BYTES,
                 max_in_flight: int | None = None, cooldown: float = 5.0,
                 sleep: Callable[[float], None] | None = None, rng: random.Random | None = None):
        _check(api_key is None or base_url is not None, "api_key", "***",
               "a key needs the endpoint it belongs to", "pass base_url too")
        urls = [base_url] if isinstance(base_url, (str, Endpoint)) or base_url is None else list(base_url)
        _check(base_url is None or bool(urls), "base_url", base_url, "a list of replicas needs at least one URL",
               "pass a URL, or a list of URLs of servers of the same models")
        self.default: list[Endpoint] = [url if isinstance(url, Endpoint) else Endpoint(url, api_key)
                                        for url in urls if url is not None]
        self.endpoints: dict[str, list[Endpoint]] = {}
        for model, given in (endpoints or {}).items():
            _check(isinstance(model, str) and model != "", "endpoints", model, "a model name is a non-empty string",
                   'map names to endpoints: {"qwen": Endpoint("http://host:8000/v1")}')
            replicas = [given] if isinstance(given, (Endpoint, str)) else list(given)
            _check(bool(replicas), "endpoints", model, "a model needs at least one endpoint",
                   'pass {"qwen": [Endpoint(url1), Endpoint(url2)]}')
            self.endpoints[model] = [e if isinstance(e, Endpoint) else Endpoint(e) for e in replicas]
        _check(max_in_flight is None or (_is_int(max_in_flight) and max_in_flight >= 1), "max_in_flight",
               max_in_flight, "it caps the calls in flight per server", "pass an integer >= 1, or None for no cap")
        _check(isinstance(cooldown, (int, float)) and not isinstance(cooldown, bool) and math.isfinite(cooldown)
               and cooldown >= 0, "cooldown", cooldown, "it is how long a failing replica is left alone",
               "pass a number of seconds >= 0")
        for name, value in (("timeout", timeout), ("deadline", deadline), ("backoff", backoff),
                            ("max_backoff", max_backoff), ("max_retry_after", max_retry_after)):
            positive = name in ("timeout", "deadline")
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   and (value > 0 if positive else value >= 0), name, value,
                   "it must be a finite number of seconds" + (" above 0" if positive else " >= 0"),
                   f"pass e.g. {name}=30")
        _check(_is_int(retries) and retries >= 0, "retries", retries, "it counts extra attempts",
               "pass an integer >= 0 (0 disables retrying)")
        _check(_is_int(max_reply_bytes) and max_reply_bytes >= 1024, "max_reply_bytes", max_reply_bytes,
               "it caps the size of a reply", "pass a number of bytes >= 1024")
        self.timeout, self.deadline, self.retries = timeout, deadline, retries
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.max_reply_bytes, self.sleep = max_reply_bytes, sleep
        self.rng = rng or random.Random()
        self.max_idle = max_idle
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._in_flight: set[_Attempt] = set()
        self._watch = threading.Condition(threading.Lock())
        self._watching, self._wakes_at = False, math.inf
        self._aborted = threading.Event()
        self.max_in_flight, self.cooldown = max_in_flight, cooldown
        self._servers = {e.base_url: _Server(_public_url(e.base_url))
                         for e in self.default + [e for group in self.endpoints.values() for e in group]}
        self._turns: dict[tuple, int] = {}
        self._slots = threading.Condition(threading.Lock())

    def __repr__(self) -> str:
        return f"HTTPClient(default={self.default!r}, endpoints={self.endpoints!r})"

    def replicas(self, model: str) -> list[Endpoint]:
        """The endpoints that serve ``model``: its own if it has any, else the default ones."""
        replicas = self.endpoints.get(model) or self.default
        if not replicas:
            raise ConfigError(f"model {model!r} has no endpoint: give HTTPClient a base_url, or "
                              f"endpoints={{{model!r}: Endpoint(...)}} (on the command line: --base-url "
                              f"or --endpoint {model}=URL)")
        return replicas

    def endpoint_for(self, model: str) -> Endpoint:
        """The endpoint that serves ``model`` (the first of its replicas): its own if it has one, else the default."""
        return self.replicas(model)[0]

    def servers(self) -> dict[str, dict[str, int]]:
        """By server URL (without credentials): the requests sent to it so far, and how many of them failed."""
        with self._slots:
            return {server.url: {"requests": server.requests, "failed": server.failed}
                    for server in self._servers.values()}

    def __call__(self, request: Request) -> Reply:
        replicas = self.replicas(request.model)
        body: dict[str, Any] = {"model": request.model, "messages": list(request.messages),
                                "temperature": request.temperature}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.n > 1:
            body["n"] = request.n
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.stream is not None:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        payload = _clean(json.dumps(body, ensure_ascii=False)).encode("utf-8")  # no lone surrogate can be sent
        attempt, retries, extra, reconnected = 0, 0, 0, False
        failed_here: set[str] = set()  # replicas this call failed on since its last retry
        while True:
            attempt += 1
            endpoint = self._pick(replicas, failed_here, request)
            try:
                reply = self._send(endpoint, payload, request)
            except _Retry as failure:
                if failure.stale and not reconnected:
                    self._settle(endpoint, "stale")
                    reconnected = True
                    continue  # a kept-alive connection the server had closed: reconnect, not a retry
                self._settle(endpoint, "down" if failure.down else "failed")
                failed_here.add(endpoint.base_url)
                if any(r.base_url not in failed_here and self._servers[r.base_url].cool_until <= time.monotonic()
                       for r in replicas):
                    extra += 1
                    continue  # failover: another replica takes the call now, no wait, no retry spent
                failed_here.clear()
                wait = min(self.max_backoff, self.backoff * 2 ** retries) * self.rng.random()
                if failure.retry_after is not None:
                    if failure.retry_after > self.max_retry_after:
                        raise self._error(endpoint, request, f"{failure.message}; the server asked to wait "
                                          f"{failure.retry_after:g} s, more than max_retry_after="
                                          f"{self.max_retry_after:g}", failure, attempt) from None
                    wait = max(wait, failure.retry_after)
                if retries >= self.retries:
                    raise self._error(endpoint, request, failure.message, failure, attempt) from None
                retries += 1
                extra += 1
                if self.sleep is not None:
                    self.sleep(wait)
                else:
                    self._aborted.wait(wait)  # abort() cuts the wait short
            except ModelError as error:
                self._settle(endpoint, "answered")
                failed_here.add(endpoint.base_url)
                if error.status == 404 and any(r.base_url not in failed_here for r in replicas):
                    extra += 1
                    continue  # this replica lacks the model (another one is loaded there): ask another replica
                raise
            except BaseException:
                self._settle(endpoint, "stale")
                raise
            else:
                self._settle(endpoint, "ok")
                reply.retries = extra
                return reply

    # --- replicas: which server takes a call ------------------------------------------------------------

    def _pick(self, replicas: list[Endpoint], failed_here: set[str], request: Request) -> Endpoint:
        """The replica for the next attempt, counted in flight: of those this call has not failed on (else
        all), the ones not cooling down (else the one back soonest), with a free slot (else wait for one),
        the one with the fewest calls in flight; ties go in turn."""
        group = tuple(r.base_url for r in replicas)
        with self._slots:
            while not self._aborted.is_set():
                now, turn = time.monotonic(), self._turns.get(group, 0)
                in_turn = [replicas[(turn + k) % len(replicas)] for k in range(len(replicas))]
                fresh = [r for r in in_turn if r.base_url not in failed_here] or in_turn
                servers = self._servers
                healthy = [r for r in fresh if servers[r.base_url].cool_until <= now] or [
                    min(fresh, key=lambda r: servers[r.base_url].cool_until)]
                free = [r for r in healthy
                        if self.max_in_flight is None or servers[r.base_url].in_flight < self.max_in_flight]
                if free:
                    chosen = min(free, key=lambda r: servers[r.base_url].in_flight)  # the first in turn on ties
                    servers[chosen.base_url].in_flight += 1
                    self._turns[group] = replicas.index(chosen) + 1
                    return chosen
                self._slots.wait(1.0)  # every slot taken: a finished call notifies
        raise self._error(replicas[0], request, "interrupted: the client was aborted", None, 1, retryable=False)

    def _settle(self, endpoint: Endpoint, outcome: str) -> None:
        """Count an attempt's end: ok, failed (retryable), down (refused), answered (a final error) or stale."""
        with self._slots:
            server = self._servers[endpoint.base_url]
            server.in_flight -= 1
            server.requests += outcome != "stale"
            server.failed += outcome in ("failed", "down", "answered")
            if outcome in ("ok", "answered"):
                server.failures = 0  # it answers: healthy
            elif outcome in ("failed", "down"):
                server.failures += 1
                if outcome == "down" or server.failures >= COOL_AFTER:
                    server.cool_until = time.monotonic() + self.cooldown
            self._slots.notify_all()  # every waiter: the one woken must be one waiting for this server

    def _error(self, endpoint: Endpoint, request: Request, message: str, failure: _Retry | None,
               attempts: int, status: int | None = None, body: str = "", retryable: bool = True) -> ModelError:
        if failure is not None:
            status, body = failure.status, failure.body
        # Servers may echo the key back ("Incorrect API key provided: sk-..."): blank it out, then cut.
        return ModelError(_shown(message, endpoint.secrets, SHOWN_MESSAGE), model=request.model, url=endpoint.url,
                          status=status, body=_shown(body, endpoint.secrets, SHOWN_BODY), attempts=attempts,
                          retryable=retryable)

    def _acquire(self, endpoint: Endpoint) -> tuple[http.client.HTTPConnection, bool]:
        """An idle kept-alive connection to the endpoint's host if there is one (True), else a new one."""
        parts = endpoint._parts
        with self._lock:
            idle = self._idle.get((parts.scheme, parts.hostname, parts.port))
            if idle:
                return idle.pop(), True
        kind = _HTTPSConnection if parts.scheme == "https" else _HTTPConnection
        return kind(parts.hostname or "", parts.port, timeout=min(self.timeout, self.deadline)), False

    def _release(self, endpoint: Endpoint, connection: http.client.HTTPConnection) -> None:
        """Put a connection whose reply was read in full back for reuse."""
        parts = endpoint._parts
        with self._lock:
            idle = self._idle.setdefault((parts.scheme, parts.hostname, parts.port), [])
            if len(idle) < self.max_idle:
                idle.append(connection)
                return
        connection.close()

    # --- the deadline watchdog: one thread per client, alive while attempts are in flight ------------------

    def _begin(self, connection: http.client.HTTPConnection) -> _Attempt:
        attempt = _Attempt(connection, time.monotonic() + self.deadline)
        with self._watch:
            self._in_flight.add(attempt)
            if not self._watching:
                self._watching = True
                threading.Thread(target=self._watchdog, name="selfmoa-deadline", daemon=True).start()
            elif attempt.deadline < self._wakes_at:
                self._watch.notify()
        return attempt

    def _end(self, attempt: _Attempt) -> None:
        with self._watch:
            self._in_flight.discard(attempt)

    def _watchdog(self) -> None:
        """Cut off every attempt past its deadline; stop after a second with nothing in flight."""
        idle_since = None
        with self._watch:
            while True:
                now = time.monotonic()
                for attempt in [a for a in self._in_flight if a.deadline <= now]:
                    attempt.expired = True
                    self._in_flight.discard(attempt)
                    _shut(attempt.connection)
                if self._in_flight:
                    idle_since = None
                    self._wakes_at = min(a.deadline for a in self._in_flight)
                elif idle_since is not None and now - idle_since >= 1.0:
                    self._watching, self._wakes_at = False, math.inf
                    return
                else:
                    idle_since = idle_since or now
                    self._wakes_at = now + 1.0
                self._watch.wait(self._wakes_at - now)

    def abort(self) -> None:
        """End every call now: attempts in flight are cut off (their sockets shut down), waits between
        retries end, and this and every later call fails with ``ModelError`` ("interrupted"). For Ctrl-C."""
        self._aborted.set()
        with self._watch:
            for attempt in self._in_flight:
                _shut(attempt.connection)
        with self._slots:
            self._slots.notify_all()  # calls waiting for a free slot
        self.close()

    # --- one attempt ---------------------------------------------------------------------------------------

    def _send(self, endpoint: Endpoint, payload: bytes, request: Request) -> Reply:
        """One attempt: send, read, parse. Raises _Retry for what may pass, ModelError for what will not."""
        if self._aborted.is_set():
            raise self._error(endpoint, request, "interrupted: the client was aborted", None, 1, retryable=False)
        connection, reused = self._acquire(endpoint)
        flight = self._begin(connection)
        try:
            reply, reusable = self._exchange(connection, reused, endpoint, payload, request, flight)
        except (_Retry, ModelError) as failure:
            self._end(flight)
            connection.close()
            if self._aborted.is_set():
                raise self._error(endpoint, request, "interrupted: the client was aborted", None, 1,
                                  retryable=False) from None
            if not flight.expired:
                raise
            message = f"no complete reply within deadline={self.deadline:g} s"
            if flight.shown:
                raise self._error(endpoint, request, f"{message} ({failure.message})", None, 1, status=200,
                                  retryable=False) from None  # text was shown: retrying would show it twice
            raise _Retry(message) from None
        except BaseException:
            self._end(flight)
            connection.close()
            raise
        self._end(flight)
        if reusable and not flight.expired:
            self._release(endpoint, connection)
        else:
            connection.close()
        return reply

    def _exchange(self, connection: http.client.HTTPConnection, reused: bool, endpoint: Endpoint, payload: bytes,
                  request: Request, flight: _Attempt) -> tuple[Reply, bool]:
        """Send the request and read the reply: the Reply and whether the connection can be reused."""
        parts = endpoint._parts
        path = (parts.path.rstrip("/") + "/chat/completions") + (f"?{parts.query}" if parts.query else "")
        headers = {"Content-Type": "application/json", "User-Agent": f"selfmoa/{__version__}",
                   "Accept": "text/event-stream" if request.stream else "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        try:
            connection.request("POST", path, body=payload, headers=headers)
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            raise _Retry(f"connection dropped before a reply ({type(exc).__name__})", stale=reused) from None
        except TimeoutError:
            raise _Retry(f"no reply within timeout={self.timeout:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _Retry(f"could not reach the server, or its reply is not HTTP ({type(exc).__name__}: "
                         f"{str(exc)[:200]})", down=isinstance(exc, (ConnectionRefusedError, socket.gaierror))) \
                from None
        json_reply = (response.getheader("Content-Type") or "").split(";")[0].strip().lower() == "application/json"
        if response.status == 200 and request.stream is not None and not json_reply:
            return self._read_stream(response, endpoint, request, flight)
        try:
            raw, whole = _read_capped(response, self.max_reply_bytes if response.status == 200 else MAX_ERROR_BYTES)
        except TimeoutError:
            raise _Retry(f"the reply stalled beyond timeout={self.timeout:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _Retry(f"the reply was cut off ({type(exc).__name__})") from None
        text = raw.decode("utf-8", errors="replace")
        if response.status != 200:
            detail = _error_message(text)
            retry_after = _retry_after(response.getheader("Retry-After"))
            if response.status in RETRY_STATUSES:
                raise _Retry(detail, status=response.status, body=text, retry_after=retry_after)
            raise self._error(endpoint, request, detail, None, 1, status=response.status, body=text,
                              retryable=False)
        if not whole:
            raise self._error(endpoint, request, f"the reply is larger than max_reply_bytes="
                              f"{self.max_reply_bytes}", None, 1, status=200, body=text, retryable=False)
        reply = self._parse(text, endpoint, request)
        if request.stream is not None and isinstance(reply.texts[0], str):  # a server that does not stream
            request.stream(reply.texts[0])  # sent a whole completion: it is the one piece of the stream
        return reply, not response.will_close

    def _parse(self, text: str, endpoint: Endpoint, request: Request) -> Reply:
        """A chat-completions JSON body -> Reply, or a ModelError that says what is wrong with it.

        Choice ``j`` goes to position ``index`` (its place in the list if it has no numeric index); an index
        out of range or already taken is ignored; a position left without a string ``message.content``
        is ``None``. With ``n == 1`` that is an error; with more, the methods ask for those samples again.
        """
        def bad(what: str) -> ModelError:
            return self._error(endpoint, request, f"the reply is not a chat completion: {what}", None, 1,
                               status=200, body=text, retryable=False)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise bad("its body is not JSON") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise bad("it has no 'choices' list")
        texts: list[str | None] = [None] * request.n
        reasons: list[str | None] = [None] * request.n
        taken, problem = [False] * request.n, None
        for place, choice in enumerate(choices):
            given = choice.get("index") if isinstance(choice, dict) else None
            index = given if isinstance(given, int) and not isinstance(given, bool) else place
            if not 0 <= index < request.n or taken[index]:
                continue  # more choices than asked for, or a repeated index: the first one counts
            taken[index] = True
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            reasons[index] = _clean(reason[:100]) if isinstance(reason, str) else None
            if isinstance(content, str):
                texts[index] = _clean(content)
            elif problem is None:
                problem = (f"choice {index} has no string 'message.content'"
                           + (f" (finish_reason {reasons[index]!r})" if reasons[index] else ""))
        if texts[0] is None and request.n == 1:
            raise bad(problem or "it has no choice with index 0")
        filled = max((i + 1 for i in range(request.n) if taken[i]), default=1)  # the rest: missing, asked for
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Reply(texts[:filled], reasons[:filled], _int_or_none(usage.get("prompt_tokens")),
                     _int_or_none(usage.get("completion_tokens")), url=endpoint.url)

    def _read_stream(self, response: http.client.HTTPResponse, endpoint: Endpoint, request: Request,
                     flight: _Attempt) -> tuple[Reply, bool]:
        """Read server-sent events, passing each text piece on as it arrives."""
        assert request.stream is not None
        pieces: list[str] = []
        reason, usage, size = None, {}, 0

        def broke(why: str) -> Exception:
            message = f"the stream broke ({why})"
            if not pieces:
                return _Retry(message)
            return self._error(endpoint, request, f"{message} after {sum(map(len, pieces))} characters had been "
                               f"streamed", None, 1, status=200, retryable=False)

        def bad(what: str, data: str = "") -> ModelError:
            return self._error(endpoint, request, f"the stream is not chat-completion events: {what}", None, 1,
                               status=200, body=data, retryable=False)
        while True:
            try:
                raw = response.readline(MAX_EVENT_LINE + 1)
            except TimeoutError:
                raise broke(f"no data within timeout={self.timeout:g} s") from None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise broke(type(exc).__name__) from None
            if not raw:
                raise broke("it ended without data: [DONE]")
            if not raw.endswith(b"\n") and len(raw) <= MAX_EVENT_LINE:
                raise broke("it ended in the middle of a line")
            size += len(raw)
            if len(raw) > MAX_EVENT_LINE:
                raise bad(f"a line is longer than {MAX_EVENT_LINE} bytes")
            if size > self.max_reply_bytes:
                raise bad(f"the reply is larger than max_reply_bytes={self.max_reply_bytes}")
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue  # blank lines between events, ":" comments, "event:" fields
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except (ValueError, RecursionError):
                raise bad("an event is not JSON", data) from None
            choices = chunk.get("choices") if isinstance(chunk, dict) else None
            if not isinstance(chunk, dict) or not isinstance(choices, (list, type(None))):
                raise bad("an event is not an object with a 'choices' list", data)
            if chunk.get("error"):  # a server that fails mid-stream says so, often followed by [DONE]
                raise broke(f"the server sent an error event: {_error_message(data)}")
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            for choice in choices or []:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if not isinstance(choice, dict) or not isinstance(delta, (dict, type(None))):
                    raise bad("a choice is not an object with a 'delta' object", data)
                if choice.get("index", 0) != 0:
                    continue  # a stream asks for one choice
                piece = (delta or {}).get("content")
                if isinstance(piece, str) and piece:
                    pieces.append(_clean(piece))
                    flight.shown = True
                    request.stream(pieces[-1])
                if isinstance(choice.get("finish_reason"), str):
                    reason = _clean(choice["finish_reason"][:100])
        try:  # the end of the body (the chunked terminator), so that the connection can be reused
            _, whole = _read_capped(response, MAX_ERROR_BYTES)
        except (OSError, http.client.HTTPException, ValueError):
            whole = False
        reply = Reply(["".join(pieces)], [reason], _int_or_none(usage.get("prompt_tokens")),
                      _int_or_none(usage.get("completion_tokens")), url=endpoint.url)
        return reply, whole and not response.will_close

    def close(self) -> None:
        """Close the idle kept-alive connections (the client stays usable: it reconnects when called)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _endpoints_of(client: Any) -> list[Endpoint]:
    """Every Endpoint a completion function holds: an HTTPClient's default replicas, then each model's."""
    groups = [getattr(client, "default", None), *(getattr(client, "endpoints", None) or {}).values()]
    flat = [e for group in groups for e in (group if isinstance(group, (list, tuple)) else [group])]
    return list(dict.fromkeys(e for e in flat if isinstance(e, Endpoint)))


def _read_capped(response: http.client.HTTPResponse, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a body, read piece by piece, and whether that was all of it.

    Content-Length is never trusted to size a buffer; a body shorter than it announced raises IncompleteRead.
    """
    body = bytearray()
    while len(body) <= limit:
        piece = response.read(min(1 << 16, limit + 1 - len(body)))
        if not piece:
            if response.length:  # announced, never sent: the connection closed early
                raise http.client.IncompleteRead(bytes(body[-16:]), response.length)
            return bytes(body), True
        body += piece
    return bytes(body[:limit]), False


def _int_or_none(value: Any) -> int | None:
    return value if _is_int(value) and value >= 0 else None


def _key_forms(secret: str) -> list[str]:
    """The ways a server may echo a key: as is, JSON-escaped, and percent-encoded (either case of hex)."""
    quoted = urllib.parse.quote(secret, safe="")
    forms = [secret, json.dumps(secret)[1:-1], secret.replace("/", "\\/"), quoted,
             re.sub("%[0-9A-F]{2}", lambda hexa: hexa.group().lower(), quoted), urllib.parse.quote_plus(secret)]
    return sorted(dict.fromkeys(forms), key=len, reverse=True)  # longest first: an escaped echo goes whole


def _redact(text: str, secret: str | None, run: int = 8) -> str:
    """``text`` with the key blanked out: every stretch of ``run`` or more characters of it (the whole key,
    a cut-off part, or the same in one of the forms servers echo it in) becomes ``***``.

    >>> _redact("bad key sk-abcdef123456; you sent sk-abcdef12; ok", "sk-abcdef123456")
    'bad key ***; you sent ***; ok'
    >>> _redact("sk-ab%2Fcdefgh", "sk-ab/cdefgh"), _redact('"sk-ab\\\\/cdefgh"', "sk-ab/cdefgh")
    ('***', '"***"')
    """
    if not secret:
        return text
    forms = _key_forms(secret)
    for form in forms:  # whole echoes first, each as one ***
        text = text.replace(form, "***")
    for form in forms:  # then any cut-off part of one
        if len(form) < run:
            continue
        grams = {form[i:i + run] for i in range(len(form) - run + 1)}
        out, start, i = [], 0, 0
        while i <= len(text) - run:
            if text[i:i + run] in grams:
                end = i + run
                while end < len(text) and text[i:end + 1] in form:
                    end += 1
                out += [text[start:i], "***"]
                start = i = end
            else:
                i += 1
        text = "".join(out) + text[start:]
    return text


def _shown(text: str, secrets: Iterable[str], limit: int) -> str:
    """Server text made safe to show: the secrets blanked out *before* cutting to ``limit`` characters (and
    any part of one left at the cut blanked after), lone surrogates and control characters replaced."""
    secrets = [secret for secret in secrets if secret]
    text = text.strip()
    margin = 8 * max((len(secret) for secret in secrets), default=0)  # a secret crossing the cut lies inside
    for secret in secrets:
        text = _redact(text[:limit + margin], secret)
    text = text[:limit]
    for secret in secrets:
        text = _redact(text, secret)
    return _CONTROLS.sub("\ufffd", _clean(text))


def _error_message(body: str) -> str:
    """The message of an OpenAI-shaped error body, or whatever the body is."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError, RecursionError):
        pass
    return body.strip() or "(empty body)"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date); None if absent or unreadable.

    >>> _retry_after("3"), _retry_after(None), _retry_after("soon")
    (3.0, None, None)
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None

# ======================================================================================================
# Quality and diversity: the measures behind the paper's argument
# ======================================================================================================
#
# The paper explains Self-MoA's edge by a trade-off: the aggregate depends on the quality of the proposals
# more than on their diversity. Diversity is measured with the Vendi score (Friedman and Dieng, 2023): the
# exponential of the entropy of the eigenvalues of K / n, where K holds the pairwise similarities of the n
# outputs. It is 1 when all outputs are the same and n when they are mutually unrelated: "the effective
# number of distinct outputs". Our similarity is the cosine of word-count vectors (lower-cased \w+ words),
# which keeps K positive semi-definite with a unit diagonal, needs no model, and is the same everywhere.

_WORD = re.compile(r"\w+")


def _word_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for word in _WORD.findall(text.lower()) or ["\0empty"]:  # an empty text is like only itself
        counts[word] = counts.get(word, 0) + 1
    return counts


def similarity_matrix(texts: Sequence[str]) -> list[list[float]]:
    """Pairwise cosine similarity of the texts' word counts: symmetric, unit diagonal, entries in [0, 1].

    >>> similarity_matrix(["a b", "b a", "c"])
    [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    vectors = [_word_counts(text) for text in texts]
    norms = [math.sqrt(sum(c * c for c in v.values())) for v in vectors]
    size = len(texts)
    matrix = [[1.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            small, large = sorted((vectors[i], vectors[j]), key=len)
            dot = sum(count * large.get(word, 0) for word, count in small.items())
            matrix[i][j] = matrix[j][i] = round(min(1.0, dot / (norms[i] * norms[j])), 12)
    return matrix


def symmetric_eigenvalues(matrix: Sequence[Sequence[float]], tolerance: float = 1e-12) -> list[float]:
    """The eigenvalues of a symmetric matrix (cyclic Jacobi rotations), in descending order.

    >>> [round(x, 6) for x in symmetric_eigenvalues([[2, 1], [1, 2]])]
    [3.0, 1.0]
    """
    a = [list(map(float, row)) for row in matrix]
    size = len(a)
    for _ in range(100):  # each sweep zeroes every off-diagonal entry once; a few sweeps converge
        off = sum(a[i][j] ** 2 for i in range(size) for j in range(i + 1, size))
        if off <= tolerance ** 2:
            break
        for p in range(size):
            for q in range(p + 1, size):
                if abs(a[p][q]) < 1e-300:
                    continue
                # The rotation angle that zeroes a[p][q]: tan(2 theta) = 2 a_pq / (a_qq - a_pp).
                theta = (a[q][q] - a[p][p]) / (2 * a[p][q])
                t = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1))
                c = 1 / math.sqrt(t * t + 1)
                s = t * c
                for k in range(size):
                    akp, akq = a[k][p], a[k][q]
                    a[k][p], a[k][q] = c * akp - s * akq, s * akp + c * akq
                for k in range(size):
                    apk, aqk = a[p][k], a[q][k]
                    a[p][k], a[q][k] = c * apk - s * aqk, s * apk + c * aqk
    return sorted((a[i][i] for i in range(size)), reverse=True)


def vendi_score(texts: Sequence[str]) -> float:
    """The Vendi score of a set of texts: 1 if all are the same, n if they share no word.

    >>> vendi_score(["the answer is 4"] * 3), vendi_score(["red", "green", "blue"])
    (1.0, 3.0)
    """
    _check(isinstance(texts, Sequence) and len(texts) > 0 and all(isinstance(t, str) for t in texts),
           "texts", texts, "the Vendi score is defined for a non-empty list of texts", "pass a list of strings")
    size = len(texts)
    eigenvalues = [max(0.0, x / size) for x in symmetric_eigenvalues(similarity_matrix(texts))]
    entropy = -sum(x * math.log(x) for x in eigenvalues if x > 1e-15)
    return round(min(float(size), max(1.0, math.exp(entropy))), 9)


# ======================================================================================================
# Batch runs: many prompts, concurrently, one output line per finished item, resumable
# ======================================================================================================
#
# The output is JSONL in a versioned format of its own (spec/batch.md): each line holds selfmoa's result
# for one item (id, status, answer or error, fingerprint, counts) and, under "input", the input record
# exactly as given, so no input field can pass for a result. One whole line is appended per finished item:
# a crash loses no finished item and leaves at most a torn last line. Before a file is changed at all,
# every line of it must read as such a record, and a torn tail as the start of one; anything else is
# someone else's file and stays byte for byte as it was. A re-run skips the items whose line says "ok" for
# the same fingerprint (the item's messages, the method and its parameters) and runs the others; at the end
# the file is rewritten (atomically) with exactly one line per item, in input order, and lines that would be
# dropped (items gone from the input, answers to an older prompt or configuration) move to a sibling file.
# A lock beside the output lets one run at a time write it.

METHODS: dict[str, Callable[..., Result]] = {"moa": moa, "self-moa": self_moa, "self-moa-seq": self_moa_seq}

BATCH_FORMAT = 1  # the version of the output lines; a line of any other version is not read as ours
_LINE_START = b'{"selfmoa_batch": 1, "id": '  # how every output line begins (json.dumps keeps key order)
_MAX_NESTING = 64  # input records nested deeper are refused up front: JSON bombs never reach the encoder
# Characters that str.splitlines() and some JSONL readers take for line ends, and lone surrogates that UTF-8
# cannot encode: written as \uXXXX escapes, so a line ends only at "\n" whatever a reader splits on.
_UNSAFE_IN_LINE = re.compile("[\u2028\u2029\x85\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise turn "\n" into "\r\n"


@dataclasses.dataclass
class Item:
    """One batch item: its id, the input record as given, and its chat messages."""

    id: Any
    record: dict
    messages: list[Message]


def _item_messages(record: Any) -> tuple[list[Message] | None, str | None]:
    """The messages of an input record, or why there are none."""
    if not isinstance(record, dict):
        return None, f"an item is a JSON object, not {type(record).__name__}"
    fields = [field for field in ("prompt", "instruction", "messages") if field in record]
    if len(fields) != 1:
        return None, ("no 'prompt', 'instruction' or 'messages' field" if not fields else
                      f"give only one of 'prompt', 'instruction' or 'messages', not {' and '.join(fields)}")
    value = record[fields[0]]
    if fields[0] == "messages":
        try:
            return as_messages(value if isinstance(value, list) else ""), None
        except ConfigError:
            return None, "'messages' must be a non-empty list of {\"role\": str, \"content\": str}"
    if not isinstance(value, str) or not value.strip():
        return None, f"'{fields[0]}' must be a non-empty string"
    return [{"role": "user", "content": value}], None


def _json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be written into an output line and read back equal, or None if it can.

    >>> _json_problem({"prompt": "hi", "tags": ["a", 1, 2.5, None, True]}) is None
    True
    >>> _json_problem({"prompt": "\\ud83d"})
    "['prompt'] holds text that UTF-8 cannot encode (a lone surrogate such as \\\\ud83d)"
    """
    stack = [(value, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > _MAX_NESTING:
            return f"{where} is nested deeper than {_MAX_NESTING} levels"
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return f"{where} holds text that UTF-8 cannot encode (a lone surrogate such as \\ud83d)"
        elif isinstance(value, dict):
            for key, inner in value.items():
                if not isinstance(key, str):
                    return f"{where} has a key that is not a string ({key!r})"
                stack.append((key, depth, f"{where} key"))
                stack.append((inner, depth + 1, f"{where}[{key!r}]"))
        elif isinstance(value, list):
            stack.extend((inner, depth + 1, f"{where}[{index}]") for index, inner in enumerate(value))
        elif isinstance(value, float):
            if not math.isfinite(value):
                return f"{where} holds {value}, which JSON cannot represent"
        elif value is not None and not isinstance(value, (bool, int)):
            return f"{where} holds a {type(value).__name__}, which is not a JSON value"
    return None


def _loads(text: str) -> Any:
    """``json.loads``, strict: NaN and Infinity are not JSON, and a nesting bomb is bad JSON, not a crash."""
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _check_records(numbered: Sequence[tuple[int, Any]], source: str, unit: str,
                   problems: list[tuple[int, str]]) -> list[Item]:
    """Items from (number, record) pairs; raise one ConfigError listing every bad one, with ``problems``."""
    items: list[Item] = []
    seen: dict[Any, int] = {}
    for position, (number, record) in enumerate(numbered):
        messages, problem = _item_messages(record)
        item_id = record.get("id", position) if isinstance(record, dict) else None
        if problem is None and (isinstance(item_id, bool) or not isinstance(item_id, (str, int))):
            problem = f"'id' must be a string or an integer, not {type(item_id).__name__}"
        elif problem is None and item_id in seen:
            problem = f"duplicate id {item_id!r} (first at {unit} {seen[item_id]})"
        if problem is None:
            problem = _json_problem(record)
            problem = f"the record {problem.lstrip()}" if problem else None
        if problem or messages is None:
            problems.append((number, problem or "no messages"))
            continue
        seen[item_id] = number
        items.append(Item(item_id, record, messages))
    if problems:
        listed = "\n".join(f"  {unit} {number}: {problem}" for number, problem in sorted(problems))
        raise ConfigError(f"{source}: {len(problems)} bad {unit}(s); fix them and run again:\n{listed}")
    if not items:
        raise ConfigError(f"{source}: there are no items; give one JSON object per line, or a JSON list")
    return items


def check_items(records: Sequence[Any], source: str = "input") -> list[Item]:
    """Check every record before any call is made; raise one ConfigError listing every bad one.

    A record is a JSON object with ``prompt``, ``instruction`` or ``messages`` and an optional ``id`` (a
    string or an integer; without one, an item's id is its position). It must hold JSON values only, nested
    at most 64 levels, with text that UTF-8 can encode, so that it is written out and read back unchanged.
    """
    return _check_records(list(enumerate(records, 1)), source, "item", [])


def read_items(path: str) -> list[Item]:
    """Read a batch input file: JSONL (one object per line) or one JSON list of objects.

    Each object carries ``prompt`` (a string), ``instruction`` (AlpacaEval's field) or ``messages`` (chat
    messages), and optionally an ``id``; without one, an item's id is its position. Lines end at ``"\\n"``
    only (a U+2028 inside a string is text, not a line break). Every bad line is reported at once, by number,
    before anything runs: bad JSON, nesting bombs, text that is not UTF-8 or cannot be encoded.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass an existing file") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # the byte-order mark some editors put before UTF-8
    if data.lstrip().startswith(b"["):
        # One JSON list, unless this is JSONL whose first line happens to be an array.
        try:
            whole = _loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            try:
                _loads(data.lstrip().split(b"\n", 1)[0].decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(f"{path}: not valid JSON ({exc}); fix the file, or write one object per "
                                  f"line") from None
        else:
            if isinstance(whole, list):
                return check_items(whole, path)
    numbered, problems = [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip(b" \t\r"):
            continue
        try:
            numbered.append((number, _loads(line.decode("utf-8"))))
        except UnicodeDecodeError:
            problems.append((number, "not UTF-8 text; save the file as UTF-8"))
        except ValueError as exc:
            problems.append((number, f"not JSON ({exc})"))
    return _check_records(numbered, path, "line", problems)


def _record_problem(record: Any) -> str | None:
    """Why a parsed output line is not a selfmoa batch record, or None if it is one."""
    if not isinstance(record, dict) or "selfmoa_batch" not in record:
        if isinstance(record, dict) and "id" in record and "method" in record and ("answer" in record or "error"
                                                                                   in record):
            return ("it has no 'selfmoa_batch' field: selfmoa 0.1 wrote it, mixing input fields and results, "
                    "which cannot be told apart safely; move it away, and rerun to answer every item again")
        return "it has no 'selfmoa_batch' field"
    if record["selfmoa_batch"] != BATCH_FORMAT:
        return f"it is in batch format {record['selfmoa_batch']!r}; this selfmoa reads format {BATCH_FORMAT}"
    item_id, status = record.get("id"), record.get("status")
    wrong = [name for name, ok in (
        ("id", isinstance(item_id, (str, int)) and not isinstance(item_id, bool)),
        ("status", status in ("ok", "error")),
        ("answer" if status == "ok" else "error", isinstance(record.get("answer" if status == "ok" else "error"),
                                                             str)),
        ("method", isinstance(record.get("method"), str)),
        ("fingerprint", isinstance(record.get("fingerprint"), str)),
        ("input", isinstance(record.get("input"), dict))) if not ok]
    return f"its {', '.join(repr(name) for name in wrong)} missing or wrong" if wrong else None


def _is_torn_start(tail: bytes, after_records: bool) -> bool:
    """Whether bytes after the last newline are the unfinished start of a record line (a crash mid-write)."""
    if tail.startswith(_LINE_START):
        return True
    return _LINE_START.startswith(tail) and (after_records or len(tail) >= len(b'{"selfmoa_batch"'))


def _parse_output(data: bytes, path: str) -> tuple[list[tuple[dict, bytes]], int]:
    """Every record of an output file with its line, and how many bytes the whole lines take.

    Raises ConfigError, having changed nothing, unless every line is a record and a torn tail (bytes after
    the last newline) is the start of one. Lines end at b"\\n" only. A whole record after the last newline
    counts as a line (``keep`` is then the whole length, with no final newline: add one before appending).
    """
    keep = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:keep].split(b"\n")[:-1], 1):
        try:
            record = _loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            problem: str | None = "it is not UTF-8 JSON"
        else:
            problem = _record_problem(record)
        if problem:
            raise ConfigError(f"{path}: line {number} is not a selfmoa batch record ({problem}), so this is not a "
                              f"selfmoa output file; it was left untouched: pass another output file, or move "
                              f"this one away")
        records.append((record, line))
    try:
        last = _loads(data[keep:].decode("utf-8")) if keep < len(data) else None
    except (UnicodeDecodeError, ValueError):
        last = None
    if last is not None and _record_problem(last) is None:  # a whole record whose "\n" an editor dropped: kept
        records.append((last, data[keep:]))
        keep = len(data)
    if keep < len(data) and not _is_torn_start(data[keep:], bool(records)):
        raise ConfigError(f"{path}: its last line (with no newline at its end) is not the start of a selfmoa batch "
                          f"record, so this is not a selfmoa output file; it was left untouched: pass another "
                          f"output file, or move this one away")
    return records, keep


def _escape_unsafe(text: str) -> str:
    r"""JSON text with U+2028, U+2029, U+0085 and lone surrogates written as \u escapes (same value).

    >>> _escape_unsafe(json.dumps(["a\u2028b", "\ud83d"], ensure_ascii=False))
    '["a\\u2028b", "\\ud83d"]'
    """
    return _UNSAFE_IN_LINE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def _dump_line(record: dict) -> bytes:
    return _escape_unsafe(json.dumps(record, ensure_ascii=False)).encode("utf-8") + b"\n"


def _batch_parameters(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's parameters as run, defaults filled in (so an explicit default changes no fingerprint).

    ``use_n`` is left out: it says how samples are requested, not what is asked.
    """
    import inspect

    signature = inspect.signature(METHODS[method])
    parameters = {name: parameter.default for name, parameter in signature.parameters.items()
                  if parameter.kind == parameter.KEYWORD_ONLY and parameter.default is not parameter.empty}
    for name, value in options.items():
        if name not in signature.parameters or name in ("complete", "stream"):
            known = ", ".join(p for p in signature.parameters if p not in ("prompt", "complete", "stream", "samples"))
            raise ConfigError(f"{name}={value!r}: {method} takes no such parameter in a batch; pass only {known}")
    parameters.update(options)
    for name in ("complete", "stream", "use_n", "concurrency"):
        parameters.pop(name, None)
    for name, value in parameters.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise ConfigError(f"{name}={value!r}: run_batch records the method's parameters in every output "
                              f"line's fingerprint, so they must be JSON values; pass strings, numbers and "
                              f"lists") from None
    return parameters


def _fingerprint(messages: list[Message], method: str, parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what produces an item's answer: its messages, the method, parameters.

    >>> _fingerprint([{"role": "user", "content": "hi"}], "self-moa", {"n": 6})[:16]
    'f1247f2503992f70'
    """
    canonical = json.dumps({"messages": messages, "method": method, "parameters": parameters},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _sibling(path: str, word: str) -> str:
    """A file beside ``path`` named after it: ``_sibling("out.jsonl", "removed")`` is ``out.removed.jsonl``."""
    root, extension = os.path.splitext(path)
    return f"{root}.{word}{extension}"


def _removed_path(output: str) -> str:
    """Where a batch moves the lines it takes out of ``output`` (items gone from the input, replaced answers).

    >>> _removed_path("answers.jsonl")
    'answers.removed.jsonl'
    """
    return _sibling(output, "removed")


def _read_descriptor(descriptor: int) -> bytes:
    os.lseek(descriptor, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(descriptor, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_file(path: str) -> bytes:
    """The bytes of the regular file ``path``; ConfigError for anything else (reading a named pipe would wait
    for a writer forever, so it is opened without blocking and refused)."""
    import stat

    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _O_BINARY)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ConfigError(f"{path}: not a regular file; pass another output file, or move it away")
        return _read_descriptor(descriptor)
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    """Write all of ``data``. ``os.write`` may write less than asked (a short write): the rest follows, until
    the disk takes nothing more (an OSError then says why, as ENOSPC, EFBIG or EIO do)."""
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        if written <= 0:
            import errno

            raise OSError(errno.EIO, "the disk took no more bytes (a short write)")
        view = view[written:]


def _through_links(path: str) -> str:
    """The file a symbolic link ``path`` points at (``path`` itself if it is none): that file is locked and
    replaced, so a link keeps pointing at the answers, and a run on either name finds the other's lock."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``: a crash leaves the old file or the new one, never a mix."""
    path = _through_links(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY, 0o644)
    try:
        try:
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)  # keep the permissions of the file replaced
        except OSError:
            pass
        _write_all(descriptor, data)
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    os.close(descriptor)
    os.replace(temporary, path)
    if os.name == "posix":  # the new name itself survives a power cut only once its folder is synced
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _move_lines(path: str, lines: Sequence[bytes]) -> None:
    """Append to ``path`` (a selfmoa file) the lines it does not hold yet, and sync it to disk."""
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_BINARY, 0o644)
    try:
        data = _read_descriptor(descriptor)
        _, keep = _parse_output(data, path)
        if keep < len(data):
            os.ftruncate(descriptor, keep)
        present = set(data[:keep].split(b"\n"))
        new = [line for line in dict.fromkeys(lines) if line not in present]
        ending = b"\n" if new and data[:keep] and not data[:keep].endswith(b"\n") else b""
        _write_all(descriptor, ending + b"".join(line + b"\n" for line in new))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- One writer at a time -----------------------------------------------------------------------------

_HELD_OUTPUTS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("selfmoa_held_outputs",
                                                                          default=frozenset())


def _fcntl() -> Any:
    """The fcntl module where the system has one (POSIX), else None."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    return fcntl


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (the lock-file fallback's stale-lock test)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes

        kernel = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(output: str, lock_path: str, holder: str) -> ConfigError:
    return ConfigError(f"{output} is being written by another selfmoa run ({holder or 'pid unknown'}), which "
                       f"holds {lock_path}; wait for it to end, or pass another output file. Two runs on one file "
                       f"would lose each other's answers")


def _cannot_write(output: str, exc: OSError) -> ConfigError:
    return ConfigError(f"{output}: cannot write the output file ({exc.strerror or exc}); pass a path in an "
                       f"existing, writable folder")


def _lock(output: str) -> Callable[[], None]:
    """Take ``output``'s lock (``output + ".lock"``) or raise ConfigError at once; returns the release.

    With fcntl, an flock on the lock file: the system drops it when its holder dies, even by kill -9.
    Elsewhere the lock file is created exclusively and holds the owner's pid; a file whose pid is no
    longer running is a stale lock, and is taken over.
    """
    lock_path = _through_links(output) + ".lock"
    fcntl = _fcntl()
    for _ in range(10):  # bounded: only a holder removing the file between our open and flock repeats this
        if fcntl is None:
            try:
                descriptor = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
            except FileExistsError:
                try:
                    with open(lock_path, encoding="ascii", errors="replace") as file:
                        pid_text = file.read().strip()
                except OSError:
                    continue
                is_pid = re.fullmatch(r"[0-9]{1,10}", pid_text) is not None  # not "²", not 5000 digits
                if not is_pid or _pid_alive(int(pid_text)):
                    raise _busy(output, lock_path, f"pid {pid_text}; if no such run exists, delete the lock file"
                                if is_pid else "") from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)  # its owner died without removing it: a stale lock
                continue
            except OSError as exc:
                raise _cannot_write(output, exc) from None
            with contextlib.suppress(OSError):  # without it, others see "pid unknown" and wait
                _write_all(descriptor, f"{os.getpid()}\n".encode())
            os.close(descriptor)

            def release_file() -> None:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            return release_file
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
        except OSError as exc:
            raise _cannot_write(output, exc) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_descriptor(descriptor).decode("ascii", "replace").strip()
            os.close(descriptor)
            raise _busy(output, lock_path, f"pid {holder}" if holder.isdigit() else "") from None
        except OSError as exc:
            os.close(descriptor)
            raise ConfigError(f"{lock_path}: cannot lock it ({exc.strerror or exc}), so two runs could write "
                              f"{output} at once; pass an output file on a local disk") from None
        try:
            current = os.path.samestat(os.fstat(descriptor), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if not current:  # the previous holder removed it as we opened it: lock the file now at that path
            os.close(descriptor)
            continue
        if os.fstat(descriptor).st_size > 32 or not re.fullmatch(rb"\d*\n?", _read_descriptor(descriptor)):
            os.close(descriptor)  # someone's own file of that name: neither emptied nor removed
            raise ConfigError(f"{lock_path} exists and is not a selfmoa lock file, so it was left untouched; move it "
                              f"away, or pass another output file")
        with contextlib.suppress(OSError):  # the pid only informs whoever finds the lock taken
            os.ftruncate(descriptor, 0)
            os.lseek(descriptor, 0, os.SEEK_SET)  # the check above read to the end
            _write_all(descriptor, f"{os.getpid()}\n".encode())

        def release_flock(held: int = descriptor) -> None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # removed while still held, so no one can lock a file about to vanish
            os.close(held)
        return release_flock
    raise _busy(output, lock_path, "")


@contextlib.contextmanager
def _output_lock(output: str) -> Iterator[None]:
    """Hold ``output``'s lock for the block (re-entrant within one thread of this process)."""
    key = os.path.realpath(output)
    if key in _HELD_OUTPUTS.get():
        yield
        return
    release = _lock(output)
    token = _HELD_OUTPUTS.set(_HELD_OUTPUTS.get() | {key})
    try:
        yield
    finally:
        _HELD_OUTPUTS.reset(token)
        release()


# --- The run --------------------------------------------------------------------------------------------


def _id_key(item_id: Any) -> tuple:
    return (type(item_id).__name__, item_id)


def run_batch(items: Sequence[Item], output: str, *, method: str = "self-moa",
              complete: Callable[[Request], Any], concurrency: int = 8, trace: bool = False,
              progress: Callable[[int, int, int, float], None] | None = None, diversity: bool = False,
              **options: Any) -> dict[str, int]:
    """Run ``method`` on every item, ``concurrency`` calls at a time, appending one JSONL line per item.

    ``options`` go to the method (``model``, ``n``, ``proposers``...). Each line is a record of format
    ``BATCH_FORMAT`` (spec/batch.md): ``selfmoa_batch``, ``id``, ``status`` (``"ok"`` with ``answer``, or
    ``"error"`` with ``error``), ``method``, ``fingerprint``, ``usage``, ``calls``, ``requests``, ``retries``,
    ``trace`` and ``diversity`` (the Vendi score of each proposer layer) when asked, and ``input``: the input
    record, unchanged. A re-run on the same ``output`` skips the items whose line is ``"ok"`` with the same
    fingerprint and runs the rest; at the end ``output`` holds one line per item, in input order, and lines
    taken out of it are appended to the sibling file named ``.removed`` (``out.jsonl``: ``out.removed.jsonl``).

    Raises ConfigError, before any call and with every file left as it was, when ``output`` is not a selfmoa
    output file or another run holds its lock; SelfMoAError when a write fails (the lines finished before
    are kept; the next run does the rest). Returns the counts ``total``, ``skipped`` (answered before),
    ``done``, ``failed``, ``changed_prompt`` and ``changed_parameters`` (run again because their line's
    fingerprint no longer matched), ``moved`` (lines moved out) and ``torn_bytes`` (a torn tail cut off).
    """
    _check(method in METHODS, "method", method, "unknown method", f"pass one of {', '.join(METHODS)}")
    items = list(items)
    _check(all(isinstance(item, Item) for item in items), "items", "...", "run_batch takes Item objects",
           "pass check_items(records) or read_items(path)")
    _check(len({_id_key(item.id) for item in items}) == len(items), "items", "...", "two items share an id",
           "give every item its own id (check_items finds the duplicates)")
    parameters = _batch_parameters(method, options)
    prints = {_id_key(item.id): _fingerprint(item.messages, method, parameters) for item in items}
    pool, _, _, _ = _start(complete, concurrency)
    try:
        with _output_lock(output):
            job = _BatchJob(method=method, complete=complete, concurrency=concurrency, trace=trace,
                            diversity=diversity, progress=progress, options=options, prints=prints, pool=pool)
            return _run_locked(items, output, job)
    except OSError as exc:  # reading the output, or cutting a torn line off it (writes report themselves)
        raise SelfMoAError(f"{output}: {exc.strerror or exc}; every finished line is kept in it; fix that, then "
                           f"run the same command again") from exc
    finally:
        pool.shutdown()


def _open_output(output: str) -> tuple[int, bool]:
    """A descriptor of ``output`` for reading and appending, and whether this call created the file."""
    import stat

    path = _through_links(output)  # a link to a file not written yet: create that file
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | _O_BINARY)
        created = False
    except FileNotFoundError:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
        except OSError as exc:
            raise _cannot_write(output, exc) from None
        created = True
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ConfigError(f"{output}: not a regular file; pass the path of a file to write")
    return descriptor, created


@dataclasses.dataclass(frozen=True)
class _BatchJob:
    """What every item of one batch run shares: the method and its options, how calls run, what a line holds."""

    method: str
    complete: Callable[[Request], Any]
    concurrency: int
    trace: bool
    diversity: bool
    progress: Callable[[int, int, int, float], None] | None
    options: dict[str, Any]
    prints: dict[tuple, str]  # each item's fingerprint, by id key
    pool: _Pool


def _run_locked(items: list[Item], output: str, job: _BatchJob) -> dict[str, int]:
    """run_batch, holding the output's lock."""
    descriptor, created = _open_output(output)
    try:
        data = _read_descriptor(descriptor)
        try:
            existing, keep = _parse_output(data, output)
            moved_to = _removed_path(output)
            if os.path.exists(moved_to):
                _parse_output(_read_file(moved_to), moved_to)  # lines are moved there later: refuse it now if foreign
        except (ConfigError, OSError) as exc:
            if created:  # leave no trace of a run that never started
                os.close(descriptor)
                descriptor = -1
                with contextlib.suppress(OSError):
                    os.unlink(_through_links(output))
            if isinstance(exc, OSError):
                raise _cannot_write(_removed_path(output), exc) from None
            raise
        # Decide per item, on the explicit status and the fingerprint, never on which keys a line holds.
        history: dict[tuple, list[dict]] = {}
        for record, _ in existing:
            history.setdefault(_id_key(record["id"]), []).append(record)
        counts = {"total": len(items), "skipped": 0, "done": 0, "failed": 0, "changed_prompt": 0,
                  "changed_parameters": 0, "moved": 0, "torn_bytes": len(data) - keep}
        todo = []
        for position, item in enumerate(items):
            lines = history.get(_id_key(item.id), [])
            current = [record for record in lines if record["fingerprint"] == job.prints[_id_key(item.id)]]
            if any(record["status"] == "ok" for record in current):
                counts["skipped"] += 1
                continue
            if lines and not current:
                messages, _ = _item_messages(lines[-1]["input"])
                counts["changed_parameters" if messages == item.messages else "changed_prompt"] += 1
            todo.append((position, item))
        if keep < len(data):
            os.ftruncate(descriptor, keep)  # a torn line left by a crash: its item runs again
        elif data and not data.endswith(b"\n"):
            _write_all(descriptor, b"\n")  # a whole last record without its newline: end it before appending
            keep += 1
        try:
            _append_results(todo, descriptor=descriptor, size=keep, output=output, job=job, counts=counts)
        except ConfigError:  # a bad option, found by the method before any call: leave no empty file behind
            if created and os.fstat(descriptor).st_size == 0:
                with contextlib.suppress(OSError):
                    os.unlink(_through_links(output))
            raise
        final, to_move, unchanged = _final_lines(items, descriptor, output, job.prints)
        os.close(descriptor)  # before the rename, which Windows refuses over an open file
        descriptor = -1
        try:
            if to_move:
                _move_lines(_removed_path(output), to_move)  # first, and synced: nothing is gone before it is kept
            if not unchanged:
                _write_atomically(output, final)
        except OSError as exc:
            raise SelfMoAError(f"{output}: cannot rewrite it ({exc.strerror or exc}); every finished line is kept "
                               f"in it; fix that, then run the same command again") from exc
        counts["moved"] = len(to_move)
        return counts
    finally:
        if descriptor >= 0:
            os.close(descriptor)


def _append_results(todo: list[tuple[int, Item]], *, descriptor: int, size: int, output: str, job: _BatchJob,
                    counts: dict[str, int]) -> None:
    """Run the items to do, appending each one's line as it finishes. A failed write stops the run."""
    lock = threading.Lock()
    started = time.monotonic()
    state: dict[str, Any] = {"size": size, "broken": None, "closed": False}

    def solve(position: int, item: Item) -> None:
        record: dict[str, Any] = {"selfmoa_batch": BATCH_FORMAT, "id": item.id}
        try:
            with _on_shared_pool(job.pool, (position,)):
                result = METHODS[job.method](item.messages, complete=job.complete, **job.options)
        except ConfigError:
            raise  # a bad option fails every item alike: the run stops, as for a bug
        except SelfMoAError as exc:
            record.update(status="error", error=str(exc))
            done_so_far = exc.partial
        else:
            record.update(status="ok", answer=result.answer)
            done_so_far = result
        record.update(method=job.method, fingerprint=job.prints[_id_key(item.id)])
        if done_so_far is not None:
            summary = done_so_far.to_dict(trace=job.trace, diversity=job.diversity)
            record.update({key: summary[key] for key in ("usage", "calls", "requests", "retries", "diversity")
                           if key in summary})
            if job.trace:
                record["trace"] = summary["trace"]
        record["input"] = item.record
        line = _dump_line(record)
        with lock:
            if state["broken"] is not None or state["closed"]:
                return  # after a failed write nothing more is written: no line may follow a torn one
            try:
                _write_all(descriptor, line)  # one whole line per item, appended
            except OSError as exc:
                state["broken"] = exc
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, state["size"])  # take back a partly written line, if we can
                return
            state["size"] += len(line)
            counts["done" if record["status"] == "ok" else "failed"] += 1
            if job.progress is not None:
                job.progress(counts["done"] + counts["failed"], counts["failed"], len(todo),
                             time.monotonic() - started)

    # Item orchestrators only wait on calls; the pool bounds the calls. Twice as many orchestrators as
    # call slots keep the pool fed while items start and finish; at most 4 x concurrency items are queued
    # ahead, so memory stays flat on huge inputs.
    runners = concurrent.futures.ThreadPoolExecutor(max_workers=2 * job.concurrency, thread_name_prefix="item")
    ahead = threading.Semaphore(4 * job.concurrency)
    bugs: list[BaseException] = []

    def finished(future: concurrent.futures.Future) -> None:
        ahead.release()
        bug = None if future.cancelled() else future.exception()
        if bug is not None:
            bugs.append(bug)  # not a model failure (those are recorded): a bug, re-raised

    try:
        for position, item in todo:
            ahead.acquire()
            if bugs or state["broken"] is not None:
                break
            runners.submit(solve, position, item).add_done_callback(finished)
        runners.shutdown(wait=True, cancel_futures=bool(bugs or state["broken"]))
        if bugs:
            raise bugs[0]
    finally:
        runners.shutdown(wait=False, cancel_futures=True)
        with lock:
            state["closed"] = True  # an item still running after an interrupt never writes
    broken = state["broken"]
    if broken is not None:
        kept = counts["skipped"] + counts["done"] + counts["failed"]
        raise SelfMoAError(f"{output}: cannot write ({broken.strerror or broken}); stopped with {kept} of "
                           f"{counts['total']} items in the file, every finished line kept; fix that, then run "
                           f"the same command again to do the rest") from broken


def _final_lines(items: list[Item], descriptor: int, output: str,
                 prints: dict[tuple, str]) -> tuple[bytes, list[bytes], bool]:
    """The rewritten output (one line per item, in input order), the lines to move out of it, and whether
    the file already holds exactly that.

    First proves that ``output`` still names the file this run appended to (``descriptor``).
    """
    data = _read_descriptor(descriptor)  # what this run appended to, even if the name now points elsewhere
    records, keep = _parse_output(data, output)
    try:
        ours = os.path.samestat(os.fstat(descriptor), os.stat(output))
    except OSError:
        ours = False
    if not ours:
        rescue = _sibling(output, f"recovered-{os.getpid()}")
        _write_atomically(rescue, data[:keep])
        raise SelfMoAError(f"{output} was moved or replaced by another program while this run wrote to it, so it "
                           f"was not rewritten; this run's lines are saved in {rescue}")
    chosen: dict[tuple, dict] = {}
    to_move = []
    for record, line in records:
        key = _id_key(record["id"])
        if key not in prints:
            to_move.append(line)  # an item no longer in the input
        elif record["fingerprint"] != prints[key]:
            if record["status"] == "ok":
                to_move.append(line)  # an answer to an older prompt or configuration
        elif record["status"] == "ok" or chosen.get(key, {}).get("status") != "ok":
            chosen[key] = record  # the last "ok" line wins; else the last "error" line
    assert len(chosen) == len(items), "every item has a line once every item has run"
    final = []
    for item in items:
        record = chosen[_id_key(item.id)]
        record["input"] = item.record  # the same messages; the other input fields as given now
        final.append(_dump_line(record))
    return b"".join(final), to_move, b"".join(final) == data


# --- AlpacaEval -----------------------------------------------------------------------------------------


def _instruction(record: dict) -> str:
    """The instruction of an input record, as AlpacaEval shows it: its text, or its last user message."""
    if "instruction" in record or "prompt" in record:
        return str(record.get("instruction", record.get("prompt")))
    users = [message["content"] for message in record.get("messages", []) if message.get("role") == "user"]
    return users[-1] if users else ""


def alpaca_eval_outputs(records: Iterable[dict], generator: str) -> list[dict]:
    """AlpacaEval's model-outputs records (``instruction``, ``output``, ``generator``) of the answered items
    among output lines (``dataset`` is copied from the input when it has one)."""
    out = []
    for record in records:
        if record.get("status") != "ok":
            continue
        given = record["input"]
        entry = {"instruction": _instruction(given), "output": record["answer"], "generator": generator}
        if "dataset" in given:
            entry["dataset"] = given["dataset"]
        out.append(entry)
    return out


def _generator_name(method: str, options: Mapping[str, Any]) -> str:
    """The AlpacaEval generator name of a configuration: method, models, n, window and carry, so that two
    configurations never share a leaderboard row (characters other than letters, digits, ``.+-`` become ``_``).

    >>> _generator_name("self-moa-seq", {"model": "Qwen/Qwen2-7B", "n": 30, "window": 6, "carry": 3})
    'selfmoa-self-moa-seq-Qwen_Qwen2-7B-n30-w6-r3'
    >>> _generator_name("moa", {"proposers": ["a", "b"], "aggregator": "z", "layers": 3})
    'selfmoa-moa-a+b-agg-z-L3'
    """
    def name(model: Any) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]", "_", str(model))

    layers = options.get("layers", 2)
    if method == "moa":
        proposers = list(options.get("proposers") or [])
        nested = bool(proposers) and not isinstance(proposers[0], str)
        layered = proposers if nested else [proposers]
        shown = "__".join("+".join(map(name, layer)) for layer in layered)
        parts = ["moa", shown, f"agg-{name(options.get('aggregator'))}"]
        if layers != 2 and not nested:
            parts.append(f"L{layers}")
        return "selfmoa-" + "-".join(parts)
    model = options.get("model")
    parts = [method, name(model), f"n{options.get('n', 6)}"]
    if method == "self-moa-seq":
        parts += [f"w{options.get('window', 6)}", f"r{options.get('carry', 3)}"]
    if options.get("aggregator") not in (None, model):
        parts.append(f"agg-{name(options['aggregator'])}")
    if method == "self-moa" and layers != 2:
        parts.append(f"L{layers}")
    return "selfmoa-" + "-".join(parts)


def _check_alpaca_target(path: str, records_path: str, items: Sequence[Item]) -> None:
    """Refuse (ConfigError) to replace ``path`` unless it is absent, empty, or a selfmoa AlpacaEval output of
    this input: every entry's instruction is one of these items', and its output is an answer recorded in the
    selfmoa records beside it (``records_path`` or the lines moved out of it)."""
    try:
        data = _read_file(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass another --output") from None
    if not data.strip():
        return
    try:
        entries = _loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        entries = None
    answered: set[tuple[str, Any]] = set()
    for source in (records_path, _removed_path(records_path)):
        try:
            records, _ = _parse_output(_read_file(source), source)
        except (OSError, ConfigError):
            continue
        answered.update((_instruction(record["input"]), record["answer"]) for record, _ in records
                        if record["status"] == "ok")
    instructions = {_instruction(item.record) for item in items}
    ours = isinstance(entries, list) and all(
        isinstance(entry, dict) and {"instruction", "output", "generator"} <= entry.keys()
        <= {"instruction", "output", "generator", "dataset"}
        and isinstance(entry["instruction"], str) and isinstance(entry["output"], str)
        and entry["instruction"] in instructions and (entry["instruction"], entry["output"]) in answered
        for entry in entries)
    if not ours:
        raise ConfigError(f"{path} is not a selfmoa AlpacaEval output of this input (each of its outputs must be "
                          f"an answer recorded in {records_path}, to an instruction of this input), so it was "
                          f"left untouched; pass another --output, or move this file away")


# ======================================================================================================
# Serving: the methods as models behind an OpenAI-compatible endpoint
# ======================================================================================================
#
# `selfmoa serve` answers POST /v1/chat/completions like any OpenAI-compatible server, so every client of
# one (the SDKs, AlpacaEval, lm-evaluation-harness, chat front-ends) uses a method by changing a model name:
# "self-moa/M", "self-moa-seq/M" and "moa/A" run a method on upstream models (M may itself contain "/");
# any other name is passed through to its upstream unchanged. All runs share one bounded call pool.
#
# A method hands its `stream` callback to its final aggregation, and to no other call. Serve always passes
# one, and so recognises the call that writes the answer: the request's `stop` goes to that call only, and
# it is streamed upstream only when the client asked for a stream. A run whose client went away is cancelled
# at the seam: every call it still has queued fails at once, without reaching the upstream.

SERVE_METHODS = {"self-moa/": "self-moa", "self-moa-seq/": "self-moa-seq", "moa/": "moa"}  # model prefix -> method
SERVE_MAX_BODY = 16 * 1024 * 1024  # bytes of a request body at most (413 beyond)
SERVE_MAX_UPSTREAM = 64 * 1024 * 1024  # bytes of a passed-through reply at most (502 beyond)
SERVE_MAX_UPSTREAM_LINE = 1024 * 1024  # a longer streamed line is relayed (redacted) in pieces
SERVE_MAX_CALLS = 256  # samples (or proposers of a layer), and layers x proposers, one request may ask for
SERVE_DEFAULTS: dict[str, Any] = {
    "n": 6, "window": 6, "carry": 3, "proposers": None, "layers": 2, "min_ok": 1, "temperature": 0.7,
    "max_tokens": None, "aggregator_temperature": 0.7, "aggregator_max_tokens": None, "seed": None,
    "instruction": DEFAULT_INSTRUCTION, "use_n": True}
# What a request may set in its "selfmoa" object, per method (the other defaults come from the request itself).
SERVE_OPTIONS = {
    "self-moa": ("n", "aggregator", "layers", "min_ok", "temperature", "max_tokens", "use_n", "instruction"),
    "self-moa-seq": ("n", "window", "carry", "aggregator", "min_ok", "temperature", "max_tokens", "use_n",
                     "instruction"),
    "moa": ("proposers", "layers", "min_ok", "temperature", "max_tokens", "use_n", "instruction"),
}
_CHAT_ROLES = ("system", "developer", "user", "assistant")


class _ServeError(Exception):
    """Internal: an OpenAI-shaped error reply (status, message, type, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", report: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.report = report

    def body(self) -> dict:
        data: dict[str, Any] = {"error": {"message": self.message, "type": self.kind, "param": self.param,
                                          "code": self.code}}
        if self.report is not None:
            data["selfmoa"] = self.report
        return data


def _is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``.

    >>> _is_loopback("127.0.0.1"), _is_loopback("localhost"), _is_loopback("0.0.0.0"), _is_loopback("::1")
    (True, True, False, True)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _chat_messages(value: Any) -> list[Message]:
    """A request's ``messages``, checked: the whole conversation is the prompt. Text parts are joined."""
    if not isinstance(value, list) or not value:
        raise _ServeError(400, "'messages' must be a non-empty list of chat messages", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _CHAT_ROLES:
            raise _ServeError(400, f"messages[{i}] needs a role ({', '.join(_CHAT_ROLES)})", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                             and isinstance(part.get("text"), str) for part in content):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise _ServeError(400, f"messages[{i}].content must be a string (or a list of text parts)",
                              f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": content})
    return messages


def _chat_request(body: dict, method: str) -> dict[str, Any]:
    """The fields of a method request, checked; every refusal names the field (OpenAI's ``param``)."""
    def refuse(field: str, why: str) -> _ServeError:
        return _ServeError(400, f"'{field}' {why}", field)

    def number(field: str, low: float, high: float, integer: bool = False) -> Any:
        value = body.get(field)
        if value is None:
            return None
        kinds = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            raise refuse(field, f"must be {'an integer' if integer else 'a number'} between {low} and {high:g}")
        return value

    out: dict[str, Any] = {"messages": _chat_messages(body.get("messages"))}
    n = body.get("n")
    if n is not None and (not _is_int(n) or n < 1):
        raise refuse("n", "must be an integer >= 1")
    if n is not None and n > 1:
        raise refuse("n", "above 1 is not supported: a method gives one answer; send n=1 or leave it out")
    for field in ("tools", "functions"):
        if body.get(field):
            raise refuse(field, "is not supported: the methods do not call tools; leave it out")
    for field in ("tool_choice", "function_call"):
        if body.get(field) not in (None, "none"):
            raise refuse(field, "is not supported: the methods do not call tools; leave it out")
    response_format = body.get("response_format")
    if response_format is not None and not (isinstance(response_format, dict)
                                            and response_format.get("type") == "text"):
        raise refuse("response_format", 'is not supported except {"type": "text"}; leave it out')
    if body.get("logprobs") not in (None, False):
        raise refuse("logprobs", "is not supported: an aggregated answer has no log-probabilities")
    if body.get("top_logprobs") not in (None, 0):
        raise refuse("top_logprobs", "is not supported: an aggregated answer has no log-probabilities")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise refuse("stream", "must be true or false")
    out["stream"] = bool(stream)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False),
                                                                              bool)):
        raise refuse("stream_options", 'must be an object like {"include_usage": true}')
    out["include_usage"] = bool(options and options.get("include_usage"))
    out["temperature"] = number("temperature", 0, 2)
    limits = [number(field, 1, 2 ** 31, integer=True) for field in ("max_completion_tokens", "max_tokens")]
    out["max_tokens"] = limits[0] if limits[0] is not None else limits[1]
    out["seed"] = number("seed", -2 ** 63, 2 ** 63 - 1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4
                                 and all(isinstance(s, str) and s for s in stop)):
        raise refuse("stop", "must be a string or a list of up to 4 non-empty strings")
    out["stop"] = tuple(stop) if stop else None
    extra = body.get("selfmoa")
    if extra is not None and not isinstance(extra, dict):
        raise refuse("selfmoa", 'must be an object of method options, e.g. {"n": 6}')
    for key in extra or {}:
        if key not in SERVE_OPTIONS[method]:
            raise _ServeError(400, f"'selfmoa.{key}' is not an option of {method}; its options are "
                              f"{', '.join(SERVE_OPTIONS[method])}", f"selfmoa.{key}")
    if extra and "use_n" in extra and not isinstance(extra["use_n"], bool):
        raise _ServeError(400, "'selfmoa.use_n' must be true or false", "selfmoa.use_n")
    out["selfmoa"] = dict(extra or {})
    return out


# A library check names a keyword argument; a client knows the request field it sent.
_SERVE_PARAMS = {"aggregator_temperature": "temperature", "aggregator_max_tokens": "max_tokens", "seed": "seed",
                 "model": "model", "prompt": "messages", "proposer": "selfmoa.proposers"}


def _param_of(exc: ConfigError) -> tuple[str, str]:
    """The request field a library ConfigError is about, and its message in the request's words.

    >>> _param_of(ConfigError("window=1: too small; pass window >= 2"))
    ('selfmoa.window', 'selfmoa.window=1: too small; pass window >= 2')
    """
    message = str(exc)
    name = re.split(r"[=\[ ]", message, maxsplit=1)[0]
    param = _SERVE_PARAMS.get(name, f"selfmoa.{name}")
    return param, param + message[len(name):]


def _redact_bytes(data: bytes, secrets: Iterable[str]) -> bytes:
    """Bytes relayed from an upstream with its key blanked out in every form ``_redact`` knows; bytes that
    are not UTF-8 pass through unchanged (surrogate escapes).

    >>> _redact_bytes(b'{"error": "bad key sk-abcdef123456"}', ["sk-abcdef123456"])
    b'{"error": "bad key ***"}'
    """
    secrets = [secret for secret in secrets if secret]
    if not secrets:
        return data
    return _redact_all(data.decode("utf-8", "surrogateescape"), secrets).encode("utf-8", "surrogateescape")


def _redact_all(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        text = _redact(text, secret)
    return text


def _run_report(result: Result, secrets: Iterable[str | None] = ()) -> dict[str, Any]:
    """The ``selfmoa`` field of a reply: calls, requests, retries and each request's latency. No keys."""
    secrets = list(secrets)
    return {"method": result.method, "calls": result.calls, "requests": result.requests,
            "retries": sum(call.retries for call in result.trace), "unreported_usage": result.usage["unreported"],
            "trace": [{"role": call.role, "model": call.model, "layer": call.layer, "round": call.round,
                       "n": call.n, "latency": call.latency, "retries": call.retries,
                       "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                       "error": call.error and _redact_all(call.error, secrets)} for call in result.trace]}


def _client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its connection (checked without reading anything it sent)."""
    try:
        if hasattr(select, "poll"):  # select() refuses descriptors above 1023, which a busy server has
            poller = select.poll()
            poller.register(connection, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([connection], [], [], 0)[0])
        return readable and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class ModelServer:
    """MoA, Self-MoA and Self-MoA-Seq as models behind an OpenAI-compatible HTTP endpoint.

    ``complete`` is the completion function every upstream call goes through (an ``HTTPClient``; another
    function works too, without pass-through). ``defaults`` holds the method defaults (the keys of
    ``SERVE_DEFAULTS``) that a request's ``selfmoa`` object and its own temperature, max_tokens, seed and
    stop override. ``server_key`` makes every route but ``/health`` require ``Authorization: Bearer KEY``;
    a host other than loopback needs one. ``models`` adds names to ``GET /v1/models``. A context manager::

        with ModelServer(HTTPClient("http://localhost:8000/v1"), port=0) as server:
            print(server.base_url)      # http://127.0.0.1:PORT/v1, serving until the block ends
    """

    def __init__(self, complete: Callable[[Request], Any], *, host: str = "127.0.0.1", port: int = 8000,
                 defaults: Mapping[str, Any] | None = None, server_key: str | None = None, concurrency: int = 8,
                 models: Sequence[str] = (), max_body: int = SERVE_MAX_BODY, drain_timeout: float = 30.0):
        _check(callable(complete), "complete", complete, "every upstream call goes through it",
               'pass complete=HTTPClient("http://host:port/v1")')
        problem = _key_problem(server_key) or ("a server key is a non-empty string" if server_key == "" else None)
        _check(problem is None, "server_key", "***", problem or "",  # clients send it as a Bearer token
               "pass the key clients will send (printable ASCII, no spaces), or None")
        _check(server_key is not None or _is_loopback(host), "host", host,
               "serving beyond this machine without a server key would let anyone who can reach it spend your "
               "upstream keys", "pass a server key (--server-key or $SELFMOA_SERVER_KEY), or bind 127.0.0.1")
        _check(_is_int(port) and 0 <= port <= 65535, "port", port, "a TCP port is 0 to 65535",
               "pass e.g. 8000, or 0 for a free port")
        unknown = sorted(set(defaults or {}) - set(SERVE_DEFAULTS))
        _check(not unknown, "defaults", unknown, "these are not method defaults", f"use {', '.join(SERVE_DEFAULTS)}")
        self.defaults = {**SERVE_DEFAULTS, **(defaults or {})}
        d = self.defaults
        seq_rounds(d["n"], d["window"], d["carry"])  # checks n, window and carry
        _settings(complete=complete, temperature=d["temperature"], max_tokens=d["max_tokens"],
                  aggregator_temperature=d["aggregator_temperature"], aggregator_max_tokens=d["aggregator_max_tokens"],
                  seed=d["seed"], concurrency=concurrency, instruction=d["instruction"], use_n=True, stream=None)
        _check(_is_int(d["layers"]) and d["layers"] >= 2, "layers", d["layers"],
               "layers count the aggregator, so there are at least 2", "pass 2 for one proposer layer")
        _check(_is_int(d["min_ok"]) and 1 <= d["min_ok"] <= d["n"], "min_ok", d["min_ok"],
               "it is the fewest proposers that must succeed", f"pass min_ok between 1 and {d['n']}")
        _check(d["proposers"] is None or (isinstance(d["proposers"], list) and len(d["proposers"]) > 0),
               "proposers", d["proposers"], "MoA proposers are a non-empty list", "pass a list of model names")
        _check(_is_int(concurrency) and concurrency >= 1, "concurrency", concurrency,
               "it bounds the upstream calls of all runs at once", "pass an integer >= 1")
        _check(isinstance(drain_timeout, (int, float)) and not isinstance(drain_timeout, bool)
               and math.isfinite(drain_timeout) and drain_timeout >= 0, "drain_timeout", drain_timeout,
               "it is how long the runs in flight may take to finish on a stop", "pass a number of seconds >= 0")
        self.complete, self.server_key, self.concurrency = complete, server_key, concurrency
        self.models, self.max_body, self.drain_timeout = list(models), max_body, drain_timeout
        self.pool = _Pool(concurrency)
        self._order = itertools.count()  # earlier requests' calls go first among equals
        self._active = 0
        self._runs: set[threading.Event] = set()  # the cancel flag of every run in flight
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}  # kept-alive pass-through connections
        self._changed = threading.Condition()
        self._stopping = self._serving = False
        self._thread: threading.Thread | None = None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_ServeHTTPServer", (http.server.ThreadingHTTPServer,),
                            {"address_family": family, "daemon_threads": True, "request_queue_size": 128,
                             "handle_error": _quiet_on_disconnect})
        self.httpd = server_class((host, port), _ServeHandler)
        self.httpd.app = self
        self.host, self.port = self.httpd.server_address[:2]
        self.base_url = f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}/v1"

    # --- life cycle ------------------------------------------------------------------------------------

    def start(self) -> ModelServer:
        """Serve in a background thread (``serve_forever`` serves in this one)."""
        self._serving = True  # so that a close() right after start() still stops it
        self._thread = threading.Thread(target=self.serve_forever, name="selfmoa-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        self.httpd.serve_forever(0.1)

    def close(self, drain_timeout: float | None = None) -> int:
        """Stop accepting, let the runs in flight finish (at most ``drain_timeout`` seconds), cancel the
        rest, and release everything. Returns how many runs were still in flight when the wait ended."""
        wait = self.drain_timeout if drain_timeout is None else drain_timeout
        self._stopping = True
        if self._serving:
            self.httpd.shutdown()
        self.httpd.server_close()
        deadline = time.monotonic() + wait
        with self._changed:
            while self._active and time.monotonic() < deadline:
                self._changed.wait(max(0.0, deadline - time.monotonic()))
            left = self._active
            for cancel in self._runs:
                cancel.set()
        self.pool.shutdown()
        with self._changed:
            idle, self._idle = self._idle, {}
        for connection in itertools.chain.from_iterable(idle.values()):
            connection.close()
        return left

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        with self._changed:
            self._active += 1
        try:
            yield
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    # --- routes ----------------------------------------------------------------------------------------

    def _secrets(self) -> list[str | None]:
        endpoints = _endpoints_of(self.complete)
        return [self.server_key] + [secret for endpoint in endpoints for secret in endpoint.secrets]

    def _authorize(self, handler: _ServeHandler) -> None:
        if self.server_key is None:
            return
        scheme, _, given = handler.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                 self.server_key.encode()):  # scheme: any case
            handler.close_connection = True  # the body is left unread
            raise _ServeError(401, "a valid server key is required: send 'Authorization: Bearer KEY'", None,
                              "invalid_api_key")

    def handle_get(self, handler: _ServeHandler) -> None:
        path = handler.path.split("?")[0].rstrip("/")
        if path == "/health":
            return handler.send_json(200, {"status": "ok"})
        self._authorize(handler)
        def entry(name: str) -> dict[str, Any]:
            method = "/" in name and name.split("/")[0] + "/" in SERVE_METHODS
            return {"id": name, "object": "model", "created": 0, "owned_by": "selfmoa" if method else "upstream"}

        if path == "/v1/models":
            return handler.send_json(200, {"object": "list", "data": [entry(name) for name in self.model_names()]})
        if path.startswith("/v1/models/"):  # one model, as the SDKs' models.retrieve() asks (ids may hold "/")
            name = urllib.parse.unquote(path[len("/v1/models/"):], errors="replace")
            if name in self.model_names():
                return handler.send_json(200, entry(name))
            raise _ServeError(404, f"The model '{_clean(name)[:200]}' does not exist", "model", "model_not_found")
        raise _ServeError(404, f"no route for GET {path[:100]}")

    def model_names(self) -> list[str]:
        """The served names: each upstream model (as its upstream lists it), and each method of it."""
        names = list(self.models)
        client = self.complete
        endpoints = _endpoints_of(client)
        for endpoint in dict.fromkeys(e for e in endpoints if isinstance(e, Endpoint)):
            names += self._upstream_models(endpoint)
        names += list(getattr(client, "endpoints", {}))
        names += [m for m in _flatten(self.defaults["proposers"] or [])]
        served = []
        for name in dict.fromkeys(names):
            served += [name, f"self-moa/{name}", f"self-moa-seq/{name}"]
            if self.defaults["proposers"]:
                served.append(f"moa/{name}")
        return list(dict.fromkeys(served))

    def _upstream_models(self, endpoint: Endpoint) -> list[str]:
        """The model ids an upstream lists (none if it cannot say so within a few seconds)."""
        parts = urllib.parse.urlsplit(endpoint.base_url)
        kind = _HTTPSConnection if parts.scheme == "https" else _HTTPConnection
        connection = kind(parts.hostname or "", parts.port, timeout=min(5.0, getattr(self.complete, "timeout", 5.0)))
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        begin, end = getattr(self.complete, "_begin", None), getattr(self.complete, "_end", None)
        flight = begin(connection) if begin and end else None  # --deadline: the client's watchdog cuts it off
        try:
            connection.request("GET", parts.path.rstrip("/") + "/models", headers=headers)
            response = connection.getresponse()
            data = json.loads(response.read(SERVE_MAX_UPSTREAM)) if response.status == 200 else {}
            return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (OSError, ValueError, AttributeError, TypeError, RecursionError, http.client.HTTPException):
            return []  # whatever the upstream answers (wrong types, a nesting bomb): it lists nothing
        finally:
            if flight is not None and end is not None:
                end(flight)
            connection.close()

    def handle_post(self, handler: _ServeHandler) -> None:
        path = handler.path.split("?")[0].rstrip("/")
        with self._in_flight():
            if self._stopping:
                handler.close_connection = True
                raise _ServeError(503, "the server is shutting down", None, "shutting_down", "server_error")
            self._authorize(handler)
            raw = handler.read_body(self.max_body)
            if path != "/v1/chat/completions":
                raise _ServeError(404, f"no route for POST {path[:100]}")
            try:
                body = json.loads(raw, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise _ServeError(400, "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise _ServeError(400, "the body must be a JSON object")
            model = body.get("model")
            if not isinstance(model, str) or not model.strip():
                raise _ServeError(400, "'model' must be a non-empty string", "model")
            prefix = next((p for p in SERVE_METHODS if model.startswith(p)), None)
            if prefix is None:
                return self._pass_through(handler, model, raw, body.get("stream") is True)
            method, upstream = SERVE_METHODS[prefix], model[len(prefix):]
            if not upstream.strip():
                raise _ServeError(404, f"The model '{model[:200]}' does not exist: name the upstream model after "
                                  f"'{prefix}'", "model", "model_not_found")
            self._run(handler, model, method, upstream, _chat_request(body, method))

    # --- the methods -----------------------------------------------------------------------------------

    def _arguments(self, method: str, upstream: str, request: dict) -> dict[str, Any]:
        """The method's keyword arguments: serve's defaults, then the request's ``selfmoa`` and own fields."""
        d, extra = self.defaults, request["selfmoa"]
        options = {key: extra.get(key, d.get(key)) for key in SERVE_OPTIONS[method] if key != "aggregator"}
        options.update(
            aggregator_temperature=d["aggregator_temperature"] if request["temperature"] is None
            else request["temperature"],
            aggregator_max_tokens=d["aggregator_max_tokens"] if request["max_tokens"] is None
            else request["max_tokens"],
            seed=d["seed"] if request["seed"] is None else request["seed"], concurrency=self.concurrency)
        proposers = options.get("proposers")
        if "layers" not in extra and isinstance(proposers, list) and all(isinstance(p, list) for p in proposers):
            options["layers"] = len(proposers) + 1  # one list per layer: they say how many, whatever --layers says
        # A request may not order unbounded work: n=10**9 would never end, and would hold the pool meanwhile.
        # Every call counts: samples, proposers, and each aggregation (a Self-MoA-Seq round is one).
        try:
            if method == "self-moa-seq":
                calls = options["n"] + seq_rounds(options["n"], options["window"], options["carry"])
            elif method == "self-moa":
                calls = options["n"] * (options["layers"] - 1) + 1 if _is_int(options["n"]) else 0
            else:  # counted, not built: layers=10**9 must not make a list of 10**9 layers
                proposers = options["proposers"]
                nested = all(isinstance(layer, list) for layer in proposers)
                calls = (sum(map(len, proposers)) if nested else len(proposers) * (options["layers"] - 1)) + 1
        except (ConfigError, TypeError):
            calls = 0  # an ill-typed option: the method's own check refuses it, naming the option
        if calls > SERVE_MAX_CALLS:  # named: the first of the request's own options that make the count
            key = next((k for k in ("n", "proposers", "layers", "window", "carry") if k in extra),
                       "proposers" if method == "moa" else "n")
            raise _ServeError(400, f"'selfmoa.{key}' asks for {calls} calls in one request (samples, proposers and "
                              f"aggregations), more than {SERVE_MAX_CALLS}; ask for fewer", f"selfmoa.{key}")
        if method == "moa":
            if not options["proposers"]:
                raise _ServeError(400, f"moa/{upstream} needs proposers: start serve with -p MODEL (repeatable) or "
                                  f'send "selfmoa": {{"proposers": [...]}}', "selfmoa.proposers")
            return {**options, "aggregator": upstream}
        return {**options, "model": upstream, "aggregator": extra.get("aggregator", upstream)}

    def _check_endpoints(self, arguments: dict[str, Any]) -> None:
        """Refuse a model no upstream serves before any call is made (404 model_not_found)."""
        endpoint_for = getattr(self.complete, "endpoint_for", None)
        if endpoint_for is None:
            return
        for model in [arguments.get("model"), arguments.get("aggregator"), *_flatten(arguments.get("proposers"))]:
            if isinstance(model, str):
                try:
                    endpoint_for(model)
                except ConfigError:
                    raise _ServeError(404, f"The model '{model[:200]}' does not exist: no upstream serves it",
                                      "model", "model_not_found") from None

    def _failure(self, exc: BaseException) -> _ServeError:
        """The reply to a failed run: 400 for a bad option, 404 for an unknown upstream model, else 502."""
        secrets = self._secrets()
        partial = getattr(exc, "partial", None)
        report = _run_report(partial, secrets) if isinstance(partial, Result) else None
        if isinstance(exc, ConfigError):
            param, message = _param_of(exc)
            return _ServeError(400, _redact_all(message, secrets)[:2000], param, report=report)
        if isinstance(exc, SelfMoAError):
            failures = exc.failures if isinstance(exc, NotEnoughProposals) else [exc]
            message = _redact_all(str(exc), secrets)[:2000]
            missing_models = [f for f in failures if isinstance(f, ModelError) and f.status == 404]
            if failures and len(missing_models) == len(failures):
                missing = " and ".join(dict.fromkeys(f"'{f.model[:200]}'" for f in missing_models))
                return _ServeError(404, f"The model {missing} does not exist upstream (at {missing_models[0].url}): "
                                   f"{_redact_all(missing_models[0].message, secrets)[:500]}", "model",
                                   "model_not_found", report=report)
            return _ServeError(502, f"upstream failure: {message}", None, "upstream_error", "upstream_error",
                               report=report)
        print(f"selfmoa serve: internal error: {type(exc).__name__}: {_redact_all(str(exc), secrets)}",
              file=sys.stderr)
        return _ServeError(500, f"internal error ({type(exc).__name__}); the server log has the details", None,
                           "internal_error", "server_error")

    def _run(self, handler: _ServeHandler, model: str, method: str, upstream: str, request: dict) -> None:
        """Run one method request on the shared pool, streaming or not, cancelling it if the client goes."""
        arguments = self._arguments(method, upstream, request)
        self._check_endpoints(arguments)
        events: queue.SimpleQueue = queue.SimpleQueue()
        cancel = threading.Event()
        streaming, stop, complete = request["stream"], request["stop"], self.complete

        def call(upstream_request: Request) -> Any:
            if cancel.is_set():
                raise ModelError("cancelled: the client went away before this call ran", model=upstream_request.model)
            if upstream_request.stream is not None:  # the final aggregation: it writes the answer
                upstream_request = dataclasses.replace(upstream_request, stop=stop,
                                                       stream=upstream_request.stream if streaming else None)
            return complete(upstream_request)

        def run() -> None:
            try:
                with _on_shared_pool(self.pool, (next(self._order),), oldest_first=True):
                    result = METHODS[method](request["messages"], complete=call,
                                             stream=lambda piece: events.put(("piece", piece)), **arguments)
                events.put(("done", result))
            except BaseException as exc:  # handed to the request's thread, which answers with it
                events.put(("error", exc))

        with self._changed:
            self._runs.add(cancel)
        try:
            threading.Thread(target=run, name="selfmoa-serve-run", daemon=True).start()
            stream = _ChunkStream(handler, model, request["include_usage"]) if streaming else None
            while True:
                try:
                    kind, value = events.get(timeout=0.05)
                except queue.Empty:
                    if _client_gone(handler.connection):
                        cancel.set()
                        handler.close_connection = True
                        return
                    continue
                if kind == "piece":
                    if stream is not None and not stream.send_piece(value):
                        cancel.set()
                        return
                    continue
                if kind == "error":
                    failure = self._failure(value) if not cancel.is_set() else _ServeError(
                        503, "the server stopped before this run finished", None, "shutting_down", "server_error")
                    if stream is not None and stream.started:
                        stream.send_error(failure)
                        return
                    raise failure
                result = value
                final = [c for c in result.trace if c.role == "aggregator"][-1]
                reason = (final.finish_reasons or ["stop"])[0] or "stop"
                usage = {key: result.usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
                if stream is not None:
                    stream.finish(result.answer, reason, usage, _run_report(result, self._secrets()))
                    return
                return handler.send_json(200, {
                    "id": f"chatcmpl-selfmoa-{os.urandom(12).hex()}", "object": "chat.completion",
                    "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                                 "finish_reason": reason}],
                    "usage": usage, "selfmoa": _run_report(result, self._secrets())})
        finally:
            with self._changed:
                self._runs.discard(cancel)

    # --- pass-through ----------------------------------------------------------------------------------

    def _pass_through(self, handler: _ServeHandler, model: str, raw: bytes, streaming: bool) -> None:
        """Send the request, as it came, to one of the model's own upstreams (with that upstream's key, never
        the client's), and its reply back as it comes: status, body and streamed events unchanged. With
        replicas, the client's rule picks the upstream (fewest calls in flight, cool-down, failover)."""
        replicas_of = getattr(self.complete, "replicas", None)
        try:
            if replicas_of is None:
                raise ConfigError("no upstream")
            replicas = list(replicas_of(model))
        except ConfigError:
            raise _ServeError(404, f"The model '{model[:200]}' does not exist: no upstream serves it", "model",
                              "model_not_found") from None
        retries = getattr(self.complete, "retries", 0)
        begin, unwatch = getattr(self.complete, "_begin", None), getattr(self.complete, "_end", None)

        def end(flight: Any) -> None:
            if unwatch is not None and flight is not None:
                unwatch(flight)
        attempt, failed_here = 0, set[str]()
        while True:
            endpoint = self._claim(replicas, failed_here, model)
            parts = urllib.parse.urlsplit(endpoint.base_url)
            path = parts.path.rstrip("/") + "/chat/completions" + (f"?{parts.query}" if parts.query else "")
            headers = {"Content-Type": "application/json", "User-Agent": f"selfmoa/{__version__}",
                       "Accept": "text/event-stream" if streaming else "application/json"}
            if endpoint.api_key:
                headers["Authorization"] = f"Bearer {endpoint.api_key}"
            connection, reused = self._upstream(parts)
            flight = begin(connection) if begin else None  # --deadline: the client's watchdog cuts it off
            try:
                connection.request("POST", path, body=raw, headers=headers)  # connects (TCP_NODELAY) if new
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                end(flight)
                connection.close()
                self._unclaim(endpoint, "stale" if reused else "down")
                if reused:
                    continue  # a kept-alive connection the upstream had closed meanwhile: not an attempt
                failure = f"could not reach it ({type(exc).__name__})"
            else:
                last_chance = attempt == retries and len(failed_here | {endpoint.base_url}) >= len(replicas)
                final = response.status >= 200  # http.client hands back a 1xx (but 100) as if it were final
                if final and (response.status not in RETRY_STATUSES or last_chance):
                    break  # relayed as it is: an answer, or the last failure once every replica had its chance
                end(flight)
                connection.close()
                self._unclaim(endpoint, "failed")
                failure = f"HTTP {response.status}"
            failed_here.add(endpoint.base_url)
            if len(failed_here) < len(replicas):
                continue  # failover: another replica takes the request now, no wait, no retry spent
            if attempt == retries:
                raise _ServeError(502, f"upstream failure: model {model[:200]!r} at {endpoint.url}: {failure}"
                                  + (f" (after {attempt + 1} attempts)" if attempt else ""), None,
                                  "upstream_error", "upstream_error")
            failed_here.clear()  # every replica failed this request: back off, then try them again
            backoff, most = getattr(self.complete, "backoff", 0.5), getattr(self.complete, "max_backoff", 30.0)
            time.sleep(min(most, backoff * 2 ** attempt) * random.random())
            attempt += 1
        key, kept = endpoint.secrets, False
        try:
            content_type = _redact_all(response.getheader("Content-Type") or "application/json", key)  # relayed
            if not (streaming and response.status == 200 and content_type.startswith("text/event-stream")):
                try:  # a body shorter than announced raises: relayed, it would pass for a whole one
                    data, whole = _read_capped(response, SERVE_MAX_UPSTREAM)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise _ServeError(502, f"upstream failure: model {model[:200]!r} at {endpoint.url}: the reply was "
                                      f"cut off ({type(exc).__name__})", None, "upstream_error", "upstream_error") \
                        from None
                if not whole:
                    raise _ServeError(502, f"upstream failure: model {model[:200]!r} at {endpoint.url}: the reply is "
                                      f"over {SERVE_MAX_UPSTREAM} bytes", None, "upstream_error", "upstream_error")
                kept = self._keep(parts, connection, response)
                retry_after = _redact_all(response.getheader("Retry-After") or "", key)
                extra = {"Retry-After": retry_after} if retry_after else {}
                return handler.send_bytes(response.status, _redact_bytes(data, key), content_type,
                                          extra)
            handler.start_chunked(200, content_type)
            # Relayed line by line: a key the upstream echoes never spans a line break (keys hold no control
            # characters), so redacting whole lines catches it even when it arrives split over two reads.
            pending = b""
            while True:
                data = response.read1(65536)
                if not data:
                    break
                pending += data
                cut = pending.rfind(b"\n") + 1 if key else len(pending)
                if not cut and len(pending) <= SERVE_MAX_UPSTREAM_LINE:
                    continue
                ready, pending = (pending[:cut], pending[cut:]) if cut else (pending, b"")
                if not handler.send_chunk(_redact_bytes(ready, key)):
                    return  # the client went away: closing the upstream connection stops the generation
            if pending and not handler.send_chunk(_redact_bytes(pending, key)):
                return
            response.read()  # the end of the body (nothing left to relay), so that the connection can be kept
            kept = self._keep(parts, connection, response)
            handler.end_chunked()
        except (OSError, http.client.HTTPException):
            handler.close_connection = True  # the upstream broke off mid-reply: so does this reply
        finally:
            end(flight)
            self._unclaim(endpoint, "ok" if response.status == 200 else "answered")
            if not kept:
                connection.close()

    def _claim(self, replicas: list[Endpoint], failed_here: set[str], model: str) -> Endpoint:
        """The upstream for one pass-through attempt, counted in flight by the client's replica rule."""
        pick = getattr(self.complete, "_pick", None)
        if pick is None:
            return replicas[0]
        try:
            return pick(replicas, failed_here, Request(model, ()))
        except ModelError as exc:  # the client was aborted: the server is stopping
            raise _ServeError(502, f"upstream failure: {exc.message}", None, "upstream_error",
                              "upstream_error") from None

    def _unclaim(self, endpoint: Endpoint, outcome: str) -> None:
        """End a claimed attempt (ok, failed, down, answered or stale), as the client counts its own calls."""
        settle = getattr(self.complete, "_settle", None)
        if settle is not None:
            settle(endpoint, outcome)

    def _upstream(self, parts: urllib.parse.SplitResult) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection to an upstream host if one is idle (True), else a new, unconnected one."""
        with self._changed:
            idle = self._idle.get((parts.scheme, parts.hostname, parts.port))
            if idle:
                return idle.pop(), True
        kind = _HTTPSConnection if parts.scheme == "https" else _HTTPConnection
        return kind(parts.hostname or "", parts.port, timeout=getattr(self.complete, "timeout", 120.0)), False

    def _keep(self, parts: urllib.parse.SplitResult, connection: http.client.HTTPConnection,
              response: http.client.HTTPResponse) -> bool:
        """Keep a connection whose reply was read in full for the next pass-through (at most 32 per host)."""
        if response.will_close or not response.isclosed():
            return False
        with self._changed:
            idle = self._idle.setdefault((parts.scheme, parts.hostname, parts.port), [])
            if len(idle) >= 32:
                return False
            idle.append(connection)
            return True


def _quiet_on_disconnect(server: http.server.ThreadingHTTPServer, request: Any, client_address: Any) -> None:
    """A client that resets or drops its connection is no error worth a traceback (serve logs nothing per
    request, and a hostile client could flood the log with them); anything else still gets one."""
    if not isinstance(sys.exc_info()[1], OSError):
        http.server.ThreadingHTTPServer.handle_error(server, request, client_address)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python reads NaN and Infinity; JSON has neither


def _flatten(proposers: Any) -> list[Any]:
    """A proposer list, or a list of per-layer lists, as one flat list.

    >>> _flatten([["a", "b"], ["c"]]), _flatten(["a", "b"]), _flatten(None)
    (['a', 'b', 'c'], ['a', 'b'], [])
    """
    if not isinstance(proposers, list):
        return []
    return [m for item in proposers for m in (item if isinstance(item, list) else [item])]


class _ChunkStream:
    """The server-sent events of a streamed method reply: ``chat.completion.chunk`` objects, then
    ``data: [DONE]``. Nothing is sent until the answer's first piece, so a run that fails before it still
    gets a proper error status."""

    def __init__(self, handler: _ServeHandler, model: str, include_usage: bool):
        self.handler, self.include_usage, self.started = handler, include_usage, False
        self.sent: list[str] = []
        self.base = {"id": f"chatcmpl-selfmoa-{os.urandom(12).hex()}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model}

    def _event(self, data: Any) -> bool:
        text = _clean(json.dumps(data, ensure_ascii=False))  # no lone surrogate: it could not be encoded
        return self.handler.send_chunk(b"data: " + text.encode("utf-8") + b"\n\n")

    def _chunk(self, delta: dict, reason: str | None = None, **extra: Any) -> bool:
        chunk = {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}
        if self.include_usage and "usage" not in extra:
            chunk["usage"] = None
        return self._event(chunk)

    def _start(self) -> bool:
        if not self.started:
            self.started = True
            self.handler.start_chunked(200, "text/event-stream")
            return self._chunk({"role": "assistant", "content": ""})
        return True

    def send_piece(self, piece: str) -> bool:
        self.sent.append(piece)
        return self._start() and self._chunk({"content": piece})

    def finish(self, answer: str, reason: str, usage: dict, report: dict) -> None:
        self._start()
        if not self.sent and answer:  # a completion function that does not stream: the answer in one piece
            self._chunk({"content": answer})
        if self.include_usage:
            self._chunk({}, reason)
            self._event({**self.base, "choices": [], "usage": usage, "selfmoa": report})
        else:
            self._chunk({}, reason, selfmoa=report)
        self.handler.send_chunk(b"data: [DONE]\n\n")
        self.handler.end_chunked()

    def send_error(self, failure: _ServeError) -> None:
        self._event(failure.body())
        self.handler.send_chunk(b"data: [DONE]\n\n")
        self.handler.end_chunked()
        self.handler.close_connection = True


class _ServeHandler(http.server.BaseHTTPRequestHandler):
    """One client connection of a ModelServer (HTTP/1.1, kept alive): the routes are the server's."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # so that even a garbled request line gets a status line back
    server_version = f"selfmoa/{__version__}"
    timeout = 120  # seconds an idle kept-alive connection, or a stalled request, is waited for
    wbufsize = 1 << 16  # a reply's headers and body leave in one send
    chunked = False

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are not logged: a log is one more place a prompt or a key could leak to

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True  # a malformed request line or header: the connection is not trusted
        self.send_json(code, _ServeError(code, message or "bad request").body())

    def _route(self, handle: Callable[[_ServeHandler], None]) -> None:
        self.began = False  # whether this request's status line has gone out
        try:
            handle(self)
        except _ServeError as error:
            self.send_json(error.status, error.body())
        except OSError:  # the client went away
            self.close_connection = True
        except Exception as exc:  # a bug of serve's: an OpenAI-shaped 500 (its text could hold a key), keep serving
            self.close_connection = True
            print(f"selfmoa serve: internal error ({type(exc).__name__}) on {self.command} {self.path[:100]!r}",
                  file=sys.stderr)
            if not self.began:
                with contextlib.suppress(OSError):
                    self.send_json(500, _ServeError(500, f"internal error in selfmoa serve ({type(exc).__name__})",
                                                    None, "server_error", "server_error").body())

    def send_response(self, code: int, message: str | None = None) -> None:
        self.began = True
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._route(self.server.app.handle_get)  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        self._route(self.server.app.handle_post)  # type: ignore[attr-defined]

    def read_body(self, limit: int) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise _ServeError(411, "send the body with a Content-Length header (chunked bodies are not read)")
        length = self.headers.get("Content-Length")
        digits = (length or "").strip()
        if length is None or not (digits.isascii() and digits.isdigit()):  # "²" is a digit to isdigit, not to int
            self.close_connection = True
            raise _ServeError(411 if length is None else 400, "a valid Content-Length header is required")
        if len(digits.lstrip("0")) > 18 or int(digits) > limit:  # int() refuses thousands of digits
            self.close_connection = True  # the unread body makes the connection unusable
            raise _ServeError(413, f"the body is over the limit of {limit} bytes", None, "body_too_large")
        data = self.rfile.read(int(length))
        if len(data) < int(length):
            self.close_connection = True
            raise _ServeError(400, "the body ended before its Content-Length")
        return data

    def send_bytes(self, status: int, data: bytes, content_type: str = "application/json",
                   headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()  # now, while the request still counts as in flight (a drain waits for it)

    def send_json(self, status: int, payload: dict) -> None:
        self.send_bytes(status, _clean(json.dumps(payload, ensure_ascii=False)).encode("utf-8"))  # no lone surrogate

    def start_chunked(self, status: int, content_type: str) -> None:
        """Start a reply of unknown length: chunked over HTTP/1.1, else ended by closing the connection."""
        self.chunked = self.request_version == "HTTP/1.1"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()

    def send_chunk(self, data: bytes) -> bool:
        """Send one piece of a chunked reply now; False if the client has gone."""
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False

    def end_chunked(self) -> None:
        self.send_chunk(b"")


# ======================================================================================================
# The command line
# ======================================================================================================

OPENAI_BASE_URL = "https://api.openai.com/v1"

CLI_DESCRIPTION = """\
Answer a prompt with MoA, Self-MoA or Self-MoA-Seq against OpenAI-compatible servers.
The prompt is the argument, or standard input; the final answer goes to standard output.
"selfmoa serve" serves the methods as models instead (selfmoa serve --help); to ask the
prompt "serve" itself, pass it after -- or on standard input."""

CLI_EPILOG = """\
endpoints and keys:
  Every model is served by --base-url (else $OPENAI_BASE_URL, else the OpenAI API), unless
  --endpoint MODEL=URL gives it its own server. A key is only ever sent to the endpoint it
  was given for. The default endpoint's key is --api-key, else $OPENAI_API_KEY, which is used
  only when the URL is the OpenAI API or came from $OPENAI_BASE_URL. The key of a model with
  its own endpoint comes from $SELFMOA_API_KEY_<MODEL> (the name in capitals, other characters
  as _), else none.

batch mode:
  -i FILE reads JSONL or a JSON list of objects with "prompt", "instruction" or "messages"
  (and an optional "id"); -o FILE gets one JSON line per item: {"selfmoa_batch": 1, "id": ...,
  "status": "ok" or "error", "answer" or "error": ..., ..., "input": {the record as given}}.
  Run the same command again to resume: items answered for the same prompt and parameters
  are skipped, the others run. One run at a time writes a file (it holds FILE.lock); a file
  that is not a selfmoa output file is never changed.

exit status:
  0 success, 1 a model or server failed, 2 a usage error (the message names the flag)."""

_FLAGS = {"temperature": "--temperature", "max_tokens": "--max-tokens", "n": "--samples",
          "aggregator_temperature": "--aggregator-temperature", "aggregator_max_tokens": "--aggregator-max-tokens",
          "window": "--window", "carry": "--carry", "layers": "--layers", "seed": "--seed", "min_ok": "--min-ok",
          "concurrency": "--concurrency", "timeout": "--timeout", "retries": "--retries", "model": "--model",
          "aggregator": "--aggregator", "proposer": "--proposer", "proposers": "--proposer", "deadline": "--deadline",
          "base_url": "--base-url", "prompt": "PROMPT", "instruction": "--instruction-file",
          "max_in_flight": "--max-in-flight"}


def _finite(text: str) -> float:
    """A number flag's value: any finite float ("nan" and "inf" are refused by argparse, naming the flag).

    >>> _finite("0.7"), _finite("1e-3")
    (0.7, 0.001)
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; pass an ordinary number")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (its --help is the usage section of the README)."""
    parser = argparse.ArgumentParser(prog="selfmoa", description=CLI_DESCRIPTION, epilog=CLI_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("prompt", nargs="?", metavar="PROMPT", help="the prompt (default: read standard input)")
    add("--method", choices=list(METHODS), default="self-moa", help="default: self-moa")
    add("-m", "--model", help="the model sampled by self-moa and self-moa-seq, and the default aggregator "
        "(default: $SELFMOA_MODEL)")
    add("-p", "--proposer", action="append", metavar="MODEL", help="a proposer of each MoA proposer layer "
        "(repeat it, in order; a model may appear several times)")
    add("-a", "--aggregator", metavar="MODEL", help="the aggregator (default: --model)")
    add("--layers", type=int, metavar="L", help="moa and self-moa: layers, the aggregator counted (default: 2)")
    add("-n", "--samples", type=int, metavar="N",
        help="self-moa and self-moa-seq: samples of --model (default: 6)")
    add("--window", type=int, metavar="W", help="self-moa-seq: responses per round (default: 6)")
    add("--carry", type=int, metavar="R",
        help="self-moa-seq: copies of the previous synthesis per round (default: 3)")
    add("--temperature", type=_finite, default=0.7, metavar="T", help="proposers' temperature (default: 0.7)")
    add("--max-tokens", type=int, metavar="K", help="proposers' token limit (default: the server's)")
    add("--aggregator-temperature", type=_finite, default=0.7, metavar="T",
        help="the aggregator's temperature (default: 0.7)")
    add("--aggregator-max-tokens", type=int, metavar="K", help="the aggregator's token limit (default: the server's)")
    add("--seed", type=int, metavar="S", help="sample i gets seed S+i; aggregations get S")
    add("--min-ok", type=int, default=1, metavar="K", help="fewest proposers per layer that must succeed (default: 1)")
    add("--concurrency", type=int, default=8, metavar="C", help="calls at once (default: 8)")
    add("--timeout", type=_finite, default=120.0, metavar="SECONDS",
        help="how long to wait to connect, and for each piece of a reply (default: 120)")
    add("--deadline", type=_finite, default=600.0, metavar="SECONDS",
        help="the most one attempt of a call may take, from connecting to the reply's last byte (default: 600)")
    add("--retries", type=int, default=4, metavar="N", help="retries of a failed call (default: 4)")
    add("--no-n", dest="use_n", action="store_false",
        help="never ask for several samples in one request (one request per sample)")
    add("--instruction-file", metavar="FILE", help="replace the aggregator instruction with this file's text")
    add("--base-url", action="append", metavar="URL",
        help="the default endpoint (default: $OPENAI_BASE_URL, else the OpenAI API); repeat it for replicas")
    add("--api-key", metavar="KEY", help="the default endpoint's key (default: see below)")
    add("--endpoint", action="append", metavar="MODEL=URL",
        help="serve MODEL from its own endpoint (repeatable; the same MODEL again adds a replica)")
    add("--max-in-flight", type=int, metavar="K", help="calls in flight per server at most (default: no cap)")
    add("--json", action="store_true", help="print the whole result (answer, trace of every call, usage) as JSON")
    add("--diversity", action="store_true",
        help="add each proposer layer's diversity (Vendi score) to --json output and batch lines")
    add("--stream", action=argparse.BooleanOptionalAction, default=None,
        help="stream the final answer as it is written (default: when stdout is a terminal)")
    add("-i", "--input", metavar="FILE", help="batch mode: run every item of FILE")
    add("-o", "--output", metavar="FILE", help="batch mode: write (and resume) results here")
    add("--format", choices=["jsonl", "alpaca_eval"],
        help="batch output format; alpaca_eval writes AlpacaEval's model-outputs JSON to --output, "
             "keeping the resumable JSONL in FILE.jsonl (default: jsonl)")
    add("--generator", metavar="NAME", help="alpaca_eval: the generator name (default: selfmoa- followed by "
        "the method, models, n, window and carry)")
    add("--trace", action="store_true", help="batch mode: put each item's trace in its output line")
    add("--version", action="version", version=f"selfmoa {__version__}")
    return parser


def _key_env_name(model: str) -> str:
    """The environment variable holding the key of a model with its own endpoint.

    >>> _key_env_name("llama-3.1:8b")
    'SELFMOA_API_KEY_LLAMA_3_1_8B'
    """
    return "SELFMOA_API_KEY_" + re.sub(r"[^A-Z0-9]", "_", model.upper())


def _cli_endpoint(url: str, key: str | None, url_source: str, key_source: str) -> Endpoint:
    """An Endpoint from the command line or the environment; a bad URL or key names where it came from,
    and shows neither the key nor the URL's user, password, path or query."""
    problem = _url_problem(url)
    if problem:
        raise ConfigError(f"{url_source}{_origin(url)!r}: {problem}; pass a URL like http://localhost:8000/v1")
    problem = _key_problem(key)
    if problem:
        raise ConfigError(f"{key_source}: {problem}; give the key alone, e.g. \"$(tr -d '\\r\\n' < key.txt)\"")
    return Endpoint(url, key)


def _servers_of(client: Any) -> dict[str, Any]:
    """``{"servers": ...}``, the requests each server got (HTTPClient.servers()), for --json; {} for other clients."""
    servers = getattr(client, "servers", None)
    return {"servers": servers()} if callable(servers) else {}


def make_client(args: argparse.Namespace, environ: Mapping[str, str]) -> HTTPClient:
    """The HTTPClient the flags and the environment describe, keys going only where they belong.

    Each --base-url is a replica of the default endpoint, each --endpoint MODEL=URL a replica of MODEL's.
    """
    env_url = environ.get("OPENAI_BASE_URL") or None
    default = []
    for base_url in args.base_url or [env_url or OPENAI_BASE_URL]:
        key, key_source = args.api_key, "--api-key"
        if key is None and (base_url.rstrip("/") == OPENAI_BASE_URL or (env_url and base_url == env_url)):
            key, key_source = environ.get("OPENAI_API_KEY") or None, "$OPENAI_API_KEY"
        default.append(_cli_endpoint(base_url, key, "--base-url " if args.base_url else "$OPENAI_BASE_URL ",
                                     key_source))
    endpoints: dict[str, list[Endpoint]] = {}
    for spec in args.endpoint or []:
        model, sep, url = spec.partition("=")
        if not sep or not model.strip() or not url or "://" in model:
            raise ConfigError("--endpoint: expected MODEL=URL, the model's name first; pass e.g. "
                              "--endpoint llama=http://localhost:8080/v1")
        name = _key_env_name(model)  # the model's key goes to every replica of it, and nowhere else
        endpoints.setdefault(model, []).append(_cli_endpoint(url, environ.get(name) or None, f"--endpoint {model}=",
                                                             f"${name}"))
    return HTTPClient(default, endpoints=endpoints, timeout=args.timeout, deadline=args.deadline,
                      retries=args.retries, max_in_flight=args.max_in_flight)


# Flags that only some methods use: given under another method they would do nothing, so they are refused.
_METHOD_FLAGS = {
    "layers": ("--layers", ("moa", "self-moa"), "aggregates in rounds over a window, not in layers"),
    "samples": ("-n/--samples", ("self-moa", "self-moa-seq"), "asks each --proposer once, drawing no samples"),
    "window": ("--window", ("self-moa-seq",), "aggregates all its samples at once, with no window"),
    "carry": ("--carry", ("self-moa-seq",), "has no rounds, so nothing is carried"),
    "proposer": ("--proposer", ("moa",), "samples --model instead of asking proposers"),
}


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse every flag that would have no effect under the chosen method (or output), naming both."""
    for name, (flag, methods, why) in _METHOD_FLAGS.items():
        if getattr(args, name) is not None and args.method not in methods:
            raise ConfigError(f"{flag}: --method {args.method} {why}, so {flag} would have no effect; drop it, or "
                              f"use --method {' or '.join(methods)}")
    if args.method == "moa" and args.model and args.aggregator:
        raise ConfigError("--model: --method moa samples no model and --aggregator names the aggregator, so --model "
                          "would have no effect; drop it")
    if args.diversity and not (args.json or args.input or args.output):
        raise ConfigError("--diversity: it adds each proposer layer's diversity to --json output and to batch lines, "
                          "so alone it would have no effect; add --json, or run a batch with -i and -o")
    batch_only = (("--trace", args.trace), ("--format", args.format is not None),
                  ("--generator", args.generator is not None))
    for flag, given in batch_only:
        if given and not (args.input or args.output):
            raise ConfigError(f"{flag}: it shapes a batch's output, and without -i FILE and -o FILE no batch runs, "
                              f"so {flag} would have no effect; drop it, or run a batch with -i and -o")
    if args.stream and args.json:
        raise ConfigError("--stream: --json prints the whole result once it is done, so --stream would have no "
                          "effect; drop one of them")
    for flag, given in (("--json", args.json), ("--stream", args.stream is not None)):
        if given and (args.input or args.output):
            raise ConfigError(f"{flag}: a batch writes its results to -o FILE and prints only a summary, so {flag} "
                              f"would have no effect; drop it")


def _instruction_file(path: str | None) -> str | None:
    """The aggregator instruction of --instruction-file (None without one); an unreadable or empty file is a
    usage error naming the flag."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--instruction-file {path}: cannot read it ({exc}); pass a UTF-8 text file") from None
    if not text:
        raise ConfigError(f"--instruction-file {path}: the file is empty; write the aggregator's instruction in it")
    return text


def _method_options(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of the chosen method, from the flags; usage errors name the flag.

    Flags a method does not use are refused; flags not given are left out, so the method's defaults apply.
    """
    _check_flags(args)
    model = args.model or environ.get("SELFMOA_MODEL") or None
    instruction = _instruction_file(args.instruction_file)
    given = {name: value for name, value in (("layers", args.layers), ("n", args.samples), ("window", args.window),
                                              ("carry", args.carry)) if value is not None}
    common = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed,
              "aggregator_temperature": args.aggregator_temperature, "min_ok": args.min_ok,
              "aggregator_max_tokens": args.aggregator_max_tokens, "concurrency": args.concurrency,
              "instruction": instruction, "use_n": args.use_n, **given}
    if args.method == "moa":
        if not args.proposer:
            raise ConfigError("--proposer: --method moa needs proposers; pass -p MODEL once per proposer")
        aggregator = args.aggregator or model
        if not aggregator:
            raise ConfigError("--aggregator: --method moa needs an aggregator; pass -a MODEL (or -m MODEL)")
        return {**common, "proposers": args.proposer, "aggregator": aggregator}
    if not model:
        raise ConfigError(f"--model: --method {args.method} needs the model to sample; pass -m MODEL or set "
                          f"$SELFMOA_MODEL")
    return {**common, "model": model, "aggregator": args.aggregator or model}


_LIBRARY_NAME = re.compile(r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")(=| >=| between)")


def _in_flags(text: str) -> str:
    """Library spellings in a message ("pass layers=2", "min_ok between 1 and 3") as flags ("--layers 2").

    >>> _in_flags("pass layers=2 for one proposer layer; carry between 1 and 3")
    'pass --layers 2 for one proposer layer; --carry between 1 and 3'
    """
    return _LIBRARY_NAME.sub(lambda m: _FLAGS[m[1]] + (" " if m[2] == "=" else m[2]), text)


def _usage_error(exc: ConfigError) -> str:
    """A library message ("window=1: ...; pass window >= 2") in the words of the command line
    ("--window 1: ...; pass --window >= 2")."""
    message = str(exc)
    name, sep, rest = message.partition("=")
    if sep and name in _FLAGS:
        value, _, why = rest.partition(": ")
        return f"{_FLAGS[name]} {value}: {_in_flags(why)}"
    return message


def _refuse(parser: argparse.ArgumentParser, exc: ConfigError) -> int:
    """Report a usage error (exit status 2); the usage line only when a flag or the prompt is at fault."""
    message = _usage_error(exc)
    if message.startswith(("--", "PROMPT")):
        parser.print_usage(sys.stderr)
    print(f"selfmoa: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a model failed, 2 a usage error)."""
    environ = os.environ if environ is None else environ
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # a subcommand only as the first word: "selfmoa -- serve" asks the prompt "serve"
        return _main_serve(argv[1:], environ)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = _method_options(args, environ)
        if args.input or args.output:
            if not (args.input and args.output):
                raise ConfigError("--input and --output go together in batch mode; pass both -i FILE and -o FILE")
            if args.prompt:
                raise ConfigError("PROMPT: batch mode reads its prompts from --input; drop the prompt argument")
            if os.path.abspath(args.input) == os.path.abspath(args.output):
                raise ConfigError("--output is the --input file; pass another path, so that the input is kept")
            return _main_batch(args, options, make_client(args, environ))
        prompt = args.prompt
        if prompt is None:
            if sys.stdin is None or sys.stdin.isatty():
                raise ConfigError("PROMPT: no prompt given; pass it as an argument, or pipe it to standard input")
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise ConfigError("PROMPT: the prompt is empty; pass the question to ask")
        client = make_client(args, environ)
    except ConfigError as exc:
        return _refuse(parser, exc)
    stream = args.stream if args.stream is not None else (sys.stdout.isatty() and not args.json)
    streamed: list[str] = []

    def show(piece: str) -> None:
        streamed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        with client:
            result = METHODS[args.method](prompt, complete=client,
                                          stream=show if stream and not args.json else None, **options)
    except ConfigError as exc:
        return _refuse(parser, exc)
    except SelfMoAError as exc:
        if streamed:
            print(file=sys.stdout)
        message = str(exc).replace(" min_ok=", " --min-ok ", 1) if isinstance(exc, NotEnoughProposals) else str(exc)
        print(f"selfmoa: {message}", file=sys.stderr)
        if args.json and exc.partial is not None:
            print(json.dumps({**exc.partial.to_dict(diversity=args.diversity), "error": message,
                              **_servers_of(client)}, indent=2,
                             ensure_ascii=False))
        elif exc.partial is not None and exc.partial.trace:
            print(f"selfmoa: {exc.partial.requests} requests had been made; --json shows them", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        client.abort()  # calls still in flight end now: their sockets are shut down
        print("\nselfmoa: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({**result.to_dict(diversity=args.diversity), **_servers_of(client)}, indent=2,
                         ensure_ascii=False))
    elif streamed:
        # What was streamed is the answer, unless the server's stream and final text differ.
        print("" if "".join(streamed) == result.answer else "\n" + result.answer)
    else:
        print(result.answer)
    return 0


def _main_batch(args: argparse.Namespace, options: dict[str, Any], client: HTTPClient) -> int:
    if args.generator is not None and (args.format != "alpaca_eval" or not args.generator.strip()):
        raise ConfigError(f"--generator {args.generator!r}: names the AlpacaEval generator, so it goes with "
                          f"--format alpaca_eval and is not empty; add --format alpaca_eval, or drop --generator")
    items = read_items(args.input)
    records_path = args.output + ".jsonl" if args.format == "alpaca_eval" else args.output
    try:
        with _output_lock(records_path):  # held until outputs.json is written, too
            if args.format == "alpaca_eval":
                _check_alpaca_target(args.output, records_path, items)
            return _run_batch_command(args, options, client, items, records_path)
    except ConfigError:
        raise
    except (SelfMoAError, OSError) as exc:  # a failed read or write: what was finished is kept
        print(f"selfmoa: {exc}", file=sys.stderr)
        return 1


def _run_batch_command(args: argparse.Namespace, options: dict[str, Any], client: HTTPClient, items: list[Item],
                       records_path: str) -> int:
    show_progress = sys.stderr.isatty()

    def progress(finished: int, failed: int, total: int, elapsed: float) -> None:
        rate = finished / elapsed if elapsed > 0 else 0.0
        eta = f"{(total - finished) / rate:.0f}s" if rate > 0 else "?"
        sys.stderr.write(f"\r{finished}/{total} done, {failed} failed, {rate:.2f} items/s, ETA {eta}   ")
        sys.stderr.flush()

    try:
        with client:
            counts = run_batch(items, records_path, method=args.method, complete=client, trace=args.trace,
                               diversity=args.diversity, progress=progress if show_progress else None, **options)
    except KeyboardInterrupt:
        client.abort()  # calls still in flight end now, so that the process can exit at once
        print(f"\nselfmoa: interrupted; finished items are in {records_path}; run the same command to resume",
              file=sys.stderr)
        return 130
    if show_progress:
        sys.stderr.write("\n")

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    if counts["torn_bytes"]:
        say(f"selfmoa: {records_path}: cut off a torn last line left by an interrupted run "
            f"({counts['torn_bytes']} bytes); its item ran again")
    if counts["changed_prompt"] or counts["changed_parameters"]:
        say(f"selfmoa: ran {counts['changed_prompt'] + counts['changed_parameters']} item(s) again because their "
            f"line no longer matched: {counts['changed_prompt']} with a changed prompt, "
            f"{counts['changed_parameters']} with a changed method or parameters")
    if counts["moved"]:
        say(f"selfmoa: moved {counts['moved']} line(s) of items no longer in the input, or of answers replaced "
            f"by a rerun, to {_removed_path(records_path)}")
    say(f"selfmoa: {counts['done']} answered, {counts['failed']} failed, {counts['skipped']} already done "
        f"(of {counts['total']}); results in {records_path}")
    servers = _servers_of(client).get("servers", {})
    if len(servers) > 1:
        say("selfmoa: requests per server: " + ", ".join(f"{url} {count['requests']} ({count['failed']} failed)"
                                                         for url, count in servers.items()))
    if counts["failed"]:
        with open(records_path, "rb") as file:
            records, _ = _parse_output(file.read(), records_path)
        failed = [json.dumps(record["id"]) for record, _ in records if record["status"] == "error"]  # 1 vs "1";
        # and an id's control characters are escaped, never sent to the terminal
        shown = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
        say(f"selfmoa: failed items (status \"error\" in {records_path}): {shown}; run the same command to "
            f"retry them" + (f" and to write {args.output}" if args.format == "alpaca_eval" else ""))
        if args.format == "alpaca_eval":
            say(f"selfmoa: {args.output} was not written: AlpacaEval needs an answer to every instruction")
        return 1
    if args.format == "alpaca_eval":
        with open(records_path, "rb") as file:
            records, _ = _parse_output(file.read(), records_path)
        generator = args.generator or _generator_name(args.method, options)
        entries = alpaca_eval_outputs((record for record, _ in records), generator)
        try:
            _write_atomically(args.output, _escape_unsafe(json.dumps(entries, indent=2, ensure_ascii=False))
                              .encode("utf-8") + b"\n")
        except OSError as exc:
            raise SelfMoAError(f"{args.output}: cannot write it ({exc.strerror or exc}); the answers are kept in "
                               f"{records_path}; fix that, then run the same command again") from exc
        say(f"selfmoa: wrote {len(entries)} AlpacaEval outputs to {args.output} (generator {generator!r})")
    return 0


SERVE_DESCRIPTION = """\
Serve MoA, Self-MoA and Self-MoA-Seq as models behind an OpenAI-compatible endpoint, in front of
the same upstream servers as the one-shot command. Prints its base URL (http://HOST:PORT/v1) as the
first line of standard output, then serves until SIGINT or SIGTERM."""

SERVE_EPILOG = """\
models (the "model" of POST /v1/chat/completions):
  self-moa/M        Self-MoA of upstream model M (M may contain '/': self-moa/Qwen/Qwen2-7B-Instruct)
  self-moa-seq/M    Self-MoA-Seq of M
  moa/A             MoA with aggregator A and the proposers of -p, or of the request
  any other name    passed through to its upstream unchanged (streamed or not)
  GET /v1/models lists them; GET /health answers 200 (without a server key).

per-request options:
  A "selfmoa" object in the body overrides the flags: n, window, carry, proposers, layers,
  min_ok, temperature and max_tokens (the proposers'), aggregator, use_n, instruction. The
  request's own temperature, max_tokens, seed and stop apply to the answer (the final
  aggregation); seed is also the base seed of the samples. The whole conversation is the prompt.
  Replies carry usage over every call of the run, and a "selfmoa" field with the calls,
  requests, retries and each request's latency.

access:
  With --server-key (else $SELFMOA_SERVER_KEY) clients must send "Authorization: Bearer KEY".
  A --host other than loopback is refused without one. A client's Authorization is never
  forwarded; upstream keys are found as for the one-shot command (see selfmoa --help).

stopping:
  On SIGINT or SIGTERM it stops accepting, lets the runs in flight finish (at most
  --drain-timeout seconds), and exits 0; a second Ctrl-C stops it at once (exit status 130).
  Exit status 2: a usage error; 1: it cannot listen on --host/--port."""

# The one-shot flags that configure nothing serve has: the prompt, the choice of method and models (the
# request's model names them), the output, and batch mode. Every other flag is shared, with its meaning.
_NOT_SERVE_FLAGS = frozenset({"help", "version", "prompt", "method", "model", "aggregator", "json", "stream",
                              "input", "output", "format", "trace", "diversity", "generator"})
_SERVE_HELP = {
    "samples": "samples of M per request (default: 6)",
    "aggregator_temperature": "the aggregator's temperature when a request gives none (default: 0.7)",
    "aggregator_max_tokens": "the aggregator's token limit when a request gives none (default: the server's)",
    "seed": "the seed when a request gives none: sample i gets S+i; aggregations get S",
    "concurrency": "upstream calls at once, over all requests (default: 8)",
    "api_key": "the default endpoint's key (default: as for the one-shot command, see selfmoa --help)",
}
_SERVE_FLAGS = {"host": "--host", "port": "--port", "server_key": "--server-key", "n": "--samples",
                "proposers": "--proposer", "drain_timeout": "--drain-timeout"}


def build_serve_parser() -> argparse.ArgumentParser:
    """The parser of ``selfmoa serve``: its own flags, then the one-shot flags it shares (the same actions)."""
    parser = argparse.ArgumentParser(prog="selfmoa serve", description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine only)")
    add("--port", type=int, default=8000, help="the port to listen on; 0 picks a free one (default: 8000)")
    add("--server-key", metavar="KEY", help="the key clients must send as a Bearer token "
        "(default: $SELFMOA_SERVER_KEY; none: no key asked, loopback only)")
    add("--drain-timeout", type=_finite, default=30.0, metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long runs in flight may take to finish (default: 30)")
    for action in build_parser()._actions:
        if action.dest in _NOT_SERVE_FLAGS:
            continue
        if action.dest in _SERVE_HELP:  # the same flag, its help in the words of serve
            action = copy.copy(action)
            action.help = _SERVE_HELP[action.dest]
        parser._add_action(action)
    return parser


def _main_serve(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """``selfmoa serve``: serve until SIGINT or SIGTERM, then drain and return 0."""
    parser = build_serve_parser()
    args = parser.parse_args(argv)
    try:
        instruction = _instruction_file(args.instruction_file) or DEFAULT_INSTRUCTION
        defaults = {"n": args.samples, "window": args.window, "carry": args.carry, "proposers": args.proposer,
                    "layers": args.layers, "min_ok": args.min_ok, "temperature": args.temperature,
                    "max_tokens": args.max_tokens, "aggregator_temperature": args.aggregator_temperature,
                    "aggregator_max_tokens": args.aggregator_max_tokens, "seed": args.seed,
                    "instruction": instruction, "use_n": args.use_n}
        defaults = {name: value for name, value in defaults.items() if value is not None}  # not given: the default
        client = make_client(args, environ)
        server = ModelServer(client, host=args.host, port=args.port, defaults=defaults,
                             server_key=args.server_key or environ.get("SELFMOA_SERVER_KEY") or None,
                             concurrency=args.concurrency, drain_timeout=args.drain_timeout)
    except ConfigError as exc:
        name, sep, rest = str(exc).partition("=")
        if sep and name in _SERVE_FLAGS:
            value, _, why = rest.partition(": ")
            exc = ConfigError(f"{_SERVE_FLAGS[name]} {value}: {why}")
        return _refuse(parser, exc)
    except OSError as exc:
        print(f"selfmoa serve: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda *_: stop.set())
    try:
        print(server.base_url, flush=True)  # only now: whoever reads it may signal at once
        server.start()
        while not stop.wait(0.5):
            pass
        if previous:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(f"selfmoa serve: stopping; letting the runs in flight finish (at most {args.drain_timeout:g} s)",
              file=sys.stderr)
        left = server.close()
    except KeyboardInterrupt:
        print("selfmoa serve: stopped without waiting for the runs in flight", file=sys.stderr)
        return 130
    finally:
        client.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
    if left:
        print(f"selfmoa serve: {left} runs were still in flight after --drain-timeout and were cancelled",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
