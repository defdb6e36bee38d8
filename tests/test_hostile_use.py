"""Serve, batch and the client under hostile use: clients that trickle their requests or hold connections
open, requests whose framing could be read two ways, a stop that cuts runs off, other programs cutting a
batch's output, interim responses, abandoned streams and proxies. Every test uses real sockets on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import resource
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests

import selfmoa
import selfmoa_batch
import selfmoa_serve
from mock_models.server import MockServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is 17 * 23 + 4?"}]


def toy(request):
    return "an answer of " + request.model


def read_reply(connection: socket.socket, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit`` seconds pass)."""
    connection.settimeout(limit)
    data = b""
    deadline = time.monotonic() + limit
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            chunk = connection.recv(65536)
            if not chunk:
                return data + b"<closed>"
            data += chunk
    return data


def read_response(connection: socket.socket, limit: float = 5.0) -> bytes:
    """One whole response (its head and a body of its Content-Length) from a connection kept alive, read as soon
    as it is there; less if ``limit`` seconds pass or the server closes first (then ending in ``<closed>``)."""
    connection.settimeout(limit)
    data = b""
    deadline = time.monotonic() + limit
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            head, found, body = data.partition(b"\r\n\r\n")
            if found:
                length = [line.split(b":", 1)[1] for line in head.split(b"\r\n")[1:]
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0]):
                    return data
            chunk = connection.recv(65536)
            if not chunk:
                return data + b"<closed>"
            data += chunk
    return data


# --- framing: one way to read a request's length, or 400 and a close ----------------------------------------

SMUGGLED = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
AMBIGUOUS = {
    "two different lengths": b"Content-Length: 2\r\nContent-Length: %d\r\n",
    "the same length twice": b"Content-Length: %d\r\nContent-Length: %d\r\n",
    "a length and chunked": b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n",
    "chunked and a length": b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n",
}


@pytest.fixture(scope="module")
def mock():
    with MockServer() as server:
        yield server


@pytest.fixture(scope="module")
def plain():
    with selfmoa_serve.ModelServer(toy, port=0) as server:
        yield server


@pytest.mark.parametrize("which", ["serve", "mock"])
@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_request_framing_is_a_400_and_a_close_in_serve_and_the_mock(plain, mock, which, case):
    """RFC 9112 section 6.3: a request with repeated Content-Length headers (equal or not), or with
    Content-Length and Transfer-Encoding, is refused with 400 and the connection closes; whatever followed
    the head (here a second request smuggled in the body) is never answered."""
    host, port = (plain.host, plain.port) if which == "serve" else ("127.0.0.1", mock.port)
    body = json.dumps({"model": "self-moa/m", "messages": QUESTION}).encode()
    framing = AMBIGUOUS[case].replace(b"%d", b"%d" % len(body))
    with socket.create_connection((host, port), timeout=5) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + framing + b"\r\n" + body + SMUGGLED)
        reply = read_reply(connection)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert reply.endswith(b"<closed>") and reply.count(b"HTTP/1.1 ") == 1, reply
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert "Content-Length" in json.loads(rest.removesuffix(b"<closed>"))["error"]["message"]


@pytest.mark.parametrize("which", ["serve", "mock"])
def test_a_get_announcing_a_body_is_answered_and_closed_so_its_body_is_never_a_request(plain, mock, which):
    host, port = (plain.host, plain.port) if which == "serve" else ("127.0.0.1", mock.port)
    with socket.create_connection((host, port), timeout=5) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                           % (len(SMUGGLED), SMUGGLED))
        reply = read_reply(connection)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 ") == 1 and reply.endswith(b"<closed>")


# --- slow clients: deadlines on the head and the body, caps on connections -----------------------------------


def test_a_client_trickling_its_request_head_is_cut_off_at_the_head_deadline(plain):
    """One byte every 0.1 s keeps any per-read timeout happy; the head's own deadline still ends it."""
    plain.head_timeout = 0.5
    try:
        with socket.create_connection((plain.host, plain.port), timeout=5) as connection:
            started = time.monotonic()
            closed = None
            for byte in (b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100):
                try:
                    connection.send(bytes([byte]))
                    if connection.recv(1, socket.MSG_DONTWAIT) == b"":
                        closed = time.monotonic() - started
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    closed = time.monotonic() - started
                    break
                time.sleep(0.1)
    finally:
        plain.head_timeout = selfmoa_serve.SERVE_HEAD_SECONDS
    assert closed is not None and 0.4 <= closed <= 2.0, closed


