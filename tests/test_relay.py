"""HTTPClient.relay: serve's pass-through goes through the one HTTP client, with the same replica choice,
failover, 404 hand-off, retries, Retry-After, deadline and keep-alive pool as a call (selfmoa_serve.py keeps only
the redacting byte relay). Tested on the library, then through `selfmoa serve`."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import requests

import selfmoa
import selfmoa_serve
from tests.hostile_server import HostileServer, response
from tests.scripted_server import ScriptedServer

QUESTION = [{"role": "user", "content": "What is 17 * 23 + 4?"}]
BODY = json.dumps({"model": "m", "messages": QUESTION}).encode()
BUSY = ("json", 503, {"error": {"message": "overloaded"}}, {})
MISSING = ("json", 404, {"error": {"message": "The model `m` does not exist."}}, {})


def dead_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    return f"http://127.0.0.1:{port}/v1"


def relayed(client, model="m", body=BODY, stream=False):
    """Relay one request; the status, body and the URL of the endpoint that answered."""
    with client.relay(model, body, stream=stream) as (endpoint, reply):
        return reply.status, reply.read(), endpoint.url


def test_relay_fails_over_from_a_refusing_and_a_503_replica_counting_them_as_calls_count():
    """A replica that refuses connections and one that answers 503 are skipped at once (no retry spent, no
    wait): the request reaches the live replica, and servers() counts the two failures as it does a call's."""
    refused = dead_url()
    with ScriptedServer(BUSY) as busy, ScriptedServer() as live:
        waits: list[float] = []
        client = selfmoa.HTTPClient([refused, busy.base_url, live.base_url], retries=0, sleep=waits.append)
        status, body, url = relayed(client)
        assert status == 200 and json.loads(body)["choices"] and url == live.base_url + "/chat/completions"
        assert waits == [] and len(busy.log) == 1 and len(live.log) == 1
        counts = client.servers()
        assert counts[refused] == {"requests": 1, "failed": 1}
        assert counts[busy.base_url] == {"requests": 1, "failed": 1}
        assert counts[live.base_url] == {"requests": 1, "failed": 0}


def test_relay_retries_with_backoff_and_retry_after_then_yields_the_last_reply_as_it_came():
    """Every replica answering 503 is retried, waiting at least what Retry-After asks; when no attempt is left,
    the last reply is yielded with its status and body (a proxy relays the upstream's own error). A Retry-After
    beyond max_retry_after yields the reply at once, without waiting."""
    slow_down = ("json", 429, {"error": {"message": "slow down"}}, {"Retry-After": "3"})
    with ScriptedServer(slow_down, ("choices", None)) as server:
        waits: list[float] = []
        client = selfmoa.HTTPClient(server.base_url, retries=2, sleep=waits.append)
        assert relayed(client)[0] == 200 and len(waits) == 1 and waits[0] >= 3 and len(server.log) == 2
    with ScriptedServer(BUSY) as server:
        waits = []
        client = selfmoa.HTTPClient(server.base_url, retries=2, backoff=0.5, sleep=waits.append)
        status, body, _ = relayed(client)
        assert status == 503 and json.loads(body)["error"]["message"] == "overloaded"
        assert len(server.log) == 3 and len(waits) == 2
    with ScriptedServer(("json", 429, {"error": {"message": "come back tomorrow"}}, {"Retry-After": "86400"})) \
            as server:
        waits = []
        client = selfmoa.HTTPClient(server.base_url, retries=3, sleep=waits.append)
        with client.relay("m", BODY) as (_, reply):
            assert reply.status == 429 and reply.getheader("Retry-After") == "86400"
        assert waits == [] and len(server.log) == 1


def test_relay_hands_a_404_to_a_replica_not_yet_asked_and_yields_the_last_404():
    """As for a call: a replica without the model (404) hands the request to one not yet asked, at once and
    without cooling the first down; with every replica answering 404, that 404 is yielded as it came."""
    with ScriptedServer(MISSING) as wrong, ScriptedServer(MISSING) as also_wrong, ScriptedServer() as right:
        client = selfmoa.HTTPClient([wrong.base_url, right.base_url], retries=0)
        assert [relayed(client)[0] for _ in range(3)] == [200] * 3
        assert len(wrong.log) >= 2 and len(right.log) == 3  # still picked in turn: not cooling down
        both_wrong = selfmoa.HTTPClient([wrong.base_url, also_wrong.base_url], retries=2, sleep=lambda s: None)
        before = len(wrong.log)
        status, body, _ = relayed(both_wrong)
        assert status == 404 and "does not exist" in body.decode()
        assert len(wrong.log) == before + 1 and len(also_wrong.log) == 1  # each asked once, no retry


