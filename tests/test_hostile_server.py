"""HTTPClient against servers that are broken or hostile: whatever they send, a call ends in a well-formed Reply
or a ModelError, in bounded time and memory, and the key never comes back out (spec/wire.md section 7)."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse

import pytest
import requests
from hypothesis import example, given, settings
from hypothesis import strategies as st

import selfmoa
import selfmoa_serve
from tests.hostile_server import HostileServer, chunked, response
from tests.scripted_server import ScriptedServer, completion

ROOT = pathlib.Path(__file__).resolve().parent.parent
CANARY = "sk-live/Zq8+Xw2=Tt9_canary42"  # '/', '+' and '=' make its JSON-escaped and percent-encoded forms differ


def leaked(*texts: str) -> list[str]:
    """The 8-character pieces of CANARY found in any of ``texts``."""
    pieces = {CANARY[i:i + 8] for i in range(len(CANARY) - 7)}
    return sorted({piece for piece in pieces for text in texts if piece in text})


def ask(client, n=1, stream=None, model="m", seed=None):
    return client(selfmoa.Request(model, ({"role": "user", "content": "hi"},), 0.7, None, n, seed, stream))


def ok_body(texts=("fine",)) -> bytes:
    return json.dumps(completion(list(texts))).encode()


# --- Strategies that build hostile replies ------------------------------------------------------------------

hostile_text = st.one_of(st.text(max_size=12), st.sampled_from(
    ["\ud83d", "a\udc00b", "\x1b[2J\x1b[1;1H", "\x00", CANARY, "x" * 300 + CANARY, "\u2028", "é" * 40]))
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), hostile_text)
KEYS = ["index", "message", "content", "delta", "finish_reason", "choices", "usage", "role", "error",
        "prompt_tokens", "completion_tokens"]
anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4), max_leaves=10)
choice = st.one_of(anything, st.fixed_dictionaries({}, optional={
    "index": st.integers(-2, 6) | anything,
    "message": st.fixed_dictionaries({}, optional={"role": st.just("assistant"),
                                                   "content": hostile_text | anything}) | anything,
    "finish_reason": st.sampled_from(["stop", "length", "content_filter"]) | anything}))
usage = st.fixed_dictionaries({}, optional={"prompt_tokens": scalar, "completion_tokens": scalar}) | anything
completion_doc = st.fixed_dictionaries({"choices": st.lists(choice, max_size=6) | anything}, optional={"usage": usage})
delta_event = st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({}, optional={
    "index": st.integers(0, 2) | anything, "delta": st.fixed_dictionaries({}, optional={
        "content": hostile_text | anything}) | anything, "finish_reason": scalar}) | anything, max_size=2)
    | anything}, optional={"usage": usage}) | anything
sse_line = st.one_of(delta_event.map(lambda e: b"data: " + json.dumps(e).encode()),
                     st.just(b"data: [DONE]"), st.just(b": keep-alive"), st.just(b"event: x"),
                     st.binary(max_size=20).map(lambda b: b"data: " + b.replace(b"\n", b"")))
sse_body = st.lists(sse_line, max_size=6).map(lambda lines: b"".join(line + b"\n\n" for line in lines))
nesting_bomb = st.builds(lambda opener, depth: opener * depth, st.sampled_from([b"[", b'{"choices":', b'{"a":[']),
                         st.integers(500, 50_000))
body = st.one_of(completion_doc.map(lambda d: json.dumps(d).encode()), anything.map(lambda d: json.dumps(d).encode()),
                 nesting_bomb, sse_body, st.binary(max_size=200),
                 st.builds(lambda pad, doc: b" " * pad + json.dumps(doc).encode(), st.integers(0, 100_000),
                           completion_doc))
status = st.sampled_from([b"200 OK"] * 6 + [b"400 Bad", b"401 No", b"404 Gone", b"408 Slow", b"429 Later", b"500 Oops",
                                            b"503 Busy", b"204 Empty", b"103 Early", b"301 Moved", b"999 What"])
extra_header = st.one_of(
    st.tuples(st.just(b"Retry-After"), st.sampled_from([b"0", b"-1", b"1e999", b"nan", b"3600", b"soon",
                                                        b"Wed, 21 Oct 2015 07:28:00 GMT",
                                                        b"Mon, 01 Jan 0000 00:00:00 GMT"])),
    st.tuples(st.just(b"Content-Type"), st.sampled_from([b"application/json", b"text/event-stream"])),
    st.tuples(st.just(b"Connection"), st.just(b"close")),
    st.tuples(st.binary(min_size=1, max_size=8).filter(lambda b: not set(b) & set(b"\r\n:")),
              st.binary(max_size=20).filter(lambda b: not set(b) & set(b"\r\n"))))
framing = st.one_of(st.just("exact"), st.just("none"), st.just("chunked"), st.just("bad-chunk"),
                    st.sampled_from([b"-5", b"abc", b"1000000000000", b"0"]), st.integers(-50, 50))


@st.composite
def hostile_replies(draw) -> bytes:
    """The whole byte stream a hostile server sends back for one request."""
    if draw(st.integers(0, 9)) == 0:  # not even a status line
        return draw(st.binary(max_size=60))
    payload, how = draw(body), draw(framing)
    headers = draw(st.lists(extra_header, max_size=3))
    if how == "exact":
        headers.append((b"Content-Length", str(len(payload)).encode()))
    elif how in ("chunked", "bad-chunk"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = chunked(payload, draw(st.lists(st.integers(1, 5000), max_size=4)))
        if how == "bad-chunk":
            payload = b"zz\r\n" + payload
    elif isinstance(how, bytes):
        headers.append((b"Content-Length", how))
    elif isinstance(how, int):
        headers.append((b"Content-Length", str(max(0, len(payload) + how)).encode()))
    return response(draw(status), headers, payload)


def check_outcome(client, server, request, pieces):
    """Run one call: it must end in a well-formed Reply or ModelError, without any piece of the key."""
    try:
        reply = client(request)
    except selfmoa.ModelError as error:
        assert error.model == "m" and error.url == server.base_url + "/chat/completions"
        assert error.status is None or isinstance(error.status, int)
        assert isinstance(error.body, str) and len(error.body) <= selfmoa.SHOWN_BODY
        assert len(error.message) <= selfmoa.SHOWN_MESSAGE
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", str(error)), "no terminal control from a server"
        for text in (str(error), repr(error), error.body, error.message):
            text.encode("utf-8")  # no lone surrogate: it can be printed and written
        assert not leaked(str(error), repr(error)), str(error)
        return error
    reply = selfmoa._as_reply(reply, request)  # what the methods receive
    assert 1 <= len(reply.texts) <= request.n and reply.texts[0] is not None or request.n > 1
    assert len(reply.finish_reasons) == len(reply.texts)
    for text in reply.texts + reply.finish_reasons + pieces:
        assert text is None or isinstance(text, str)
        if text is not None:
            text.encode("utf-8")  # no lone surrogate
    for count in (reply.prompt_tokens, reply.completion_tokens):
        assert count is None or (isinstance(count, int) and count >= 0)
    if request.stream is not None:
        assert reply.texts == ["".join(pieces)]
    return reply


@given(reply=hostile_replies(), n=st.integers(1, 4), stream=st.booleans())
@example(reply=response(b"200 OK", [], b"[" * 100_000), n=1, stream=False)
@example(reply=response(b"200 OK", [], json.dumps(completion(["\ud83d"])).encode()), n=1, stream=False)
@example(reply=response(b"200 OK", [], b"data: 1\n\n"), n=1, stream=True)
@example(reply=response(b"200 OK", [], b'data: {"choices": [1]}\n\n'), n=1, stream=True)
@example(reply=response(b"200 OK", [], b'data: {"choices": [{"delta": "x"}]}\n\n'), n=1, stream=True)
@example(reply=response(b"200 OK", [(b"Content-Length", b"1000000000000")], b"{}"), n=1, stream=False)
@example(reply=response(b"200 OK", [], b"data: [DONE]\n\n"), n=1, stream=True)
@example(reply=response(b"500 Oops", [], json.dumps({"error": {"message": "x" * 590 + CANARY}}).encode()), n=1,
         stream=False)
@settings(max_examples=120, deadline=None)
def test_whatever_a_server_sends_a_call_ends_in_a_reply_or_a_model_error_in_bounded_time(reply, n, stream):
    """Any status line, headers, framing, body, SSE events, nesting or surrogates: the call returns a well-formed
    Reply (texts are str, or None for an unusable position of n > 1) or raises a ModelError carrying model, a
    credential-free URL, status and a redacted slice of the body; never another exception, never past
    (retries + 1) x deadline."""
    pieces: list[str] = []
    n = 1 if stream else n
    request = selfmoa.Request("m", ({"role": "user", "content": "hi"},), 0.7, None, n, None,
                              pieces.append if stream else None)
    with HostileServer(reply) as server:
        client = selfmoa.HTTPClient(server.base_url, CANARY, timeout=0.5, deadline=1.0, retries=1,
                                    max_reply_bytes=65536, max_retry_after=5, sleep=lambda s: None)
        started = time.monotonic()
        check_outcome(client, server, request, pieces)
        assert time.monotonic() - started < 2 * 1.0 + 0.5


# --- Time: the deadline, and Ctrl-C ----------------------------------------------------------------------------

HEAD = response(b"200 OK", [(b"Content-Length", b"2000")], b"")


@pytest.mark.parametrize("plan", [
    [("drip", b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 200, 0.05)],  # the status line and headers, byte by byte
    [HEAD, ("drip", b" " * 2000, 0.05)],  # the body, a byte at a time
], ids=["headers", "body"])
def test_a_server_dripping_bytes_ends_in_model_error_within_the_deadline(plan):
    """A server sending a byte every 0.05 s (so that no single read times out) is cut off at the deadline of each
    attempt, and the attempt is retried."""
    with HostileServer(*plan) as server:
        client = selfmoa.HTTPClient(server.base_url, timeout=0.2, deadline=0.3, retries=1, sleep=lambda s: None)
        started = time.monotonic()
        with pytest.raises(selfmoa.ModelError, match=r"no complete reply within deadline=0.3 s") as caught:
            ask(client)
        assert time.monotonic() - started < 2 * 0.3 + 0.4
        assert caught.value.attempts == 2 and len(server.log) == 2


def test_a_dripping_stream_that_showed_text_is_cut_at_the_deadline_and_not_retried():
    """Text already passed on cannot be taken back: the deadline ends a stream in a final ModelError."""
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
    plan = [response(b"200 OK", [(b"Content-Type", b"text/event-stream")], b""), ("drip", event * 100, 0.002)]
    pieces: list[str] = []
    with HostileServer(*plan) as server:
        client = selfmoa.HTTPClient(server.base_url, timeout=0.3, deadline=0.4, retries=3, sleep=lambda s: None)
        started = time.monotonic()
        with pytest.raises(selfmoa.ModelError, match="deadline=0.4 s") as caught:
            ask(client, stream=pieces.append)
        assert time.monotonic() - started < 0.4 + 0.4 and len(server.log) == 1 and pieces
        assert not caught.value.retryable


def test_abort_ends_stalled_calls_at_once_and_closes_their_sockets(monkeypatch):
    """abort() (what Ctrl-C calls) ends every call in flight with ModelError and shuts their sockets."""
    monkeypatch.setattr(selfmoa, "PROBE_WAIT", 0.05)  # the calls behind the first (never answered) go soon
    with HostileServer(("hold",)) as server:
        client = selfmoa.HTTPClient(server.base_url, timeout=30, deadline=60)
        errors: list[BaseException] = []

        def call():
            try:
                ask(client)
            except selfmoa.ModelError as exc:
                errors.append(exc)
        threads = [threading.Thread(target=call) for _ in range(3)]
        for thread in threads:
            thread.start()
        while len(server.log) < 3:
            time.sleep(0.01)
        started = time.monotonic()
        client.abort()
        for thread in threads:
            thread.join(2)
        assert time.monotonic() - started < 0.5 and len(errors) == 3
        assert all("interrupted" in str(error) for error in errors)
        for _ in range(100):
            if len(server.closed_by_client) == 3:
                break
            time.sleep(0.01)
        assert len(server.closed_by_client) == 3
        with pytest.raises(selfmoa.ModelError, match="interrupted"):
            ask(client)  # an aborted client stays aborted


@pytest.fixture
def stalling_server():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()
    closed: list[bool] = []
    held: list[bool] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if "slow" in json.dumps(body["messages"]):
                held.append(True)
                self.connection.settimeout(0.05)
                while not release.is_set():  # held open until the client goes away
                    try:
                        if self.connection.recv(1) == b"":
                            closed.append(True)
                            return
                    except (TimeoutError, OSError):
                        continue
                return
            data = json.dumps(completion(["ok"] * body.get("n", 1))).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", closed, held
    release.set()
    httpd.shutdown()
    httpd.server_close()


# Ctrl-C at a terminal: SIGINT at its default, whatever the test runner inherited (a shell that starts a job
# in the background with "&" ignores SIGINT in it, and Python leaves an ignored SIGINT ignored).
AS_AT_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


# The same, with the calls behind a server's first request waiting 0.05 s for it, not PROBE_WAIT (2 s): for a test
# that needs every call in flight against a server that answers none.
AS_AT_A_TERMINAL_NO_PROBE_WAIT = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                                  "import selfmoa; selfmoa.PROBE_WAIT = 0.05; sys.exit(selfmoa.main(sys.argv[2:]))")


def interrupt(command, wait_for, timeout=10.0, launcher=AS_AT_A_TERMINAL):
    """Start selfmoa, wait until ``wait_for()`` holds, send SIGINT; the seconds it took to exit, and its output."""
    process = subprocess.Popen([sys.executable, "-c", launcher, str(ROOT / "selfmoa.py"), *command],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not wait_for() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
        return time.monotonic() - sent, process.returncode, out, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctrl_c_ends_a_batch_with_stalled_calls_within_a_second_keeping_finished_lines(tmp_path, stalling_server):
    """Ctrl-C during a batch whose remaining calls are stalled: exit 130 within about a second, every finished
    line kept, the stalled sockets closed."""
    url, closed, held = stalling_server
    records = [{"id": i, "prompt": "fast" if i < 3 else "slow"} for i in range(5)]  # 2 of 4 call slots stall
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "out.jsonl"

    def three_done():
        return output.exists() and output.read_text().count("\n") >= 3 and len(held) == 2 and not closed
    seconds, code, _, err = interrupt(["--base-url", url, "-m", "m", "-n", "2", "--timeout", "30", "--concurrency",
                                       "4", "-i", str(tmp_path / "in.jsonl"), "-o", str(output)], three_done)
    assert code == 130 and seconds < 1.0, err
    answered = [json.loads(line) for line in output.read_text().splitlines() if '"answer"' in line]
    assert sorted(line["id"] for line in answered) == [0, 1, 2]
    assert "interrupted" in err and "Traceback" not in err
    for _ in range(100):
        if closed:
            break
        time.sleep(0.01)
    assert closed, "the stalled connections were closed"


def test_ctrl_c_ends_a_single_prompt_with_stalled_calls_within_a_second(tmp_path, stalling_server):
    url, closed, held = stalling_server
    seconds, code, out, err = interrupt(["--base-url", url, "-m", "m", "-n", "3", "--no-n", "--timeout", "30",
                                         "slow"], lambda: len(held) == 3, launcher=AS_AT_A_TERMINAL_NO_PROBE_WAIT)
    assert code == 130 and seconds < 1.0 and "interrupted" in err and "Traceback" not in err


# --- Memory: size caps ------------------------------------------------------------------------------------------

ENDLESS = ("repeat", b" " * 65536, 800)  # 50 MB


@pytest.mark.parametrize("plan, stream, match", [
    ([response(b"200 OK", [], b""), ENDLESS], False, "larger than max_reply_bytes"),  # no length: read to the close
    ([response(b"200 OK", [(b"Content-Length", b"1000000000000")], b""), ENDLESS], False, "larger than"),
    ([response(b"200 OK", [(b"Transfer-Encoding", b"chunked")], b""),
      ("repeat", b"10000\r\n" + b" " * 65536 + b"\r\n", 800)], False, "larger than"),
    ([response(b"500 Oops", [], b"{"), ENDLESS], False, "HTTP 500"),  # only the start of an error is read
    ([response(b"200 OK", [(b"Content-Type", b"text/event-stream")], b"data: "), ("repeat", b"x" * 65536, 800)],
     True, "longer than"),  # one endless line
    ([response(b"200 OK", [(b"Content-Type", b"text/event-stream")], b""),
      ("repeat", b'data: {"choices": [{"delta": {"content": "' + b"x" * 60000 + b'"}}]}\n\n', 800)], True,
     "larger than"),
], ids=["no-length", "huge-length", "chunked", "error-body", "endless-sse-line", "endless-sse-events"])
def test_a_reply_over_the_size_cap_ends_in_model_error_with_flat_memory(plan, stream, match):
    """A 50 MB reply against a 1 MiB cap (or the 1 MiB SSE line cap, or the 64 KiB read of an error body): a
    ModelError, and memory peaks at a few MB, whatever Content-Length claims."""
    with HostileServer(*plan) as server:
        client = selfmoa.HTTPClient(server.base_url, timeout=2, deadline=10, retries=1, sleep=lambda s: None,
                                    max_reply_bytes=2**20)
        tracemalloc.start()
        try:
            with pytest.raises(selfmoa.ModelError, match=match):
                ask(client, stream=(lambda piece: None) if stream else None)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20
        assert len(server.log) == (2 if match == "HTTP 500" else 1), "an over-size reply is final, a 500 retried"


def test_the_default_reply_cap_is_a_few_tens_of_megabytes():
    assert selfmoa.HTTPClient("http://127.0.0.1:9/v1").max_reply_bytes == selfmoa.MAX_REPLY_BYTES == 32 * 2**20
    with pytest.raises(selfmoa.ConfigError, match="max_reply_bytes"):
        selfmoa.HTTPClient("http://127.0.0.1:9/v1", max_reply_bytes=10)


def test_a_body_shorter_than_its_content_length_is_a_retried_truncation_not_a_memory_error():
    with HostileServer(response(b"200 OK", [(b"Content-Length", b"1000000000000")], b'{"choices": []}')) as server:
        client = selfmoa.HTTPClient(server.base_url, retries=1, sleep=lambda s: None)
        with pytest.raises(selfmoa.ModelError, match="cut off") as caught:
            ask(client)
        assert caught.value.attempts == 2 and len(server.log) == 2


# --- n: choices placed by index, unusable ones asked for again on their own ------------------------------------

def choices(*pairs) -> bytes:
    """A completion whose choices are (index, content) pairs, in this order."""
    return json.dumps({"choices": [{"index": index, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"} for index, content in pairs]}).encode()


@pytest.mark.parametrize("reply, asked_again", [
    (choices((0, "a"), (1, None), (2, "c"), (3, "d")), [1]),  # a refusal / a reasoning parser out of tokens
    (choices((0, "a"), (0, "dup"), (1, "b"), (3, "d")), [2]),  # a repeated index: the first one counts
    (choices((0, "a"), (2, "c"), (3, "d")), [1]),  # a gap
    (choices((0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "extra"), (-1, "neg")), []),  # extras ignored
    (choices((3, "d"), (1, "b"), (0, "a"), (2, "c")), []),  # any order
    (choices((1, "b"), (2, None)), [0, 2, 3]),  # nothing usable at 0
    (choices((0, None), (1, None)), [0, 1, 2, 3]),  # nothing usable at all: each sample on its own
], ids=["null-content", "duplicate", "gap", "extras", "reordered", "missing-first", "all-null"])
def test_each_choice_counts_only_for_its_own_index_and_the_rest_are_asked_for_singly(reply, asked_again):
    """Choices are matched by index; a position without usable text is asked for on its own with seed S+i; the
    aggregator sees each sample exactly once, in sample order."""
    with ScriptedServer(("raw", 200, reply, {}), ("choices", None)) as server:
        client = selfmoa.HTTPClient(server.base_url, sleep=lambda s: None)
        result = selfmoa.self_moa("hi", "m", n=4, complete=client, seed=10, concurrency=1)
    given_texts = {0: "a", 1: "b", 2: "c", 3: "d"}
    expected = [f"text {10 + i} 0" if i in asked_again else given_texts[i] for i in range(4)]
    singles = sorted(e["body"]["seed"] for e in server.log[1:-1])
    assert singles == [10 + i for i in asked_again]
    assert all(e["body"].get("n", 1) == 1 for e in server.log[1:-1])
    assert selfmoa.read_references(server.log[-1]["body"]["messages"]) == expected
    assert result.proposals() == {1: expected} and result.calls == 5


def test_a_single_sample_without_usable_text_fails_only_that_sample():
    """Self-MoA n=3 against a server refusing one sample: the other two are aggregated."""
    refusal = json.dumps({"choices": [{"index": 0, "message": {"content": None}, "finish_reason": "content_filter"}]})
    with ScriptedServer(("raw", 200, choices((0, "a"), (1, None), (2, "c")), {}),
                        ("raw", 200, refusal.encode(), {}), ("choices", None)) as server:
        client = selfmoa.HTTPClient(server.base_url, sleep=lambda s: None)
        result = selfmoa.self_moa("hi", "m", n=3, complete=client, seed=0)
    assert result.proposals() == {1: ["a", "c"]}
    failed = [call for call in result.trace if call.error]
    assert len(failed) == 1 and "content_filter" in failed[0].error and failed[0].seed == 1


def test_lone_surrogates_in_a_reply_become_replacement_characters_and_crash_nothing(tmp_path, capsys):
    """A reply text holding lone surrogates ("\\ud83d" cut from its pair) is shown, traced and written with
    U+FFFD in their place, on every path."""
    text = json.dumps(completion(["half an emoji: \ud83d.", "another \udc00"])).encode()
    with ScriptedServer(("raw", 200, text, {})) as server:
        code = selfmoa.main(["--base-url", server.base_url, "-m", "m", "-n", "2", "--json", "Q"], environ={})
        out, _ = capsys.readouterr()
        assert code == 0 and "half an emoji: \ufffd." in out
        (tmp_path / "in.jsonl").write_text('{"prompt": "Q"}\n')
        code = selfmoa.main(["--base-url", server.base_url, "-m", "m", "-n", "2", "--trace", "-i",
                             str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")], environ={})
        assert code == 0 and "\ufffd" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")
        pieces: list[str] = []
        events = [b'{"choices": [{"index": 0, "delta": {"content": "\\ud83d"}}]}', b"[DONE]"]
    with ScriptedServer(("sse", events)) as server:
        assert ask(selfmoa.HTTPClient(server.base_url), stream=pieces.append).texts == ["\ufffd"]
        assert pieces == ["\ufffd"]


# --- Keys ------------------------------------------------------------------------------------------------------

def echo(body: bytes, status: bytes = b"401 Unauthorized") -> bytes:
    return response(status, [(b"Content-Length", str(len(body)).encode())], body)


ACROSS_MESSAGE_CUT = json.dumps({"error": {"message": "m" * (selfmoa.SHOWN_MESSAGE - 10) + CANARY}}).encode()
ACROSS_BODY_CUT = b"b" * (selfmoa.SHOWN_BODY - 10) + CANARY.encode()
FAILURES = {
    "json-echo": echo(json.dumps({"error": {"message": f"Incorrect API key provided: {CANARY}"}}).encode()),
    "across-message-cut": echo(ACROSS_MESSAGE_CUT),
    "across-body-cut": echo(ACROSS_BODY_CUT, b"500 Oops"),
    "json-escaped": echo(b'{"error": {"message": "key ' + CANARY.replace("/", "\\/").encode() + b' is bad"}}'),
    "percent-encoded": echo(b"<a href='/login?key=" + selfmoa.urllib.parse.quote(CANARY, safe="").encode()
                            + b"'>again</a>", b"403 Forbidden"),
    "prefix-only": echo(f"key {CANARY[:12]}... is revoked".encode()),
    "status-line": f"HTTP/1.1 abc {CANARY}\r\n\r\n".encode(),
    "bad-reply": echo(json.dumps({"choices": "no", "echo": CANARY}).encode(), b"200 OK"),
    "stream-event": response(b"200 OK", [(b"Content-Type", b"text/event-stream")], f"data: {CANARY}\n\n".encode()),
    "dropped": b"",
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_no_piece_of_the_key_appears_anywhere_on_any_failure_path(name, tmp_path, capsys):
    """A canary key echoed by the server (whole, across the cut, JSON-escaped, percent-encoded, a prefix), through
    the library (error, repr, partial trace), the CLI (stderr, --json) and batch (output file, trace): no 8
    characters of it are found anywhere."""
    stream = name == "stream-event"
    with HostileServer(FAILURES[name]) as server:
        client = selfmoa.HTTPClient(server.base_url, CANARY, retries=1, sleep=lambda s: None, timeout=2)
        with pytest.raises(selfmoa.SelfMoAError) as caught:
            if stream:
                ask(client, stream=lambda piece: None)
            else:
                selfmoa.self_moa("Q", "m", n=2, complete=client)
        error = caught.value
        partial = json.dumps(error.partial.to_dict()) if error.partial else ""
        bodies = [getattr(f, "body", "") for f in getattr(error, "failures", [error])]
        assert not leaked(str(error), repr(error), partial, repr(client), *bodies)
        flags = ["--base-url", server.base_url, "--api-key", CANARY, "-m", "m", "-n", "2", "--retries", "0",
                 "--timeout", "2"]  # the library run above retried; here a retry would only add its backoff
        code = selfmoa.main([*flags, "--json", "Q"], environ={})
        out, err = capsys.readouterr()
        assert code == 1 and not leaked(out, err)
        (tmp_path / "in.jsonl").write_text('{"prompt": "Q"}\n')
        code = selfmoa.main([*flags, "--trace", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl")],
                            environ={})
        out, err = capsys.readouterr()
        assert code == 1 and not leaked(out, err, (tmp_path / "o.jsonl").read_text())
    assert all(f"Bearer {CANARY}".encode() in request for request in server.log)


@pytest.mark.parametrize("key", [CANARY + "\r", CANARY + "\n", "\t" + CANARY, CANARY[:10] + " " + CANARY[10:],
                                 CANARY + "\x00", CANARY + "é", CANARY + "\x7f"])
def test_a_key_with_a_control_or_non_ascii_character_is_refused_up_front_without_showing_it(key, capsys):
    """A key ending in \\r (read from a CRLF file), or holding any control, space or non-ASCII character, is a
    ConfigError (exit 2 naming where the key came from) that shows no part of it."""
    with pytest.raises(selfmoa.ConfigError) as caught:
        selfmoa.Endpoint("http://127.0.0.1:9/v1", key)
    assert not leaked(str(caught.value), repr(caught.value))
    url = "http://127.0.0.1:9/v1"
    for argv, environ, source in [(["--base-url", url, "--api-key", key], {}, "--api-key"),
                                  ([], {"OPENAI_BASE_URL": url, "OPENAI_API_KEY": key}, "$OPENAI_API_KEY"),
                                  (["--base-url", url, "--endpoint", "q=" + url], {"SELFMOA_API_KEY_Q": key},
                                   "$SELFMOA_API_KEY_Q")]:
        code = selfmoa.main([*argv, "-m", "m", "Q"], environ=environ)
        out, err = capsys.readouterr()
        assert code == 2 and f"selfmoa: error: {source}: " in err and "control character" in err, err
        assert not leaked(out, err)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:99999/v1?api-key=" + CANARY, "port"),
    ("http://127.0.0.1:0/v1", "port"),
    ("http://127.0.0.1:http/v1", "port"),
    ("http://user:" + CANARY + "@127.0.0.1:8000/v1", "credentials"),
    ("http://127.0.0.1:8000/v1 ?api-key=" + CANARY, "space"),
    ("http://[::1/v1?key=" + CANARY, "not a valid URL"),
    ("ftp://127.0.0.1/" + CANARY, "not an http"),
    ("http:///v1/" + CANARY, "no host"),
    ("http://127.0.0.1:8000/v1/\u00e9?" + CANARY, "non-ASCII"),
])
def test_a_bad_url_is_a_usage_error_naming_the_flag_and_echoing_no_credentials_path_or_query(url, why, capsys):
    """Bad ports, schemes, hosts, characters or credentials in a URL: exit 2, the message names the flag (or the
    variable) and shows at most the URL's scheme and host."""
    for argv, source in [(["--base-url", url], "--base-url"), (["--base-url", "http://127.0.0.1:9/v1", "--endpoint",
                                                              "q=" + url], "--endpoint q="), ([], "$OPENAI_BASE_URL")]:
        code = selfmoa.main([*argv, "-m", "m", "Q"], environ={"OPENAI_BASE_URL": url})
        out, err = capsys.readouterr()
        message = err.strip().splitlines()[-1]
        assert code == 2 and message.startswith(f"selfmoa: error: {source}") and why in message, message
        shown = message.split("; pass a URL like")[0]
        assert not leaked(out, err) and "api-key=" not in shown and "//user" not in shown and "/v1" not in shown
    with pytest.raises(selfmoa.ConfigError, match=why) as caught:
        selfmoa.HTTPClient(url)
    assert not leaked(str(caught.value))