def test_a_client_trickling_its_body_gets_408_at_the_body_deadline(plain):
    plain.body_timeout = 0.5
    try:
        with socket.create_connection((plain.host, plain.port), timeout=5) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            started = time.monotonic()
            for _ in range(20):  # 2 s of one byte every 0.1 s, until the server answers (or 1 s passed)
                with contextlib.suppress(OSError):
                    connection.send(b" ")
                time.sleep(0.1)
                if time.monotonic() - started > 1.0 or select.select([connection], [], [], 0)[0]:
                    break
            reply = read_reply(connection)
    finally:
        plain.body_timeout = selfmoa_serve.SERVE_BODY_SECONDS
    assert reply.startswith(b"HTTP/1.1 408 ") and reply.endswith(b"<closed>"), reply[:300]
    assert json.loads(reply.partition(b"\r\n\r\n")[2].removesuffix(b"<closed>"))["error"]["code"] == "request_timeout"


SLOW_SERVER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import selfmoa_serve
server = selfmoa_serve.ModelServer(lambda request: "ok", port=0, server_key="the-key").start()
print(server.port, server.max_connections, server.max_per_client, flush=True)
sys.stdin.read()
server.close(drain_timeout=0)
"""


def wait_for_the_accept_queue(port: int, below: int) -> None:
    """Wait (at most 2 s) until fewer than ``below`` connections wait in the accept queue of the listening socket
    on ``port``, as Linux counts them in /proc/net/tcp; elsewhere, wait 0.06 s."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            with open("/proc/net/tcp") as table:
                rows = [line.split() for line in table.readlines()[1:]]
        except OSError:
            time.sleep(0.06)
            return
        queued = [int(row[4].split(":")[1], 16) for row in rows  # state 0A: listening; rx_queue: its queue
                  if row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port]
        if not queued or queued[0] < below:
            return
        time.sleep(0.005)


