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
``Sampling``                a role's request settings: temperature, token limit, other fields, per model
``Request`` / ``Reply``     what crosses the seam between the methods and a model
``Result`` / ``Call``       the final answer, with a trace of every call made
``inject_references``       the aggregator prompt: messages + instruction + numbered references
``DEFAULT_INSTRUCTION``     the aggregator's instruction unless ``instruction=`` replaces it
``REFERENCE_INSTRUCTION``   the original MoA code's instruction, for ``layout="reference"``
``read_references``         the inverse: the references an aggregator prompt holds
``seq_plan``                Self-MoA-Seq's windows: per round, the carried copies and the new samples
``seq_rounds``              the number of Self-MoA-Seq rounds for ``n``, ``window``, ``carry``
``MAX_N``                   the most samples asked for in one request (16)
``METHODS``                 the three methods by name: ``"moa"``, ``"self-moa"``, ``"self-moa-seq"``
``vendi_score``             the diversity of a set of outputs (Vendi score)
``main``                    the command line
==========================  =================================================================

The three methods at a glance (the arguments after ``prompt`` and the models are keywords)::

    moa(prompt, proposers, aggregator, *, complete, layers=2, min_ok=1, seed=None, proposing=None, ...)
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

The files of the project
------------------------
This file is all a project that calls the methods needs: copy ``selfmoa.py`` alone. The programs that run
the methods at scale live beside it and import it (never the other way round):

* ``selfmoa_batch.py``: batch runs, ``selfmoa -i prompts.jsonl -o answers.jsonl`` (``run_batch``,
  ``read_items``, ``check_items``), resumable;
* ``selfmoa_serve.py``: ``selfmoa serve``, the methods as models behind an OpenAI-compatible endpoint
  (``ModelServer``);
* ``selfmoa_eval.py``: ``selfmoa eval``, the paper's experiments on your models and data: one pool of
  samples per model, every proposer composition, Self-MoA and Self-MoA-Seq aggregated from it, graded.

Where this file was copied alone, ``selfmoa serve``, ``selfmoa merge``, ``selfmoa eval`` and ``-i/-o`` say which
file to copy beside it.

The exact behaviour (invariants, wire format, prompt format) is specified in the ``spec/`` folder of the
project; the tests check every invariant by name.

Licence: MIT. Copyright (c) 2026 the selfmoa authors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import difflib
import email.utils
import hashlib
import http.client
import importlib
import importlib.util
import ipaddress
import itertools
import json
import math
import os
import queue
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

__version__ = "0.2.0"
__all__ = [  # noqa: RUF022 (plain sorted(), as tests/test_smoke.py checks)
    "Call", "ConfigError", "DEFAULT_INSTRUCTION", "Endpoint", "HTTPClient", "MAX_N", "METHODS", "ModelError",
    "NotEnoughProposals", "REFERENCE_INSTRUCTION", "Reply", "Request", "Result", "Sampling", "SelfMoAError",
    "inject_references", "main", "moa", "read_references", "self_moa", "self_moa_seq", "seq_plan",
    "seq_rounds", "vendi_score",
]

