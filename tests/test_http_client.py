"""HTTPClient against a real loopback server answering from a script: every path of the seam."""

from __future__ import annotations

import json
import time

import pytest

import selfmoa
from tests.scripted_server import ScriptedServer, completion

ERROR = {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}}


def client(server, **kwargs):
    kwargs.setdefault("sleep", lambda seconds: None)
    kwargs.setdefault("timeout", 5)
    return selfmoa.HTTPClient(server.base_url, **kwargs)


def ask(c, n=1, seed=None, model="m", stream=None):
    return c(selfmoa.Request(model, ({"role": "user", "content": "hi"},), 0.7, None, n, seed, stream))


def test_keep_alive_connection_is_reused():
    with ScriptedServer() as server, client(server) as c:
        for _ in range(4):
            ask(c)
        assert len({entry["client_port"] for entry in server.log}) == 1
        assert server.log[0]["path"] == "/v1/chat/completions"


def test_n_honoured_gives_all_choices_in_one_request():
    with ScriptedServer() as server, client(server) as c:
        reply = ask(c, n=3, seed=10)
        assert reply.texts == ["text 10 0", "text 10 1", "text 10 2"]
        assert len(server.log) == 1 and server.log[0]["body"]["n"] == 3 and server.log[0]["body"]["seed"] == 10
        assert (reply.prompt_tokens, reply.completion_tokens) == (7, 5)


def test_n_ignored_falls_back_to_one_request_per_missing_sample():
    with ScriptedServer(("choices", 1)) as server, client(server) as c:
        result = selfmoa.self_moa("hi", "m", n=4, complete=c, seed=20)
        proposals = [e["body"] for e in server.log if len(e["body"]["messages"]) == 1]
        # the fallback requests run concurrently, so they may arrive in any order
        assert sorted((b["seed"], b.get("n", 1)) for b in proposals) == [(20, 4), (21, 1), (22, 1), (23, 1)]
        assert result.calls == 5
        refs = selfmoa.read_references(server.log[-1]["body"]["messages"])
        assert refs == ["text 20 0", "text 21 0", "text 22 0", "text 23 0"]


def test_retry_on_429_waits_at_least_retry_after():
    waits = []
    with ScriptedServer(("json", 429, ERROR, {"Retry-After": "7"}), ("choices", None)) as server, \
            client(server, sleep=waits.append, backoff=0.01) as c:
        reply = ask(c)
        assert reply.retries == 1 and len(server.log) == 2
        assert waits and waits[0] >= 7


def test_retry_after_beyond_the_limit_fails_at_once():
    with ScriptedServer(("json", 429, ERROR, {"Retry-After": "3600"}), ("choices", None)) as server, \
            client(server, max_retry_after=60) as c:
        with pytest.raises(selfmoa.ModelError, match="asked to wait 3600 s") as caught:
            ask(c)
        assert caught.value.status == 429 and len(server.log) == 1


@pytest.mark.parametrize("fault", [("json", 500, ERROR, {}), ("json", 503, ERROR, {}), ("drop",),
                                   ("truncate", 200, completion(["cut"]))])
def test_retry_on_server_errors_and_broken_connections(fault):
    with ScriptedServer(fault, ("choices", None)) as server, client(server) as c:
        reply = ask(c, seed=1)
        assert reply.texts == ["text 1 0"] and reply.retries == 1 and len(server.log) == 2


def test_retries_are_bounded_and_the_error_carries_everything():
    with ScriptedServer(("json", 500, {"error": {"message": "boom", "type": "server_error"}}, {})) as server, \
            client(server, retries=2) as c:
        with pytest.raises(selfmoa.ModelError) as caught:
            ask(c, model="qwen")
        error = caught.value
        assert (error.model, error.status, error.attempts) == ("qwen", 500, 3)
        assert error.url == server.base_url + "/chat/completions" and "boom" in error.body
        assert "qwen" in str(error) and "HTTP 500" in str(error) and "boom" in str(error)
        assert len(server.log) == 3


def test_no_retry_on_400():
    bad = {"error": {"message": "messages is required", "type": "invalid_request_error", "param": "messages"}}
    with ScriptedServer(("json", 400, bad, {}), ("choices", None)) as server, client(server) as c:
        with pytest.raises(selfmoa.ModelError, match="messages is required") as caught:
            ask(c)
        assert caught.value.status == 400 and not caught.value.retryable and len(server.log) == 1


def test_timeout_is_enforced():
    with ScriptedServer(("stall", 2.0), ("choices", None)) as server, client(server, timeout=0.3, retries=0) as c:
        started = time.monotonic()
        with pytest.raises(selfmoa.ModelError, match="timeout=0.3"):
            ask(c)
        assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("body, what", [(b"<html>oops</html>", "not JSON"), (b'{"id": 1}', "no 'choices'"),
                                        (b'{"choices": [{"message": {}}]}', "message.content")])