def test_1100_trickling_connections_at_a_1024_file_limit_leave_health_and_keyed_requests_answered():
    """Serve runs at the common limit of 1,024 open files. 1,100 connections from 81 addresses (300 from
    one of them) each send one header byte at a time and never finish; meanwhile /health and a keyed
    request from another address are answered within a few seconds, again and again."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"this test opens 1,100 connections; the hard limit of open files is {hard}")
    if soft != resource.RLIM_INFINITY and soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))
    process = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    trickling: list[socket.socket] = []
    try:
        port, total_cap, client_cap = map(int, process.stdout.readline().split())
        assert total_cap < 1024 and client_cap < 300
        sources = ["127.0.0.2"] * 300 + [f"127.0.1.{i % 80 + 1}" for i in range(800)]
        for i, source in enumerate(sources):
            if i % 32 == 31:  # paced: a full listen queue drops a connect, which the kernel retries after 1 s
                wait_for_the_accept_queue(port, below=64)
            connection = socket.socket()
            connection.bind((source, 0))
            connection.settimeout(5)
            connection.connect(("127.0.0.1", port))
            connection.setblocking(False)
            with contextlib.suppress(OSError):
                connection.send(b"GET /health HTTP/1.1\r\nX-Slow: ")
            trickling.append(connection)
        answered: list[float] = []
        session = requests.Session()
        stop = time.monotonic() + 2
        while time.monotonic() < stop and len(answered) < 4:
            for connection in trickling:  # one more byte each, on every round
                with contextlib.suppress(OSError):
                    connection.send(b"a")
            started = time.monotonic()
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
            keyed = session.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=5,
                                 headers={"Authorization": "Bearer the-key"},
                                 json={"model": "self-moa/m", "messages": QUESTION, "selfmoa": {"n": 1}})
            unkeyed = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            assert (health.status_code, keyed.status_code, unkeyed.status_code) == (200, 200, 401)
            answered.append(time.monotonic() - started)
            if len(answered) < 4:
                time.sleep(0.2)
        assert len(answered) >= 3 and max(answered) < 3.0, answered
        closed = 0
        for connection in trickling:
            try:
                closed += connection.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= 1100 - total_cap, f"only {closed} of the 1,100 trickling connections were closed"
    finally:
        process.stdin.close()  # the server first: 1,100 connections closing under it would keep it busy
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        for connection in trickling:
            connection.close()


def test_over_the_caps_a_connection_takes_a_waiting_ones_place_or_gets_a_503_when_all_are_busy():
    """With every place taken by a connection busy with a request, the next one gets a 503 naming the cap
    (and Retry-After) at once; once one of them only waits, a newcomer takes its place instead."""
    release = threading.Event()

    def stuck(request):
        release.wait(10)
        return "done"

    with selfmoa_serve.ModelServer(stuck, port=0, concurrency=4) as server:
        server.max_per_client = 2
        body = json.dumps({"model": "self-moa/m", "messages": QUESTION, "selfmoa": {"n": 1}}).encode()
        busy = []
        for _ in range(2):
            connection = socket.create_connection((server.host, server.port), timeout=5)
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
            busy.append(connection)
        deadline = time.monotonic() + 5
        while len(server._runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection((server.host, server.port), timeout=5) as third:
            reply = read_reply(third)
        assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in reply and reply.endswith(b"<closed>")
        error = json.loads(reply.partition(b"\r\n\r\n")[2].removesuffix(b"<closed>"))["error"]
        assert error["code"] == "too_many_connections" and "2 from this address" in error["message"]
        release.set()
        for connection in busy:  # answered; now kept alive and waiting for a next request
            assert read_response(connection, 0.5).startswith(b"HTTP/1.1 200 ")
        # The reply reaches the client a moment before serve marks its connection as waiting again.
        deadline = time.monotonic() + 5
        while not all(client.waiting for client in list(server._clients.values())) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert requests.get(server.base_url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
        evicted = sum(read_reply(connection, 0.3) == b"<closed>" for connection in busy)
        assert evicted == 1
        for connection in busy:
            connection.close()


# --- the drain: every request cut off gets its last words -----------------------------------------------------


def test_at_the_drain_timeout_streams_end_with_an_error_and_done_and_waiting_requests_get_503():
    """A stream mid-answer and a request still waiting for its run, both cut off by the drain timeout: the
    stream ends with an error event and [DONE], the waiting request gets its 503, and close() returns only
    after both were written."""
    release = threading.Event()

    def slow(request):
        if request.stream is not None:  # the final aggregation: stream until released
            for i in range(200):
                if release.wait(0.02):
                    break
                request.stream(f"piece {i} ")
            return "never mind"
        if request.messages[-1]["content"] == "2?":  # the other request's samples: wait until released
            release.wait(10)
        return "a sample"

    server = selfmoa_serve.ModelServer(slow, port=0, concurrency=4).start()
    try:
        body = {"model": "self-moa/m", "messages": QUESTION, "selfmoa": {"n": 1}}
        drain_cutting_off_a_stream_and_a_waiting_request(
            server, {**body, "stream": True}, {**body, "messages": [{"role": "user", "content": "2?"}]},
            lambda: len(server._runs) >= 2)
    finally:
        release.set()


def drain_cutting_off_a_stream_and_a_waiting_request(server, streamed_body, waiting_body, both_running):
    """Start a stream (read until its first piece) and a request that waits, close ``server`` with a 0.2 s drain
    timeout once ``both_running()``, and check what both clients got: the stream an error event and [DONE], the
    waiting request its 503, and close() back within 3 s having cut off the two."""
    streamed = requests.post(server.base_url + "/chat/completions", json=streamed_body, stream=True, timeout=10)
    lines = streamed.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    waiting: list = []
    asker = threading.Thread(target=lambda: waiting.append(requests.post(
        server.base_url + "/chat/completions", json=waiting_body, timeout=10)))
    asker.start()
    deadline = time.monotonic() + 5
    while not both_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    left = server.close(drain_timeout=0.2)
    took = time.monotonic() - started
    rest = [line for line in lines if line]
    asker.join(5)
    assert left == 2 and took < 3.0, (left, took)
    assert rest[-1] == b"data: [DONE]", rest[-3:]
    assert json.loads(rest[-2].removeprefix(b"data: "))["error"]["code"] == "shutting_down"
    assert waiting and waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "shutting_down"


# --- batch: another program empties or cuts the output mid-run ------------------------------------------------


CUTS = {"emptied": lambda size: 0, "cut mid-line": lambda size: size - 7, "cut to a few bytes": lambda size: 5}


def echo(request):
    """Drafts, then an answer naming the prompt."""
    prompt = request.messages[-1]["content"]
    return f"the answer to {prompt}" if selfmoa.read_references(request.messages) else f"a draft of {prompt}"


def cutting(output: pathlib.Path, at_call: int, how: str):
    """A completion function that, at its call number ``at_call``, cuts the output as ``CUTS[how]`` says, as
    another program might (the items run one at a time, so earlier items' lines are in the file by then)."""
    calls = [0]

    def complete(request):
        calls[0] += 1
        if calls[0] == at_call:
            size = output.stat().st_size
            assert size > 0, "no line was in the file yet to cut"
            os.truncate(output, CUTS[how](size))
        return echo(request)
    return complete


def assert_the_next_run_completes(output: pathlib.Path, records: list[dict]) -> None:
    data = output.read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-80:]  # nothing appended after the cut, no fragment left
    counts = selfmoa_batch.run_batch(selfmoa_batch.check_items(records), str(output), complete=echo, model="m", n=2)
    assert counts["done"] + counts["skipped"] == len(records) and counts["done"] >= 1
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == [record["id"] for record in records]
    assert all(line["answer"] == f"the answer to question {line['id']}" for line in lines)