def test_a_bad_timeout_or_deadline_is_a_usage_error_naming_the_flag(capsys):
    """Zero or negative: refused by the client's checks; NaN and infinities: refused by argparse already. Either
    way exit 2, naming the flag and the value."""
    for flag, value in [("--timeout", "0"), ("--timeout", "nan"), ("--deadline", "-1"), ("--deadline", "inf")]:
        try:
            code = selfmoa.main(["--base-url", "http://127.0.0.1:9/v1", flag, value, "-m", "m", "Q"], environ={})
        except SystemExit as exited:  # argparse's own usage error
            code = exited.code
        err = capsys.readouterr().err
        named = f"selfmoa: error: {flag} {value}" in err or f"selfmoa: error: argument {flag}: '{value}'" in err
        assert code == 2 and named, err



def test_a_completion_function_may_mark_samples_without_text_with_none():
    """The seam: a Reply holding None at position i gets sample i asked for again on its own (seed S+i); a single
    sample without text is a ModelError for that sample only."""
    asked = []

    def complete(request):
        asked.append((request.n, request.seed))
        if request.n == 3:
            return selfmoa.Reply(["a", None, "c"])
        return selfmoa.Reply([None]) if request.seed == 101 else f"single {request.seed}"
    result = selfmoa.self_moa("hi", "m", n=3, complete=complete, seed=100, concurrency=1)
    assert result.proposals() == {1: ["a", "c"]} and (1, 101) in asked
    assert [call.error is not None for call in result.trace] == [False, True, False]
    with pytest.raises(selfmoa.ModelError, match="holds no text"):
        selfmoa._as_reply(selfmoa.Reply([None]), selfmoa.Request("m", (), n=1))