# The programs beside this file (selfmoa_batch.py, selfmoa_serve.py, selfmoa_eval.py, examples/) also use these
# internal names: argument checks, the shared call pool and run, the command line's flag readers and reports, the
# reading and redacting of server text. They are kept working for those files (tests/test_smoke.py checks that
# they use no others), but are no public API: code outside this project should use __all__ only.
_FOR_SIBLINGS = frozenset({
    "_check", "_is_int", "_key_problem", "_Pool", "_on_shared_pool", "_start", "_sampling", "_clean", "_redact",
    "_read_capped", "_endpoints_of", "_servers_of", "_reason", "_finite", "_instruction_file", "_refuse",
    "_method_arguments", "_method_options", "_Run", "_settings", "_check_model", "_check_window"})


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
    ``None`` when no response came), ``body`` (the start of the server's reply), ``attempts``,
    ``retryable`` (whether the last failure was of a kind worth retrying later) and ``kind``: ``"context"``
    (the prompt exceeds the model's context window), ``"thinking"`` (the token limit was spent thinking),
    ``"refused"`` (the server refused a field the caller set: ``field`` names it), or ``""``.
    """

    def __init__(self, message: str, *, model: str = "", url: str = "", status: int | None = None,
                 body: str = "", attempts: int = 1, retryable: bool = False, kind: str = "",
                 field: str | None = None):
        self.message, self.model, self.url, self.status = message, model, url, status
        self.body, self.attempts, self.retryable = body, attempts, retryable
        self.kind, self.field = kind, field
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

# The reference layout: the original MoA code's aggregator prompt (Wang et al., github.com/togethercomputer/MoA,
# utils.py), which the paper's experiments built on: its instruction, the header, then each response on a
# line of its own numbered "1. ", "2. ", ... A response holding a line that looks like "3. ..." can fake a
# boundary there, which is why the keyed layout is the default; this one is for comparing with the paper.
REFERENCE_INSTRUCTION = (
    "You have been provided with a set of responses from various open-source models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to "
    "critically evaluate the information provided in these responses, recognizing that some of it may be biased "
    "or incorrect. Your response should not simply replicate the given answers but should offer a refined, "
    "accurate, and comprehensive reply to the instruction. Ensure your response is well-structured, coherent, "
    "and adheres to the highest standards of accuracy and reliability."
)
LAYOUTS = ("keyed", "reference")  # how the references are laid out in the aggregator prompt (spec/wire.md 6)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = str | Sequence[Message]
Proposers = Sequence[str] | Sequence[Sequence[str]]  # MoA's: one list of models, or one list per proposer layer
Stream = Callable[[str], None]  # receives the final answer's text pieces as they arrive
_T = TypeVar("_T")


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


def format_references(references: Sequence[str], instruction: str | None = None, layout: str = "keyed") -> str:
    """The system-message block: the instruction, a header, then each reference between its markers.

    ``instruction`` None is ``DEFAULT_INSTRUCTION`` (``REFERENCE_INSTRUCTION`` in the reference layout). With
    ``layout="reference"``, the references are numbered lines as the original MoA code wrote them:

    >>> print(format_references(["Paris.", "Lyon."], instruction="Combine these.", layout="reference"))
    Combine these.
    <BLANKLINE>
    Responses from models:
    1. Paris.
    2. Lyon.

    The default, keyed layout:

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
    _check_layout(layout)
    if layout == "reference":
        instruction = REFERENCE_INSTRUCTION if instruction is None else instruction
        numbered = "".join(f"\n{i}. {text}" for i, text in enumerate(references, 1))
        return f"{instruction}\n\n{REFERENCES_HEADER}{numbered}"
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    key, count = reference_key(references), len(references)
    blocks = [f"<<<response {i} of {count}, key {key}>>>\n{text}\n<<<end of response {i}, key {key}>>>"
              for i, text in enumerate(references, 1)]
    return f"{instruction}\n\n{REFERENCES_HEADER}\n\n" + "\n\n".join(blocks)


def inject_references(messages: Sequence[Message], references: Sequence[str],
                      instruction: str | None = None, layout: str = "keyed") -> list[Message]:
    """A new message list: ``messages`` with the instruction and references in the system message.

    An existing system message gets the block appended after a blank line; otherwise one system message
    is put first. The other messages pass through unchanged, and ``messages`` itself is never modified.
    With no references, the messages come back as they are (a copy). ``layout`` is as for ``format_references``.

    >>> inject_references([{"role": "user", "content": "Q"}], ["A1"], "Merge.")[0]["content"][:32]
    'Merge.\\n\\nResponses from models:\\n\\n'
    >>> inject_references([{"role": "system", "content": "Be brief."}], ["A1"], "Merge.")[0]["content"][:18]
    'Be brief.\\n\\nMerge.\\n'
    """
    out = [dict(message) for message in messages]
    if not references:
        return out
    block = format_references(references, instruction, layout)
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


_MARKER = re.compile(r"[ \t]*<{0,3}[ \t]*(?:end of )?response \d+(?: of \d+)?, key ([0-9a-f]{8})[ \t]*>{0,3}[ \t\r]*")


def _is_marker(line: str, key: str) -> bool:
    """Whether ``line`` is a marker line of the block with ``key``, also as a model echoes it (fewer angle
    brackets, spaces). One pattern for every key: compiling one per block cost more than the rest of a call."""
    found = _MARKER.fullmatch(line)
    return found is not None and found.group(1) == key


def _strip_markers(text: str, key: str) -> str:
    """``text`` without the marker lines of the prompt (block key ``key``) it answers: a model may echo them.

    >>> _strip_markers("Paris.\\n<<<end of response 2, key 29d190ab>>", "29d190ab")
    'Paris.'
    """
    return "\n".join(line for line in text.split("\n") if not _is_marker(line, key))


# ======================================================================================================
# Thoughts are never references
# ======================================================================================================
#
# A thinking model served without a reasoning parser (Qwen3 on vLLM by default, many llama.cpp and Ollama
# setups) opens its reply with its thoughts, in <think> ... </think>, then answers. The thoughts (often
# thousands of tokens) are not the answer: they are removed from every reply before it becomes a reference
# or the final answer. spec/wire.md section 2 fixes the rule; _ThoughtFilter applies it to a stream.

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BLANK = " \t\r\n"  # what may stand before a thought, and is dropped after one


def split_thoughts(text: str) -> tuple[str, bool]:
    """The answer of a reply without the thoughts that open it, and whether it had any.

    While the reply, leading blanks (spaces, tabs, ``\\r``, ``\\n``) aside, starts with ``<think>``, everything up
    to and including the next ``</think>`` is removed, and the blanks after it; a ``<think>`` never closed
    makes the rest thought (the token limit ran out while thinking), leaving no answer. A reply that does not
    open with ``<think>`` is returned unchanged, whatever tags it holds further on.

    >>> split_thoughts("<think>\\nIs 7 prime? Yes.\\n</think>\\n\\n7 is prime.")
    ('7 is prime.', True)
    >>> split_thoughts("<think>\\nStill thinking when the limit"), split_thoughts("A <think> tag.")
    (('', True), ('A <think> tag.', False))
    """
    rest, thought = text.lstrip(_BLANK), False
    while rest.startswith(THINK_OPEN):
        thought = True
        end = rest.find(THINK_CLOSE, len(THINK_OPEN))
        if end < 0:
            return "", True
        rest = rest[end + len(THINK_CLOSE):].lstrip(_BLANK)
    return (rest, True) if thought else (text, False)


# ======================================================================================================
# The seam: every model call goes through one completion function
# ======================================================================================================
#
# A completion function takes a Request and returns a Reply, a string or a list of strings. It may return
# fewer texts than request.n (some servers ignore n); the methods then ask for each missing sample in a
# request of its own. It signals a failed call by raising ModelError; anything else it raises is treated
# as a bug and propagates. HTTPClient is the completion function for real servers.


MAX_N = 16  # samples asked for in one request at most (servers cap n: OpenAI at 128, some far lower)


DEFAULT_TEMPERATURE = 0.7  # the paper samples (and aggregates) at 0.7
# Request fields the methods set themselves: Sampling.fields cannot hold them.
_OWN_FIELDS = ("model", "messages", "n", "seed", "stream", "stream_options", "stop")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the requests of one role are made: the proposers' (``proposing=``) or the aggregator's
    (``aggregating=``). The methods also take a plain dict with these keys.

    - ``temperature``: None (the default) sends 0.7, the paper's, which a server that refuses temperatures
      (OpenAI's reasoning models) may have dropped, so that the model samples at its own; a number is the
      caller's choice: always sent, and a server refusing it is an error naming it.
    - ``max_tokens``: the token limit of each reply (None: the server's). Sent as ``max_tokens``, or as
      ``max_completion_tokens`` to a server that refuses ``max_tokens``.
    - ``fields``: other JSON fields for every request of the role, as the server names them:
      ``{"reasoning_effort": "high"}``, ``{"top_p": 0.9}``, ``{"chat_template_kwargs": {"enable_thinking":
      False}}``, ``{"max_completion_tokens": 4096}`` (the limit under that name). A value None sends no such
      field: ``{"temperature": None}`` sends no temperature at all.
    - ``models``: more fields for one model's requests of the role, over ``fields``: ``{"qwen3": {...}}``.

    >>> Sampling(max_tokens=4096, fields={"reasoning_effort": "high"}).request_fields("o4-mini")
    {'reasoning_effort': 'high'}
    """

    temperature: float | None = None
    max_tokens: int | None = None
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    models: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def request_fields(self, model: str) -> dict[str, Any]:
        """The fields of a request to ``model`` (``fields``, then the model's own over them), None ones left out."""
        merged = {**self.fields, **self.models.get(model, {})}
        return {name: value for name, value in merged.items() if value is not None}

    def sent_temperature(self, model: str) -> float | None:
        """The temperature a request to ``model`` carries: None when ``fields`` removes it."""
        merged = {**self.fields, **self.models.get(model, {})}
        if "temperature" in merged:  # only ever None (checked): no temperature is sent
            return None
        return DEFAULT_TEMPERATURE if self.temperature is None else self.temperature

    def params(self, prefix: str = "") -> dict[str, Any]:
        """As a Result's ``params`` (and a batch's fingerprint) report it: ``temperature`` and ``max_tokens``
        always, ``fields`` and ``models`` when given; ``prefix`` is ``"aggregator_"`` for the aggregator."""
        out: dict[str, Any] = {f"{prefix}temperature": DEFAULT_TEMPERATURE if self.temperature is None
                               else self.temperature, f"{prefix}max_tokens": self.max_tokens}
        if self.fields:
            out[f"{prefix}fields"] = dict(self.fields)
        if self.models:
            out[f"{prefix}models"] = {model: dict(fields) for model, fields in self.models.items()}
        return out


@dataclasses.dataclass(frozen=True)
class Request:
    """One chat-completion request, as the methods hand it to the completion function.

    ``temperature`` None sends none. ``fields`` are other JSON fields to send as they are (``Sampling.fields``);
    ``optional`` names the fields whose values the caller did not choose (the default temperature): a client
    may drop those when a server refuses them, and must refuse to drop any other.
    """

    model: str
    messages: tuple  # of Message dicts; never mutated
    temperature: float | None = DEFAULT_TEMPERATURE
    max_tokens: int | None = None
    n: int = 1
    seed: int | None = None
    stream: Callable[[str], None] | None = dataclasses.field(default=None, compare=False, repr=False)
    stop: tuple[str, ...] | None = None  # stop sequences (serve sets them on the final aggregation only)
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optional: frozenset[str] = frozenset()


@dataclasses.dataclass
class Reply:
    """What a completion function returns: one text per choice, with what the server reported.

    ``texts[i]`` is the text of sample ``i`` of the request, or ``None`` where the server gave no usable
    text for that position (the methods then ask for it again on its own, as for a missing one, unless its
    ``finish_reason`` is ``"length"``: the token limit was spent thinking, and asking again with the same
    limit would spend it again). ``reasoning_tokens`` counts the tokens spent thinking, where the server
    says (``usage.completion_tokens_details.reasoning_tokens``); ``adapted`` holds what the client changed
    in the request to suit the server (``{"max_tokens": None, "max_completion_tokens": 512}``: a field with
    the value sent instead, None for one not sent).
    """

    texts: list[str | None]
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    retries: int = 0
    url: str | None = None
    model: str | None = None  # the model id the server reported answering with, where it said
    reasoning_tokens: int | None = None
    adapted: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    value.texts = [text if text is None else _clean(text) for text in value.texts[:request.n]]
    value.finish_reasons = (list(value.finish_reasons) + [None] * request.n)[:len(value.texts)]
    if not value.texts or value.texts[0] is None and request.n == 1 and value.finish_reasons[0] != "length":
        raise ModelError("the reply holds no text", model=request.model, url=value.url or "")
    return value


_SURROGATES = re.compile("[\ud800-\udfff]")  # unpaired halves (json.loads joins the pairs)


def _clean(text: str) -> str:
    """Text with lone surrogates (which no encoder accepts) replaced by U+FFFD: what crosses the seam, both
    ways (a reply's texts, a request's JSON), and any server text shown.

    >>> _clean("ok \\ud83d!")
    'ok \\ufffd!'
    """
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


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
    temperature: float | None = DEFAULT_TEMPERATURE
    max_tokens: int | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: list[str | None] = dataclasses.field(default_factory=list)
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    latency: float = 0.0
    retries: int = 0
    url: str | None = None
    error: str | None = None
    adapted: dict[str, Any] = dataclasses.field(default_factory=dict)

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
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "unreported": unreported}
        if any(call.reasoning_tokens is not None for call in self.trace):  # thinking, counted in completion_tokens
            usage["reasoning_tokens"] = sum(call.reasoning_tokens or 0 for call in self.trace)
        return usage

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


def moa(prompt: Prompt, proposers: Proposers, aggregator: str, *, complete: Callable[[Request], Any],
        layers: int | None = None, proposing: Sampling | None = None, aggregating: Sampling | None = None,
        seed: int | None = None, min_ok: int = 1, concurrency: int = 8, instruction: str | None = None,
        layout: str = "keyed", use_n: bool = True, samples: Sequence[str] | None = None,
        stream: Stream | None = None) -> Result:
    """Mixture-of-Agents: ``layers - 1`` layers of proposers, then one aggregator.

    ``proposers`` is the list of proposer models of every proposer layer (a model may appear several
    times), or a list of such lists, one per layer. ``layers`` counts the aggregator, as the papers do
    (default 2: one proposer layer and the aggregator). The proposers of a layer run concurrently (at most
    ``concurrency`` calls at once), and their answers are numbered in configuration order whatever order
    they finish in. A proposer that fails is dropped, the numbering staying contiguous; a layer with fewer
    than ``min_ok`` successes raises ``NotEnoughProposals``. Proposer ``j`` of a layer gets seed
    ``seed + j``; consecutive proposers of the same model share one request with ``n`` (at most ``MAX_N``
    per request; none with ``use_n=False``). ``proposing`` and ``aggregating`` say how the proposers' and
    the aggregator's requests are made: temperature, token limit, other fields, per model (a ``Sampling``,
    or a dict of its fields).
    ``instruction`` replaces ``DEFAULT_INSTRUCTION``; ``layout`` chooses how the references are shown
    (``"keyed"``, or ``"reference"``: numbered, as the original MoA code did; see ``format_references``).
    ``stream`` receives the final answer's text pieces as they arrive.

    ``samples`` gives the first proposer layer's outputs instead of asking for them, one text per proposer
    of that layer, in order (the proposers then only name whose output each is): a run over proposals
    drawn once and reused, as an evaluation does. No call is made for them.

    >>> moa("2+2?", ["a", "b"], "c", samples=["4", "5"], complete=lambda r: str(read_references(r.messages))).answer
    "['4', '5']"
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
    settings = _settings(complete=complete, proposing=proposing, aggregating=aggregating, seed=seed,
                         concurrency=concurrency, instruction=instruction, use_n=use_n, stream=stream, layout=layout)
    _check_moa(plan=plan, aggregator=aggregator, min_ok=min_ok)
    given = None if samples is None else _given_layer(samples, plan[0])
    return _moa(messages, plan=plan, aggregator=aggregator, min_ok=min_ok, settings=settings, method="moa",
                given=given)


# The method bodies read as the algorithms. The run object (``_Run``, below the machinery banner) sends every
# call, and promises:
#   run.layer(l, models, prompt, shown=...)  asks every proposer of layer l (concurrently; repeats of one model
#       share requests with n) and returns their outcomes in configuration order: each proposer's text, or the
#       ModelError it failed with. ``shown`` says which earlier answers the prompt shows (for the trace).
#   run.aggregate(call, prompt)  sends one aggregation and waits for it: its text (any marker line it echoes
#       removed), or its ModelError raised. The final answer's aggregation is streamed to ``stream``.
#   source.take(k)  hands out Self-MoA-Seq's next k good samples, each with its number, in sample order (fewer
#       at the end, none after); failed ones are skipped, and too few good ones raise NotEnoughProposals.
# Every call goes into the trace; the pool, which call goes first, and asking again for missing samples are
# the run's business, so that nothing here but the paper's steps decides what is asked.


def _moa(messages: list[Message], *, plan: list[list[str]], aggregator: str, min_ok: int, settings: _Settings,
         method: str, given: list[str] | None = None) -> Result:
    """The MoA layer loop, shared by ``moa`` and ``self_moa``: ``plan`` holds the models of each proposer layer,
    ``given`` the first layer's outputs when the caller has them."""
    params = {"proposers": plan, "aggregator": aggregator, "layers": len(plan) + 1, **settings.params(),
              "min_ok": min_ok, **({} if given is None else {"samples_given": len(given)})}
    with _Run(settings, method=method, params=params, layers=len(plan) + 1) as run:
        references: list[str] = []  # the answers of the previous layer, in configuration order
        positions: list[int] = []  # where each of them stood in its layer
        for number, models in enumerate(plan, 1):
            # Layer 1 answers the prompt alone; layer l sees the answers of layer l-1, numbered in order.
            prompt_l = inject_references(messages, references, settings.instruction, settings.layout)
            outcomes: list[Outcome] = list(given) if number == 1 and given is not None else \
                run.layer(number, models, prompt_l, shown=positions)
            # A proposer that failed is dropped and the survivors keep their order; too few stop the run.
            positions = _survivors(outcomes, layer=number, min_ok=min_ok)
            references = [outcome for outcome in outcomes if isinstance(outcome, str)]
        # The aggregator synthesizes the last layer's answers into the final answer.
        final = Call("aggregator", layer=len(plan) + 1, model=aggregator, indices=[0], references=positions)
        answer = run.aggregate(final, inject_references(messages, references, settings.instruction, settings.layout))
        return run.result(answer)


# ======================================================================================================
# Self-MoA: one model sampled n times, then aggregated
# ======================================================================================================


def self_moa(prompt: Prompt, model: str, *, complete: Callable[[Request], Any], n: int = 6,
             aggregator: str | None = None, layers: int = 2, proposing: Sampling | None = None,
             aggregating: Sampling | None = None, seed: int | None = None, min_ok: int = 1, concurrency: int = 8,
             instruction: str | None = None, layout: str = "keyed", use_n: bool = True,
             samples: Sequence[str] | None = None, stream: Stream | None = None) -> Result:
    """Self-MoA: ``n`` samples of ``model`` at a temperature above 0, aggregated by ``aggregator``.

    The aggregator is ``model`` itself unless given. This is exactly MoA whose proposer layers hold
    ``model`` ``n`` times, so it makes ``n + 1`` calls (``n`` per proposer layer); the ``n`` samples go in one
    request with ``n`` when the server honours it. Sample ``i`` has seed ``seed + i``. ``samples`` gives the
    samples instead (``n`` is then their number, and no sample is asked for), as in ``moa``.

    >>> self_moa("2+2?", "m", n=3, complete=lambda r: "4").calls
    4
    >>> self_moa("2+2?", "m", samples=["4", "4", "5"], complete=lambda r: "4").calls
    1
    >>> self_moa("2+2?", "m", n=3, complete=lambda r: "4", proposing={"temperature": 0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    selfmoa.ConfigError: temperature=0: ...; pass a temperature above 0 (the paper samples at 0.7)
    """
    messages = as_messages(prompt)
    proposing = _sampling("proposing", proposing)
    if samples is not None:
        _check(isinstance(samples, Sequence) and not isinstance(samples, str), "samples", samples,
               "it is the list of sample texts", "pass a list of strings")
        n = len(samples)
    _check_sampled(model=model, n=n, temperature=proposing.temperature, method="Self-MoA")
    plan = _proposer_plan([model] * n, layers)
    settings = _settings(complete=complete, proposing=proposing, aggregating=aggregating, seed=seed,
                         concurrency=concurrency, instruction=instruction, use_n=use_n, stream=stream, layout=layout)
    aggregator = model if aggregator is None else aggregator
    _check_moa(plan=plan, aggregator=aggregator, min_ok=min_ok)
    given = None if samples is None else _given_layer(samples, plan[0])
    return _moa(messages, plan=plan, aggregator=aggregator, min_ok=min_ok, settings=settings, method="self-moa",
                given=given)


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
    _check_window(window, carry, n)
    plan = [(0, range(min(n, window)))]
    for start in range(window, n, window - carry):
        plan.append((carry, range(start, min(n, start + window - carry))))
    return plan


def seq_rounds(n: int, window: int = 6, carry: int = 3) -> int:
    """The number of Self-MoA-Seq rounds (aggregation calls) for ``n`` samples: ``len(seq_plan(...))``.

    >>> [seq_rounds(n) for n in (1, 6, 7, 9, 10, 30)]
    [1, 1, 2, 2, 3, 9]
    """
    _check_window(window, carry, n)
    return 1 if n <= window else 1 + math.ceil((n - window) / (window - carry))


def self_moa_seq(prompt: Prompt, model: str | None = None, *, complete: Callable[[Request], Any],
                 n: int | None = None, samples: Iterable[str] | None = None, window: int = 6, carry: int = 3,
                 aggregator: str | None = None, proposing: Sampling | None = None,
                 aggregating: Sampling | None = None, seed: int | None = None, min_ok: int = 1,
                 concurrency: int = 8, instruction: str | None = None, layout: str = "keyed", use_n: bool = True,
                 stream: Stream | None = None) -> Result:
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
    proposing = _sampling("proposing", proposing)
    if samples is None:
        n = 6 if n is None else n
        _check_sampled(model=model, n=n, temperature=proposing.temperature, method="Self-MoA-Seq")
    else:
        _check_given(samples=samples, n=n)
    aggregator = model if aggregator is None else aggregator
    _check_model("aggregator", aggregator)
    settings = _settings(complete=complete, proposing=proposing, aggregating=aggregating, seed=seed,
                         concurrency=concurrency, instruction=instruction, use_n=use_n, stream=stream, layout=layout)
    known = n if samples is None else (len(samples) if isinstance(samples, Sequence) else None)
    _check_min_ok_samples(min_ok, known)
    params = {"model": model, "aggregator": aggregator, "n": known, "window": window, "carry": carry,
              **settings.params(), "min_ok": min_ok}
    with _Run(settings, method="self-moa-seq", params=params) as run:
        # The samples: drawn from the model (all requested at once, each round's new ones in one request) or
        # the caller's, handed out in order as the rounds need them, failed ones skipped.
        source = run.seq_samples(samples, model=model, messages=messages, n=n, window=window, carry=carry,
                                 min_ok=min_ok)
        synthesis: str | None = None
        number = 0
        # Round 1 takes a whole window of samples; every later round, the next window - carry.
        while new := source.take(window if synthesis is None else window - carry):
            number += 1
            # The window: the previous synthesis carry times, first, to bias the aggregator towards it;
            # then the new samples, in order.
            shown = ([] if synthesis is None else [synthesis] * carry) + [text for _, text in new]
            call = Call("aggregator", layer=2, model=str(aggregator), indices=[0], references=[i for i, _ in new],
                        round=number, carried=len(shown) - len(new))
            synthesis = run.aggregate(call, inject_references(messages, shown, settings.instruction, settings.layout))
        assert synthesis is not None, "a source that yields no sample raises NotEnoughProposals"
        return run.result(synthesis)


# ======================================================================================================
# The methods by name (the command line's --method, serve's model prefixes, batch's method)
# ======================================================================================================

METHODS: dict[str, Callable[..., Result]] = {"moa": moa, "self-moa": self_moa, "self-moa-seq": self_moa_seq}


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
    pairs = [(p, q) for p in range(size) for q in range(p + 1, size)]
    for _ in range(100):  # each sweep zeroes every off-diagonal entry once; a few sweeps converge
        off = sum(a[p][q] ** 2 for p, q in pairs)
        if off <= tolerance ** 2:
            break
        for p, q in pairs:
            row_p, row_q = a[p], a[q]
            if abs(row_p[q]) < 1e-300:
                continue
            # The rotation angle that zeroes a[p][q]: tan(2 theta) = 2 a_pq / (a_qq - a_pp).
            theta = (row_q[q] - row_p[p]) / (2 * row_p[q])
            t = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1))
            c = 1 / math.sqrt(t * t + 1)
            s = t * c
            for row in a:  # columns p and q
                akp, akq = row[p], row[q]
                row[p], row[q] = c * akp - s * akq, s * akp + c * akq
            for k in range(size):  # rows p and q
                apk, aqk = row_p[k], row_q[k]
                row_p[k], row_q[k] = c * apk - s * aqk, s * apk + c * aqk
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


########################################################################################################
#
#   EVERYTHING BELOW IS MACHINERY.
#
#   The methods above are the paper. What follows makes them run well: the bounded call pool that
#   runs a method's calls concurrently (and keeps traces in configuration order), the argument checks,
#   the HTTP client for real servers (the completion function behind the seam), and the one-prompt
#   command line. None of it changes what a method computes. Batch runs (selfmoa_batch.py) and
#   serving (selfmoa_serve.py) live in files of their own beside this one, and import it.
#
########################################################################################################


# ======================================================================================================
# Running calls: a bounded pool, and one run's bookkeeping
# ======================================================================================================


class _Pool:
    """At most ``workers`` threads taking calls in priority order (lowest first, then FIFO), each started when a
    call finds no thread free.

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
        self._idle = threading.Semaphore(0)  # released by a worker that finished a call: a thread is free
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, priority: tuple, fn: Callable, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:  # a late follow-up of a run that has already ended: never runs
                future.cancel()
                return future
            self._queue.put((priority, next(self._order), future, fn, args))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.workers:  # none is free
                thread = threading.Thread(target=self._work, name=f"selfmoa-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if future is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 (handed to whoever waits on the future)
                    future.set_exception(exc)
            self._idle.release()

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
class _Settings:
    """The checked arguments every method shares."""

    complete: Callable[[Request], Any]
    concurrency: int
    proposing: Sampling
    aggregating: Sampling
    seed: int | None
    instruction: str
    layout: str
    use_n: bool
    stream: Callable[[str], None] | None

    def params(self) -> dict[str, Any]:
        """The sampling arguments as a Result's ``params`` reports them."""
        return {**self.proposing.params(), **self.aggregating.params("aggregator_"), "seed": self.seed,
                **({} if self.layout == "keyed" else {"layout": self.layout})}

    def request(self, role: str, model: str, messages: tuple, **rest: Any) -> Request:
        """A request of ``role`` (``"proposer"`` or ``"aggregator"``) to ``model``, with the role's settings."""
        sampling = self.proposing if role == "proposer" else self.aggregating
        temperature = sampling.sent_temperature(model)
        optional = frozenset({"temperature"} if sampling.temperature is None and temperature is not None else ())
        return Request(model=model, messages=messages, temperature=temperature, max_tokens=sampling.max_tokens,
                       fields=sampling.request_fields(model), optional=optional, **rest)


class _Run:
    """One method run: the completion function, the pool, and the trace of every request sent.

    A run never stops early. Which requests it sends depends on the replies alone: a failure stops it from
    starting new layers or rounds, but every request already issued (and the follow-ups its reply calls
    for) is still sent and awaited before the error is raised, whatever the concurrency or the timing.
    So ``partial`` lists every request sent, each with its outcome. Use it as a context manager: an error
    leaving the block gets ``partial``; the run's own pool is shut down.
    """

    def __init__(self, settings: _Settings, *, method: str, params: dict, layers: int = 2):
        self.settings, self.method, self.params = settings, method, params
        self.layers = layers  # MoA's layers, the aggregator's included: the longest chain of calls
        self.source: _Generated | _Given | None = None  # Self-MoA-Seq's samples
        self.rounds = 0  # Self-MoA-Seq's rounds aggregated so far
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
                    exc.partial = self._result("", dict(self.params))  # type: ignore[attr-defined]
        finally:
            if self._owned:
                self.pool.shutdown()

    def result(self, answer: str) -> Result:
        """The run's Result: ``answer``, the trace, and the parameters (Self-MoA-Seq's with the samples and
        rounds actually aggregated)."""
        params = dict(self.params)
        if self.source is not None:
            params["n"], params["rounds"] = self.source.count, self.rounds
        return self._result(answer, params)

    def _result(self, answer: str, params: dict) -> Result:
        with self._lock:
            trace = sorted(self.trace, key=Call.sort_key)
        return Result(answer, self.method, trace, params)

    def seq_samples(self, samples: Iterable[str] | None, *, model: str | None, messages: list[Message],
                    n: int | None, window: int, carry: int, min_ok: int) -> _Generated | _Given:
        """Self-MoA-Seq's samples, handed out in order by ``take``: the caller's ``samples``, or drawn from
        ``model`` (all requested now, one request per round's new samples)."""
        self.source = (_Given(samples, min_ok=min_ok) if samples is not None else
                       _Generated(self, model=model, messages=messages, n=n, window=window, carry=carry,
                                  min_ok=min_ok))
        return self.source

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
        call.n, call.seed, call.fields = request.n, request.seed, dict(request.fields)  # as sent, unless adapted
        call.temperature, call.max_tokens = request.temperature, request.max_tokens
        started = time.perf_counter()
        try:
            outcome: Reply | ModelError = _as_reply(self.settings.complete(request), request)
        except ModelError as exc:
            outcome = exc
        except Exception as exc:  # a bug in the completion function: recorded, then it propagates
            call.error = f"{type(exc).__name__}: {exc}"
            self._record(call, started)
            raise
        if isinstance(outcome, Reply):
            call.prompt_tokens, call.completion_tokens = outcome.prompt_tokens, outcome.completion_tokens
            call.reasoning_tokens, call.retries, call.url = outcome.reasoning_tokens, outcome.retries, outcome.url
            _sent_as(call, outcome.adapted)
            outcome = self._answers(call, request, outcome)
        if isinstance(outcome, ModelError):
            outcome = self._in_context(call, outcome)
            call.error, call.url = str(outcome), outcome.url or call.url
            call.retries = max(call.retries, outcome.attempts - 1)
        self._record(call, started)
        return outcome

    def _answers(self, call: Call, request: Request, reply: Reply) -> Reply | ModelError:
        """The reply's answers: each text without the thoughts that open it (``split_thoughts``) and without
        the marker lines of its prompt's block (a model may echo them). A position left with no answer and
        ``finish_reason`` ``"length"`` (content null, or an unclosed thought) spent its token limit thinking: it
        fails for good, as asking again with the same limit would spend it again; with ``n = 1`` the call fails."""
        block = _block_key(request.messages[0]["content"]) if request.messages[0]["role"] == "system" else None
        texts: list[str | None] = []
        for text in reply.texts:
            if text is not None:
                text, thought = split_thoughts(text)  # the thoughts that open it are no answer
                if block is not None:  # a model may echo the markers of the prompt it answers: they are no answer
                    text = _strip_markers(text, block[1])
                text = None if thought and not text.strip(_BLANK) else text  # only thought: wire.md's blanks
            texts.append(text)
        reply.texts = texts
        call.outputs, call.finish_reasons = texts, reply.finish_reasons
        if request.n == 1 and texts[0] is None:
            if reply.finish_reasons[0] == "length":
                return self._spent(call, request, reply.url)
            return ModelError("the reply holds no answer, only thoughts", model=request.model, url=reply.url or "",
                              status=200)
        return reply

    def _in_context(self, call: Call, error: ModelError) -> ModelError:
        """A failure that the caller can fix, said in the caller's words: a context window exceeded (which call,
        and what shortens its prompt), or a value the caller set that the server refused (which setting)."""
        aggregator = call.role == "aggregator"
        where = (f"the aggregator's prompt of round {call.round}" if call.round else
                 f"the aggregator's prompt (layer {call.layer})" if aggregator else
                 f"the prompt of a proposer of layer {call.layer}")
        if error.kind == "context":
            fix = ("show fewer or shorter references: a smaller window= or n=, a lower max_tokens= for the "
                   "proposers (--window, -n, --max-tokens)" if aggregator or call.layer > 1 else
                   "shorten the prompt, or lower the token limit (max_tokens=, --max-tokens)")
            message = (f"{where} exceeds the model's context window (not retried): {error.message}; {fix}, or use "
                       f"a model with a longer context")
        elif error.kind == "refused" and error.field:
            field = error.field
            if field in ("temperature", "max_tokens"):
                name = ("aggregator_" if aggregator else "") + field
                setting = f"{name}= (--{name.replace('_', '-')} on the command line)"
            elif field == "seed":
                setting = "seed= (--seed)"
            else:
                role = "aggregator" if aggregator else "proposer"
                setting = (f"{'aggregating' if aggregator else 'proposing'}'s fields[{field!r}] (--field or "
                           f"--{role}-field {field}=... on the command line)")
            message = (f"{error.message}; {field} was set explicitly, as {setting}, so it is never dropped: leave "
                       f"it out or change it")
        else:
            return error
        return ModelError(message, model=error.model, url=error.url, status=error.status, body=error.body,
                          attempts=error.attempts, retryable=False, kind=error.kind, field=error.field)

    def _spent(self, call: Call, request: Request, url: str | None) -> ModelError:
        """The failure of a sample (or aggregation) whose token limit was spent thinking, naming the setting."""
        name = "max_tokens" if call.role == "proposer" else "aggregator_max_tokens"
        flag = "--max-tokens" if call.role == "proposer" else "--aggregator-max-tokens"
        limit = (f"the token limit ({name}={request.max_tokens})" if request.max_tokens is not None else
                 "the server's default token limit")
        return ModelError(f"{limit} was spent thinking: the reply holds no answer, only thoughts (finish_reason "
                          f"'length'); raise {name} ({flag} on the command line), or ask for less reasoning",
                          model=request.model, url=url or "", status=200, kind="thinking")

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
        base = self.settings.seed
        slots: list[concurrent.futures.Future] = [concurrent.futures.Future() for _ in range(count)]
        frozen = tuple(messages)

        def ask(start: int, size: int) -> None:
            seed = None if base is None else base + first + start
            request = self.settings.request("proposer", model, frozen, n=size, seed=seed)
            call = Call("proposer", layer=layer, model=model, indices=list(range(first + start, first + start + size)),
                        references=list(references))
            future = self._submit(call, remaining, answer, start, size, call, request)
            future.add_done_callback(lambda done: never_sent(start, size) if done.cancelled() else None)

        def answer(start: int, size: int, call: Call, request: Request) -> None:
            try:
                outcome = self._call(call, request)
            except BaseException as exc:  # a bug in the completion function: surface it to the waiter
                for slot in slots[start:start + size]:
                    slot.set_exception(exc)
                raise
            if isinstance(outcome, ModelError):
                for slot in slots[start:start + size]:
                    slot.set_result(outcome)
                return
            for offset, (text, reason) in enumerate(zip(outcome.texts, outcome.finish_reasons)):
                if text is None and reason == "length":  # spent thinking: the same limit would spend it again
                    slots[start + offset].set_result(self._spent(call, request, outcome.url))
                elif text is None:
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

    def layer(self, number: int, models: Sequence[str], messages: list[Message], *,
              shown: list[int]) -> list[Outcome]:
        """Ask every proposer of one layer, concurrently; their outcomes in configuration order.

        Consecutive proposers of one model share requests with ``n`` (see ``samples``)."""
        remaining = self.layers + 1 - number  # this layer, the later ones and the aggregator
        slots: list[concurrent.futures.Future] = []
        for model, run_of in itertools.groupby(enumerate(models), key=lambda item: item[1]):
            positions = [position for position, _ in run_of]
            slots += self.samples(model=model, messages=messages, first=positions[0], count=len(positions),
                                  layer=number, references=shown, remaining=remaining)
        return [slot.result() for slot in slots]

    def aggregate(self, call: Call, messages: list[Message]) -> str:
        """One aggregation call, waited for: its text, with any echoed marker line removed (also from what is
        streamed). A failure raises its ModelError. The final answer's aggregation is the one streamed: MoA's
        aggregator, and the Self-MoA-Seq round known to be the last without waiting for another sample."""
        if call.round is None:
            remaining, final = self.layers + 1 - call.layer, True
        else:  # a round: the rounds left are chained after it
            assert self.source is not None, "Self-MoA-Seq's rounds aggregate its samples"
            remaining, final = max(1, self.source.rounds - call.round + 1), self.source.exhausted
            self.rounds = call.round
        stream = self.settings.stream if final else None
        block = _block_key(messages[0]["content"]) if self.settings.layout == "keyed" else None
        assert block is not None or self.settings.layout != "keyed", "an aggregation always shows references"
        markers = None if stream is None or block is None else _MarkerFilter(stream, block[1])
        inner = stream if markers is None else markers
        shown = None if inner is None else _ThoughtFilter(inner)  # thoughts first, then echoed markers
        request = self.settings.request("aggregator", call.model, tuple(messages), n=1, seed=self.settings.seed,
                                        stream=shown)
        outcome = self._submit(call, remaining, self._call, call, request).result()
        if isinstance(outcome, ModelError):
            raise outcome
        if shown is not None:
            shown.close()
        if markers is not None:
            markers.close()
        assert outcome.texts[0] is not None, "a reply to n = 1 without an answer is a ModelError"
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


def _sent_as(call: Call, adapted: Mapping[str, Any]) -> None:
    """Record in a trace what the client actually sent, where it adapted the request to the server."""
    if not adapted:
        return
    call.adapted = dict(adapted)
    fields = dict(call.fields)
    for name, value in adapted.items():
        if name == "temperature":
            call.temperature = value
        elif name == "max_tokens":
            call.max_tokens = value
        elif name != "n":
            fields[name] = value
    call.fields = {name: value for name, value in fields.items() if value is not None}


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


class _ThoughtFilter:
    """Passes a streamed answer on without the thoughts that ``split_thoughts`` removes from the text: what
    could still be (or is) a thought is held back, so no piece of a thought is ever passed on, and what is
    passed joins to exactly the answer returned."""

    def __init__(self, stream: Callable[[str], None]):
        self.stream, self.held, self.deciding, self.thought = stream, "", True, False

    def __call__(self, piece: str) -> None:
        if not self.deciding:
            if piece:
                self.stream(piece)
            return
        self.held += piece
        while True:
            rest = self.held.lstrip(_BLANK)
            if rest.startswith(THINK_OPEN):  # a thought: wait for its end, then drop it and the space after
                end = rest.find(THINK_CLOSE, len(THINK_OPEN))
                if end < 0:
                    return
                self.held, self.thought = rest[end + len(THINK_CLOSE):], True
                continue
            if THINK_OPEN.startswith(rest):  # "", or "<thi": may still open a thought
                return
            text = rest if self.thought else self.held  # decided: an answer
            self.held, self.deciding = "", False
            self.stream(text)
            return

    def close(self) -> None:
        """The stream ended: what was held is the answer, unless it is (the start of) a thought."""
        rest = self.held.lstrip(_BLANK)
        if self.deciding and not rest.startswith(THINK_OPEN) and rest:
            self.stream(rest if self.thought else self.held)
        elif self.deciding and not self.thought and self.held and not rest:
            self.stream(self.held)  # only whitespace: the answer is that
        self.held, self.deciding = "", False


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
        text = "" if self.passing or _is_marker(self.line, self.key) else self._pass_line()
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


def _sampling(name: str, given: Any) -> Sampling:
    """A role's settings, checked: a ``Sampling``, a dict of its fields, or None for the defaults.

    A bad part is named as the command line's flag is once translated: ``temperature=...`` for the
    proposers' temperature, ``aggregator_temperature=...`` for the aggregator's, ``fields[top_p]=...``.
    """
    if given is None:
        return Sampling()
    if isinstance(given, Mapping) and not isinstance(given, Sampling):
        known = [f.name for f in dataclasses.fields(Sampling)]
        unknown = [key for key in given if key not in known]
        _check(not unknown, name, dict(given), f"{', '.join(map(repr, unknown))} is not a setting of a role",
               f"use {', '.join(known)}")
        given = Sampling(**given)
    _check(isinstance(given, Sampling), name, given, "it holds a role's request settings",
           'pass Sampling(...), a dict like {"temperature": 1.0, "max_tokens": 512}, or None')
    prefix = "" if name == "proposing" else "aggregator_"
    temperature, max_tokens = given.temperature, given.max_tokens
    _check(temperature is None or (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                                   and 0 <= temperature <= 2), f"{prefix}temperature", temperature,
           "chat-completions servers accept 0 to 2", "pass a number between 0 and 2, or None for the default (0.7)")
    _check(max_tokens is None or (_is_int(max_tokens) and max_tokens >= 1), f"{prefix}max_tokens", max_tokens,
           "it limits the tokens generated per reply", "pass an integer >= 1, or None for the server's default")
    _check(isinstance(given.fields, Mapping), f"{prefix}fields", given.fields, "it maps request fields to values",
           'pass a dict like {"top_p": 0.9}')
    _check(isinstance(given.models, Mapping) and all(isinstance(m, str) and m and isinstance(f, Mapping)
                                                     for m, f in given.models.items()),
           f"{prefix}models", given.models, "it maps a model name to that model's own request fields",
           'pass a dict like {"qwen3": {"top_p": 0.9}}')
    for where, fields in [(f"{prefix}fields", given.fields)] + [(f"{prefix}models[{model}]", fields) for
                                                               model, fields in given.models.items()]:
        for key, value in fields.items():
            _check(isinstance(key, str) and key != "", where, dict(fields), "a field name is a non-empty string",
                   "name the fields as the server does")
            _check(key not in _OWN_FIELDS, f"{where}[{key}]", value, "the methods set this field themselves",
                   f"leave {key} out")
            _check(key not in ("temperature", "max_tokens") or value is None, f"{where}[{key}]", value,
                   f"the {key} of a role is its own setting", f"pass {prefix}{key}= instead (None here sends none)")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                _check(False, f"{where}[{key}]", value, "a request field is sent as JSON",
                       "pass strings, numbers, booleans, None, lists and dicts")
            _check(not (max_tokens is not None and key == "max_completion_tokens" and value is not None),
                   f"{prefix}max_tokens", max_tokens, "a max_completion_tokens field sets the token limit as well",
                   "give the limit once: as max_tokens, or as the field")
    return given


def _check_model(name: str, value: Any) -> None:
    _check(isinstance(value, str) and value.strip() != "", name, value, "a model name is a non-empty string",
           "pass the name the server knows the model by")


def _settings(*, complete: Any, proposing: Any, aggregating: Any, seed: Any, concurrency: Any, instruction: Any,
              use_n: Any, stream: Any, layout: Any = "keyed") -> _Settings:
    """The arguments every method shares, checked."""
    proposing, aggregating = _sampling("proposing", proposing), _sampling("aggregating", aggregating)
    _check(seed is None or _is_int(seed), "seed", seed, "sample i is drawn with seed + i",
           "pass an integer, or None")
    _check_layout(layout)
    if instruction is None:
        instruction = REFERENCE_INSTRUCTION if layout == "reference" else DEFAULT_INSTRUCTION
    _check(isinstance(instruction, str) and instruction.strip() != "", "instruction", instruction,
           "it tells the aggregator what to do with the references", "pass a non-empty string, or None")
    _check(stream is None or callable(stream), "stream", stream, "it receives the final answer's text pieces",
           "pass a function taking a str, or None")
    return _Settings(complete=complete, concurrency=concurrency, proposing=proposing, aggregating=aggregating,
                     seed=seed, instruction=instruction, layout=layout, use_n=bool(use_n), stream=stream)


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
    _check(not (isinstance(temperature, (int, float)) and temperature <= 0),  # other bad values: _sampling
           "temperature", temperature, f"{method}'s diversity comes from sampling; at 0 every sample is the same",
           "pass a temperature above 0 (the paper samples at 0.7)")


def _check_layout(layout: Any) -> None:
    _check(layout in LAYOUTS, "layout", layout, "the references are laid out keyed or numbered as in the original "
           "MoA code", 'pass layout="keyed" (the default) or layout="reference"')


def _check_window(window: Any, carry: Any, n: Any = 1) -> None:
    _check(_is_int(window) and window >= 2, "window", window,
           "each round must hold the carried synthesis and at least one new sample", "pass window >= 2 (default 6)")
    _check(_is_int(carry) and 1 <= carry < window, "carry", carry,
           f"carry copies of the synthesis plus at least one new sample must fit in window={window}",
           f"pass carry between 1 and {window - 1} (default 3)")
    _check(_is_int(n) and n >= 1, "n", n, "there must be at least one sample", "pass n >= 1")


def _check_given(*, samples: Any, n: Any) -> None:
    _check(n is None, "n", n, "the samples were given, so there is nothing to generate",
           "pass either samples= or n=, not both")
    _check(isinstance(samples, Iterable) and not isinstance(samples, (str, bytes, Mapping)), "samples",
           samples, "it is an iterable of sample texts", 'pass a list or generator of strings')
    _check(not (isinstance(samples, Sequence) and len(samples) == 0), "samples", samples,
           "there is nothing to aggregate", "pass at least one sample text")


def _given_layer(samples: Any, proposers: list[str]) -> list[str]:
    """The given first-layer outputs of MoA and Self-MoA, checked: one string per proposer of that layer."""
    _check(isinstance(samples, Sequence) and not isinstance(samples, str) and len(samples) == len(proposers),
           "samples", samples, f"the first proposer layer has {len(proposers)} proposers, one given output each",
           f"pass a list of {len(proposers)} strings, in proposer order")
    for i, text in enumerate(samples):
        _check(isinstance(text, str), f"samples[{i}]", text, "a sample is a string of text", "pass the sample texts")
    return list(samples)


def _check_min_ok_samples(min_ok: Any, known: int | None) -> None:
    """Self-MoA-Seq's min_ok: 1..n for generated samples, 1..len(samples) for a list, >= 1 for a generator."""
    _check(_is_int(min_ok) and min_ok >= 1 and (known is None or min_ok <= known), "min_ok", min_ok,
           "it is the fewest samples that must succeed", f"pass min_ok between 1 and {known or 'the sample count'}")


# ======================================================================================================
# HTTPClient: the completion function for OpenAI-compatible servers
# ======================================================================================================

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
_INTERRUPTED = "interrupted: the client was aborted"
MAX_REPLY_BYTES = 32 * 2**20  # the largest reply body read (HTTPClient's max_reply_bytes); a stream counts whole
MAX_EVENT_LINE = 2**20  # the longest line of a streamed reply (one event)
MAX_ERROR_BYTES = 2**16  # how much of an error reply is read; the rest is dropped with its connection
MAX_INTERIM = 32  # interim (1xx) responses skipped before a reply at most (a server may send any number)
LIST_WITHIN = 5.0  # seconds a server may take to list its models (GET /models) before it counts as listing none
SHOWN_MESSAGE, SHOWN_BODY = 600, 500  # characters of server text kept in a ModelError's message and body

_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # shown to a terminal, they could rewrite what it shows


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


class _FinalResponse(http.client.HTTPResponse):
    """A reply read past every interim response: HTTP lets a server send any number of 1xx responses (102
    Processing, 103 Early Hints, each with headers of its own) before the final one, and a client must skip
    them. http.client skips only 100 Continue. 101 (a protocol switch, never asked for) is left as it is."""

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(MAX_INTERIM):
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim response's headers, skipped (each bounded)
        raise http.client.HTTPException(f"more than {MAX_INTERIM} interim (1xx) responses before the reply")

    # A reply cut off by its attempt's deadline (the watchdog shuts the socket) must never read as whole: a
    # body that runs to the connection's close (no Content-Length, not chunked) would end there looking
    # complete. Its end is checked so (the other bodies know their end: cut short, they raise IncompleteRead).
    attempt: _Attempt | None = None  # set by HTTPClient: the attempt whose deadline bounds this reply

    def _ended(self, data: bytes, amount: int | None) -> bytes:
        if (self.attempt is not None and self.attempt.expired and self.length is None and not self.chunked
                and amount != 0 and (not data or self.isclosed())):
            raise TimeoutError("the reply was cut off at the deadline")
        return data

    def read(self, amt: int | None = None) -> bytes:
        return self._ended(super().read(amt), amt)

    def read1(self, n: int = -1) -> bytes:
        return self._ended(super().read1(n), n)

    def readline(self, limit: int | None = -1) -> bytes:
        return self._ended(super().readline(-1 if limit is None else limit), limit)


class _NoDelay:
    """http.client sends a request's headers and body in two writes; with Nagle's algorithm on, the second
    can wait for the server's delayed ACK (tens of milliseconds). TCP_NODELAY sends both at once. Replies
    are read past interim (1xx) responses."""

    response_class: type[http.client.HTTPResponse] = _FinalResponse

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
        # kept: http.client drops .sock while a read-to-close reply still reads from it
        self.socket = self.sock  # type: ignore[attr-defined]


class _HTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


# --- proxies, as the environment asks for them (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) -------------


class _ForwardedHTTPConnection(_HTTPConnection):
    """A plain-HTTP request sent through an HTTP proxy: the request line names the whole URL."""

    def __init__(self, proxy: urllib.parse.SplitResult, target: str, authorization: str | None, timeout: float):
        super().__init__(proxy.hostname or "", proxy.port or 80, timeout=timeout)
        self.target, self.authorization = target, authorization

    def putrequest(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        super().putrequest(method, self.target + url if url.startswith("/") else url, *args, **kwargs)
        if self.authorization:
            self.putheader("Proxy-Authorization", self.authorization)


def _environment_proxies() -> dict[str, str]:
    """The proxy settings of the environment, read as httpx and requests read them: ``HTTP_PROXY`` for http
    URLs, ``HTTPS_PROXY`` for https, ``ALL_PROXY`` for both, ``NO_PROXY`` for the hosts that bypass them
    (names in either case, the lower-case one first). Keys: ``http``, ``https``, ``all``, ``no``.

    Raises ConfigError for a proxy selfmoa cannot use (only ``http://`` proxies: https through them by
    CONNECT), naming the variable; the URL is shown without its password."""
    import urllib.request

    proxies = {scheme: url for scheme, url in urllib.request.getproxies_environment().items()
               if scheme in ("http", "https", "all", "no") and url.strip()}
    for scheme in ("http", "https", "all"):
        url = proxies.get(scheme)
        if url is None:
            continue
        if "://" not in url:
            url = proxies[scheme] = "http://" + url  # a bare host:port, as curl and requests read it
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # noqa: B018 (a port that is not a number raises)
        except ValueError:
            parts = parts._replace(netloc="?")
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ConfigError(f"{scheme.upper()}_PROXY={_public_url(url)}: selfmoa goes through http:// proxies "
                              f"only (https URLs by CONNECT through them), not {parts.scheme or 'this'}; point it "
                              f"at an http:// proxy, or unset it to connect directly")
    return proxies


def _proxy_for(proxies: Mapping[str, str], scheme: str, host: str) -> str | None:
    """The proxy URL for a server, or None to connect directly: loopback never goes through a proxy, and
    ``NO_PROXY`` (host names, domain suffixes, ``*``) lists more hosts that do not.

    >>> _proxy_for({"https": "http://proxy:3128", "no": "internal.example"}, "https", "api.openai.com")
    'http://proxy:3128'
    >>> _proxy_for({"https": "http://proxy:3128", "no": "internal.example"}, "https", "gpu.internal.example")
    >>> _proxy_for({"all": "http://proxy:3128"}, "http", "127.0.0.1")
    """
    import urllib.request

    url = proxies.get(scheme) or proxies.get("all")
    if url is None or host == "localhost" or host.endswith(".localhost"):
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    if proxies.get("no") and urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            host, {"no": proxies["no"]}):
        return None
    return url


def _connection(parts: urllib.parse.SplitResult, timeout: float,
                proxies: Mapping[str, str]) -> http.client.HTTPConnection:
    """A new (unconnected) connection to the server of ``parts``: direct, or through the proxy the
    environment names for it (CONNECT for https, so that TLS runs end to end with the server itself)."""
    https = parts.scheme == "https"
    proxy = _proxy_for(proxies, parts.scheme, parts.hostname or "")
    if proxy is None:
        return (_HTTPSConnection if https else _HTTPConnection)(parts.hostname or "", parts.port, timeout=timeout)
    proxy_parts = urllib.parse.urlsplit(proxy)
    authorization = None
    if proxy_parts.username is not None:
        import base64

        credentials = (urllib.parse.unquote(proxy_parts.username) + ":"
                       + urllib.parse.unquote(proxy_parts.password or ""))
        authorization = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    host = parts.hostname or ""
    if not https:
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        return _ForwardedHTTPConnection(proxy_parts, f"http://{netloc}", authorization, timeout)
    connection = _HTTPSConnection(proxy_parts.hostname or "", proxy_parts.port or 80, timeout=timeout)
    connection.set_tunnel(host, parts.port or 443, headers={"Proxy-Authorization": authorization}
                          if authorization else None)
    return connection


def _send_request(connection: http.client.HTTPConnection, endpoint: Endpoint, tail: str, payload: bytes | None,
                  accept: str) -> None:
    """POST ``payload`` (JSON), or GET without one, to ``{base_url}{tail}`` with its query string and its key."""
    parts = endpoint._parts
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    headers |= {"User-Agent": f"selfmoa/{__version__}", "Accept": accept}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    connection.request("GET" if payload is None else "POST", parts.path.rstrip("/") + tail
                       + (f"?{parts.query}" if parts.query else ""), body=payload, headers=headers)


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
        self.endpoint: Endpoint | None = None  # the replica it happened on, set when no other one is left


class _Attempt:
    """Internal: one attempt in flight, which the deadline watchdog, ``abort()`` or ``cancel()`` may cut off."""

    __slots__ = ("connection", "deadline", "expired", "shown", "owner", "cancelled")

    def __init__(self, connection: http.client.HTTPConnection, deadline: float):
        self.connection, self.deadline, self.expired = connection, deadline, False
        self.shown = False  # whether streamed text was passed on (then the attempt cannot be retried)
        self.owner = getattr(_CALLER, "owner", None)  # whose call it is (HTTPClient.on_behalf_of), if said
        self.cancelled = False


# Internal: the owner of the calls a thread makes, set by ``HTTPClient.on_behalf_of`` for a program that runs
# calls for several owners (serve: one per client request), so that ``HTTPClient.cancel(owner)`` can end them.
_CALLER = threading.local()


class _Tally:
    """Internal: one call's count of its attempts, of the extra ones among them (failovers, 404 hand-offs and
    retries: the ``retries`` its Reply reports), and whether it already replaced a stale kept-alive connection."""

    __slots__ = ("attempts", "extra", "reconnected")

    def __init__(self) -> None:
        self.attempts, self.extra, self.reconnected = 0, 0, False


_SAFE_FIELDS = frozenset({"model", "messages", "stream", "stream_options"})  # fields no server refuses
PROBE_WAIT = 2.0  # seconds the calls behind a server's first request wait for it (a refusal comes back at once)


class _Learned:
    """Internal: what one server refuses and accepts for one model, learned from its replies (wire.md section 8).
    ``probe`` is held by the one request that tries fields not yet ``accepted``."""

    __slots__ = ("renamed", "single", "dropped", "refused", "accepted", "probe")

    def __init__(self) -> None:
        self.renamed, self.single = False, False  # max_tokens sent as max_completion_tokens; n sent as 1
        self.dropped: set[str] = set()  # optional fields not sent (the default temperature)
        self.refused: dict[str, str] = {}  # fields refused that the caller chose: the server's reason
        self.accepted: frozenset[str] = frozenset()  # fields a 200 reply accepted
        self.probe = threading.Lock()


_CONTEXT = re.compile(r"context[ _-]?(length|window|size)|maximum context|too many tokens|prompt is too long|"
                      r"exceeds? (the )?(model'?s? )?(max(imum)? )?(context|token limit)", re.IGNORECASE)


def _refusal(text: str, body: Mapping[str, Any]) -> str | None:
    """What a 4xx error body says the server refuses in ``body``: ``"context"`` (the prompt exceeds the
    context window, in OpenAI's, vLLM's, llama.cpp's or another wording), the name of a request field (the
    error's ``param``, else a field of the body named in its message), or None.

    >>> _refusal('{"error": {"message": "Unsupported parameter", "param": "max_tokens"}}', {"max_tokens": 9})
    'max_tokens'
    >>> _refusal('{"object": "error", "message": "This model\\'s maximum context length is 4096 tokens."}', {})
    'context'
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    error = error if isinstance(error, dict) else data if isinstance(data, dict) else {}
    given = error.get("message")
    message: str = given if isinstance(given, str) else text
    code, kind, param = (str(error.get(key) or "") for key in ("code", "type", "param"))
    if code == "context_length_exceeded" or kind == "exceed_context_size_error" or _CONTEXT.search(message):
        return "context"
    if param in body and param not in _SAFE_FIELDS:
        return param
    for name in sorted(set(body) - _SAFE_FIELDS, key=len, reverse=True):  # max_completion_tokens before max_tokens
        if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message):
            return name
    return None


def _to_stderr(line: str) -> None:
    print(f"selfmoa: {line}", file=sys.stderr, flush=True)


COOL_AFTER = 3  # failures in a row that take a replica out for HTTPClient's cooldown (a refusal: at once)


class _Server:
    """Internal: what the client knows of one server: calls in flight, failures in a row, when its
    cool-down ends, and the requests it was sent (and how many failed) for the summary."""

    __slots__ = ("url", "in_flight", "failures", "cool_until", "requests", "failed")

    def __init__(self, url: str):
        self.url, self.in_flight, self.failures, self.cool_until, self.requests, self.failed = url, 0, 0, 0.0, 0, 0


class _Replicas:
    """Internal: the replica bookkeeping of one client, shared by everything sent through it. ``pick`` chooses
    the server of an attempt and counts it in flight; ``settle`` counts the attempt's end (and cools a server
    down that refuses, or fails ``COOL_AFTER`` times in a row); ``counts`` is the summary ``servers()`` shows."""

    def __init__(self, endpoints: Iterable[Endpoint], *, max_in_flight: int | None, cooldown: float,
                 aborted: threading.Event):
        self.max_in_flight, self.cooldown, self._aborted = max_in_flight, cooldown, aborted
        self._servers = {e.base_url: _Server(_public_url(e.base_url)) for e in endpoints}
        self._turns: dict[tuple, int] = {}
        self._slots = threading.Condition(threading.Lock())

    def pick(self, replicas: list[Endpoint], failed_here: set[str]) -> Endpoint | None:
        """The replica for the next attempt, counted in flight: of those this call has not failed on (else
        all), the ones not cooling down (else the one back soonest), with a free slot (else wait for one),
        the one with the fewest calls in flight; ties go in turn. None once the client is aborted."""
        group = tuple(r.base_url for r in replicas)
        servers = self._servers
        with self._slots:
            while not self._aborted.is_set():
                now, turn = time.monotonic(), self._turns.get(group, 0)
                in_turn = [replicas[(turn + k) % len(replicas)] for k in range(len(replicas))]
                fresh = [r for r in in_turn if r.base_url not in failed_here] or in_turn
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
        return None

    def settle(self, endpoint: Endpoint, outcome: str) -> None:
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

    def can_fail_over(self, replicas: list[Endpoint], failed_here: set[str]) -> bool:
        """Whether a replica this call has not failed on is not cooling down: the call goes there at once."""
        now = time.monotonic()
        with self._slots:
            return any(r.base_url not in failed_here and self._servers[r.base_url].cool_until <= now
                       for r in replicas)

    def counts(self) -> dict[str, dict[str, int]]:
        with self._slots:
            return {server.url: {"requests": server.requests, "failed": server.failed}
                    for server in self._servers.values()}

    def wake(self) -> None:
        """Wake every attempt waiting for a free slot (the client was aborted: they give up)."""
        with self._slots:
            self._slots.notify_all()


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
    - Today's servers (spec/wire.md section 8): a refusal that can be met without changing what was asked
      is met, once per server and model for the life of the client, and announced once (``announce``, by
      default a line on stderr): ``max_tokens`` refused -> ``max_completion_tokens``; a 400 or 422 to a
      request with ``n > 1`` -> ``n = 1``; a refused temperature named in ``request.optional`` -> none sent.
      The first request to a server and model with fields not yet accepted goes alone, so each adaptation
      costs one refused request. A refused field the caller chose is a ModelError with ``kind="refused"``;
      a prompt beyond the context window (each server's way of saying so) one with ``kind="context"``.
      ``adaptations()`` lists what was adapted; each Reply's ``adapted`` what its request was sent as.
    - ``abort()`` ends every call in flight at once and makes later calls fail (the command line's Ctrl-C).
    - For a proxy: ``relay(model, body)`` sends a request as a client wrote it and yields the server's reply
      unread, after the same replica choice, failover, retries and deadline as a call; ``models()`` lists the
      model names its servers report.
    """

    def __init__(self, base_url: str | Endpoint | Sequence[str | Endpoint] | None = None,
                 api_key: str | None = None, *,
                 endpoints: Mapping[str, Endpoint | str | Sequence[Endpoint | str]] | None = None,
                 timeout: float = 120.0, deadline: float = 600.0, retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 30.0, max_retry_after: float = 120.0, max_idle: int = 64,
                 max_reply_bytes: int = MAX_REPLY_BYTES, max_in_flight: int | None = None, cooldown: float = 5.0,
                 sleep: Callable[[float], None] | None = None, rng: random.Random | None = None,
                 announce: Callable[[str], None] | None = None):
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
        for name, value in (("timeout", timeout), ("deadline", deadline), ("backoff", backoff),
                            ("max_backoff", max_backoff), ("max_retry_after", max_retry_after), ("cooldown", cooldown)):
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
        self.max_reply_bytes, self.max_idle = max_reply_bytes, max_idle
        self.max_in_flight, self.cooldown = max_in_flight, cooldown
        self.sleep, self.rng = sleep, rng or random.Random()
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._in_flight: set[_Attempt] = set()
        self._watch = threading.Condition(threading.Lock())
        self._watching, self._wakes_at = False, math.inf
        self._aborted = threading.Event()
        self._replicas = _Replicas(self.default + [e for group in self.endpoints.values() for e in group],
                                   max_in_flight=max_in_flight, cooldown=cooldown, aborted=self._aborted)
        self.announce = announce if announce is not None else _to_stderr
        self._learned: dict[tuple[str, str], _Learned] = {}  # by (server, model): what it refuses, accepts
        self._adaptations: list[dict[str, str]] = []
        self._proxies = _environment_proxies()  # as httpx: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY

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
        return self._replicas.counts()

    def adaptations(self) -> list[dict[str, str]]:
        """What this client adapted to which server and model so far: ``{"server", "model", "field",
        "change"}`` each, in the order learned (``--json`` shows them)."""
        with self._lock:
            return [dict(adaptation) for adaptation in self._adaptations]

    def __call__(self, request: Request) -> Reply:
        replicas = self.replicas(request.model)
        tally = _Tally()
        endpoint, reply = self._retrying(replicas, request, tally, lambda endpoint: self._adapting(endpoint, request))
        self._replicas.settle(endpoint, "ok")
        reply.retries = tally.extra
        return reply

    # --- a call in layers: the body; retries; the replica of each attempt; adapting to it; one attempt ------

    @staticmethod
    def _body(request: Request, learned: _Learned | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The request's JSON body, the fields the server needs and no others (wire.md section 1), as adapted
        to what the server is known to refuse (section 8); and the adaptations made (a field with the value
        sent instead, None for one not sent)."""
        body: dict[str, Any] = {"model": request.model, "messages": list(request.messages)}
        adapted: dict[str, Any] = {}
        if request.temperature is not None:
            body["temperature"] = request.temperature
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
        body.update((name, value) for name, value in request.fields.items() if name not in body)
        if learned is not None:
            if learned.single and body.get("n", 1) > 1:
                body["n"] = adapted["n"] = 1
            if learned.renamed and "max_tokens" in body and "max_completion_tokens" not in body:
                body["max_completion_tokens"] = adapted["max_completion_tokens"] = body.pop("max_tokens")
                adapted["max_tokens"] = None
            for name in learned.dropped & request.optional & set(body):
                del body[name]
                adapted[name] = None
        return body, adapted

    def _adapting(self, endpoint: Endpoint, request: Request) -> Reply:
        """One attempt on ``endpoint``, adapted to what the server refuses for this model: the body with what
        is known (``_body``); a refusal learned from the reply is met by sending again at once, adapted. The
        first body with fields the server has not yet accepted for the model is sent alone (the others wait),
        so a refusal is paid for once, not by every call in flight."""
        with self._lock:
            learned = self._learned.setdefault((endpoint.base_url, request.model), _Learned())
        while True:
            body, adapted = self._body(request, learned)
            refused = [name for name in learned.refused if name in body]
            if refused:  # a value the caller chose, which the server is known to refuse: never dropped
                raise self._refused(endpoint, request, refused[0], learned.refused[refused[0]])
            risky = frozenset(body) - _SAFE_FIELDS
            # Fields not yet accepted: this request goes alone, the others wait for its answer, or for as long
            # as a refusal takes to come back (a request still running after PROBE_WAIT was not refused).
            probing = not risky <= learned.accepted and learned.probe.acquire(timeout=PROBE_WAIT)
            if probing and risky <= learned.accepted:  # the request ahead was accepted meanwhile: go together
                learned.probe.release()
                probing = False
            try:
                body, adapted = self._body(request, learned)  # what others learned meanwhile
                sent = dataclasses.replace(request, n=body.get("n", 1)) if "n" in adapted else request
                payload = _clean(json.dumps(body, ensure_ascii=False)).encode("utf-8")  # no lone surrogate sent
                try:
                    reply = self._send(endpoint, payload, sent)
                except ModelError as error:
                    if not self._learn(endpoint, request, body, error, learned):
                        raise
                    continue  # adapted: send again at once (no retry spent)
                with self._lock:
                    learned.accepted |= frozenset(body) - _SAFE_FIELDS
            finally:
                if probing:
                    learned.probe.release()
            reply.adapted = adapted
            return reply

    def _learn(self, endpoint: Endpoint, request: Request, body: dict[str, Any], error: ModelError,
               learned: _Learned) -> bool:
        """Whether a refusal can be met by sending the request again, adapted; if so, remember and announce
        it. Raises the refusal in the caller's terms where it cannot be met (a context window exceeded, a value
        the caller chose); returns False for any other failure."""
        if error.status not in (400, 413, 422):
            return False
        problem = _refusal(error.body or error.message, body)
        if problem == "context":
            raise ModelError(f"the prompt exceeds the model's context window: {error.message}", model=error.model,
                             url=error.url, status=error.status, body=error.body, kind="context")
        if problem == "max_tokens" and "max_completion_tokens" not in body:
            change = "sent as max_completion_tokens (the same limit)"
            with self._lock:
                learned.renamed = True
        elif problem in request.optional and problem in body:
            change = "not sent (the server refuses it; the model samples at its own default)"
            with self._lock:
                learned.dropped.add(problem)
        elif (problem == "n" or problem is None) and body.get("n", 1) > 1 and error.status in (400, 422):
            change = "refused above 1: one request per sample"
            problem = "n"
            with self._lock:
                learned.single = True
        elif problem is not None and problem in body:
            with self._lock:
                learned.refused[problem] = error.message
            raise self._refused(endpoint, request, problem, error.message)
        else:
            return False
        self._announce(endpoint, request.model, problem, change)
        return True

    def _refused(self, endpoint: Endpoint, request: Request, field: str, reason: str) -> ModelError:
        return self._error(endpoint, request, f"the server refuses {field} for this model: {reason}", None, 1,
                           status=400, retryable=False, kind="refused", field=field)

    def _announce(self, endpoint: Endpoint, model: str, field: str, change: str) -> None:
        adaptation = {"server": endpoint.url.rsplit("/chat/completions", 1)[0], "model": model, "field": field,
                      "change": change}
        with self._lock:
            if adaptation in self._adaptations:
                return
            self._adaptations.append(adaptation)
        self.announce(f"{adaptation['server']} refuses {field} for model {model!r}: {change}, for the rest of this "
                      f"run")

    def _retrying(self, replicas: list[Endpoint], request: Request, tally: _Tally,
                  attempt: Callable[[Endpoint], _T]) -> tuple[Endpoint, _T]:
        """Retries: once every replica has failed the call (``_failing_over``), wait (exponential backoff with
        full jitter, and at least what Retry-After asks) and try them all again, ``retries`` times at most.
        Returns the replica that answered and its answer, which the caller settles; raises ModelError."""
        retries = 0
        while True:
            try:
                return self._failing_over(replicas, request, tally, attempt)
            except _Retry as failure:
                endpoint = failure.endpoint or replicas[0]
                wait = min(self.max_backoff, self.backoff * 2 ** retries) * self.rng.random()
                if failure.retry_after is not None:
                    if failure.retry_after > self.max_retry_after:
                        raise self._error(endpoint, request, f"{failure.message}; the server asked to wait "
                                          f"{failure.retry_after:g} s, more than max_retry_after="
                                          f"{self.max_retry_after:g}", failure, tally.attempts) from None
                    wait = max(wait, failure.retry_after)
                if retries >= self.retries:
                    raise self._error(endpoint, request, failure.message, failure, tally.attempts) from None
                retries += 1
                tally.extra += 1
                (self.sleep or self._aborted.wait)(wait)  # abort() cuts a wait short

    def _failing_over(self, replicas: list[Endpoint], request: Request, tally: _Tally,
                      attempt: Callable[[Endpoint], _T]) -> tuple[Endpoint, _T]:
        """Replicas: each attempt goes to the replica ``_Replicas.pick`` chooses. A failure sends the call at
        once to a replica it has not failed on and that is not cooling down (no wait, no retry spent); with
        none left, the failure goes up to the retries. A 404 (that replica has another model loaded) hands the
        call to a replica not yet asked, without cooling the first down. A kept-alive connection that the
        server had closed is replaced once per call, and counts as no failure."""
        failed_here: set[str] = set()  # replicas this call failed on since its last retry
        while True:
            endpoint = self._replicas.pick(replicas, failed_here)
            if endpoint is None:
                raise self._error(replicas[0], request, _INTERRUPTED)
            tally.attempts += 1
            try:
                return endpoint, attempt(endpoint)
            except _Retry as failure:
                if failure.stale and not tally.reconnected:
                    self._replicas.settle(endpoint, "stale")
                    tally.reconnected = True
                    continue  # a kept-alive connection the server had closed: reconnect, not a retry
                self._replicas.settle(endpoint, "down" if failure.down else "failed")
                failed_here.add(endpoint.base_url)
                if not self._replicas.can_fail_over(replicas, failed_here):
                    failure.endpoint = endpoint
                    raise
                tally.extra += 1  # failover: another replica takes the call now
            except ModelError as error:
                self._replicas.settle(endpoint, "answered")
                failed_here.add(endpoint.base_url)
                if error.status != 404 or all(r.base_url in failed_here for r in replicas):
                    raise
                tally.extra += 1  # this replica lacks the model (another one is loaded there): ask another one
            except BaseException:
                self._replicas.settle(endpoint, "stale")
                raise

    @contextlib.contextmanager
    def relay(self, model: str, body: bytes, *,
              stream: bool = False) -> Iterator[tuple[Endpoint, http.client.HTTPResponse]]:
        """Send ``body``, a chat-completions request as a client wrote it, to a server of ``model``, and yield
        that server's ``Endpoint`` and its reply, unread, for a proxy that passes replies on as they come
        (``selfmoa serve``)::

            with client.relay("qwen", raw_body, stream=True) as (endpoint, reply):
                status, first = reply.status, reply.read1(65536)

        The server is chosen, failed over from, retried and waited for exactly as for a call (replicas,
        cool-down, the 404 hand-off, backoff, Retry-After), on the same kept-alive connections, and
        ``deadline`` bounds each attempt, reading the reply included (past it, reading fails). A reply that
        asks for a retry (408, 409, 429, 5xx) or names a model its server lacks (404) is yielded, status and
        all, once no attempt is left; any other is yielded at once. ``stream`` only sets the ``Accept``
        header; the body is sent unchanged, with the endpoint's own key. The connection is kept for reuse when
        the reply was read to its end. Raises ConfigError when no endpoint serves ``model``, and ModelError
        when no server answered (refused, timed out, cut off before the headers) after every retry.
        """
        replicas = self.replicas(model)
        request = Request(model, ())  # what errors name
        held: list[tuple[Endpoint, _Attempt, http.client.HTTPResponse]] = []  # a reply yielded if none follows

        def attempt(endpoint: Endpoint) -> tuple[_Attempt, http.client.HTTPResponse]:
            self._let_go(held)  # another attempt: the reply held from the last one will not be yielded
            flight, response = self._open(endpoint, body, request, stream=stream)
            status = response.status
            if 200 <= status and status != 404 and status not in RETRY_STATUSES:
                return flight, response
            if status < 200:  # a 101 (interim replies are skipped): a protocol switch never asked for, no reply
                self._finish(flight)
                raise _Retry(f"HTTP {status}: an interim reply where the final one was due")
            held.append((endpoint, flight, response))
            if status == 404:
                raise self._error(endpoint, request, "the server does not serve this model", status=404)
            raise _Retry(f"HTTP {status}", status=status, retry_after=_retry_after(response.getheader("Retry-After")))

        try:
            endpoint, (flight, response) = self._retrying(replicas, request, _Tally(), attempt)
            settled = False
        except ModelError:
            if not held or self._aborted.is_set():
                self._let_go(held)
                raise
            (endpoint, flight, response), settled = held.pop(), True  # counted as failed when it was held
        except BaseException:  # Ctrl-C in a wait between retries: the held reply is not yielded
            self._let_go(held)
            raise
        try:
            yield endpoint, response
        finally:
            self._finish(flight, endpoint if response.isclosed() and not response.will_close else None)
            if not settled:
                self._replicas.settle(endpoint, "ok" if response.status < 400 else "answered")

    def _let_go(self, held: list[tuple[Endpoint, _Attempt, http.client.HTTPResponse]]) -> None:
        """Close the replies a relay held and will not yield (their attempts were already counted)."""
        while held:
            self._finish(held.pop()[1])

    def _error(self, endpoint: Endpoint, request: Request, message: str, failure: _Retry | None = None,
               attempts: int = 1, status: int | None = None, body: str = "", retryable: bool = False,
               kind: str = "", field: str | None = None) -> ModelError:
        if failure is not None:  # the retries are spent: a later call may still succeed
            status, body, retryable = failure.status, failure.body, True
        # Servers may echo the key back ("Incorrect API key provided: sk-..."): blank it out, then cut.
        return ModelError(_shown(message, endpoint.secrets, SHOWN_MESSAGE), model=request.model, url=endpoint.url,
                          status=status, body=_shown(body, endpoint.secrets, SHOWN_BODY), attempts=attempts,
                          retryable=retryable, kind=kind, field=field)

    def _acquire(self, endpoint: Endpoint) -> tuple[http.client.HTTPConnection, bool]:
        """An idle kept-alive connection to the endpoint's host if there is one (True), else a new one."""
        parts = endpoint._parts
        with self._lock:
            idle = self._idle.get((parts.scheme, parts.hostname, parts.port))
            if idle:
                return idle.pop(), True
        return _connection(parts, min(self.timeout, self.deadline), self._proxies), False

    def _finish(self, flight: _Attempt, reuse_for: Endpoint | None = None) -> None:
        """Stop watching an attempt and close its connection, or keep it idle for ``reuse_for`` when the reply
        was read to its end within the deadline."""
        self._end(flight)
        if reuse_for is not None and not flight.expired:
            parts = reuse_for._parts
            with self._lock:
                idle = self._idle.setdefault((parts.scheme, parts.hostname, parts.port), [])
                if len(idle) < self.max_idle:
                    idle.append(flight.connection)
                    return
        flight.connection.close()

    # --- the deadline watchdog: one thread per client, alive while attempts are in flight ------------------

    def _begin(self, connection: http.client.HTTPConnection, within: float | None = None) -> _Attempt:
        """Watch an attempt: cut it off ``within`` seconds from now (default: ``deadline``)."""
        attempt = _Attempt(connection, time.monotonic() + (self.deadline if within is None else within))
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
        self._replicas.wake()  # calls waiting for a free slot
        self.close()

    @contextlib.contextmanager
    def on_behalf_of(self, owner: object) -> Iterator[None]:
        """The calls this thread makes inside the block belong to ``owner``, so that ``cancel(owner)`` ends
        them (serve: one owner per client request, cancelled when that client goes away)."""
        previous = getattr(_CALLER, "owner", None)
        _CALLER.owner = owner
        try:
            yield
        finally:
            _CALLER.owner = previous

    def cancel(self, owner: object) -> None:
        """End now the attempts in flight of the calls made ``on_behalf_of(owner)``, and fail those calls
        without a retry (``ModelError``): nobody waits for their answers. Other calls go on."""
        with self._watch:
            for attempt in self._in_flight:
                if attempt.owner is owner:
                    attempt.cancelled = True
                    _shut(attempt.connection)

    # --- one attempt ---------------------------------------------------------------------------------------

    def _send(self, endpoint: Endpoint, payload: bytes, request: Request) -> Reply:
        """One attempt: send, read, parse. Raises _Retry for what may pass, ModelError for what will not."""
        flight, response = self._open(endpoint, payload, request, stream=request.stream is not None)
        try:
            reply, reusable = self._read(response, endpoint, request, flight)
        except (_Retry, ModelError) as failure:
            raise self._failed(flight, endpoint, request, failure) from None
        except BaseException:
            self._finish(flight)
            raise
        self._finish(flight, endpoint if reusable else None)
        return reply

    def _open(self, endpoint: Endpoint, payload: bytes, request: Request, *,
              stream: bool) -> tuple[_Attempt, http.client.HTTPResponse]:
        """Send ``payload`` on an idle kept-alive connection or a new one, under the deadline, and read the
        status line and headers of the reply (``stream``: ask for server-sent events)."""
        if self._aborted.is_set():
            raise self._error(endpoint, request, _INTERRUPTED)
        connection, reused = self._acquire(endpoint)
        flight = self._begin(connection)
        try:
            _send_request(connection, endpoint, "/chat/completions", payload,
                          "text/event-stream" if stream else "application/json")
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            failure = _Retry(f"connection dropped before a reply ({type(exc).__name__})", stale=reused)
        except TimeoutError:
            failure = _Retry(f"no reply within timeout={self.timeout:g} s")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failure = _Retry(f"could not reach the server, or its reply is not HTTP ({type(exc).__name__}: "
                             f"{str(exc)[:200]})", down=isinstance(exc, (ConnectionRefusedError, socket.gaierror)))
        except BaseException:
            self._finish(flight)
            raise
        else:
            if isinstance(response, _FinalResponse):
                response.attempt = flight
            if not flight.expired:
                return flight, response
            failure = _Retry("the reply's head was cut off")  # http.client ends the headers at the close
        raise self._failed(flight, endpoint, request, failure)

    def _failed(self, flight: _Attempt, endpoint: Endpoint, request: Request,
                failure: _Retry | ModelError) -> _Retry | ModelError:
        """What to raise for an attempt that failed, once its connection is closed: ``failure`` itself, unless
        ``abort()`` or the deadline cut the attempt off (then a retry, unless streamed text was already shown)."""
        self._finish(flight)
        if self._aborted.is_set():
            return self._error(endpoint, request, _INTERRUPTED)
        if flight.cancelled:
            return self._error(endpoint, request, "cancelled: nobody waits for this call any more")
        if not flight.expired:
            return failure
        message = f"no complete reply within deadline={self.deadline:g} s"
        if flight.shown:  # text was shown: retrying would show it twice
            return self._error(endpoint, request, f"{message} ({failure.message})", status=200)
        return _Retry(message)

    def _read(self, response: http.client.HTTPResponse, endpoint: Endpoint, request: Request,
              flight: _Attempt) -> tuple[Reply, bool]:
        """Read and parse the reply: the Reply and whether the connection can be reused."""
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
            if response.status in RETRY_STATUSES:
                raise _Retry(detail, status=response.status, body=text,
                             retry_after=_retry_after(response.getheader("Retry-After")))
            raise self._error(endpoint, request, detail, status=response.status, body=text)
        if not whole:
            raise self._error(endpoint, request, f"the reply is larger than max_reply_bytes={self.max_reply_bytes}",
                              status=200, body=text)
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
            return self._error(endpoint, request, f"the reply is not a chat completion: {what}", status=200, body=text)
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
            choice = choice if isinstance(choice, dict) else {}
            index = choice["index"] if _is_int(choice.get("index")) else place
            if not 0 <= index < request.n or taken[index]:
                continue  # more choices than asked for, or a repeated index: the first one counts
            taken[index] = True
            message, reason = choice.get("message"), choice.get("finish_reason")
            content = message.get("content") if isinstance(message, dict) else None
            reasons[index] = _clean(reason[:100]) if isinstance(reason, str) else None
            if isinstance(content, str):
                texts[index] = _clean(content)
            elif problem is None:
                problem = (f"choice {index} has no string 'message.content'"
                           + (f" (finish_reason {reasons[index]!r})" if reasons[index] else ""))
        if texts[0] is None and request.n == 1 and reasons[0] != "length":  # "length": spent thinking
            raise bad(problem or "it has no choice with index 0")
        filled = max((i + 1 for i in range(request.n) if taken[i]), default=1)  # the rest: missing, asked for
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        reported = data.get("model")
        return Reply(texts[:filled], reasons[:filled], _int_or_none(usage.get("prompt_tokens")),
                     _int_or_none(usage.get("completion_tokens")), url=endpoint.url,
                     model=_CONTROLS.sub("\ufffd", _clean(reported[:200])) if isinstance(reported, str) else None,
                     reasoning_tokens=_reasoning_tokens(usage))

    def _read_stream(self, response: http.client.HTTPResponse, endpoint: Endpoint, request: Request,
                     flight: _Attempt) -> tuple[Reply, bool]:
        """Read server-sent events, passing each text piece on as it arrives."""
        assert request.stream is not None
        pieces: list[str] = []
        reason, usage, size, choices_seen, thought = None, {}, 0, False, False

        def broke(why: str) -> Exception:
            message = f"the stream broke ({why})"
            if not pieces:
                return _Retry(message)
            return self._error(endpoint, request, f"{message} after {sum(map(len, pieces))} characters had been "
                               f"streamed", status=200)

        def bad(what: str, data: str = "") -> ModelError:
            return self._error(endpoint, request, f"the stream is not chat-completion events: {what}", status=200,
                               body=data)
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
                if not isinstance(choice, dict) or not isinstance(choice.get("delta"), (dict, type(None))):
                    raise bad("a choice is not an object with a 'delta' object", data)
                if choice.get("index", 0) != 0:
                    continue  # a stream asks for one choice
                choices_seen, delta = True, choice.get("delta") or {}
                thought = thought or any(isinstance(delta.get(name), str)
                                         for name in ("reasoning_content", "reasoning"))  # never passed on
                piece = delta.get("content")
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
        if not choices_seen:  # 200, then [DONE] and nothing else: llama-cpp-python's sign of an overflow
            raise self._error(endpoint, request, "the server answered with an empty stream (no choice at all), "
                              "which is how some servers say that the prompt exceeds the model's context window",
                              status=200, kind="context")
        spent = not pieces and reason == "length" and thought  # the whole limit went on thinking
        reply = Reply([None if spent else "".join(pieces)], [reason], _int_or_none(usage.get("prompt_tokens")),
                      _int_or_none(usage.get("completion_tokens")), url=endpoint.url,
                      reasoning_tokens=_reasoning_tokens(usage))
        return reply, whole and not response.will_close

    # --- the models a server offers, for messages -----------------------------------------------------------

    def models(self, model: str | None = None) -> list[str] | None:
        """The model names the servers of ``model`` (without it: every server of the client) list at ``GET
        {base_url}/models``, each asked once, with its own key, within 5 s (or ``timeout`` and ``deadline`` if
        shorter), never retried; sorted and without repeats. None when none of them answers with a list. For
        messages such as "the server offers ...": what a 404 meant; and for serve's ``GET /v1/models``.
        Names are cleaned like any server text (keys blanked out, control characters replaced, cut short)."""
        found = [self._list_models(e) for e in (self.replicas(model) if model is not None else _endpoints_of(self))]
        listed = [names for names in found if names is not None]
        return sorted(set().union(*listed)) if listed else None

    def _list_models(self, endpoint: Endpoint) -> list[str] | None:
        if self._aborted.is_set():
            return None
        connection = _connection(endpoint._parts, min(LIST_WITHIN, self.timeout, self.deadline), self._proxies)
        flight = self._begin(connection, min(LIST_WITHIN, self.deadline))
        try:
            _send_request(connection, endpoint, "/models", None, "application/json")
            response = connection.getresponse()
            raw, whole = _read_capped(response, 16 * MAX_ERROR_BYTES)
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            self._finish(flight)
        if response.status != 200 or not whole or flight.expired:
            return None
        try:
            data = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            return None
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            return None
        return [_shown(_listed_name(entry), endpoint.secrets, 200) for entry in entries[:1000]
                if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"].strip()]

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


def _listed_name(entry: dict) -> str:
    """A model's name as ``GET /models`` lists it: its id, except from llama.cpp's server, which lists the path of
    the file it loaded (``/models/qwen2-7b-q4_k_m.gguf``) and answers to any name: then the file's name alone (so
    that serve lists ``self-moa/qwen2-7b-q4_k_m.gguf``, not ``self-moa//models/...``).

    >>> _listed_name({"id": "/models/qwen2-7b-q4_k_m.gguf", "owned_by": "llamacpp"})
    'qwen2-7b-q4_k_m.gguf'
    >>> _listed_name({"id": "Qwen/Qwen2-7B-Instruct", "owned_by": "vllm"})
    'Qwen/Qwen2-7B-Instruct'
    """
    name = entry["id"]
    if entry.get("owned_by") == "llamacpp":
        name = re.split(r"[/\\]", name.rstrip("/\\"))[-1] or name
    return name


def _int_or_none(value: Any) -> int | None:
    return value if _is_int(value) and value >= 0 else None


def _reasoning_tokens(usage: Mapping[str, Any]) -> int | None:
    """``usage.completion_tokens_details.reasoning_tokens``, where the server reports it."""
    details = usage.get("completion_tokens_details")
    return _int_or_none(details.get("reasoning_tokens")) if isinstance(details, dict) else None


def _key_forms(secret: str) -> list[str]:
    """The ways a server may echo a key: as is, JSON-escaped, and percent-encoded (either case of hex)."""
    quoted = urllib.parse.quote(secret, safe="")
    forms = [secret, json.dumps(secret)[1:-1], secret.replace("/", "\\/"), quoted,
             re.sub("%[0-9A-F]{2}", lambda hexa: hexa.group().lower(), quoted), urllib.parse.quote_plus(secret)]
    return sorted(dict.fromkeys(forms), key=len, reverse=True)  # longest first: an escaped echo goes whole


def _redact(text: str, secret: str | None) -> str:
    """``text`` with the key blanked out: every stretch of 8 or more characters of it (the whole key,
    a cut-off part, or the same in one of the forms servers echo it in) becomes ``***``.

    >>> _redact("bad key sk-abcdef123456; you sent sk-abcdef12; ok", "sk-abcdef123456")
    'bad key ***; you sent ***; ok'
    >>> _redact("sk-ab%2Fcdefgh", "sk-ab/cdefgh"), _redact('"sk-ab\\\\/cdefgh"', "sk-ab/cdefgh")
    ('***', '"***"')
    """
    if not secret:
        return text
    run, forms = 8, _key_forms(secret)
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
    """The message of an OpenAI-shaped error body (or vLLM's ``{"message": ...}``), or whatever the body is."""
    try:
        data = json.loads(body)
        error, message = data.get("error"), data.get("message")
    except (ValueError, AttributeError, RecursionError):
        error = message = None
    error = error.get("message") if isinstance(error, dict) else error
    return next((text for text in (error, message) if isinstance(text, str)), body.strip() or "(empty body)")


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
# The command line
# ======================================================================================================

OPENAI_BASE_URL = "https://api.openai.com/v1"

CLI_DESCRIPTION = """\
Answer a prompt with MoA, Self-MoA or Self-MoA-Seq against OpenAI-compatible servers.
The prompt is the argument, or standard input; the final answer goes to standard output.
"selfmoa serve" serves the methods as models instead (selfmoa serve --help), "selfmoa
merge" joins the outputs of a batch run in shards (selfmoa merge --help), and "selfmoa eval"
measures the methods on a dataset (selfmoa eval --help); to ask the prompt "serve", "merge"
or "eval" itself, pass it after -- or on standard input."""

CLI_EPILOG = """\
endpoints and keys:
  Every model is served by --base-url (else $OPENAI_BASE_URL, else the OpenAI API), unless
  --endpoint MODEL=URL gives it its own server. A key is only ever sent to the endpoint it
  was given for. The default endpoint's key is --api-key, else $OPENAI_API_KEY, which is used
  only when the URL is the OpenAI API or came from $OPENAI_BASE_URL. The key of a model with
  its own endpoint comes from $SELFMOA_API_KEY_<MODEL> (the name in capitals, other characters
  as _), else none. $HTTPS_PROXY, $HTTP_PROXY, $ALL_PROXY and $NO_PROXY are honoured as other
  HTTP clients honour them (http:// proxies only; loopback is always reached directly), and
  $SSL_CERT_FILE names the certificates of the CAs to trust (a private CA).

batch mode:
  -i FILE reads JSONL or a JSON list of objects with "prompt", "instruction" or "messages"
  (and an optional "id"); -o FILE gets one JSON line per item, its answer or its error and
  the input record (the format: selfmoa_batch.py's docstring, and spec/batch.md in full).
  Run the same command again to resume: items answered for the same prompt and parameters
  are skipped, the others run. One run at a time writes a file (it holds FILE.lock); a file
  that is not a selfmoa output file is never changed. --shard K/N runs only the items of
  shard K (a stable hash of each id picks its shard), so N processes or machines can run
  one input: then selfmoa merge -i FILE OUT... -o ALL checks and joins their outputs.

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


def _method_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a method and its parameters, and how its calls run (--method to
    --instruction-file): the main command's, and those of ``selfmoa merge`` and other runners of the methods."""
    add = parser.add_argument
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
    add("--temperature", type=_finite, metavar="T",
        help="proposers' temperature (default: 0.7, dropped where a server refuses it)")
    add("--max-tokens", type=int, metavar="K", help="proposers' token limit (default: the server's)")
    add("--aggregator-temperature", type=_finite, metavar="T",
        help="the aggregator's temperature (default: 0.7, dropped where a server refuses it)")
    add("--aggregator-max-tokens", type=int, metavar="K", help="the aggregator's token limit (default: the server's)")
    add("--field", action="append", metavar="[MODEL:]KEY=VALUE",
        help="send the request field KEY with every request (with MODEL:, every request to MODEL); VALUE is "
             "JSON, else a string; null sends no KEY (repeatable)")
    add("--proposer-field", action="append", metavar="[MODEL:]KEY=VALUE", help="the same, for the proposers only")
    add("--aggregator-field", action="append", metavar="[MODEL:]KEY=VALUE",
        help="the same, for the aggregator only")
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
    add("--layout", choices=LAYOUTS, default="keyed", help="how the aggregator prompt lists the responses: keyed "
        "blocks, or numbered lines as in the original MoA code (reference) (default: keyed)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (its --help is the usage section of the README)."""
    parser = argparse.ArgumentParser(prog="selfmoa", description=CLI_DESCRIPTION, epilog=CLI_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (default: read standard input)")
    _method_arguments(parser)
    add = parser.add_argument
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
    add("--shard", metavar="K/N", help="batch mode: run only shard K of N (K from 0 to N-1): the items whose id "
        "hashes to K; join the shards' outputs with selfmoa merge")
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
    """``{"servers": ...}``, the requests each server got (HTTPClient.servers()), and ``{"adaptations": ...}``,
    what the client adapted to them (HTTPClient.adaptations(), when any), for --json; {} for other clients.
    The default endpoint (the OpenAI API when no --base-url is given) is left out when no model of the run used
    it, so that a run over --endpoint servers alone does not seem to involve it."""
    servers = getattr(client, "servers", None)
    if not callable(servers):
        return {}
    counts = servers()
    default = {_public_url(endpoint.base_url) for endpoint in getattr(client, "default", [])}
    own = {_public_url(e.base_url) for group in getattr(client, "endpoints", {}).values() for e in group}
    if not any(counts.get(url, {}).get("requests") for url in default):
        counts = {url: count for url, count in counts.items() if url not in default or url in own}
    adaptations = getattr(client, "adaptations", None)
    adapted = adaptations() if callable(adaptations) else []
    return {"servers": counts, **({"adaptations": adapted} if adapted else {})}


def _reason(error: str) -> str:
    """A failed call's error for a one-line report: without the server's whole reply, which --json keeps.

    >>> _reason("model 'x' at http://h/v1: HTTP 404: no such model; server said: {\\"error\\": {}}")
    "model 'x' at http://h/v1: HTTP 404: no such model"
    """
    return error.split("; server said: ", 1)[0]


def _spans(positions: Iterable[int]) -> str:
    """Positions (0-based) as a reader counts them (1-based), runs joined.

    >>> _spans([0, 2, 3, 4, 7])
    '1, 3-5, 8'
    """
    spans: list[list[int]] = []
    ordered = sorted(set(positions))
    for position in ordered:
        if spans and position == spans[-1][1] + 1:
            spans[-1][1] = position
        else:
            spans.append([position, position])
    return ", ".join(f"{a + 1}" if a == b else f"{a + 1}-{b + 1}" for a, b in spans)


def dropped_report(result: Result) -> list[str]:
    """What the command line says on standard error about a run's proposers (MoA) or samples (Self-MoA, Self-MoA-Seq)
    that failed and were dropped while the run went on: one line per layer and cause, naming the model, the reason
    and how many went on ("continuing with K of N"). A layer that stopped the run is the error's to name."""
    word = "proposer" if result.method == "moa" else "sample"
    proposers = [call for call in result.trace if call.role == "proposer"]
    layers = sorted({call.layer for call in proposers})
    lines = []
    for layer in layers:
        calls = [call for call in proposers if call.layer == layer]
        asked = {i for call in calls for i in call.indices}
        causes: dict[str, tuple[set[int], set[str]]] = {}
        for call in calls:
            if call.error:
                positions, models = causes.setdefault(_reason(call.error), (set(), set()))
                positions.update(call.indices)
                models.add(call.model)
        lost = {i for positions, _ in causes.values() for i in positions}
        if not lost or not any(call.layer > layer for call in result.trace):  # the run went on past this layer
            continue
        where = f"layer {layer}: " if len(layers) > 1 else ""
        for reason, (positions, models) in causes.items():
            many = len(positions) > 1
            lines.append(f"{where}{word}{'s' if many else ''} {_spans(positions)} ({', '.join(sorted(models))}) "
                         f"failed and {'were' if many else 'was'} dropped: {reason}; continuing with "
                         f"{len(asked) - len(lost)} of {len(asked)} {word}s")
    return lines


_HTTP_404 = re.compile(r": HTTP 404: ")


def missing_models_report(errors: Iterable[tuple[str, str]], client: Any) -> list[str]:
    """For each model that got a 404 (``errors``: pairs of model and error text) from every server of it, and that
    its servers do not list at ``GET /models``: a line saying so, with the names they do offer (and the nearest
    one). Asks the servers through ``client.models`` (HTTPClient); nothing for other clients or unlisted models."""
    lister = getattr(client, "models", None)
    if not callable(lister):
        return []
    lines = []
    for model in dict.fromkeys(model for model, error in errors if _HTTP_404.search(error)):
        offered = lister(model)
        if not offered or model in offered:
            continue
        urls = [_public_url(endpoint.base_url) for endpoint in client.replicas(model)]
        where = f"its server {urls[0]}" if len(urls) == 1 else f"any of its {len(urls)} servers"
        close = difflib.get_close_matches(model, offered, n=1, cutoff=0.6)
        shown = ", ".join(offered[:20]) + (f" and {len(offered) - 20} more" if len(offered) > 20 else "")
        lines.append(f"model {_clean(model)[:200]!r} does not exist on {where} (HTTP 404); it offers: {shown}"
                     + (f" (did you mean {close[0]!r}?)" if close else ""))
    return lines


_HTTP_DENIED = re.compile(r": HTTP 40[13]: ")


def _default_urls(args: argparse.Namespace, environ: Mapping[str, str]) -> list[str]:
    """The default endpoint's replicas: each --base-url, else $OPENAI_BASE_URL, else the OpenAI API."""
    return args.base_url or [environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL]


def _takes_openai_key(url: str, environ: Mapping[str, str]) -> bool:
    """Whether $OPENAI_API_KEY may go to ``url``: only to the OpenAI API, or to $OPENAI_BASE_URL."""
    return url.rstrip("/") == OPENAI_BASE_URL or url == (environ.get("OPENAI_BASE_URL") or None)


def key_report(errors: Iterable[tuple[str, str]], args: argparse.Namespace, environ: Mapping[str, str]) -> list[str]:
    """For a model refused with 401 or 403 (``errors``: pairs of model and error text) that was sent no key: why
    none was sent, by the rule of "endpoints and keys", and how to give it one. Nothing when a key was sent."""
    lines = []
    own = {spec.partition("=")[0] for spec in args.endpoint or [] if "=" in spec}
    for model in dict.fromkeys(model for model, error in errors if _HTTP_DENIED.search(error)):
        if model in own:
            name = _key_env_name(model)
            if not environ.get(name):
                lines.append(f"model {model!r} has its own --endpoint and was sent no key: the key of such a model "
                             f"comes from ${name} alone; export {name}=...")
            continue
        if args.api_key is not None:
            continue
        withheld = [url for url in _default_urls(args, environ) if not _takes_openai_key(url, environ)]
        if not withheld:
            continue
        shown = _public_url(withheld[0])
        if environ.get("OPENAI_API_KEY"):
            lines.append(f"$OPENAI_API_KEY was not sent to {shown}, on purpose: it goes only to the OpenAI API or to "
                         f"$OPENAI_BASE_URL, never to another --base-url. Give this server's key with --api-key KEY, "
                         f"or, if $OPENAI_API_KEY is its key, export OPENAI_BASE_URL={shown} instead of --base-url")
        else:
            lines.append(f"no key was sent to {shown}: give this server's key with --api-key KEY")
    return lines


def make_client(args: argparse.Namespace, environ: Mapping[str, str]) -> HTTPClient:
    """The HTTPClient the flags and the environment describe, keys going only where they belong.

    Each --base-url is a replica of the default endpoint, each --endpoint MODEL=URL a replica of MODEL's.
    """
    default = []
    for base_url in _default_urls(args, environ):
        key, key_source = args.api_key, "--api-key"
        if key is None and _takes_openai_key(base_url, environ):
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
                  ("--generator", args.generator is not None), ("--shard", getattr(args, "shard", None) is not None))
    for flag, given in batch_only:
        if given and not (args.input or args.output):
            raise ConfigError(f"{flag}: it shapes a batch's output, and without -i FILE and -o FILE no batch runs, "
                              f"so {flag} would have no effect; drop it, or run a batch with -i and -o")
    if args.stream and args.json:
        raise ConfigError("--stream: --json prints the whole result once it is done, so --stream would have no "
                          "effect; drop one of them")
    for flag, given in (("--json", args.json), ("--stream", args.stream is True)):  # --no-stream: harmless
        if given and (args.input or args.output):
            raise ConfigError(f"{flag}: a batch writes its results to -o FILE and prints only a summary, so {flag} "
                              f"would have no effect; drop it")


_FIELD_VALUE_START = tuple('{["')


def _field_flag(flag: str, text: str) -> tuple[str | None, str, Any]:
    """``[MODEL:]KEY=VALUE`` of --field (or a role's): the model (None: any), the key, the JSON value.

    VALUE is JSON where it reads as JSON, else the text itself; a value that starts like a JSON object, list
    or string must be valid JSON. The key is what follows the last ``:`` before ``=`` (model names may hold ``:``).

    >>> _field_flag("--field", 'qwen3:8b:chat_template_kwargs={"enable_thinking": false}')
    ('qwen3:8b', 'chat_template_kwargs', {'enable_thinking': False})
    >>> _field_flag("--field", "reasoning_effort=high"), _field_flag("--field", "top_p=0.9")
    ((None, 'reasoning_effort', 'high'), (None, 'top_p', 0.9))
    """
    left, sep, raw = text.partition("=")
    model, colon, key = left.rpartition(":")
    if not sep or not key.strip() or key != key.strip() or (colon and not model.strip()):
        raise ConfigError(f"{flag} {text!r}: expected [MODEL:]KEY=VALUE; pass e.g. {flag} top_p=0.9 or "
                          f"{flag} qwen3:reasoning_effort=low")

    def refuse(constant: str) -> Any:
        raise ValueError(constant)
    try:
        value = json.loads(raw, parse_constant=refuse)
    except (ValueError, RecursionError):
        if raw.strip().startswith(_FIELD_VALUE_START) or not raw.strip():
            raise ConfigError(f"{flag} {key}=...: {raw[:100]!r} is not valid JSON; quote it for the shell, e.g. "
                              f"{flag} '{key}={{\"enable_thinking\": false}}', or {key}='\"text\"' for a string") \
                from None
        value = raw
    if key in _OWN_FIELDS:
        raise ConfigError(f"{flag} {key}: selfmoa sets {key} itself; drop it")
    if key in ("temperature", "max_tokens") and value is not None:
        role = "--aggregator-" if flag == "--aggregator-field" else "--"
        raise ConfigError(f"{flag} {key}: {key} has a flag of its own; pass {role}{key.replace('_', '-')} "
                          f"(or {key}=null to send none)")
    return model or None, key, value


def role_settings(args: argparse.Namespace) -> tuple[Sampling, Sampling]:
    """The proposers' and the aggregator's ``Sampling`` from the flags: --temperature, --max-tokens, --field and
    --proposer-field; the --aggregator- ones. A model's own fields (MODEL:) go over the role's, and a role's
    flag over --field."""
    roles = []
    for role in ("proposer", "aggregator"):
        fields: dict[str, Any] = {}
        models: dict[str, dict[str, Any]] = {}
        for flag in ("--field", f"--{role}-field"):
            for text in getattr(args, flag[2:].replace("-", "_")) or []:
                model, key, value = _field_flag(flag, text)
                (fields if model is None else models.setdefault(model, {}))[key] = value
        prefix = "" if role == "proposer" else "aggregator_"
        temperature, max_tokens = getattr(args, f"{prefix}temperature"), getattr(args, f"{prefix}max_tokens")
        if max_tokens is not None and any(f.get("max_completion_tokens") is not None
                                          for f in [fields, *models.values()]):
            flag = "--aggregator-max-tokens" if prefix else "--max-tokens"
            raise ConfigError(f"{flag} {max_tokens}: a max_completion_tokens field sets the token limit as well; "
                              f"give the limit once, as {flag} or as the field")
        roles.append(Sampling(temperature=temperature, max_tokens=max_tokens, fields=fields, models=models))
    return roles[0], roles[1]


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
    proposing, aggregating = role_settings(args)
    common = {"proposing": proposing, "aggregating": aggregating, "seed": args.seed, "min_ok": args.min_ok,
              "concurrency": args.concurrency, "instruction": instruction, "use_n": args.use_n, **given,
              **({} if args.layout == "keyed" else {"layout": args.layout})}
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
    if argv[:1] and argv[0] in _SUBCOMMANDS:  # only as the first word: "selfmoa -- serve" asks the prompt "serve"
        name, entry = _SUBCOMMANDS[argv[0]]
        sibling = _sibling(name, f"selfmoa {argv[0]}")
        return getattr(sibling, entry)(argv[1:], environ) if sibling else 2
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
            batch = _sibling("selfmoa_batch", "batch mode (-i/-o)")
            return batch.batch_command(args, options, make_client(args, environ), environ) if batch else 2
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
            result = METHODS[args.method](prompt, complete=client, stream=show if stream else None, **options)
    except ConfigError as exc:
        return _refuse(parser, exc)
    except SelfMoAError as exc:
        if streamed:
            print(file=sys.stdout)
        message = str(exc).replace(" min_ok=", " --min-ok ", 1) if isinstance(exc, NotEnoughProposals) else str(exc)
        partial = exc.partial
        for line in [*(dropped_report(partial) if partial is not None else []), message]:
            print(f"selfmoa: {line}", file=sys.stderr)
        errors = [(call.model, call.error) for call in partial.trace if call.error] if partial else []
        if isinstance(exc, ModelError):
            errors.append((exc.model, str(exc)))
        for line in missing_models_report(errors, client) + key_report(errors, args, environ):
            print(f"selfmoa: {line}", file=sys.stderr)
        if args.json and partial is not None:
            print(json.dumps({**partial.to_dict(diversity=args.diversity), "error": message, **_servers_of(client)},
                             indent=2, ensure_ascii=False))
        elif partial is not None and partial.trace:
            print(f"selfmoa: {partial.requests} request{'s' if partial.requests != 1 else ''} had been made; --json "
                  f"shows them", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        client.abort()  # calls still in flight end now: their sockets are shut down
        print("\nselfmoa: interrupted", file=sys.stderr)
        return 130
    errors = [(call.model, call.error) for call in result.trace if call.error]
    for line in dropped_report(result) + missing_models_report(errors, client):
        print(f"selfmoa: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({**result.to_dict(diversity=args.diversity), **_servers_of(client)}, indent=2,
                         ensure_ascii=False))
    elif streamed:
        # What was streamed is the answer, unless the server's stream and final text differ.
        print("" if "".join(streamed) == result.answer else "\n" + result.answer)
    else:
        print(result.answer)
    return 0


# The programs beside this file, each with the other ones it imports; and the subcommands they run.
_SIBLINGS = {"selfmoa_batch": (), "selfmoa_serve": (), "selfmoa_eval": ("selfmoa_batch",)}
_SUBCOMMANDS = {"serve": ("selfmoa_serve", "main"), "merge": ("selfmoa_batch", "merge_command"),
                "eval": ("selfmoa_eval", "main")}


def _sibling(name: str, what: str) -> Any:
    """The sibling module ``name`` (selfmoa_batch, selfmoa_serve, selfmoa_eval), imported only when its command
    runs; None, with a line on stderr naming the files to add, where this selfmoa.py was copied without them."""
    chain = [*_SIBLINGS[name], name]  # what ``name`` imports first
    beside = {module: os.path.join(os.path.dirname(os.path.abspath(__file__)), module + ".py") for module in chain}
    missing = [module for module in chain if importlib.util.find_spec(module) is None
               and not os.path.isfile(beside[module])]
    if missing:
        files = " and ".join(f"{module}.py" for module in missing)
        imports = " and ".join(f"{module}.py" for module in ["selfmoa", *_SIBLINGS[name]])
        print(f"selfmoa: error: {what} needs {files}, not beside this selfmoa.py; copy {files} next to it "
              f"({name}.py imports {imports} and nothing else), or install the package: pip install selfmoa",
              file=sys.stderr)
        return None
    for module in chain:
        if module in sys.modules or importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
            continue
        # beside this file, though not on sys.path (python3 -I path/to/selfmoa.py)
        spec = importlib.util.spec_from_file_location(module, beside[module])
        assert spec is not None and spec.loader is not None
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    return sys.modules[name]


if __name__ == "__main__":
    # This file is also the module "selfmoa" that the siblings import: one ConfigError, not two.
    sys.modules.setdefault("selfmoa", sys.modules[__name__])
    sys.exit(main())