@pytest.mark.parametrize("how", sorted(CUTS))
def test_an_output_cut_under_a_run_is_a_one_line_error_and_a_file_the_next_run_completes(tmp_path, how):
    """Another program empties the output, or cuts it in the middle of a line, while a run appends to it:
    the run ends with a one-line error, appends nothing after the cut and leaves no fragment of a line;
    the next run reads the file, redoes what was lost, and leaves one line per item."""
    records = [{"id": i, "prompt": f"question {i}"} for i in range(8)]
    output = tmp_path / "out.jsonl"
    with pytest.raises(selfmoa.SelfMoAError, match="was cut from .* by another program") as caught:
        selfmoa_batch.run_batch(selfmoa_batch.check_items(records), str(output), model="m", n=2, concurrency=1,
                                complete=cutting(output, 9, how))
    assert "\n" not in str(caught.value) and not isinstance(caught.value, selfmoa.ConfigError)
    assert_the_next_run_completes(output, records)


CUT_RUN = """
import os, pathlib, sys
import selfmoa, selfmoa_batch
output, calls = pathlib.Path(sys.argv[1]), [0]
def complete(request):
    calls[0] += 1
    if calls[0] == 9:
        os.truncate(output, 0)
    return "the answer to " + request.messages[-1]["content"]
try:
    selfmoa_batch.run_batch(selfmoa_batch.check_items([{"id": i, "prompt": f"question {i}"} for i in range(8)]),
                            str(output), model="m", n=2, concurrency=1, complete=complete)
except selfmoa.SelfMoAError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


def test_an_output_emptied_under_a_run_is_the_same_one_line_error_under_python_O(tmp_path):
    """``python -O`` strips asserts: the check is no assert (it was, and became a KeyError)."""
    result = subprocess.run([sys.executable, "-O", "-c", CUT_RUN, str(tmp_path / "out.jsonl")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "was cut from" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == b""


# --- the client: interim responses ----------------------------------------------------------------------------

REPLY = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "the final answer"},
                                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})


@pytest.mark.parametrize("stream", [False, True])
def test_the_client_skips_any_number_of_interim_responses_with_headers_before_the_reply(stream):
    """HTTP allows any number of 1xx responses before the final one; a server sends 102 Processing and two
    103 Early Hints, each with headers, and the call gets the 200 that follows, the first time."""
    from tests.hostile_server import HostileServer, response

    interim = (b"HTTP/1.1 102 Processing\r\n\r\n" + b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
               b"Link: </b.js>; rel=preload\r\n\r\n" + b"HTTP/1.1 103 Early Hints\r\nX-Note: again\r\n\r\n")
    if stream:
        events = b"".join(b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece},
                                                                "finish_reason": None}]}).encode() + b"\n\n"
                          for piece in ("the final ", "answer")) + b"data: [DONE]\n\n"
        final = response(b"200 OK", [(b"Content-Type", b"text/event-stream"),
                                     (b"Content-Length", str(len(events)).encode())], events)
    else:
        final = response(b"200 OK", [(b"Content-Type", b"application/json"),
                                     (b"Content-Length", str(len(REPLY)).encode())], REPLY.encode())
    pieces: list[str] = []
    with HostileServer(interim + final) as server:
        client = selfmoa.HTTPClient(server.base_url, retries=0, timeout=5)
        reply = client(selfmoa.Request("m", ({"role": "user", "content": "hi"},),
                                       stream=pieces.append if stream else None))
        assert len(server.log) == 1
    assert reply.texts == ["the final answer"] and reply.retries == 0
    assert "".join(pieces) == ("the final answer" if stream else "")


def test_endless_interim_responses_are_a_failure_not_a_hang():
    from tests.hostile_server import HostileServer

    with HostileServer(("repeat", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", 100_000)) as server:
        client = selfmoa.HTTPClient(server.base_url, retries=0, timeout=5)
        with pytest.raises(selfmoa.ModelError, match="interim"):
            client(selfmoa.Request("m", ({"role": "user", "content": "hi"},)))


# --- an abandoned streamed method request ---------------------------------------------------------------------


def test_an_abandoned_streamed_method_request_stops_its_upstream_call_within_a_second():
    """A client reads the first pieces of a streamed Self-MoA answer and goes away. The final aggregation,
    which the mock streams a token every 20 ms, is cut off: the mock sends at most a second's worth of
    tokens after the disconnect, and never the whole answer."""
    with MockServer(latency_per_token=0.02) as mock, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(mock.base_url, retries=0), port=0) as server:
        body = json.dumps({"model": "self-moa/echo", "stream": True, "messages": [
            {"role": "user", "content": " ".join(f"word{i}" for i in range(40))}], "selfmoa": {"n": 1}}).encode()
        with socket.create_connection((server.host, server.port), timeout=10) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
            seen = b""
            while seen.count(b'"content"') < 5:
                seen += connection.recv(65536)
        left = time.monotonic()
        aggregation = next(entry for entry in mock.requests if entry["body"].get("stream"))
        sent_at_disconnect = aggregation["events_sent"]
        while not aggregation.get("stream_over") and time.monotonic() - left < 1.5:
            time.sleep(0.01)
        sent_after_a_second = aggregation["events_sent"]
        assert aggregation.get("stream_over"), "the upstream kept streaming after 1.5 s"
    assert aggregation["events"] > 150, "the answer must take far longer than a second to stream"
    assert sent_after_a_second == aggregation["events_sent"], "the upstream kept streaming after 1.5 s"
    assert sent_after_a_second - sent_at_disconnect <= 1.0 / 0.02, (sent_at_disconnect, sent_after_a_second)
    assert aggregation["events_sent"] < aggregation["events"]
    assert time.monotonic() - left < 5


# --- proxies: HTTP_PROXY, HTTPS_PROXY, NO_PROXY as httpx reads them ------------------------------------------

TLS = ROOT / "tests" / "tls"  # a test CA and a certificate of model.test that it signed (tests only)


class LoopbackProxy:
    """An HTTP proxy on loopback: CONNECT opens a tunnel, an absolute-form request is forwarded (its request
    line rewritten); host names are resolved through ``names`` (model.test -> 127.0.0.1), never by DNS.
    ``heads`` records each request head it got, ``relayed`` every byte it passed on, either way."""

    def __init__(self, names: dict[str, str]):
        self.names, self.heads, self.relayed = names, [], bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.accept, daemon=True).start()

    def close(self):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket):
        client.settimeout(10)
        with client:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            self.heads.append(head.decode("latin-1"))
            method, target, version = head.split(b"\r\n")[0].split(b" ")
            if method == b"CONNECT":
                host, port = target.decode().rsplit(":", 1)
                upstream = socket.create_connection((self.names[host], int(port)), timeout=10)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                url = urllib.parse.urlsplit(target.decode())
                upstream = socket.create_connection((self.names[url.hostname], url.port), timeout=10)
                line = b" ".join([method, url.path.encode(), version])
                upstream.sendall(line + b"\r\n" + head.partition(b"\r\n")[2] + b"\r\n\r\n" + rest)
            with upstream:
                self.pipe(client, upstream)

    def pipe(self, one: socket.socket, other: socket.socket):
        def copy(source, sink):
            with contextlib.suppress(OSError):
                while chunk := source.recv(65536):
                    self.relayed.extend(chunk)
                    sink.sendall(chunk)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
        back = threading.Thread(target=copy, args=(other, one), daemon=True)
        back.start()
        copy(one, other)
        back.join(10)


def tls_server(heads: list[bytes]):
    """A TLS server of model.test on loopback answering one chat completion per connection; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "server.pem", TLS / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError), context.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += tls.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                while len(body) < length:  # all of it: a close with unread bytes would reset the connection
                    body += tls.recv(65536)
                heads.append(head)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY.encode()))
    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_https_goes_through_the_https_proxy_by_connect_with_tls_to_the_server_itself(monkeypatch):
    """HTTPS_PROXY (with a user and password): the client asks the proxy for a CONNECT tunnel to model.test,
    authenticates to the proxy, and speaks TLS through it to the server, whose certificate a private CA
    (SSL_CERT_FILE) vouches for. The proxy sees the CONNECT and encrypted bytes only: never the key."""
    heads: list[bytes] = []
    listener = tls_server(heads)
    proxy = LoopbackProxy({"model.test": "127.0.0.1"})
    try:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://someone:pa%20ss@127.0.0.1:{proxy.port}")
        monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "ca.pem"))
        port = listener.getsockname()[1]
        client = selfmoa.HTTPClient(f"https://model.test:{port}/v1", api_key="sk-the-upstream-key", retries=0,
                                    timeout=10)
        reply = client(selfmoa.Request("m", ({"role": "user", "content": "hi"},)))
    finally:
        proxy.close()
        listener.close()
    assert reply.texts == ["the final answer"]
    [connect] = proxy.heads
    assert connect.startswith(f"CONNECT model.test:{port} HTTP/1.")
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'someone:pa ss').decode()}" in connect
    assert b"sk-the-upstream-key" not in bytes(proxy.relayed) and "sk-the-upstream-key" not in connect
    assert b"Authorization: Bearer sk-the-upstream-key" in heads[0] and b"Host: model.test:" in heads[0]