def test_relay_without_any_answer_raises_model_error_after_retries_and_an_unknown_model_config_error():
    client = selfmoa.HTTPClient(dead_url(), retries=1, sleep=lambda s: None)
    with pytest.raises(selfmoa.ModelError, match="could not reach") as caught:
        relayed(client)
    assert caught.value.attempts == 2 and caught.value.status is None
    with pytest.raises(selfmoa.ConfigError, match="model 'b' has no endpoint"):
        relayed(selfmoa.HTTPClient(endpoints={"a": dead_url()}), model="b")
    aborted = selfmoa.HTTPClient(dead_url())
    aborted.abort()
    with pytest.raises(selfmoa.ModelError, match="interrupted"):
        relayed(aborted)


def test_relay_is_bounded_by_the_deadline_before_and_after_the_headers():
    """``deadline`` bounds each relay attempt as it bounds a call's: an upstream that drips its status line (each
    byte well within the socket's timeout) is cut off, retried, and then a ModelError; one that drips its body
    is cut off while the proxy reads it."""
    with HostileServer(("drip", b"HTTP/1.1 200 OK\r\n" * 10, 0.02)) as silent:
        client = selfmoa.HTTPClient(silent.base_url, timeout=5, deadline=0.3, retries=1, sleep=lambda s: None)
        started = time.monotonic()
        with pytest.raises(selfmoa.ModelError, match="deadline=0.3") as caught:
            relayed(client)
        assert caught.value.attempts == 2 and time.monotonic() - started < 3
    dripping = (response(b"200 OK", [(b"Content-Length", b"400")], b""), ("drip", b"x" * 400, 0.05))
    with HostileServer(*dripping) as upstream:
        client = selfmoa.HTTPClient(upstream.base_url, timeout=5, deadline=0.3, retries=0)
        started = time.monotonic()
        # Cut while reading it, or (on a busy machine) before its head was in: never read as a whole reply.
        with pytest.raises((OSError, http.client.HTTPException, selfmoa.ModelError)), \
                client.relay("m", BODY) as (_, reply):
            reply.read()
        assert time.monotonic() - started < 3


def test_relay_shares_the_calls_keep_alive_pool_and_their_in_flight_cap():
    """One client, one pool: a relayed reply read to its end leaves its connection for the next call, and a
    relay holds its replica's --max-in-flight slot until its reply has been read."""
    with ScriptedServer() as server:
        client = selfmoa.HTTPClient(server.base_url, max_in_flight=1)
        assert relayed(client)[0] == 200
        client(selfmoa.Request("m", tuple(QUESTION)))
        assert relayed(client)[0] == 200
        assert len({entry["client_port"] for entry in server.log}) == 1  # one connection, kept alive
        done = threading.Event()
        with client.relay("m", BODY) as (_, reply):
            waiter = threading.Thread(target=lambda: (client(selfmoa.Request("m", tuple(QUESTION))), done.set()),
                                      daemon=True)
            waiter.start()
            assert not done.wait(0.3), "a call took the slot of a relay still being read"
            reply.read()
        assert done.wait(5)
        waiter.join(5)


