#!/usr/bin/env python3
"""selfmoa_serve: MoA, Self-MoA and Self-MoA-Seq as models behind an OpenAI-compatible endpoint.

``selfmoa serve`` answers ``POST /v1/chat/completions`` like any OpenAI-compatible server, so every client of
one (the SDKs, AlpacaEval, lm-evaluation-harness, chat front-ends) uses a method by changing a model name:
``self-moa/M``, ``self-moa-seq/M`` and ``moa/A`` run a method of ``selfmoa`` (the one file that implements
them) on upstream models; any other name is passed through to its upstream unchanged. It implements
``spec/serve.md``, needs the Python standard library and ``selfmoa.py`` beside it, and nothing imports it
but the command line.

Public API
----------
==================  =========================================================================
``ModelServer``     the server: ``start()``, ``base_url``, ``close()`` (drains the runs in flight)
``SERVE_METHODS``   the model-name prefixes that run a method
``main``            ``selfmoa serve``: flags as the one-shot command's, plus --host, --port, --server-key
==================  =========================================================================

Usage, with a toy model in front (a ``selfmoa.HTTPClient`` in real use):

>>> import json, urllib.request
>>> def toy(request):
...     return "an answer of " + request.model
>>> server = ModelServer(toy, port=0).start()
>>> body = json.dumps({"model": "self-moa/a", "messages": [{"role": "user", "content": "Hi"}]}).encode()
>>> ask = urllib.request.Request(server.base_url + "/chat/completions", data=body,
...                              headers={"Content-Type": "application/json"})
>>> with urllib.request.urlopen(ask, timeout=10) as reply:
...     json.load(reply)["choices"][0]["message"]["content"]
'an answer of a'
>>> server.close()
0

On the command line (``selfmoa serve --help`` lists every flag)::

    selfmoa serve --base-url http://localhost:8000/v1   # at http://127.0.0.1:8100/v1, "self-moa/qwen" is a model

Licence: MIT. Copyright (c) 2026 the selfmoa authors.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hmac
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import math
import os
import queue
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

from selfmoa import (
    DEFAULT_INSTRUCTION,
    METHODS,
    REFERENCE_INSTRUCTION,
    ConfigError,
    HTTPClient,
    Message,
    ModelError,
    NotEnoughProposals,
    Request,
    Result,
    SelfMoAError,
    __version__,
    _check,
    _clean,
    _endpoints_of,
    _finite,
    _instruction_file,
    _is_int,
    _key_problem,
    _on_shared_pool,
    _Pool,
    _read_capped,
    _redact,
    _refuse,
    build_parser,
    make_client,
    role_settings,
    seq_rounds,
)

__all__ = ["ModelServer", "SERVE_METHODS", "main"]  # noqa: RUF022 (plain sorted(), as tests/test_smoke.py checks)


# ======================================================================================================
# Serving: the methods as models behind an OpenAI-compatible endpoint
# ======================================================================================================
#
# `selfmoa serve` answers POST /v1/chat/completions like any OpenAI-compatible server, so every client of
# one (the SDKs, AlpacaEval, lm-evaluation-harness, chat front-ends) uses a method by changing a model name:
# "self-moa/M", "self-moa-seq/M" and "moa/A" run a method on upstream models (M may itself contain "/");
# any other name is passed through to its upstream unchanged. All runs share one bounded call pool. Every
# upstream request goes through the one HTTPClient: a method's calls as calls, a pass-through by its relay
# (the same replicas, retries, deadline and connections); serve itself only relays the bytes, keys blanked.
#
# A method hands its `stream` callback to its final aggregation, and to no other call. Serve always passes
# one, and so recognises the call that writes the answer: the request's `stop` goes to that call only, and
# it is streamed upstream only when the client asked for a stream. A run whose client went away is cancelled
# at the seam: every call it still has queued fails at once, without reaching the upstream.

SERVE_PORT = 8100  # the default port: clear of vLLM's 8000 and llama.cpp's 8080, where its upstreams often are
SERVE_METHODS = {"self-moa/": "self-moa", "self-moa-seq/": "self-moa-seq", "moa/": "moa"}  # model prefix -> method
SERVE_MAX_BODY = 16 * 1024 * 1024  # bytes of a request body at most (413 beyond)
SERVE_MAX_UPSTREAM = 64 * 1024 * 1024  # bytes of a passed-through reply at most (502 beyond)
SERVE_MAX_UPSTREAM_LINE = 1024 * 1024  # a longer streamed line is relayed (redacted) in pieces
SERVE_MAX_CALLS = 256  # samples (or proposers of a layer), and layers x proposers, one request may ask for
SERVE_HEAD_SECONDS = 10.0  # a connection's time to send a request head, from its accept or its previous reply
SERVE_BODY_SECONDS = 60.0  # and then the request's whole body
SERVE_MAX_CONNECTIONS = 1000  # open client connections at most (fewer when the open-file limit is low)
SERVE_MAX_PER_CLIENT = 256  # open connections from one client address at most
SERVE_DRAIN_GRACE = 5.0  # seconds the cut-off requests get, after --drain-timeout, to write their last words
SERVE_DEFAULTS: dict[str, Any] = {
    "n": 6, "window": 6, "carry": 3, "proposers": None, "layers": 2, "min_ok": 1, "temperature": None,
    "max_tokens": None, "aggregator_temperature": None, "aggregator_max_tokens": None, "seed": None,
    "instruction": DEFAULT_INSTRUCTION, "use_n": True, "fields": {}, "models": {}, "aggregator_fields": {},
    "aggregator_models": {}, "layout": "keyed"}
# What a request may set in its "selfmoa" object, per method (the other defaults come from the request itself).
# temperature, max_tokens, fields and models are the proposers'; aggregator_fields and aggregator_models the
# aggregator's (its temperature and token limit are the request's own).
_ROLE_OPTIONS = ("temperature", "max_tokens", "fields", "models", "aggregator_fields", "aggregator_models")
SERVE_OPTIONS = {
    "self-moa": ("n", "aggregator", "layers", "min_ok", *_ROLE_OPTIONS, "use_n", "instruction", "layout"),
    "self-moa-seq": ("n", "window", "carry", "aggregator", "min_ok", *_ROLE_OPTIONS, "use_n", "instruction",
                     "layout"),
    "moa": ("proposers", "layers", "min_ok", *_ROLE_OPTIONS, "use_n", "instruction", "layout"),
}
# A client's standard sampling fields that apply to the final aggregation, as its temperature does (sent
# upstream as given, over serve's --aggregator-field ones).
SERVE_PASSED_FIELDS = ("top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                       "reasoning_effort", "reasoning", "verbosity", "chat_template_kwargs", "logit_bias")
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
    out["fields"] = {field: body[field] for field in SERVE_PASSED_FIELDS if body.get(field) is not None}
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


def _role(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """One role's settings (a dict the methods take as a ``Sampling``) from flat options: ``temperature``,
    ``max_tokens``, ``fields``, ``models``, each with ``prefix`` (``"aggregator_"`` for the aggregator's)."""
    return {key: options[f"{prefix}{key}"] for key in ("temperature", "max_tokens", "fields", "models")}


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


def _usage(result: Result) -> dict[str, Any]:
    """A reply's ``usage``: the run's token totals, with the reasoning tokens where the upstreams reported them
    (``completion_tokens_details.reasoning_tokens``, as OpenAI reports them)."""
    totals = result.usage
    usage: dict[str, Any] = {key: totals[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    if "reasoning_tokens" in totals:
        usage["completion_tokens_details"] = {"reasoning_tokens": totals["reasoning_tokens"]}
    return usage


def _run_report(result: Result, secrets: Iterable[str | None] = ()) -> dict[str, Any]:
    """The ``selfmoa`` field of a reply: calls, requests, retries and each request's latency. No keys."""
    secrets = list(secrets)
    return {"method": result.method, "calls": result.calls, "requests": result.requests,
            "retries": sum(call.retries for call in result.trace), "unreported_usage": result.usage["unreported"],
            "trace": [{"role": call.role, "model": call.model, "layer": call.layer, "round": call.round,
                       "n": call.n, "latency": call.latency, "retries": call.retries,
                       "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                       "reasoning_tokens": call.reasoning_tokens, "adapted": call.adapted,
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

    def __init__(self, complete: Callable[[Request], Any], *, host: str = "127.0.0.1", port: int = SERVE_PORT,
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
               f"pass e.g. {SERVE_PORT}, or 0 for a free port")
        unknown = sorted(set(defaults or {}) - set(SERVE_DEFAULTS))
        _check(not unknown, "defaults", unknown, "these are not method defaults", f"use {', '.join(SERVE_DEFAULTS)}")
        self.defaults = {**SERVE_DEFAULTS, **(defaults or {})}
        _check(_is_int(concurrency) and concurrency >= 1, "concurrency", concurrency,
               "it bounds the upstream calls of all runs at once", "pass an integer >= 1")
        self.concurrency = concurrency
        self._check_defaults()
        _check(isinstance(drain_timeout, (int, float)) and not isinstance(drain_timeout, bool)
               and math.isfinite(drain_timeout) and drain_timeout >= 0, "drain_timeout", drain_timeout,
               "it is how long the runs in flight may take to finish on a stop", "pass a number of seconds >= 0")
        self.complete, self.server_key, self.concurrency = complete, server_key, concurrency
        self._client = complete if isinstance(complete, HTTPClient) else None  # pass-through and model lists
        self.models, self.max_body, self.drain_timeout = list(models), max_body, drain_timeout
        self.pool = _Pool(concurrency)
        self._order = itertools.count()  # earlier requests' calls go first among equals
        self._active = 0
        self._runs: set[threading.Event] = set()  # the cancel flag of every run in flight
        self._changed = threading.Condition()
        self._stopping = self._serving = False
        self._cut = threading.Event()  # set when --drain-timeout ends: the requests still in flight answer now
        self._thread: threading.Thread | None = None
        # What one client may hold (see _admit): attributes, so that an embedding program may tune them.
        self.head_timeout, self.body_timeout = SERVE_HEAD_SECONDS, SERVE_BODY_SECONDS
        self.max_connections, self.max_per_client = _connection_cap(concurrency), SERVE_MAX_PER_CLIENT
        self._clients: dict[socket.socket, _Client] = {}  # every open client connection
        self._per_host: dict[str, int] = {}
        self._clients_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_ServeHTTPServer", (_ServeHTTPServer,), {"address_family": family})
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
        rest, and release everything. Returns how many runs were still in flight when the wait ended.

        Each request still in flight then is answered before close() returns (within SERVE_DRAIN_GRACE
        seconds): a stream with an error event and ``[DONE]``, any other with a 503; the HTTPClient is then
        aborted (``abort()``: its calls in flight end, and it makes no more), as the server is done with it."""
        wait = self.drain_timeout if drain_timeout is None else drain_timeout
        self._stopping = True
        if self._serving:
            with contextlib.suppress(OSError):  # wakes the serve loop now, not at its next 0.1 s poll (Linux)
                self.httpd.socket.shutdown(socket.SHUT_RD)
            self.httpd.shutdown()
        self.httpd.server_close()
        deadline = time.monotonic() + wait
        with self._changed:
            while self._active and time.monotonic() < deadline:
                self._changed.wait(max(0.0, deadline - time.monotonic()))
            left = self._active
            for cancel in self._runs:
                cancel.set()
            # Cut off: each request still in flight now writes its last words (a stream: an error event and
            # [DONE]; a request still waiting: its 503), and only then does close() return.
            self._cut.set()
            if left and self._client is not None:
                self._client.abort()  # the upstream calls still in flight end now (the client is done with)
            grace = time.monotonic() + SERVE_DRAIN_GRACE
            while self._active and time.monotonic() < grace:
                self._changed.wait(max(0.0, grace - time.monotonic()))
        self.pool.shutdown()
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

    # --- connections -----------------------------------------------------------------------------------
    #
    # A connection waits (for a request head, from its accept or from the end of its previous reply) at most
    # head_timeout seconds in all, however slowly its bytes trickle in, then body_timeout for the body. At
    # most max_per_client connections from one address and max_connections in all are open; a connection
    # over either cap takes the place of the one, from that address or from anyone, that has waited longest
    # for a request head; when none is waiting (every one is busy with a request) it gets a 503 and a close.
    # So connections that hold a place without sending a request never lock out one that sends it.

    def _admit(self, connection: socket.socket, address: Any) -> bool:
        """Whether a newly accepted connection is served (else it was answered 503 and is closed)."""
        host = str(address[0]) if isinstance(address, tuple) and address else ""
        with self._clients_lock:
            full = None
            if self._per_host.get(host, 0) >= self.max_per_client and not self._evict(host):
                full = f"{self.max_per_client} from this address"
            elif len(self._clients) >= self.max_connections and not self._evict(None):
                full = f"{self.max_connections} in all"
            if full is None:
                self._clients[connection] = _Client(host)
                self._per_host[host] = self._per_host.get(host, 0) + 1
                return True
        body = json.dumps(_ServeError(503, f"too many open connections ({full}), each busy with a request; retry "
                                      f"in a moment", None, "too_many_connections", "server_error").body()).encode()
        with contextlib.suppress(OSError):
            connection.setblocking(False)  # the accepting thread never waits for one client
            connection.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return False

    def _evict(self, host: str | None) -> bool:
        """Close the connection (from ``host``, or from anyone) that has waited longest for a request head."""
        waiting = [(client.since, id(s), s) for s, client in self._clients.items()
                   if client.waiting and (host is None or client.host == host)]
        if not waiting:
            return False
        victim = min(waiting)[2]
        self._forget(victim)
        with contextlib.suppress(OSError):
            victim.shutdown(socket.SHUT_RDWR)  # its handler's read ends now, and the handler with it
        return True

    def _forget(self, connection: socket.socket) -> None:
        client = self._clients.pop(connection, None)
        if client is not None:
            self._per_host[client.host] -= 1
            if not self._per_host[client.host]:
                del self._per_host[client.host]

    def _waiting(self, connection: socket.socket, waiting: bool) -> None:
        """Mark a connection as waiting for a request head (evictable) or busy with a request."""
        with self._clients_lock:
            client = self._clients.get(connection)
            if client is not None:
                client.waiting, client.since = waiting, time.monotonic()

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
        if self._client is not None:
            names += (self._client.models() or []) + list(self._client.endpoints)
        names += [m for m in _flatten(self.defaults["proposers"] or [])]
        served = []
        for name in dict.fromkeys(names):
            served += [name, f"self-moa/{name}", f"self-moa-seq/{name}"]
            if self.defaults["proposers"]:
                served.append(f"moa/{name}")
        return list(dict.fromkeys(served))

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

    def _check_defaults(self) -> None:
        """Check the defaults by each method's own checks: a run of the method on the arguments a request that
        sets nothing gets, stopped at its first call (a method checks every argument before its first call)."""
        request: dict[str, Any] = {"selfmoa": {}, "temperature": None, "max_tokens": None, "fields": {}, "seed": None}
        for method in SERVE_OPTIONS:
            try:
                arguments = self._arguments(method, "m", request)
            except _ServeError:
                continue  # moa without default proposers, or over the call cap: a request's own values may do
            try:
                METHODS[method]([{"role": "user", "content": "?"}], complete=_stop_at_first_call,
                                **{**arguments, "concurrency": 1})  # one thread: it stops at once
            except _Checked:
                pass

    def _arguments(self, method: str, upstream: str, request: dict) -> dict[str, Any]:
        """The method's keyword arguments: serve's defaults, then the request's ``selfmoa`` and own fields."""
        d, extra = self.defaults, request["selfmoa"]
        options = {key: extra.get(key, d.get(key)) for key in SERVE_OPTIONS[method]
                   if key != "aggregator" and key not in _ROLE_OPTIONS}
        if "layout" in extra and "instruction" not in extra and d["instruction"] in (DEFAULT_INSTRUCTION,
                                                                                        REFERENCE_INSTRUCTION):
            options["instruction"] = None  # serve's default instruction: the one of the layout asked for
        given = {**d, **{key: extra[key] for key in _ROLE_OPTIONS if key in extra}}
        if request["temperature"] is not None:
            given["aggregator_temperature"] = request["temperature"]
        if request["max_tokens"] is not None:
            given["aggregator_max_tokens"] = request["max_tokens"]
        if request["fields"]:
            fields = given["aggregator_fields"]
            given["aggregator_fields"] = {**(fields if isinstance(fields, dict) else {}), **request["fields"]}
        options.update(proposing=_role(given), aggregating=_role(given, "aggregator_"),
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
        if self._client is None:
            return
        for model in [arguments.get("model"), arguments.get("aggregator"), *_flatten(arguments.get("proposers"))]:
            if isinstance(model, str):
                try:
                    self._client.replicas(model)
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

    def _cancel(self, cancel: threading.Event) -> None:
        """Cancel a run: its queued calls fail when they reach the pool, and its calls in flight end now
        (their upstream connections close, which stops the generation)."""
        cancel.set()
        if isinstance(self.complete, HTTPClient):
            self.complete.cancel(cancel)

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
            if not isinstance(complete, HTTPClient):
                return complete(upstream_request)
            with complete.on_behalf_of(cancel):  # this run's calls: cut off at once when it is cancelled (_cancel)
                return complete(upstream_request)

        def piece(text: str) -> None:
            if cancel.is_set():  # nobody listens: end the upstream call (its connection closes, generation stops)
                raise _Abandoned("the client went away")
            events.put(("piece", text))

        def run() -> None:
            try:
                with _on_shared_pool(self.pool, (next(self._order),), oldest_first=True):
                    result = METHODS[method](request["messages"], complete=call, stream=piece, **arguments)
                events.put(("done", result))
            except BaseException as exc:  # handed to the request's thread, which answers with it
                events.put(("error", exc))

        with self._changed:
            self._runs.add(cancel)
        try:
            threading.Thread(target=run, name="selfmoa-serve-run", daemon=True).start()
            stream = _ChunkStream(handler, model, request["include_usage"]) if streaming else None
            while True:
                if self._cut.is_set():  # the drain timeout ended: answer now, as the process is about to exit
                    cancel.set()
                    failure = _drain_cut()
                    handler.close_connection = True
                    if stream is not None and stream.started:
                        stream.send_error(failure)
                        return
                    raise failure
                try:
                    kind, value = events.get(timeout=0.05)
                except queue.Empty:
                    if _client_gone(handler.connection):
                        self._cancel(cancel)
                        handler.close_connection = True
                        return
                    continue
                if kind == "piece":
                    if stream is not None and not stream.send_piece(value):
                        self._cancel(cancel)
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
                usage = _usage(result)
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
        """Send the request, as it came, to one of the model's own upstreams, and its reply back as it comes:
        status, body and streamed events unchanged, the upstream's keys blanked out wherever they show. The
        client's ``relay`` chooses the upstream, fails over, retries and bounds each attempt by its deadline,
        as for any call, and sends that upstream's key (never the client's)."""
        if self._client is None:
            raise _ServeError(404, f"The model '{model[:200]}' does not exist: no upstream serves it", "model",
                              "model_not_found")
        try:
            with self._client.relay(model, raw, stream=streaming) as (endpoint, response):
                key = endpoint.secrets
                content_type = _redact_all(response.getheader("Content-Type") or "application/json", key)
                if streaming and response.status == 200 and content_type.startswith("text/event-stream"):
                    return self._relay_stream(handler, response, content_type, key)
                try:  # a body shorter than announced raises: relayed, it would pass for a whole one
                    data, whole = _read_capped(response, SERVE_MAX_UPSTREAM)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise _ServeError(502, f"upstream failure: model {model[:200]!r} at {endpoint.url}: the reply was "
                                      f"cut off ({type(exc).__name__})", None, "upstream_error", "upstream_error") \
                        from None
                if not whole:
                    raise _ServeError(502, f"upstream failure: model {model[:200]!r} at {endpoint.url}: the reply is "
                                      f"over {SERVE_MAX_UPSTREAM} bytes", None, "upstream_error", "upstream_error")
                retry_after = _redact_all(response.getheader("Retry-After") or "", key)
        except ConfigError:
            raise _ServeError(404, f"The model '{model[:200]}' does not exist: no upstream serves it", "model",
                              "model_not_found") from None
        except (ModelError, _ServeError) as exc:  # no upstream answered, after retries
            if self._cut.is_set():  # or the drain timeout cut the call off
                raise _drain_cut() from None
            raise exc if isinstance(exc, _ServeError) else self._failure(exc) from None
        # Sent once the upstream connection is back in the client's pool, for the client's next request.
        handler.send_bytes(response.status, _redact_bytes(data, key), content_type,
                           {"Retry-After": retry_after} if retry_after else {})

    def _relay_stream(self, handler: _ServeHandler, response: http.client.HTTPResponse, content_type: str,
                      key: Sequence[str]) -> None:
        """Pass a streamed reply on as it comes, with ``key`` blanked out."""
        try:
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
            if self._cut.is_set():
                raise OSError("cut off by the drain timeout")
            handler.end_chunked()
        except (OSError, http.client.HTTPException):
            handler.close_connection = True  # the upstream broke off mid-reply: so does this reply
            if self._cut.is_set():  # the drain timeout cut it off: the stream ends with an error and [DONE]
                event = json.dumps(_drain_cut().body()).encode()
                if handler.send_chunk(b"\n\ndata: " + event + b"\n\n") and handler.send_chunk(b"data: [DONE]\n\n"):
                    handler.end_chunked()


def _drain_cut() -> _ServeError:
    return _ServeError(503, "the server stopped before this request finished (its drain timeout ended)", None,
                       "shutting_down", "server_error")


class _Abandoned(Exception):
    """Raised from a run's stream callback once its client has gone: the completion function's read of the
    upstream stream ends there, and with it the upstream call (its connection is closed, not kept)."""


class _Checked(Exception):
    """The arguments passed a method's checks: its first call was reached (see ``ModelServer._check_defaults``)."""


def _stop_at_first_call(request: Request) -> Any:
    raise _Checked


class _Client:
    """An open client connection: its address, and whether it waits for a request head (since when)."""

    __slots__ = ("host", "waiting", "since")

    def __init__(self, host: str):
        self.host, self.waiting, self.since = host, True, time.monotonic()


def _connection_cap(concurrency: int) -> int:
    """How many client connections serve keeps open: SERVE_MAX_CONNECTIONS, or fewer under a low limit of
    open files, leaving room for the listening socket, the upstream connections and the standard streams."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # Windows: no such limit
        return SERVE_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY:
        return SERVE_MAX_CONNECTIONS
    return max(8, min(SERVE_MAX_CONNECTIONS, soft - 64 - 2 * concurrency))


class _ServeHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, admitted by its ModelServer (``_admit``) and forgotten when it closes."""

    daemon_threads = True
    request_queue_size = 128
    app: ModelServer

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.app._admit(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.app._clients_lock:
            self.app._forget(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets or drops its connection is no error worth a traceback (serve logs nothing per
        request, and a hostile client could flood the log with them); anything else still gets one."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Deadlined(io.RawIOBase):
    """A client connection read so that every read ends by its handler's deadline (None: no deadline),
    however slowly the bytes trickle in: a per-read timeout alone lets one byte a second hold it forever."""

    def __init__(self, handler: _ServeHandler):
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        handler = self.handler
        connection, deadline = handler.connection, handler.deadline
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client took too long to send its request")
            connection.settimeout(min(left, handler.timeout))
        try:
            return connection.recv_into(buffer)
        finally:
            if deadline is not None:
                connection.settimeout(handler.timeout)


def _framing_problem(headers: Any) -> str | None:
    """Why a request's framing headers are ambiguous (RFC 9112, section 6.3), or None: a request whose body
    length two readers could see differently is refused, never guessed (that is request smuggling)."""
    lengths = headers.get_all("Content-Length") or []
    if len(lengths) > 1:
        return "a request with more than one Content-Length header is refused (RFC 9112); send exactly one"
    if lengths and headers.get_all("Transfer-Encoding"):
        return "a request with both Content-Length and Transfer-Encoding is refused (RFC 9112); send Content-Length"
    return None


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
    timeout = 120  # seconds any one read or write may stall (the head and the body have deadlines of their own)
    wbufsize = 1 << 16  # a reply's headers and body leave in one send
    chunked = False
    deadline: float | None = None  # when the request head (then its body) must have arrived

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = io.BufferedReader(_Deadlined(self), 65536)

    def handle_one_request(self) -> None:
        app = self.server.app  # type: ignore[attr-defined]
        app._waiting(self.connection, True)  # idle, or reading a head: another client may take its place
        self.deadline = time.monotonic() + app.head_timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        app = self.server.app  # type: ignore[attr-defined]
        app._waiting(self.connection, False)
        self.deadline = time.monotonic() + app.body_timeout
        problem = _framing_problem(self.headers)
        if problem:
            self.send_error(400, problem)  # and the connection closes
            return False
        if self.command != "POST" and (self.headers.get("Content-Length", "0").strip() != "0"
                                       or self.headers.get("Transfer-Encoding")):
            self.close_connection = True  # a body serve does not read must not be taken for the next request
        return True

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
        try:
            data = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise _ServeError(408, f"the body did not arrive within {self.server.app.body_timeout:g} seconds",  # type: ignore[attr-defined]
                              None, "request_timeout") from None
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
  min_ok, temperature, max_tokens, fields and models (the proposers'), aggregator_fields and
  aggregator_models, aggregator, use_n, instruction, layout. The request's own temperature, max_tokens
  (or max_completion_tokens), seed, stop and standard fields (top_p, reasoning_effort,
  chat_template_kwargs, ...) apply to the answer (the aggregation); seed is also the base seed
  of the samples. The whole conversation is the prompt.
  Replies carry usage over every call of the run, and a "selfmoa" field with the calls,
  requests, retries and each request's latency.

access:
  With --server-key (else $SELFMOA_SERVER_KEY) clients must send "Authorization: Bearer KEY".
  A --host other than loopback is refused without one. A client's Authorization is never
  forwarded; upstream keys are found as for the one-shot command (see selfmoa --help).

stopping:
  On SIGINT or SIGTERM it stops accepting, lets the runs in flight finish (at most
  --drain-timeout seconds), ends each run still going with an error event and [DONE] (a
  stream) or a 503, and exits 0; a second Ctrl-C stops it at once (exit status 130).
  Exit status 2: a usage error; 1: it cannot listen on --host/--port."""

# The one-shot flags that configure nothing serve has: the prompt, the choice of method and models (the
# request's model names them), the output, and batch mode. Every other flag is shared, with its meaning.
_NOT_SERVE_FLAGS = frozenset({"help", "version", "prompt", "method", "model", "aggregator", "json", "stream",
                              "input", "output", "format", "trace", "diversity", "generator", "shard"})
_SERVE_HELP = {
    "samples": "samples of M per request (default: 6)",
    "aggregator_temperature": "the aggregator's temperature when a request gives none (default: 0.7, dropped "
                              "where a server refuses it)",
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
    add("--port", type=int, default=SERVE_PORT, help="the port to listen on; 0 picks a free one (default: "
        f"{SERVE_PORT}, which vLLM's 8000 and llama.cpp's 8080 leave free)")
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


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``selfmoa serve``: serve until SIGINT or SIGTERM, then drain and return 0 (2 a usage error, 1 no listening)."""
    environ = os.environ if environ is None else environ
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_serve_parser()
    args = parser.parse_args(argv)
    try:
        instruction = _instruction_file(args.instruction_file) or (
            REFERENCE_INSTRUCTION if args.layout == "reference" else DEFAULT_INSTRUCTION)
        proposing, aggregating = role_settings(args)
        defaults = {"n": args.samples, "window": args.window, "carry": args.carry, "proposers": args.proposer,
                    "layers": args.layers, "min_ok": args.min_ok, "temperature": args.temperature,
                    "max_tokens": args.max_tokens, "aggregator_temperature": args.aggregator_temperature,
                    "aggregator_max_tokens": args.aggregator_max_tokens, "seed": args.seed,
                    "instruction": instruction, "layout": args.layout, "use_n": args.use_n, "fields": proposing.fields,
                    "models": proposing.models, "aggregator_fields": aggregating.fields,
                    "aggregator_models": aggregating.models}
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
        print(f"selfmoa serve: {left} runs were still in flight after --drain-timeout; each was answered "
              f"(a stream: an error event and [DONE]; else 503 shutting_down) and cancelled", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