def test_http_goes_through_the_http_proxy_and_loopback_never_does(monkeypatch):
    """HTTP_PROXY: a request to http://model.test is sent to the proxy with the whole URL in its request line;
    a server on loopback is reached directly, as NO_PROXY would say, without being listed there."""
    proxy = LoopbackProxy({"model.test": "127.0.0.1"})
    try:
        with MockServer() as mock:
            for name in ("http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            question = selfmoa.Request("echo", ({"role": "user", "content": "through the proxy"},))
            proxied = selfmoa.HTTPClient(f"http://model.test:{mock.port}/v1", retries=0, timeout=10)(question)
            assert [head.split("\r\n")[0] for head in proxy.heads] == [
                f"POST http://model.test:{mock.port}/v1/chat/completions HTTP/1.1"]
            direct = selfmoa.HTTPClient(mock.base_url, retries=0, timeout=10)(question)
            assert len(proxy.heads) == 1, "a loopback server went through the proxy"
    finally:
        proxy.close()
    assert proxied.texts == direct.texts and "through the proxy" in proxied.texts[0]


@pytest.mark.parametrize("environ, scheme, host, proxied", [
    ({"HTTPS_PROXY": "http://p:3128"}, "https", "api.openai.com", "http://p:3128"),
    ({"HTTPS_PROXY": "http://p:3128"}, "http", "api.openai.com", None),
    ({"HTTP_PROXY": "p:3128"}, "http", "gpu.example", "http://p:3128"),  # no scheme: http://, as curl reads it
    ({"ALL_PROXY": "http://p:3128"}, "https", "api.openai.com", "http://p:3128"),
    ({"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}, "https", "a.example", "http://lower:1"),
    ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "internal.example, .corp"}, "https", "gpu.internal.example", None),
    ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "internal.example,.corp"}, "https", "x.corp", None),
    ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "internal.example"}, "https", "api.openai.com", "http://p:3128"),
    ({"HTTPS_PROXY": "http://p:3128", "no_proxy": "*"}, "https", "api.openai.com", None),
    ({"ALL_PROXY": "http://p:3128"}, "http", "localhost", None),
    ({"ALL_PROXY": "http://p:3128"}, "http", "127.0.0.5", None),
    ({"ALL_PROXY": "http://p:3128"}, "http", "::1", None),
])
def test_proxy_choice_follows_the_environment_as_httpx_does(monkeypatch, environ, scheme, host, proxied):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    client = selfmoa.HTTPClient("http://127.0.0.1:9/v1")
    assert selfmoa._proxy_for(client._proxies, scheme, host) == proxied


