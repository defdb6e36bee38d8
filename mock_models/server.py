"""The mock server: an OpenAI-compatible chat-completions endpoint over real HTTP, with fault injection.

Speaks the subset of the API in spec/wire.md: ``POST /v1/chat/completions`` (model, messages, temperature,
top_p, max_tokens, n, seed, stream, stream_options, stop), ``GET /v1/models``, ``GET /health``. Errors are
OpenAI-shaped JSON. Every response sets ``Content-Length`` (streams too: the events are generated first,
then sent with the injected per-token latency between them).

Token estimate (deterministic): a text has one token per word or punctuation mark (regex ``\\w+|[^\\w\\s]``);
a prompt counts its messages' tokens plus 4 per message plus 2.

Determinism: a reply is a function of (model, messages, temperature, effective seed) through sha256, where
choice ``j`` of a request with seed ``S`` has effective seed ``S + j`` (spec/wire.md section 4), so a
request with ``n`` and one request per sample give the same samples. Temperature 0 ignores the seed;
temperature > 0 without a seed draws a fresh random salt, like a real model.

Capacity (``max_concurrency``): at most that many requests are worked on at once, the others wait in a queue
with their connections open, like a GPU server with a fixed number of batch slots (llama.cpp's server has
one); ``peak_concurrency`` records the most seen at once.

Malformed requests (bodies that are not JSON, nested too deeply, holding a lone surrogate escape, fields of
the wrong type) get an OpenAI-shaped 4xx; the server never drops a connection for what a client sent
without answering. Ambiguous framing (two Content-Length headers, or one with Transfer-Encoding) is a 400
and a close, never a guess.

Faults (``fault_rate``, ``faults``, ``fault_seed``): whether a request fails, and how, is drawn from sha256
over (fault_seed, the request body, how many times this server has seen that same body), so a retry of
the same request gets a fresh but reproducible draw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mock_models import models

FAULTS = ("429", "500", "503", "drop", "truncate", "stall")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def prompt_tokens(messages: list[dict]) -> int:
    return sum(count_tokens(m["content"]) + 4 for m in messages) + 2


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", payload: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.payload = payload  # a whole error body in another server's shape (vLLM's, llama.cpp's)

    def body(self) -> dict:
        return self.payload if self.payload is not None else _error(self.message, self.kind, self.param, self.code)


THINKING = ("content", "reasoning_content", "reasoning")  # where a thinking model's thoughts go
OVERFLOWS = ("openai", "vllm", "llama.cpp", "empty-stream")  # how a server says the context window is exceeded
THOUGHT_OPENER = "Thinking (mock):"  # every thought starts so, and no answer holds it: tests look for it
_EFFORT = {"minimal": 0.25, "low": 0.5, "medium": 1.0, "high": 2.0}


def _check_body(body: object) -> dict:
    """The request's fields, checked like a real server; raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "'model' is required and must be a string", "model")
    if model not in models.MODELS:
        raise BadRequest(404, f"The model '{model[:100]}' does not exist", "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer") \
                or not isinstance(m.get("content"), str):
            raise BadRequest(400, f"messages[{i}] needs a role (system, user, assistant) and string content",
                             f"messages[{i}]")
    checks: list[tuple[str, Any, int, int, float | None]] = [  # name, JSON types, low, high, default
        ("temperature", (int, float), 0, 2, 1.0), ("top_p", (int, float), 0, 1, 1.0),
        ("n", int, 1, 128, 1), ("max_tokens", int, 1, 1_000_000, None),
        ("max_completion_tokens", int, 1, 1_000_000, None), ("seed", int, -2**63, 2**63 - 1, None)]
    out: dict[str, Any] = {"model": model, "messages": messages}
    for name, kinds, low, high, default in checks:
        value = body.get(name, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high):
            raise BadRequest(400, f"'{name}' must be a number between {low} and {high}", name)
        out[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):
        raise BadRequest(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    out["stop"] = stop or []
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(400, "'stream' must be a boolean", "stream")
    out["stream"] = stream
    options = body.get("stream_options") or {}
    out["include_usage"] = bool(isinstance(options, dict) and options.get("include_usage"))
    out["limit"] = out["max_completion_tokens"] if out["max_completion_tokens"] is not None else out["max_tokens"]
    kwargs = body.get("chat_template_kwargs")
    out["thinking"] = not (isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False)
    effort = body.get("reasoning_effort", "medium")
    if effort not in _EFFORT:
        raise BadRequest(400, f"'reasoning_effort' must be one of {', '.join(_EFFORT)}", "reasoning_effort")
    out["effort"] = _EFFORT[effort]
    return out


def _openai_reasoning(body: dict) -> None:
    """The restrictions of OpenAI's reasoning models (o-series, gpt-5), with their error bodies."""
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise BadRequest(400, f"Unsupported value: 'temperature' does not support {temperature} with this model. "
                         f"Only the default (1) value is supported.", "temperature", "unsupported_value")
    if "max_tokens" in body:
        raise BadRequest(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                         "'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")


def _overflow(shape: str, limit: int, used: int, wanted: int, stream: bool) -> BadRequest | None:
    """The context-window error of one kind of server (None: answer 200 with an empty stream)."""
    if shape == "vllm":
        message = (f"This model's maximum context length is {limit} tokens. However, you requested {used + wanted} "
                   f"tokens ({used} in the messages, {wanted} in the completion). Please reduce the length of the "
                   f"messages or completion.")
        return BadRequest(400, message, payload={"object": "error", "message": message, "type": "BadRequestError",
                                                 "param": None, "code": 400})
    if shape == "llama.cpp":
        message = "the request exceeds the available context size, try increasing it"
        return BadRequest(400, message, payload={"error": {"code": 400, "message": message,
                                                           "type": "exceed_context_size_error",
                                                           "n_prompt_tokens": used, "n_ctx": limit}})
    if shape == "empty-stream" and stream:
        return None  # llama-cpp-python: the stream starts (200), then ends with no text
    if shape == "empty-stream":
        return BadRequest(400, f"Requested tokens ({used + wanted}) exceed context window of {limit}", None, None)
    return BadRequest(400, f"This model's maximum context length is {limit} tokens. However, your messages resulted "
                      f"in {used + wanted} tokens. Please reduce the length of the messages.", "messages",
                      "context_length_exceeded")


def _thought(model: str, messages: list[dict], sample: object, tokens: int) -> str:
    """A thinking model's thoughts: ``tokens`` tokens that start with THOUGHT_OPENER (deterministic)."""
    words = ["Hmm", ",", "the", "user", "asks", "something", ";", "let", "me", "weigh", "the", "options", "."]
    start = int(models.unit("thought", model, json.dumps(messages), sample) * len(words))
    body = [words[(start + i) % len(words)] for i in range(max(0, tokens - count_tokens(THOUGHT_OPENER)))]
    return " ".join([THOUGHT_OPENER, *body])


def _limit(text: str, max_tokens: int | None, stop: list[str]) -> tuple[str, str]:
    """Apply stop sequences and max_tokens; returns the text and its finish_reason."""
    reason = "stop"
    for sequence in stop:
        if sequence in text:
            text = text[:text.index(sequence)]
    if max_tokens is not None:
        tokens = list(_TOKEN.finditer(text))
        if len(tokens) > max_tokens:
            text, reason = text[:tokens[max_tokens - 1].end()], "length"
    return text, reason


class MockServer:
    """Mock LLMs behind a real ``ThreadingHTTPServer``; a context manager that starts and stops it.

    >>> with MockServer() as server:
    ...     server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
    True
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency: float = 0.0,
                 latency_per_token: float = 0.0, fault_rate: float = 0.0, faults=None, fault_seed: int = 0,
                 retry_after: float = 1, stall_seconds: float = 30.0, honour_n: bool = True, api_key: str | None = None,
                 max_body_bytes: int = 1_000_000, context_length: int | None = None, client_timeout: float = 30.0,
                 max_concurrency: int | None = None, openai_reasoning: bool = False, refuse_n: bool = False,
                 thinking: str | None = None, thought_tokens: int = 40, overflow: str = "openai"):
        faults = tuple(faults) if faults is not None else FAULTS
        unknown = [f for f in faults if f not in FAULTS]
        if unknown or not 0 <= fault_rate <= 1:
            raise ValueError(f"faults must be among {FAULTS} and fault_rate in [0, 1] (got {unknown}, {fault_rate})")
        self.latency, self.latency_per_token = latency, latency_per_token
        self.fault_rate, self.faults, self.fault_seed = fault_rate, faults, fault_seed
        self.retry_after, self.stall_seconds, self.honour_n = retry_after, stall_seconds, honour_n
        self.api_key, self.max_body_bytes, self.context_length = api_key, max_body_bytes, context_length
        if thinking not in (None, *THINKING) or overflow not in OVERFLOWS:
            raise ValueError(f"thinking must be among {THINKING} (or None) and overflow among {OVERFLOWS} "
                             f"(got {thinking!r}, {overflow!r})")
        if isinstance(thought_tokens, bool) or not isinstance(thought_tokens, int) or thought_tokens < 6:
            raise ValueError(f"thought_tokens must be an integer >= 6 (got {thought_tokens!r})")
        # Today's servers: OpenAI's reasoning models refuse temperature and max_tokens; Anthropic's compatible
        # endpoint refuses n > 1; thinking models put thoughts in content (<think>...</think>, no reasoning
        # parser) or in reasoning_content / reasoning (with one); each server reports overflow its own way.
        self.openai_reasoning, self.refuse_n, self.thinking = openai_reasoning, refuse_n, thinking
        self.thought_tokens, self.overflow = thought_tokens, overflow
        if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
                                            or max_concurrency < 1):
            raise ValueError(f"max_concurrency must be an integer >= 1 or None (got {max_concurrency!r})")
        # At most max_concurrency requests are worked on at once (a GPU server's batch slots, llama.cpp's one
        # slot); the others wait, queued, with their connections open. peak_concurrency records the most seen.
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self.in_progress = self.peak_concurrency = 0
        # Every request, as it arrives: method, path, headers, body, status, fault; a streamed reply's entry
        # also counts its events and, live, how many were sent (a client that leaves stops it short), and
        # says when it is over ("stream_over").
        self.requests: list[dict] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        server_class = _Server6 if ":" in host else _Server  # an IPv6 address such as ::1
        self._httpd = server_class((host.strip("[]"), port), _make_handler(self, client_timeout))
        self.host, self.port = self._httpd.socket.getsockname()[:2]
        self.base_url = f"http://[{self.host}]:{self.port}/v1" if ":" in self.host else \
            f"http://{self.host}:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def start(self) -> MockServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the serve loop now, not at its next poll (Linux)
            self._httpd.socket.shutdown(socket.SHUT_RD)
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> MockServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def serve_forever(self) -> None:
        self._httpd.serve_forever(0.2)

    # --- what the handler asks ------------------------------------------------------------------------

    def draw_fault(self, raw: bytes) -> str | None:
        if not self.fault_rate:
            return None
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            seen = self._seen.get(digest, 0)
            self._seen[digest] = seen + 1
        if models.unit("fault", self.fault_seed, digest, seen) >= self.fault_rate:
            return None
        return self.faults[int(models.unit("fault-kind", self.fault_seed, digest, seen) * len(self.faults))]

    def log(self, entry: dict) -> None:
        with self._lock:
            self.requests.append(entry)

    def refusal(self, body: dict, request: dict) -> BadRequest | None:
        """What a restricted server refuses in a checked request, before any work (None: nothing)."""
        if self.openai_reasoning:
            try:
                _openai_reasoning(body)
            except BadRequest as refused:
                return refused
        if self.refuse_n and request["n"] > 1:  # Anthropic's compatible endpoint, and other gateways
            return BadRequest(400, f"n: only n=1 is supported (got {request['n']})", None, None)
        return None

    def complete(self, request: dict) -> tuple[dict, list[tuple[str | None, str, str | None]]]:
        """The chat completion for a checked request, and each choice's (content, finish_reason, reasoning):
        content None when the thoughts used up the token limit; reasoning None without a reasoning field.
        Raises BadRequest for a prompt beyond the context window, except an ``empty-stream`` overflow of a
        streamed request, whose body then has ``"overflow": True`` and no choices."""
        model, messages, limit = request["model"], request["messages"], request["limit"]
        used = prompt_tokens(messages)
        window = self.context_length or models.CONTEXT_LENGTH[model]
        if used + (limit or 0) > window:
            refused = _overflow(self.overflow, window, used, limit or 0, request["stream"])
            if refused is not None:
                raise refused
            return {"id": "chatcmpl-overflow", "created": 1_700_000_000, "model": model, "overflow": True}, []
        temperature = request["temperature"]
        n = request["n"] if self.honour_n else 1
        choices: list[tuple[str | None, str, str | None]] = []
        thinking = self.thinking if request["thinking"] else None
        reasoning_tokens = 0
        salt = os.urandom(8).hex()
        for j in range(n):
            if temperature == 0:
                sample: object = "greedy"
            elif request["seed"] is not None:
                sample = request["seed"] + j
            else:
                sample = f"{salt}-{j}"
            text = models.reply(model, messages, temperature, sample)
            if thinking is None:
                choices.append((*_limit(text, limit, request["stop"]), None))
                continue
            thought = _thought(model, messages, sample, max(6, round(self.thought_tokens * request["effort"])))
            if thinking == "content":  # no reasoning parser: the thoughts open the content, in <think> tags
                content, reason = _limit(f"<think>\n{thought}\n</think>\n\n{text}", limit, request["stop"])
                choices.append((content, reason, None))
                continue
            spent = count_tokens(thought)
            if limit is not None and spent >= limit:  # the whole limit went on thinking: no content at all
                cut, _ = _limit(thought, limit, [])
                reasoning_tokens += limit
                choices.append((None, "length", cut))
                continue
            reasoning_tokens += spent
            content, reason = _limit(text, None if limit is None else limit - spent, request["stop"])
            choices.append((content, reason, thought))
        completion_tokens = sum(count_tokens(text or "") for text, _, _ in choices) + reasoning_tokens
        created = 1_700_000_000
        ident = "chatcmpl-" + hashlib.sha256(json.dumps([request["model"], messages, temperature, request["seed"],
                                                          choices]).encode()).hexdigest()[:24]
        field = thinking if thinking in ("reasoning_content", "reasoning") else None
        body: dict[str, Any] = {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": j, "message": {"role": "assistant", "content": text,
                                                 **({field: thought} if field else {})}, "finish_reason": reason}
                        for j, (text, reason, thought) in enumerate(choices)],
            "usage": {"prompt_tokens": used, "completion_tokens": completion_tokens,
                      "total_tokens": used + completion_tokens}}
        if field or self.openai_reasoning:  # a server with a reasoning parser (or OpenAI's) counts the thoughts
            body["usage"]["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return body, choices


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True
    linger_seconds = 2.0  # how long a closing connection's unread input is drained, at most
    linger_bytes = 64 * 2**20  # and how much of it

    def handle_error(self, request, client_address) -> None:
        """A client that went away mid-reply (a timeout, a kill, a test's abandoned stream) is no bug of the mock:
        no traceback for it on standard error, where it would land in whatever runs then; anything else gets one."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        """Close a connection as careful HTTP servers do ("lingering close"): stop writing, then read and discard
        what the client is still sending (a body over the limit, refused unread) until it stops, for a bounded
        time and size. Closing with unread input would make the kernel reset the connection, which can destroy
        the error reply before the client reads it, and fail the client's own send."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            ends = time.monotonic() + self.linger_seconds
            drained = 0
            while drained < self.linger_bytes:
                left = ends - time.monotonic()
                if left <= 0:
                    break
                request.settimeout(left)
                chunk = request.recv(1 << 16)
                if not chunk:
                    break
                drained += len(chunk)
        self.close_request(request)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _make_handler(server: MockServer, client_timeout: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        default_request_version = "HTTP/1.1"  # so that even a garbled request line gets a status line back
        server_version = "mock-models/1"
        timeout = client_timeout  # a client that stalls mid-request is dropped after this long
        wbufsize = 1 << 16  # headers and body leave in one send (no Nagle / delayed-ACK stall on keep-alive)

        def setup(self) -> None:
            super().setup()
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args) -> None:
            pass

        def parse_request(self) -> bool:
            """The head, refused with 400 and a close when its framing is ambiguous (RFC 9112, section 6.3):
            two Content-Length headers, or one with Transfer-Encoding, could be read two ways (smuggling)."""
            if not super().parse_request():
                return False
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) > 1 or (lengths and self.headers.get_all("Transfer-Encoding")):
                self.send_error(400, "ambiguous framing: more than one Content-Length, or Content-Length with "
                                "Transfer-Encoding; send exactly one Content-Length")
                return False
            if self.command != "POST" and (self.headers.get("Content-Length", "0").strip() != "0"
                                           or self.headers.get("Transfer-Encoding")):
                self.close_connection = True  # a body the mock does not read is never taken for a request
            return True

        def send_error(self, code, message=None, explain=None) -> None:  # malformed request lines, etc.
            self.close_connection = True
            self._json(code, _error(message or "bad request", "invalid_request_error"))

        def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                return self._json(200, {"status": "ok"})
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "mock-models",
                     "context_length": server.context_length or models.CONTEXT_LENGTH[name]}
                    for name in models.MODELS]})
            self._json(404, _error(f"no route for GET {path[:100]}", "invalid_request_error"))

        def do_POST(self) -> None:
            if server._slots is None:
                return self._post()
            with server._slots:
                with server._lock:
                    server.in_progress += 1
                    server.peak_concurrency = max(server.peak_concurrency, server.in_progress)
                try:
                    self._post()
                finally:
                    with server._lock:
                        server.in_progress -= 1

        def _post(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            entry: dict[str, Any] = {"method": "POST", "path": path, "headers": dict(self.headers), "body": None,
                     "status": None, "fault": None}
            server.log(entry)  # logged on arrival; status and fault are filled in as they are known
            try:
                raw = self._read_body()
                try:
                    entry["body"] = json.loads(raw)
                except (ValueError, RecursionError):
                    raise BadRequest(400, "the body is not valid JSON (or is nested too deeply)", None) from None
                try:
                    json.dumps(entry["body"], ensure_ascii=False).encode("utf-8")
                except UnicodeError:  # "\\ud83d" alone: JSON can spell it, Unicode has no such character
                    raise BadRequest(400, "the body holds a lone surrogate escape (\\ud800-\\udfff); send valid "
                                     "Unicode", None) from None
                if path != "/v1/chat/completions":
                    raise BadRequest(404, f"no route for POST {path[:100]}")
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    raise BadRequest(401, "Incorrect API key provided", None, "invalid_api_key")
                request = _check_body(entry["body"])
                refused = server.refusal(entry["body"], request)
                if refused is not None:
                    raise refused
                fault = server.draw_fault(raw)
                entry["fault"] = fault
                if fault in ("429", "500", "503"):
                    entry["status"] = int(fault)
                    headers = {"Retry-After": f"{server.retry_after:g}"} if fault == "429" else {}
                    kind = {"429": "rate_limit_exceeded", "500": "server_error", "503": "service_unavailable"}[fault]
                    return self._json(int(fault), _error(f"injected fault: {kind}", kind), headers)
                if fault == "drop":
                    entry["status"] = 0
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "stall":
                    time.sleep(server.stall_seconds)
                body, choices = server.complete(request)
                entry["status"] = 200
                if request["stream"]:
                    return self._stream(request, body, choices, entry)
                time.sleep(server.latency + server.latency_per_token * body["usage"]["completion_tokens"])
                if fault == "truncate":
                    data = json.dumps(body).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.close_connection = True
                    return
                self._json(200, body)
            except BadRequest as bad:
                entry["status"] = bad.status
                self._json(bad.status, bad.body())
            except OSError:  # the client went away
                self.close_connection = True
            except Exception as exc:  # a bug of the mock: say so in the API's shape, and keep serving
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self._json(500, _error(f"mock_models failed on this request ({type(exc).__name__})",
                                           "server_error"))

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                raise BadRequest(411, "chunked request bodies are not supported; send Content-Length")
            length = self.headers.get("Content-Length")
            digits = (length or "").strip()
            if length is None or not re.fullmatch(r"[0-9]+", digits):  # "²" passes isdigit() but not int()
                self.close_connection = True
                raise BadRequest(411 if length is None else 400, "a valid Content-Length header is required")
            if len(digits) > 18 or int(digits) > server.max_body_bytes:  # int() refuses 4300+ digits
                self.close_connection = True  # the unread body makes the connection unusable
                raise BadRequest(413, f"the body is over the limit of {server.max_body_bytes} bytes")
            return self.rfile.read(int(digits))

        def _stream(self, request: dict, body: dict, choices: list[tuple[str | None, str, str | None]],
                    entry: dict) -> None:
            base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
                    "model": body["model"]}
            events = []
            field = server.thinking if server.thinking in ("reasoning_content", "reasoning") else "reasoning"
            for j, (text, reason, thought) in enumerate(choices):
                events.append({**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}]})
                for piece in re.findall(r"\S+\s*|\s+", thought or ""):
                    events.append({**base, "choices": [{"index": j, "delta": {field: piece},
                                                        "finish_reason": None}]})
                for piece in re.findall(r"\S+\s*|\s+", text or ""):
                    events.append({**base, "choices": [{"index": j, "delta": {"content": piece},
                                                        "finish_reason": None}]})
                events.append({**base, "choices": [{"index": j, "delta": {}, "finish_reason": reason}]})
            if request["include_usage"] and "usage" in body:
                events.append({**base, "choices": [], "usage": body["usage"]})
            chunks = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Length", str(sum(map(len, chunks))))
            self.end_headers()
            time.sleep(server.latency)
            entry["events_sent"], entry["events"] = 0, len(chunks)  # how far the stream got (a client may leave)
            try:
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    entry["events_sent"] += 1
                    if server.latency_per_token:
                        time.sleep(server.latency_per_token)
            finally:
                entry["stream_over"] = True  # whole, or cut short by a client that left: no more events

    return Handler


def _error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@contextlib.contextmanager
def serve(**options):
    """A mock server for the duration of a ``with`` block; yields its base URL."""
    with MockServer(**options) as server:
        yield server.base_url