def test_pass_through_blanks_the_keys_of_the_replica_that_answered_after_a_failover():
    """Through serve: the request fails over from a replica that echoes its key in a 503 to one that echoes
    another key in its 401; the relayed 401 shows neither (serve blanks the keys of the endpoint the client's
    relay says answered), and each replica got its own key only."""
    first, second = "sk-first-replica-0001", "sk-second-replica-002"
    with ScriptedServer(("json", 503, {"error": {"message": f"bad key {first}"}}, {})) as one, \
            ScriptedServer(("json", 401, {"error": {"message": f"Incorrect API key provided: {second}"}},
                            {"X-Echo": second})) as two:
        client = selfmoa.HTTPClient([selfmoa.Endpoint(one.base_url, first), selfmoa.Endpoint(two.base_url, second)],
                                    retries=0)
        with selfmoa_serve.ModelServer(client, port=0) as server:
            reply = requests.post(server.base_url + "/chat/completions", json={"model": "m", "messages": QUESTION},
                                  timeout=10)
        assert reply.status_code == 401 and "***" in reply.text
        assert not any(secret[i:i + 8] in reply.text for secret in (first, second) for i in range(len(secret) - 7))
        assert one.log[0]["headers"]["Authorization"] == f"Bearer {first}"
        assert two.log[0]["headers"]["Authorization"] == f"Bearer {second}"


def test_pass_through_goes_through_the_clients_pool_retries_and_waits():
    """Through serve: pass-through and method calls share the client's kept-alive connections, and a
    pass-through retry waits through the client's own sleep, at least what Retry-After asks."""
    slow_down = ("json", 429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
    with ScriptedServer(slow_down, ("choices", None)) as upstream:
        waits: list[float] = []
        client = selfmoa.HTTPClient(upstream.base_url, retries=1, sleep=waits.append)
        with selfmoa_serve.ModelServer(client, port=0, concurrency=1) as server:
            url = server.base_url + "/chat/completions"
            with requests.Session() as session:
                passed = session.post(url, json={"model": "m", "messages": QUESTION}, timeout=10)
                method = session.post(url, json={"model": "self-moa/m", "messages": QUESTION,
                                                 "selfmoa": {"n": 2}}, timeout=10)
        assert passed.status_code == 200 and method.status_code == 200, (passed.text, method.text)
        assert waits and waits[0] >= 2
        # After the 429 (whose connection closes, as a call's does), one connection serves the passed-through
        # request and the method's calls.
        assert len(upstream.log) == 4 and len({entry["client_port"] for entry in upstream.log[1:]}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_that_runs_to_the_close_cut_at_the_deadline_never_passes_for_a_whole_one(stream):
    """A reply without Content-Length or chunks ends when its connection closes, and the deadline ends an attempt
    by shutting that connection: such a cut reply must not read as complete. Through the relay, reading its end
    raises; through serve, a non-streamed pass-through is a 502 (never a 200 with half a body), a streamed one
    breaks off."""
    head = [(b"Content-Type", b"text/event-stream" if stream else b"application/json"), (b"Connection", b"close")]
    plan = (response(b"200 OK", head, b""), ("drip", b"x" * 400, 0.02))
    with HostileServer(*plan) as upstream:
        client = selfmoa.HTTPClient(upstream.base_url, timeout=5, deadline=0.3, retries=0)
        # Cut while reading it, or (on a busy machine) before its head was in: never read as a whole reply.
        with pytest.raises((OSError, http.client.HTTPException, selfmoa.ModelError)), \
                client.relay("m", BODY) as (_, reply):
            reply.read()
        with selfmoa_serve.ModelServer(client, port=0) as server:
            started = time.monotonic()
            try:
                reply = requests.post(server.base_url + "/chat/completions",
                                      json={"model": "m", "messages": QUESTION, "stream": stream}, timeout=10)
                assert reply.status_code == (200 if stream else 502), reply.text
                assert not stream or "[DONE]" not in reply.text
            except requests.exceptions.ChunkedEncodingError:
                assert stream  # the relayed stream broke off: the client sees it end early
            assert time.monotonic() - started < 3


def test_serve_reaches_the_client_only_through_its_public_methods():
    """One HTTP client (issue 21): serve asks nothing of the completion function by attribute lookup, holds no pool
    of its own, and calls no private method of HTTPClient."""
    import ast
    import pathlib

    source = (pathlib.Path(__file__).resolve().parent.parent / "selfmoa_serve.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    lookups = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None)
               == "getattr" and ast.unparse(node.args[0]) in ("self.complete", "complete", "client")]
    assert not lookups, [ast.unparse(node) for node in lookups]
    private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and ast.unparse(node.value) in ("self.complete", "complete", "client") and node.attr.startswith("_")}
    assert not private, private
    assert "_idle" not in source and "http.client.HTTPConnection(" not in source