@pytest.mark.parametrize("value", ["socks5://user:secret@127.0.0.1:1080", "https://user:secret@proxy:3128"])
def test_a_proxy_selfmoa_cannot_use_is_refused_naming_the_variable_never_ignored(monkeypatch, value):
    for name in ("HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "all_proxy", "no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", value)
    with pytest.raises(selfmoa.ConfigError, match=r"HTTPS_PROXY=\S+: selfmoa goes through http:// proxies") as caught:
        selfmoa.HTTPClient("https://api.example/v1")
    assert "secret" not in str(caught.value)
    result = subprocess.run([sys.executable, "selfmoa.py", "--base-url", "https://api.example/v1", "-m", "m", "hi"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "HTTPS_PROXY=" in result.stderr and "secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_at_the_drain_timeout_pass_through_streams_and_waiting_pass_through_requests_are_answered_too():
    """The same for requests passed through to an upstream: a relayed stream cut off mid-answer ends with an
    error event and [DONE]; a request still waiting for its upstream's reply gets its 503."""
    with MockServer(latency_per_token=0.05) as mock:
        server = selfmoa_serve.ModelServer(selfmoa.HTTPClient(mock.base_url, retries=0), port=0).start()
        long_question = [{"role": "user", "content": " ".join(f"word{i}" for i in range(100))}]
        body = {"model": "echo", "messages": long_question}
        drain_cutting_off_a_stream_and_a_waiting_request(server, {**body, "stream": True}, body,
                                                         lambda: len(mock.requests) >= 2)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_while_its_run_waits_on_a_silent_upstream_closes_that_upstream_call_within_a_second(
        stream, monkeypatch):
    """Before any token (a long prefill, a model that thinks without streaming text), there is no piece to
    stop at: the run's calls in flight are cut off as soon as serve sees the client gone."""
    from tests.hostile_server import HostileServer

    # The second sample waits PROBE_WAIT for the first request to this server and model (which the upstream
    # never answers) before it is sent too; the test needs both in flight, not that wait.
    monkeypatch.setattr(selfmoa, "PROBE_WAIT", 0.05)

    with HostileServer(("hold",)) as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, retries=0, timeout=30), port=0) as server:
        body = json.dumps({"model": "self-moa/m", "messages": QUESTION, "stream": stream,
                           "selfmoa": {"n": 2, "use_n": False}}).encode()
        with socket.create_connection((server.host, server.port), timeout=10) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
            deadline = time.monotonic() + 5
            while len(upstream.log) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(upstream.log) == 2, "both samples are in flight"
        left = time.monotonic()
        while len(upstream.closed_by_client) < 2 and time.monotonic() - left < 3:
            time.sleep(0.01)
        took = time.monotonic() - left
        assert len(upstream.closed_by_client) == 2 and took < 1.0, took
        time.sleep(0.2)
        assert len(upstream.log) == 2, "a cut-off call was retried, or the aggregation was sent"


def test_sigterm_with_a_run_still_streaming_at_the_drain_timeout_ends_it_properly_and_exits_0():
    """`selfmoa serve --drain-timeout 0.3`, SIGTERM while a stream is mid-answer: the stream ends with an error
    event and [DONE] before the process exits, with status 0, and standard error counts the run cut off."""
    with MockServer(latency_per_token=0.05) as mock:
        environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
        process = subprocess.Popen([sys.executable, "selfmoa.py", "serve", "--port", "0", "--base-url",
                                    mock.base_url, "--retries", "0", "--drain-timeout", "0.3"], cwd=ROOT,
                                   env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            base_url = process.stdout.readline().strip()
            streamed = requests.post(base_url + "/chat/completions", stream=True, timeout=10, json={
                "model": "self-moa/echo", "stream": True, "selfmoa": {"n": 1},
                "messages": [{"role": "user", "content": " ".join(f"word{i}" for i in range(5))}]})
            lines = streamed.iter_lines()
            assert next(line for line in lines if line).startswith(b"data: ")
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
            assert process.wait(timeout=10) == 0
            err = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()
    assert rest[-1] == b"data: [DONE]" and b'"shutting_down"' in rest[-2], rest[-3:]
    assert "1 runs were still in flight after --drain-timeout" in err, err