@pytest.mark.parametrize("before", [b"", b'data: {"choices": [{"index": 0, "delta": {"content": "half an ans"}}]}\n\n'])
def test_an_error_event_in_a_stream_is_a_model_error_never_a_complete_answer(before):
    """A server that fails mid-stream sends `data: {"error": {...}}` and often `data: [DONE]` after it (vLLM
    does; so does `selfmoa serve`). That is a ModelError carrying the server's message (final once text was
    passed on), never an empty or half answer returned as if whole."""
    events = before + b'data: {"error": {"message": "the engine died", "type": "server_error"}}\n\ndata: [DONE]\n\n'
    plan = response(b"200 OK", [(b"Content-Type", b"text/event-stream"), (b"Content-Length", b"%d" % len(events))],
                    events)
    with HostileServer(plan) as server:
        shown: list[str] = []
        with pytest.raises(selfmoa.ModelError, match="the engine died") as failure:
            ask(selfmoa.HTTPClient(server.base_url, retries=1, backoff=0), stream=shown.append)
    assert len(server.log) == (1 if before else 2) and failure.value.retryable == (not before)


def test_a_key_in_the_base_urls_query_is_never_shown_when_a_server_echoes_it(capsys):
    """Azure-style endpoints take their key in the query (`?api-key=...`): when a server echoes it back, whole or
    cut off, it is blanked like a header key: in the error, the trace, `--json` and serve's replies."""
    secret = "QueryKey-" + CANARY[:20]
    echo = ("json", 401, {"error": {"message": f"bad api-key {secret} for /v1?api-key={secret[:12]}"}}, {})
    with ScriptedServer(echo) as server:
        url = f"{server.base_url}?api-version=2024-06-01&api-key={urllib.parse.quote(secret, safe='')}"
        with pytest.raises(selfmoa.NotEnoughProposals) as caught:
            selfmoa.self_moa("Q", "m", n=2, complete=selfmoa.HTTPClient(url, retries=0))
        shown = [str(caught.value), json.dumps(caught.value.partial.to_dict())]
        assert selfmoa.main(["--base-url", url, "-m", "m", "-n", "2", "--json", "Q"], environ={}) == 1
        shown += list(capsys.readouterr())
        with selfmoa_serve.ModelServer(selfmoa.HTTPClient(url, retries=0), port=0) as front:
            for model in ("self-moa/m", "m"):  # a method run, and pass-through
                reply = requests.post(front.base_url + "/chat/completions", timeout=10,
                                      json={"model": model, "messages": [{"role": "user", "content": "Q"}]})
                shown.append(reply.text)
    assert all("bad api-key *** for /v1?api-key=***" in text for text in shown[:2]), shown[:2]
    assert [text for text in shown if secret[:8] in text or secret[-8:] in text] == []