def test_malformed_replies_are_clear_errors_naming_the_endpoint(body, what):
    with ScriptedServer(("raw", 200, body, {})) as server, client(server) as c:
        with pytest.raises(selfmoa.ModelError, match=what) as caught:
            ask(c)
        assert server.base_url in str(caught.value) and len(server.log) == 1


def test_streaming_passes_pieces_as_they_arrive_and_reads_usage():
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
              {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
              b"[DONE]"]
    pieces = []
    with ScriptedServer(("sse", events)) as server, client(server) as c:
        reply = ask(c, stream=pieces.append)
        assert pieces == ["Hel", "lo"] and reply.texts == ["Hello"] and reply.finish_reasons == ["stop"]
        assert (reply.prompt_tokens, reply.completion_tokens) == (3, 2)
        assert server.log[0]["body"]["stream"] is True


def test_a_stream_cut_before_done_is_an_error_once_text_was_shown():
    events = [{"choices": [{"index": 0, "delta": {"content": "Hel"}}]}]
    with ScriptedServer(("sse", events)) as server, client(server) as c:
        with pytest.raises(selfmoa.ModelError, match="after 3 characters"):
            ask(c, stream=lambda piece: None)


def test_the_key_goes_only_to_its_own_endpoint_and_never_into_errors():
    canary = "sk-canary-0123456789"
    leak = {"error": {"message": f"Incorrect API key provided: {canary}", "type": "invalid_request_error"}}
    with ScriptedServer(("choices", None)) as public, ScriptedServer(("json", 401, leak, {})) as private:
        c = selfmoa.HTTPClient(public.base_url, endpoints={"secret": selfmoa.Endpoint(private.base_url, canary)},
                               sleep=lambda s: None)
        ask(c, model="open")
        with pytest.raises(selfmoa.ModelError) as caught:
            ask(c, model="secret")
        assert "Authorization" not in public.log[0]["headers"]
        assert private.log[0]["headers"]["Authorization"] == f"Bearer {canary}"
        for text in (str(caught.value), repr(caught.value), caught.value.body, repr(c), repr(c.endpoints)):
            assert canary not in text


def test_a_model_without_an_endpoint_is_a_config_error():
    c = selfmoa.HTTPClient(endpoints={"a": "http://127.0.0.1:9/v1"})
    with pytest.raises(selfmoa.ConfigError, match="model 'b' has no endpoint"):
        ask(c, model="b")


def test_an_unreachable_server_is_a_model_error_after_retries():
    c = selfmoa.HTTPClient("http://127.0.0.1:9/v1", retries=1, timeout=1, sleep=lambda s: None)
    with pytest.raises(selfmoa.ModelError, match="could not reach") as caught:
        ask(c)
    assert caught.value.attempts == 2 and caught.value.status is None


def test_keep_alive_survives_across_method_calls_and_threads():
    """Runs on fresh worker threads still reuse the idle connection; nothing piles up."""
    with ScriptedServer() as server, client(server) as c:
        for _ in range(5):
            selfmoa.self_moa("hi", "m", n=2, complete=c, concurrency=1)
        assert len({entry["client_port"] for entry in server.log}) == 1
        assert sum(len(idle) for idle in c._idle.values()) == 1


def test_a_streamed_reply_leaves_its_connection_reusable():
    events = [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}, b"[DONE]"]
    with ScriptedServer(("sse", events), ("choices", None)) as server, client(server) as c:
        ask(c, stream=lambda piece: None)
        ask(c)
        assert len({entry["client_port"] for entry in server.log}) == 1


def test_choices_without_a_numeric_index_keep_their_order_instead_of_crashing():
    body = json.dumps({"choices": [{"index": None, "message": {"content": "first"}},
                                   {"index": None, "message": {"content": "second"}}]}).encode()
    with ScriptedServer(("raw", 200, body, {})) as server, client(server) as c:
        assert ask(c, n=2).texts == ["first", "second"]


def test_a_server_that_answers_a_stream_request_with_a_whole_json_completion_is_streamed_in_one_piece():
    """Some OpenAI-compatible servers ignore "stream": true and send an ordinary completion (Content-Type
    application/json): that is a good reply, not a broken stream; its text is passed to the stream as one piece,
    with no retry."""
    with ScriptedServer(("choices", 1)) as server:
        client = selfmoa.HTTPClient(server.base_url, retries=2)
        pieces = []
        reply = client(selfmoa.Request("m", ({"role": "user", "content": "Q"},), stream=pieces.append))
        assert reply.texts == ["text None 0"] and pieces == ["text None 0"] and len(server.log) == 1
        assert server.log[0]["body"]["stream"] is True
        streamed = []
        result = selfmoa.self_moa("Q", "m", n=2, complete=client, stream=streamed.append)
        assert "".join(streamed) == result.answer != ""
