"""`selfmoa serve`: the methods as models behind an OpenAI-compatible endpoint, tested with `requests` (and the
official `openai` package when it is installed) in front of the mock models, as any client would use it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import selfmoa
import selfmoa_serve
from mock_models.server import MockServer
from tests import test_readme
from tests.hostile_server import HostileServer, response
from tests.scripted_server import ScriptedServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 * 23 + 4?"}]
SESSION = requests.Session()


@pytest.fixture(scope="module")
def mock():
    with MockServer() as server:
        yield server


@pytest.fixture(scope="module")
def served(mock):
    """One server for most tests: samples n=3 by default, MoA proposers coder and mathematician."""
    client = selfmoa.HTTPClient(mock.base_url, retries=0)
    defaults = {"n": 3, "proposers": ["coder", "mathematician"]}
    with selfmoa_serve.ModelServer(client, port=0, defaults=defaults) as server:
        yield server


@pytest.fixture(scope="module")
def slow_mock():
    with MockServer(latency=0.1) as server:
        yield server


def post(server, body, **headers):
    return SESSION.post(server.base_url + "/chat/completions", json=body, headers=headers, timeout=10)


def events(response):
    """The data of each server-sent event of a streamed reply, in order ("[DONE]" as a string)."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    found = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    return [data if data == "[DONE]" else json.loads(data) for data in found]


def sent_since(mock, count):
    return [entry["body"] for entry in mock.requests[count:]]


METHOD_CASES = [  # model, selfmoa options, calls the run makes
    ("self-moa/generalist", {"n": 4}, 5),
    ("self-moa-seq/generalist", {"n": 7, "window": 3, "carry": 1}, 10),
    ("moa/generalist", {}, 3),
    ("moa/coder", {"proposers": ["generalist", "generalist-2"], "layers": 3}, 5),
]


def test_models_lists_each_method_of_each_upstream_model(served):
    """GET /v1/models lists every upstream model and self-moa/, self-moa-seq/ and moa/ of it; /health is 200."""
    listed = SESSION.get(served.base_url + "/models", timeout=10).json()
    names = [model["id"] for model in listed["data"]]
    assert listed["object"] == "list" and all(model["object"] == "model" for model in listed["data"])
    for upstream in ("generalist", "coder", "echo"):
        assert {upstream, f"self-moa/{upstream}", f"self-moa-seq/{upstream}", f"moa/{upstream}"} <= set(names)
    health = SESSION.get(served.base_url.removesuffix("/v1") + "/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


@pytest.mark.parametrize("model, options, calls", METHOD_CASES)
def test_streamed_chunks_reassemble_to_the_non_streamed_answer(served, model, options, calls):
    """For the same seed, a method's streamed chunks join to exactly its non-streamed answer, and the last
    chunk carries the same usage and run report."""
    body = {"model": model, "messages": QUESTION, "seed": 4, "selfmoa": options}
    whole = post(served, body)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["object"] == "chat.completion" and answer["model"] == model
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["selfmoa"]["calls"] == calls and len(answer["selfmoa"]["trace"]) == answer["selfmoa"]["requests"]
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]

    streamed = events(post(served, {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert streamed[-1] == "[DONE]"
    chunks = streamed[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == model for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert text == answer["choices"][0]["message"]["content"] != ""
    assert len([chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content")]) > 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]
    assert chunks[-1]["selfmoa"]["calls"] == calls

    plain = events(post(served, {**body, "stream": True}))[:-1]
    assert plain[-1]["choices"][0]["finish_reason"] == "stop" and plain[-1]["selfmoa"]["calls"] == calls
    assert all("usage" not in chunk for chunk in plain)


def test_usage_is_the_sum_over_the_runs_calls_as_the_mock_counted_them(served, mock):
    """`usage` of a run equals the mock's own usage of every request the run sent it, added up."""
    before = len(mock.requests)
    reply = post(served, {"model": "self-moa-seq/generalist", "messages": QUESTION, "seed": 9, "stream": True,
                          "stream_options": {"include_usage": True}, "selfmoa": {"n": 5, "window": 3, "carry": 1}})
    usage = events(reply)[-2]["usage"]
    sent = sent_since(mock, before)
    assert len(sent) == 4  # the samples in one request per round (3 + 2), then 2 rounds
    counted = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for body in sent:  # the mock is deterministic: asking again gives the same reply and usage
        again = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
        for key, value in SESSION.post(mock.base_url + "/chat/completions", json=again).json()["usage"].items():
            counted[key] += value
    assert usage == counted


def test_request_fields_reach_the_final_aggregation_and_selfmoa_the_samples(served, mock):
    """The request's temperature, max_tokens, seed and stop go to the final aggregation (stop to it alone);
    the selfmoa object's temperature and max_tokens go to the samples, whose seeds start at the request's."""
    before = len(mock.requests)
    reply = post(served, {"model": "self-moa-seq/generalist", "messages": QUESTION, "temperature": 0.3,
                          "max_tokens": 60, "seed": 11, "stop": ["."],
                          "selfmoa": {"n": 5, "window": 3, "carry": 1, "temperature": 0.9, "max_tokens": 70}})
    assert reply.status_code == 200, reply.text
    assert "." not in reply.json()["choices"][0]["message"]["content"]
    sent = sent_since(mock, before)
    samples = [b for b in sent if not selfmoa.read_references(b["messages"])]
    rounds = [b for b in sent if selfmoa.read_references(b["messages"])]
    assert sorted((b["temperature"], b["max_tokens"], b["seed"], b.get("n")) for b in samples) == [
        (0.9, 70, 11, 3), (0.9, 70, 14, 2)]
    assert [(b["temperature"], b["max_tokens"], b["seed"], b.get("stop")) for b in rounds] == [
        (0.3, 60, 11, None), (0.3, 60, 11, ["."])]
    assert all(b["messages"][-1] == QUESTION[-1] and "Be brief." in b["messages"][0]["content"] for b in sent)


def test_pass_through_equals_calling_the_upstream_directly(served, mock):
    """Any other model name is passed through: status, content type and body bytes (streamed or not) are
    the upstream's own, errors included; the client's Authorization never reaches the upstream."""
    bodies = [{"model": "coder", "messages": QUESTION, "seed": 5, "selfmoa": {"ignored": True}},
              {"model": "coder", "messages": QUESTION, "seed": 5, "stream": True,
               "stream_options": {"include_usage": True}},
              {"model": "no-such-model", "messages": QUESTION}, {"model": "coder", "messages": QUESTION, "n": 2,
                                                                  "seed": 1, "temperature": 9}]
    for body in bodies:
        before = len(mock.requests)
        through = post(served, body, Authorization="Bearer client-secret")
        direct = SESSION.post(mock.base_url + "/chat/completions", json=body)
        assert (through.status_code, through.headers["Content-Type"], through.content) == (
            direct.status_code, direct.headers["Content-Type"], direct.content)
        assert mock.requests[before]["body"] == body
        assert "client-secret" not in json.dumps(mock.requests[before]["headers"])


@pytest.mark.parametrize("model, patch, param", [
    ("self-moa/generalist", {"n": 2}, "n"),
    ("self-moa/generalist", {"n": "1"}, "n"),
    ("self-moa/generalist", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("self-moa/generalist", {"tool_choice": "auto"}, "tool_choice"),
    ("self-moa/generalist", {"response_format": {"type": "json_object"}}, "response_format"),
    ("self-moa/generalist", {"logprobs": True}, "logprobs"),
    ("self-moa/generalist", {"messages": "What is 2+2?"}, "messages"),
    ("self-moa/generalist", {"messages": []}, "messages"),
    ("self-moa/generalist", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("self-moa/generalist", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("self-moa/generalist", {"temperature": "hot"}, "temperature"),
    ("self-moa/generalist", {"temperature": 2.5}, "temperature"),
    ("self-moa/generalist", {"max_tokens": 0}, "max_tokens"),
    ("self-moa/generalist", {"seed": 1.5}, "seed"),
    ("self-moa/generalist", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("self-moa/generalist", {"stream": "yes"}, "stream"),
    ("self-moa/generalist", {"stream_options": [1]}, "stream_options"),
    ("self-moa/generalist", {"selfmoa": "n=6"}, "selfmoa"),
    ("self-moa/generalist", {"selfmoa": {"bogus": 1}}, "selfmoa.bogus"),
    ("self-moa/generalist", {"selfmoa": {"window": 3}}, "selfmoa.window"),
    ("self-moa/generalist", {"selfmoa": {"n": 0}}, "selfmoa.n"),
    ("self-moa/generalist", {"selfmoa": {"n": "six"}}, "selfmoa.n"),
    ("self-moa/generalist", {"selfmoa": {"temperature": 0}}, "selfmoa.temperature"),
    ("self-moa/generalist", {"selfmoa": {"use_n": "no"}}, "selfmoa.use_n"),
    ("self-moa/generalist", {"selfmoa": {"min_ok": 9}}, "selfmoa.min_ok"),
    ("self-moa-seq/generalist", {"selfmoa": {"window": 1}}, "selfmoa.window"),
    ("self-moa-seq/generalist", {"selfmoa": {"carry": 6}}, "selfmoa.carry"),
    ("moa/generalist", {"selfmoa": {"proposers": []}}, "selfmoa.proposers"),
    ("moa/generalist", {"selfmoa": {"proposers": [3]}}, "selfmoa.proposers"),
    ("moa/generalist", {"selfmoa": {"layers": 1}}, "selfmoa.layers"),
    ("self-moa/generalist", {"selfmoa": {"n": 257}}, "selfmoa.n"),
    ("self-moa/generalist", {"selfmoa": {"n": 10**30}}, "selfmoa.n"),
    ("self-moa/generalist", {"selfmoa": {"n": 100, "layers": 4}}, "selfmoa.n"),
    ("moa/generalist", {"selfmoa": {"proposers": ["coder"] * 129, "layers": 3}}, "selfmoa.proposers"),
    ("moa/generalist", {"selfmoa": {"layers": 10**9}}, "selfmoa.layers"),
])
def test_unsupported_or_wrong_requests_get_an_openai_shaped_400_naming_the_field(served, mock, model, patch, param):
    """Each unsupported or ill-typed field is refused with 400 and an OpenAI-shaped error whose `param`
    names it, before any upstream call is made."""
    before = len(mock.requests)
    reply = post(served, {"model": model, "messages": QUESTION, **patch})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert isinstance(error["message"], str) and param.split(".")[-1].split("[")[0] in error["message"]
    assert len(mock.requests) == before


def test_harmless_fields_are_accepted(served):
    """Fields that do not change what a method computes are accepted (and ignored)."""
    reply = post(served, {"model": "self-moa/generalist", "n": 1, "top_p": 0.9, "user": "u",
                          "presence_penalty": 0, "frequency_penalty": 0, "metadata": {"k": "v"}, "logprobs": False,
                          "response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "stream": False,
                          "stream_options": None, "parallel_tool_calls": False, "max_completion_tokens": 40,
                          "messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("model", ["self-moa/no-such-model", "self-moa-seq/no-such-model", "moa/no-such-model",
                                   "self-moa/", "no-such-model"])
def test_unknown_models_get_404_model_not_found(served, model):
    """An unknown upstream model, under a method prefix or passed through, is a 404 `model_not_found`."""
    reply = post(served, {"model": model, "messages": QUESTION})
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["code"] == "model_not_found" and reply.json()["error"]["param"] == "model"


def raw_exchange(server, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are; the status and JSON body of the reply."""
    with socket.create_connection((server.host, server.port), timeout=5) as connection:
        connection.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"Content-Length: (\d+)", reply).group(1)):
            piece = connection.recv(65536)
            if not piece:
                break
            reply += piece
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("data, status", [
    (b"{", 400), (b"[]", 400), (b"null", 400), (b'"x"', 400), (b"\xff\xfe{}", 400), (b"[" * 100_000, 400),
    (b'{"model": 5, "messages": []}', 400), (b'{"model": "", "messages": []}', 400),
    (b'{"model": "self-moa/generalist", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400),
    (b'{"model": "self-moa/generalist", "messages": [{"role": "user", "content": "x"}], "selfmoa": {"n": Infinity}}',
     400),
])
def test_malformed_bodies_get_400_and_the_server_stays_up(served, data, status):
    """Malformed JSON and wrong types get an OpenAI-shaped 400; the server keeps serving."""
    reply = SESSION.post(served.base_url + "/chat/completions", data=data,
                         headers={"Content-Type": "application/json"})
    assert reply.status_code == status and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert SESSION.get(served.base_url + "/models").status_code == 200


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{", 413),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\nab", 400),  # a digit to isdigit
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{", 413),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n\r\n", 411),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /v2/elsewhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
])
def test_oversized_or_malformed_http_gets_an_error_and_the_server_stays_up(served, request_bytes, status):
    """Oversized bodies get 413 (without being read), bad framing 400/411, unknown routes 404; then the
    server still answers."""
    got, body = raw_exchange(served, request_bytes)
    assert got == status and isinstance(body["error"]["message"], str)
    assert SESSION.get(served.base_url + "/models").status_code == 200


def echo(request):
    return selfmoa.Reply([f"{request.model} ok"], ["stop"], prompt_tokens=3, completion_tokens=2)


@pytest.fixture(scope="module")
def plain():
    """A server in front of a plain completion function (no HTTP upstream, no pass-through)."""
    with selfmoa_serve.ModelServer(echo, port=0, defaults={"n": 2}) as server:
        yield server


scalars = (st.none() | st.booleans() | st.integers(-10, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=8))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)), max_leaves=6)
fields = st.sampled_from(["n", "temperature", "max_tokens", "seed", "stop", "stream", "stream_options", "tools",
                          "tool_choice", "response_format", "logprobs", "selfmoa", "messages", "user", "top_p"])


@settings(max_examples=60)
@given(model=st.sampled_from(["self-moa/m", "self-moa-seq/m", "moa/m", "self-moa/a/b"]),
       patch=st.dictionaries(fields, json_values, max_size=4),
       options=st.dictionaries(st.sampled_from(["n", "window", "carry", "proposers", "layers", "min_ok",
                                                "temperature", "max_tokens", "use_n", "aggregator"]),
                               json_values, max_size=3))
def test_hostile_requests_get_an_answer_or_an_openai_error_and_never_break_the_server(plain, model, patch, options):
    """Whatever values a request's fields hold, the reply is a chat completion (200) or an OpenAI-shaped 400
    naming a field, never a 5xx, and the server keeps serving."""
    body = {"model": model, "messages": QUESTION, "selfmoa": options, **patch}
    reply = SESSION.post(plain.base_url + "/chat/completions", json=body, timeout=10)
    assert reply.status_code in (200, 400), reply.text
    if reply.status_code == 400:
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and isinstance(error["param"], str)
    elif body.get("stream") is True:
        assert events(reply)[-1] == "[DONE]"
    else:
        assert reply.json()["choices"][0]["message"]["content"].endswith(" ok")


def test_upstream_model_names_may_contain_slashes(plain):
    """`self-moa/<M>` and `moa/<A>` take everything after the prefix as the model, slashes included."""
    reply = post(plain, {"model": "self-moa/Qwen/Qwen2-7B-Instruct", "messages": QUESTION})
    assert reply.json()["choices"][0]["message"]["content"] == "Qwen/Qwen2-7B-Instruct ok"
    assert {call["model"] for call in reply.json()["selfmoa"]["trace"]} == {"Qwen/Qwen2-7B-Instruct"}
    reply = post(plain, {"model": "moa/org/agg", "messages": QUESTION, "selfmoa": {"proposers": ["x/y"]}})
    assert [call["model"] for call in reply.json()["selfmoa"]["trace"]] == ["x/y", "org/agg"]
    assert reply.json()["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}


def test_upstream_failures_are_a_502_naming_the_model_and_never_a_key():
    """Upstream failures after retries (here every proposer: fewer than min_ok) are an OpenAI-shaped 502
    naming the upstream model; an upstream key the upstream echoes back is blanked out, passed through too."""
    key = "sk-upstream-secret-123"
    echoed = ("json", 500, {"error": {"message": f"Incorrect API key provided: {key}"}}, {})
    with ScriptedServer(echoed) as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, key, retries=1, backoff=0), port=0) as server:
        for model in ("self-moa/generalist", "self-moa-seq/generalist", "moa/generalist"):
            reply = post(server, {"model": model, "messages": QUESTION,
                                  "selfmoa": {"proposers": ["coder"]} if model.startswith("moa") else {"n": 2}})
            assert reply.status_code == 502, reply.text
            error = reply.json()["error"]
            assert error["type"] == "upstream_error" and error["code"] == "upstream_error"
            assert ("'coder'" if model.startswith("moa") else "'generalist'") in error["message"]
            assert key not in reply.text and {call["retries"] for call in reply.json()["selfmoa"]["trace"]} == {1}
        passed = post(server, {"model": "generalist", "messages": QUESTION})
        assert passed.status_code == 500 and key not in passed.text and "***" in passed.text
        assert all(entry["headers"]["Authorization"] == f"Bearer {key}" for entry in upstream.log)
    with selfmoa_serve.ModelServer(selfmoa.HTTPClient("http://127.0.0.1:9/v1", retries=0), port=0) as server:
        for model in ("self-moa/generalist", "generalist"):
            reply = post(server, {"model": model, "messages": QUESTION})
            assert reply.status_code == 502 and "'generalist'" in reply.json()["error"]["message"]


def test_a_server_key_is_required_when_set_and_never_forwarded(mock):
    """With a server key, every route but /health needs it as a Bearer token (401 otherwise); it and the
    client's Authorization never reach the upstream."""
    with selfmoa_serve.ModelServer(selfmoa.HTTPClient(mock.base_url, retries=0), port=0, server_key="serve-secret",
                             defaults={"n": 2}) as server:
        body = {"model": "self-moa/generalist", "messages": QUESTION, "seed": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "serve-secret"},
                        {"Authorization": "Basic serve-secret"}, {"Authorization": "Bearer serve-secretX"}):
            for reply in (post(server, body, **headers), SESSION.get(server.base_url + "/models", headers=headers)):
                assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        assert SESSION.get(server.base_url.removesuffix("/v1") + "/health").status_code == 200
        before = len(mock.requests)
        assert post(server, body, Authorization="Bearer serve-secret").status_code == 200
        assert post(server, {**body, "model": "coder"}, Authorization="Bearer serve-secret").status_code == 200
        assert len(mock.requests) - before == 3
        # The scheme is case-insensitive (RFC 7235), as some clients send it:
        assert post(server, {**body, "model": "coder"}, Authorization="bearer  serve-secret").status_code == 200
        assert all("Authorization" not in entry["headers"] for entry in mock.requests[before:])


def test_a_non_loopback_host_without_a_server_key_is_refused(capsys):
    """Binding beyond loopback without a server key is refused before anything listens."""
    with pytest.raises(selfmoa.ConfigError, match="host"):
        selfmoa_serve.ModelServer(echo, host="0.0.0.0", port=0)
    assert selfmoa.main(["serve", "--host", "0.0.0.0", "--port", "0", "--base-url", "http://127.0.0.1:9/v1"],
                        environ={}) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--host '0.0.0.0'" in err and "--server-key" in err


def test_a_port_in_use_is_exit_status_1_naming_it(plain, capsys):
    """A port that cannot be listened on is reported, with the address, as exit status 1."""
    assert selfmoa.main(["serve", "--port", str(plain.port), "--base-url", "http://127.0.0.1:9/v1"], environ={}) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"cannot listen on 127.0.0.1:{plain.port}" in err


def test_serve_takes_the_one_shot_flags_with_their_meaning(capsys):
    """serve shares every endpoint, key, retry, timeout and method-default flag of the one-shot command
    (the same definitions), refuses the one-shot-only ones, and checks values naming the flag."""
    args = selfmoa_serve.build_serve_parser().parse_args(
        ["--port", "0", "--retries", "2", "--timeout", "5", "-n", "4", "--window", "3", "--carry", "1", "-p", "a",
         "-p", "b", "--layers", "3", "--min-ok", "2", "--temperature", "0.5", "--max-tokens", "9", "--seed", "3",
         "--aggregator-temperature", "0.1", "--aggregator-max-tokens", "7", "--concurrency", "2", "--no-n",
         "--api-key", "k", "--endpoint", "x=http://127.0.0.1:9/v1", "--base-url", "http://127.0.0.1:8/v1"])
    assert (args.retries, args.timeout, args.samples, args.window, args.carry, args.proposer, args.layers) == (
        2, 5.0, 4, 3, 1, ["a", "b"], 3)
    assert (args.min_ok, args.temperature, args.max_tokens, args.seed, args.concurrency, args.use_n) == (
        2, 0.5, 9, 3, 2, False)
    one_shot = {a.dest for a in selfmoa.build_parser()._actions}
    shared = {a.dest for a in selfmoa_serve.build_serve_parser()._actions}
    assert one_shot - shared == selfmoa_serve._NOT_SERVE_FLAGS - {"help"}
    for flag in ("--json", "--method", "-i", "--model"):
        with pytest.raises(SystemExit):
            selfmoa_serve.build_serve_parser().parse_args([flag, "x"])
    assert selfmoa.main(["serve", "--port", "0", "--window", "1"], environ={}) == 2
    assert "selfmoa: error: --window 1:" in capsys.readouterr().err


def test_a_prompt_that_is_literally_serve_is_still_possible(mock, capsys, monkeypatch):
    """`serve` is a subcommand only as the first argument: after `--`, or on standard input, it is a prompt."""
    flags = ["--base-url", mock.base_url, "-m", "generalist", "-n", "2", "--seed", "1", "--no-stream"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("serve"))
    for argv in (flags + ["--", "serve"], flags):
        before = len(mock.requests)
        assert selfmoa.main(argv, environ={}) == 0
        assert capsys.readouterr().out.strip() != ""
        assert mock.requests[before]["body"]["messages"] == [{"role": "user", "content": "serve"}]


def test_a_client_that_disconnects_mid_stream_cancels_its_runs_queued_calls(slow_mock):
    """A streamed run whose client goes away stops: its queued calls never reach the upstream."""
    client = selfmoa.HTTPClient(slow_mock.base_url, retries=0)
    with selfmoa_serve.ModelServer(client, port=0, concurrency=1) as server:
        question = [{"role": "user", "content": "disconnect test: what is 6 * 7?"}]
        body = json.dumps({"model": "self-moa/generalist", "messages": question, "stream": True, "seed": 2,
                           "selfmoa": {"n": 6, "use_n": False}}).encode()

        def seen():
            return sum(bool(entry["body"]) and entry["body"]["messages"][-1] == question[-1]
                       for entry in list(slow_mock.requests))

        with socket.create_connection((server.host, server.port), timeout=5) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 5
            while seen() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while server._runs and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server._runs, "the run did not end after its client went away"
        time.sleep(0.25)
        assert 1 <= seen() <= 2, f"{seen()} of the run's 7 calls reached the upstream"
        # The shared pool is free again for everyone else.
        reply = post(server, {"model": "self-moa/generalist", "messages": QUESTION, "selfmoa": {"n": 1}})
        assert reply.status_code == 200


def test_sigterm_stops_accepting_drains_in_flight_runs_and_exits_0(slow_mock):
    """`selfmoa serve --port 0` prints its base URL first (and takes its server key from
    $SELFMOA_SERVER_KEY); on SIGTERM the run in flight still gets its answer, new connections are refused,
    and the process exits 0."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
    process = subprocess.Popen([sys.executable, "selfmoa.py", "serve", "--port", "0", "--base-url",
                                slow_mock.base_url, "--retries", "0"], cwd=ROOT,
                               env={**environ, "SELFMOA_SERVER_KEY": "env-key"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url), base_url
        assert requests.get(base_url + "/models", timeout=10).status_code == 401
        before = len(slow_mock.requests)
        replies = []
        asking = threading.Thread(target=lambda: replies.append(requests.post(
            base_url + "/chat/completions", timeout=10, headers={"Authorization": "Bearer env-key"},
            json={"model": "self-moa/generalist", "messages": QUESTION, "selfmoa": {"n": 2}})))
        asking.start()
        deadline = time.monotonic() + 5
        while len(slow_mock.requests) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        asking.join(10)
        assert replies and replies[0].status_code == 200 and replies[0].json()["selfmoa"]["calls"] == 3
        assert process.wait(timeout=10) == 0
        assert "env-key" not in process.stderr.read()
        with pytest.raises(requests.ConnectionError):
            requests.get(base_url + "/models", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_a_second_ctrl_c_stops_at_once_with_status_130(slow_mock):
    """Ctrl-C starts the drain; a second Ctrl-C during it stops serve at once (exit status 130)."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
    process = subprocess.Popen([sys.executable, "selfmoa.py", "serve", "--port", "0", "--base-url",
                                slow_mock.base_url, "--retries", "0", "--concurrency", "1"], cwd=ROOT, env=environ,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = process.stdout.readline().strip()
        question = [{"role": "user", "content": "second ctrl-c test"}]

        def ask():
            with contextlib.suppress(requests.RequestException):  # serve stops without answering
                requests.post(base_url + "/chat/completions", timeout=10, json={
                    "model": "self-moa/generalist", "messages": question, "selfmoa": {"n": 8, "use_n": False}})

        asking = threading.Thread(target=ask)
        asking.start()
        deadline = time.monotonic() + 5
        while not any(e["body"] and e["body"]["messages"] == question for e in list(slow_mock.requests)) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        for _ in range(200):  # bounded: the drain has begun once serve says so
            if "stopping" in process.stderr.readline():
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 130
        assert "stopped without waiting" in process.stderr.read()
        asking.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_the_official_openai_sdk_works_unchanged(served):
    """The official SDK (if installed) talks to serve as to any server: `extra_body` carries the options,
    streaming reassembles to the same answer, and refusals arrive as its own error types."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0)
    ask = {"model": "self-moa/generalist", "messages": QUESTION, "seed": 6, "extra_body": {"selfmoa": {"n": 2}}}
    answer = client.chat.completions.create(**ask)
    direct = post(served, {"model": "self-moa/generalist", "messages": QUESTION, "seed": 6, "selfmoa": {"n": 2}})
    assert answer.choices[0].message.content == direct.json()["choices"][0]["message"]["content"]
    assert answer.usage.total_tokens == direct.json()["usage"]["total_tokens"]
    assert answer.model_extra["selfmoa"]["calls"] == 3
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              client.chat.completions.create(**ask, stream=True) if chunk.choices]
    assert "".join(pieces) == answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**ask, "n": 2})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**ask, "model": "self-moa/no-such-model"})
    assert "self-moa/generalist" in {model.id for model in client.models.list()}


SERVE_HELP = re.compile(r"(<!-- serve-help:start -->\n```\n)(.*?)(```\n<!-- serve-help:end -->)", re.DOTALL)


def serve_help() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    return selfmoa_serve.build_serve_parser().format_help()


def test_readme_shows_exactly_serve_help(monkeypatch):
    """The README's `selfmoa serve --help` block is the parser's help: character for character on Python
    3.10-3.12, word for word on 3.13+ (whose argparse words the options' metavars differently)."""
    monkeypatch.setenv("COLUMNS", "100")
    found = SERVE_HELP.search(test_readme.README.read_text(encoding="utf-8"))
    assert found, "README.md lost its <!-- serve-help:start --> ... <!-- serve-help:end --> block"
    stale = "README.md's serve help is stale: run python3 -m tests.test_serve --update (with Python 3.10-3.12)"
    if sys.version_info < test_readme.HELP_FORMAT_CHANGED:
        assert found.group(2) == serve_help(), stale
    else:
        assert test_readme.metavar_once(found.group(2)) == test_readme.metavar_once(serve_help()), stale


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    if sys.version_info >= test_readme.HELP_FORMAT_CHANGED:
        sys.exit("update the README with Python 3.10-3.12: their argparse prints the help the README shows")
    text = test_readme.README.read_text(encoding="utf-8")
    test_readme.README.write_text(SERVE_HELP.sub(lambda m: m.group(1) + serve_help() + m.group(3), text),
                                  encoding="utf-8")
    print("README.md updated")


def test_close_finishes_runs_in_flight_refuses_new_requests_and_cancels_after_the_drain_timeout(slow_mock):
    """While draining, a run in flight still gets its answer, a new request on an open connection gets
    503; a run still going when the drain timeout ends is cancelled (its queued calls are never sent)."""
    def asker(server, question, n, out):
        body = {"model": "self-moa/generalist", "messages": [{"role": "user", "content": question}],
                "selfmoa": {"n": n, "use_n": False}}
        return threading.Thread(target=lambda: out.append(requests.post(server.base_url + "/chat/completions",
                                                                         json=body, timeout=10)))

    def sent(question):
        return sum(bool(e["body"]) and e["body"]["messages"][-1]["content"] == question for e in slow_mock.requests)

    for drain, n, question in ((5.0, 2, "drain test: 2 + 2?"), (0.05, 6, "drain timeout test: 3 + 3?")):
        server = selfmoa_serve.ModelServer(selfmoa.HTTPClient(slow_mock.base_url, retries=0), port=0,
                                     concurrency=1).start()
        kept = requests.Session()
        assert kept.get(server.base_url.removesuffix("/v1") + "/health").status_code == 200
        replies: list = []
        asking = asker(server, question, n, replies)
        asking.start()
        deadline = time.monotonic() + 5
        while sent(question) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        left: list = []
        closing = threading.Thread(target=lambda s=server, out=left, d=drain: out.append(s.close(drain_timeout=d)))
        closing.start()
        time.sleep(0.02)
        late = kept.post(server.base_url + "/chat/completions", json={"model": "coder", "messages": QUESTION})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        closing.join(10)
        asking.join(10)
        if drain > 1:
            assert left == [0] and replies[0].status_code == 200 and sent(question) == n + 1
        else:
            assert left == [1]
            time.sleep(0.3)
            assert sent(question) <= 2, f"{sent(question)} of the cancelled run's {n + 1} calls were sent"


@pytest.mark.parametrize("model", ["self-moa/generalist", "coder"])
def test_an_http_1_0_client_gets_its_stream_ended_by_closing_the_connection(served, model):
    """HTTP/1.0 has no chunked encoding: a stream to such a client is the raw events, ended by closing."""
    body = json.dumps({"model": model, "messages": QUESTION, "stream": True, "seed": 1,
                       "selfmoa": {"n": 2}} if "/" in model else {"model": model, "messages": QUESTION,
                                                                  "stream": True, "seed": 1}).encode()
    with socket.create_connection((served.host, served.port), timeout=5) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = b""
        for _ in range(10_000):  # bounded: the server closes the connection at the end of the stream
            piece = connection.recv(65536)
            if not piece:
                break
            reply += piece
    head, _, events_text = reply.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"Transfer-Encoding" not in head
    assert events_text.endswith(b"data: [DONE]\n\n") and events_text.startswith(b"data: {")


def test_a_saturated_server_runs_the_older_requests_calls_first():
    """Under load, serve runs the calls of earlier requests first: request A's aggregation, once queued, runs
    before the samples request B queued earlier (a batch does the opposite, longest chains first, for
    throughput; with that order this test fails)."""
    a_started, b_started, gate, order = threading.Event(), threading.Event(), threading.Event(), []

    def waiting_in_queue(count):
        for _ in range(1000):  # bounded: 10 s at most
            if server.pool._queue.qsize() >= count:
                return True
            time.sleep(0.01)
        return False

    def complete(request):
        order.append((request.model, "aggregation" if selfmoa.read_references(request.messages) else "sample"))
        if len(order) == 1:  # A's samples: hold the only worker until B's samples are queued
            a_started.set()
            assert gate.wait(10)
        elif order[-1] == ("b", "sample") and not b_started.is_set():  # hold it until A's aggregation is queued
            b_started.set()
            assert waiting_in_queue(3)  # B's two other samples and A's aggregation
        return selfmoa.Reply([f"{request.model} text"] * request.n, ["stop"] * request.n, 1, 1)

    with selfmoa_serve.ModelServer(complete, port=0, concurrency=1, defaults={"n": 2}) as server:
        first = threading.Thread(target=post, args=(server, {"model": "self-moa/a", "messages": QUESTION}))
        second = threading.Thread(target=post, args=(server, {"model": "self-moa/b", "messages": QUESTION,
                                                              "selfmoa": {"n": 3, "use_n": False}}))
        first.start()
        assert a_started.wait(10)
        second.start()
        assert waiting_in_queue(3)  # B's three samples, each its own request
        gate.set()
        first.join(10)
        second.join(10)
    assert order == [("a", "sample"), ("b", "sample"), ("a", "aggregation"), ("b", "sample"), ("b", "sample"),
                     ("b", "aggregation")]


def test_pass_through_blanks_an_echoed_upstream_key_in_every_form_even_split_over_two_reads():
    """A hostile upstream that echoes its key, whole, JSON-escaped or percent-encoded, in a passed-through
    reply (streamed, with the key cut in two by a pause between writes, or not) never shows it to the client."""
    key = "sk-up/stream+secret-4242"
    forms = [key, key.replace("/", "\\/"), "sk-up%2Fstream%2Bsecret-4242"]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def upstream():
        for _ in range(2):  # bounded: one streamed and one plain request
            connection, _ = listener.accept()
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    body += connection.recv(65536)
                if json.loads(body).get("stream"):
                    text = "".join(f'data: {{"choices": [{{"delta": {{"content": "echo {form}"}}}}]}}\n\n'
                                   for form in forms) + "data: [DONE]\n\n"
                    middle = text.index(key) + len(key) // 2
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                       b"Connection: close\r\n\r\n")
                    connection.sendall(text[:middle].encode())
                    time.sleep(0.05)  # the client reads the first half on its own
                    connection.sendall(text[middle:].encode())
                else:
                    payload = ('{"error": {"message": "' + " ".join(forms) + '"}}').encode()  # as a server writes it
                    connection.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload)

    thread = threading.Thread(target=upstream, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    client = selfmoa.HTTPClient(f"http://127.0.0.1:{port}/v1", key, retries=0)
    with listener, selfmoa_serve.ModelServer(client, port=0) as server:
        streamed = post(server, {"model": "m", "messages": QUESTION, "stream": True})
        plain = post(server, {"model": "m", "messages": QUESTION})
    thread.join(10)
    assert streamed.status_code == 200 and plain.status_code == 401
    for reply in (streamed, plain):
        assert reply.text.count("***") == 3, reply.text
        assert not any(key[i:i + 8] in reply.text for i in range(len(key) - 7))
        assert "secret" not in reply.text


def test_pass_through_spreads_over_a_models_replicas_and_fails_over_from_a_dead_one():
    """Pass-through follows the client's replica rule: requests for one model alternate between its two
    live upstreams (fewest in flight, ties in turn), and a replica that refuses connections or answers 503 is
    skipped without the client seeing an error or a retry being spent."""
    dead = socket.create_server(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/v1"
    dead.close()  # nothing listens there now: connections are refused
    with MockServer() as one, MockServer() as two:
        client = selfmoa.HTTPClient([one.base_url, two.base_url], retries=1, backoff=0)
        with selfmoa_serve.ModelServer(client, port=0) as server:
            replies = [post(server, {"model": "generalist", "messages": QUESTION, "seed": i}) for i in range(6)]
            streamed = post(server, {"model": "generalist", "messages": QUESTION, "seed": 6, "stream": True})
        assert all(reply.status_code == 200 for reply in replies) and streamed.status_code == 200
        assert sorted([len(one.requests), len(two.requests)]) == [3, 4]  # 7 requests, in turn
        failover = selfmoa.HTTPClient([dead_url, one.base_url], retries=0, backoff=0)
        before = len(one.requests)
        with selfmoa_serve.ModelServer(failover, port=0) as server:
            reply = post(server, {"model": "generalist", "messages": QUESTION, "seed": 1})
        assert reply.status_code == 200 and len(one.requests) == before + 1
        assert reply.json() == replies[1].json()
        busy = ("json", 503, {"error": {"message": "overloaded"}}, {})
        with ScriptedServer(busy) as overloaded:
            failover = selfmoa.HTTPClient([overloaded.base_url, one.base_url], retries=0, backoff=0)
            with selfmoa_serve.ModelServer(failover, port=0) as server:
                reply = post(server, {"model": "generalist", "messages": QUESTION, "seed": 1})
            assert reply.status_code == 200 and len(overloaded.log) == 1 and len(one.requests) == before + 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["self-moa/\\ud800", "moa/x\\udfff", "self-moa-seq/\\ud83d", "x\\ud800"])
def test_lone_surrogates_in_a_request_get_a_well_formed_reply(plain, model, stream):
    """A request may spell half a surrogate pair (JSON allows "\\ud800", no UTF-8 text holds one) in the model
    name, which the reply echoes: the client still gets a status and a UTF-8 JSON body (each lone surrogate as
    U+FFFD), never a dropped connection."""
    options = b', "selfmoa": {"proposers": ["p"]}' if model.startswith("moa/") else b""
    data = (b'{"model": "%s", "stream": %s, "messages": [{"role": "user", "content": "hi \\udc80"}]%s}'
            % (model.encode(), b"true" if stream else b"false", options))
    reply = SESSION.post(plain.base_url + "/chat/completions", data=data, headers={"Content-Type": "application/json"})
    assert reply.status_code in (200, 404), reply.text
    reply.content.decode("utf-8")  # strict: nothing unencodable was sent
    if reply.status_code == 404:
        assert "\ufffd" in reply.json()["error"]["message"]
    elif stream:
        first, *_, last = reply.content.decode("utf-8").strip().split("\n\n")  # SSE is UTF-8, whatever requests guesses
        assert last == "data: [DONE]" and "\ufffd" in json.loads(first[len("data: "):])["model"]
    else:
        assert "\ufffd" in reply.json()["model"] and reply.json()["choices"][0]["message"]["content"].endswith(" ok")


def test_models_list_survives_whatever_an_upstream_lists():
    """GET /v1/models asks each upstream for its models; whatever body an upstream's /models answers (wrong
    types, a nesting bomb, a lone surrogate), serve still answers 200 with its own names."""
    with HostileServer() as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, timeout=2), port=0, models=["mine"]) as server:
        for listed in (b'{"data": 5}', b'{"data": null}', b"[" * 100_000, b'{"data": [{"id": "\\ud800"}]}',
                       b'{"data": {"id": "m"}}', b"\xff\xfe", b'{"data": [5, null, {"id": 7}]}'):
            upstream.plan = [response(b"200 OK", [(b"Content-Length", b"%d" % len(listed))], listed)]
            reply = SESSION.get(server.base_url + "/models", timeout=10)
            assert reply.status_code == 200, (listed[:30], reply.text)
            assert {"mine", "self-moa/mine"} <= {model["id"] for model in reply.json()["data"]}


@pytest.mark.parametrize("key", ["serverkey-1234\r", "serverkey-1234\n", "server key 1234", "clé-secrète-1234",
                                 "serverkey\t1234", " serverkey-1234"])
def test_a_server_key_that_is_not_a_bearer_token_is_refused_without_showing_it(key, capsys):
    """A server key that is not printable ASCII without spaces (a trailing CR from a CRLF key file, a tab, an
    accent: what a client cannot send, or what a Bearer token may not hold) would give every request a 401:
    it is refused up front (ConfigError, exit status 2), as upstream keys are, and never shown."""
    with pytest.raises(selfmoa.ConfigError, match="server_key") as refused:
        selfmoa_serve.ModelServer(echo, port=0, server_key=key)
    assert key.strip()[:8] not in str(refused.value)
    for argv, environ in ((["serve", "--port", "0", "--server-key", key], {}),
                          (["serve", "--port", "0"], {"SELFMOA_SERVER_KEY": key})):
        assert selfmoa.main(argv + ["--base-url", "http://127.0.0.1:9/v1"], environ=environ) == 2
        out, err = capsys.readouterr()
        assert out == "" and "server" in err and key.strip()[:8] not in err


def test_a_pass_through_reply_the_upstream_cuts_off_is_a_502_never_a_short_200():
    """A non-streamed pass-through whose upstream reply ends before its announced end (a short Content-Length
    body, a broken chunk) is an OpenAI-shaped 502 naming the model: never relayed as a complete 200 with a
    body cut in two, never a connection closed without an answer."""
    with HostileServer() as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, timeout=2, retries=0), port=0) as server:
        for cut in (response(b"200 OK", [(b"Content-Length", b"200")], b'{"choices": '),
                    response(b"200 OK", [(b"Transfer-Encoding", b"chunked")], b'5\r\n{"cho\r\nzz'),
                    response(b"200 OK", [(b"Content-Type", b"text/event-stream"), (b"Transfer-Encoding", b"chunked")],
                             b"5\r\ndata:\r\n")):
            upstream.plan = [cut]
            reply = post(server, {"model": "coder", "messages": QUESTION})
            assert reply.status_code == 502, (cut, reply.text)
            assert reply.json()["error"]["code"] == "upstream_error" and "'coder'" in reply.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_pass_through_attempt_is_bounded_by_the_deadline_like_any_call(stream):
    """--deadline bounds one whole attempt in serve as in the one-shot command: an upstream that drips its
    reply a byte at a time (each wait well within --timeout) is cut off at the deadline - a 502 if nothing was
    relayed yet, else the relayed stream ends - instead of holding the client for as long as it drips."""
    head = [(b"Content-Type", b"text/event-stream" if stream else b"application/json"), (b"Content-Length", b"400")]
    with HostileServer(response(b"200 OK", head, b""), ("drip", b"x" * 400, 0.05)) as upstream, \
            selfmoa_serve.ModelServer(selfmoa.HTTPClient(upstream.base_url, timeout=2, deadline=0.3, retries=0),
                                      port=0) as server:
        started = time.monotonic()
        try:
            reply = post(server, {"model": "coder", "messages": QUESTION, "stream": stream})
            assert reply.status_code == (200 if stream else 502), reply.text
        except requests.exceptions.ChunkedEncodingError:
            assert stream  # the relayed stream broke off: the client sees it end early
        assert time.monotonic() - started < 2.0


def test_pass_through_blanks_an_upstream_key_echoed_in_a_relayed_header():
    """The headers serve relays from an upstream (Content-Type, Retry-After) are part of the reply: a key the
    upstream echoes there is blanked out as in the body, never shown to the client."""
    key = "sk-header-echo-secret-77"
    with HostileServer() as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, key, retries=0), port=0) as server:
        for stream in (False, True):
            kind = b"text/event-stream" if stream else b"application/json"
            body = b"data: [DONE]\n\n" if stream else b'{"choices": []}'
            upstream.plan = [response(b"200 OK", [(b"Content-Type", kind + b"; key=" + key.encode()),
                                                  (b"Retry-After", key.encode()),
                                                  (b"Content-Length", b"%d" % len(body))], body)]
            reply = post(server, {"model": "coder", "messages": QUESTION, "stream": stream})
            shown = "\n".join(f"{name}: {value}" for name, value in reply.headers.items()) + reply.text
            assert reply.status_code == 200 and not any(key[i:i + 8] in shown for i in range(len(key) - 7)), shown


def test_an_upstream_interim_status_is_never_relayed_as_the_final_reply():
    """http.client hands any 1xx but 100 back as if final. Relayed, it would leave every conforming client
    (which waits for the final status after a 1xx) hanging: it is an upstream failure, a 502, instead."""
    with HostileServer() as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, timeout=2, retries=0), port=0) as server:
        for status in (b"101 Switching Protocols", b"102 Processing", b"103 Early Hints"):
            upstream.plan = [b"HTTP/1.1 " + status + b"\r\nLink: </x>\r\n\r\n"]
            reply = post(server, {"model": "coder", "messages": QUESTION})
            assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_error", reply.text


def test_models_list_is_bounded_by_the_deadline_whatever_an_upstream_drips():
    """An upstream that drips its /models reply a byte at a time (each wait within --timeout) holds GET
    /v1/models no longer than --deadline: serve then answers with the names it has."""
    dripping = (response(b"200 OK", [(b"Content-Length", b"400")], b""), ("drip", b" " * 400, 0.05))
    with HostileServer(*dripping) as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, timeout=2, deadline=0.3), port=0, models=["mine"]) as server:
        started = time.monotonic()
        reply = SESSION.get(server.base_url + "/models", timeout=10)
        assert reply.status_code == 200 and "self-moa/mine" in {model["id"] for model in reply.json()["data"]}
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("model, options, calls", [
    ("self-moa-seq/m", {"n": 256, "window": 2, "carry": 1}, 511),  # 256 samples and 255 rounds
    ("self-moa/m", {"n": 128, "layers": 3}, 257),
    ("self-moa/m", {"n": 256}, 257),
    ("moa/m", {"proposers": ["p"] * 128, "layers": 3}, 257),
    ("moa/m", {"proposers": [["p"] * 200, ["q"] * 100], "layers": 3}, 301),
    ("moa/m", {"proposers": ["a", "b"], "layers": 10**9}, 2 * (10**9 - 1) + 1),  # counted, never built
])
def test_a_request_may_ask_for_at_most_256_calls_aggregations_included(plain, model, options, calls):
    """"A request may ask for at most 256 calls": every call counts, samples, proposers and aggregations
    alike (a Self-MoA-Seq round is a call), so a request over it is a 400 naming a selfmoa option, and one
    of exactly 256 calls runs."""
    reply = post(plain, {"model": model, "messages": QUESTION, "selfmoa": options})
    assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("selfmoa."), (calls, reply.text)
    assert str(calls) in reply.json()["error"]["message"]
    reply = post(plain, {"model": "self-moa-seq/m", "messages": QUESTION, "selfmoa": {"n": 171, "window": 3,
                                                                                      "carry": 1}})
    assert reply.status_code == 200 and reply.json()["selfmoa"]["calls"] == 256


def test_moa_proposers_may_be_one_list_per_layer_without_naming_layers(plain):
    """`proposers` may be "a list of lists, one per layer": that list then says how many layers there are,
    so a request that leaves `layers` out runs them (serve's own --layers default does not contradict it)."""
    reply = post(plain, {"model": "moa/agg", "messages": QUESTION, "selfmoa": {"proposers": [["a", "b"], ["c"]]}})
    assert reply.status_code == 200, reply.text
    assert [(call["model"], call["layer"]) for call in reply.json()["selfmoa"]["trace"]] == [
        ("a", 1), ("b", 1), ("c", 2), ("agg", 3)]


def test_a_signal_right_after_the_base_url_is_printed_still_drains_and_exits_0(monkeypatch):
    """A supervisor (or a test) that reads the base URL and signals at once is answered like any later
    signal: serve was already listening for it when the first line went out, so it drains and returns 0,
    instead of dying of the default handler (KeyboardInterrupt, or SIGTERM's kill)."""
    class SignalOnFirstLine(io.StringIO):
        def write(self, text):
            written = super().write(text)
            if "http://" in text:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread, here, at once
            return written

    monkeypatch.setattr(sys, "stdout", SignalOnFirstLine())
    try:
        status = selfmoa.main(["serve", "--port", "0", "--base-url", "http://127.0.0.1:9/v1"], environ={})
    except KeyboardInterrupt:
        pytest.fail("the signal arrived before serve listened for it")
    assert status == 0 and sys.stdout.getvalue().startswith("http://127.0.0.1:")


def test_a_run_is_not_cancelled_because_its_connection_has_a_high_file_descriptor():
    """A busy server holds over 1024 descriptors; select() refuses those, and that must not read as "the client
    went away": a request whose connection lands above 1024 is answered, not cancelled at the first check."""
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1400:
        pytest.skip("needs a descriptor limit above 1400")

    def slow(request):
        time.sleep(0.15)  # a few of the 50 ms checks of the client's connection happen meanwhile
        return echo(request)

    filler = [os.dup(0) for _ in range(1100)]  # bounded: pushes the next sockets above 1024
    try:
        with selfmoa_serve.ModelServer(slow, port=0, defaults={"n": 1}) as server:
            reply = requests.post(server.base_url + "/chat/completions", json={"model": "self-moa/m",
                                                                                "messages": QUESTION}, timeout=10)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "m ok"
    finally:
        for descriptor in filler:
            os.close(descriptor)


def test_a_client_resetting_its_connection_leaves_no_traceback_in_the_log(plain, capfd):
    """Serve logs nothing per request, so a client that resets its kept-alive connection (a crash, a kill -9,
    a load balancer) must not print a traceback either: a hostile one could flood the log with them."""
    import struct
    for _ in range(3):  # bounded
        with socket.create_connection((plain.host, plain.port), timeout=5) as connection:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.02)  # the handler now waits for the next request line
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    time.sleep(0.1)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e400"])
def test_a_drain_timeout_that_is_not_a_finite_number_of_seconds_is_a_usage_error(value, capsys):
    """--drain-timeout is a finite number of seconds >= 0: infinity would crash the drain (Condition.wait
    cannot wait that long) and NaN or a negative one would silently skip it, so they are refused naming it."""
    with pytest.raises(selfmoa.ConfigError, match="drain_timeout"):
        selfmoa_serve.ModelServer(echo, port=0, drain_timeout=float(value))
    try:
        code = selfmoa.main(["serve", "--port", "0", "--drain-timeout", value, "--base-url", "http://127.0.0.1:9/v1"],
                            environ={})
    except SystemExit as exited:  # NaN and infinities: refused by argparse already
        code = exited.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "--drain-timeout" in err


def test_a_bug_in_a_handler_is_an_openai_shaped_500_without_its_text_and_the_server_keeps_serving(monkeypatch,
                                                                                                  capsys):
    """Whatever a handler raises, the client gets an OpenAI-shaped 500 naming no more than the exception's type
    (its text could hold a key), stderr gets one line and no traceback, and the next request is served."""
    def broken(self, handler):
        raise RuntimeError("boom sk-secret-in-a-bug")

    monkeypatch.setattr(selfmoa_serve.ModelServer, "handle_post", broken)
    with selfmoa_serve.ModelServer(echo, port=0) as server:
        reply = post(server, {"model": "self-moa/m", "messages": QUESTION})
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        assert "sk-secret" not in reply.text and "RuntimeError" in reply.json()["error"]["message"]
        assert SESSION.get(server.base_url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    err = capsys.readouterr().err
    assert "internal error (RuntimeError)" in err and "Traceback" not in err and "sk-secret" not in err


def test_one_model_is_retrieved_by_its_id_even_with_slashes(served):
    """GET /v1/models/{id} (the SDKs' models.retrieve) answers each listed name, slashes and all, and a 404
    model_not_found for any other."""
    listed = [entry["id"] for entry in SESSION.get(served.base_url + "/models", timeout=10).json()["data"]]
    for name in ("self-moa/generalist", "generalist", "moa/coder"):
        assert name in listed
        reply = SESSION.get(served.base_url + "/models/" + name, timeout=10)
        assert reply.status_code == 200 and reply.json()["id"] == name and reply.json()["object"] == "model"
    missing = SESSION.get(served.base_url + "/models/self-moa/nope%ff%00", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_llama_cpp_upstream_is_listed_by_its_model_file_name_not_its_path():
    """llama.cpp's server lists the path of the file it loaded as the model's id (and answers to any name): serve
    lists the file's name, so that "self-moa/qwen2-7b-q4_k_m.gguf" is a model and "self-moa//models/..." is not."""
    listed = json.dumps({"object": "list", "data": [{"id": "/models/qwen2-7b-q4_k_m.gguf", "object": "model",
                                                     "owned_by": "llamacpp"}]}).encode()
    with HostileServer() as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, timeout=2), port=0) as server:
        upstream.plan = [response(b"200 OK", [(b"Content-Length", b"%d" % len(listed))], listed)]
        names = {model["id"] for model in SESSION.get(server.base_url + "/models", timeout=10).json()["data"]}
    assert {"qwen2-7b-q4_k_m.gguf", "self-moa/qwen2-7b-q4_k_m.gguf"} <= names
    assert not any("/models/" in name for name in names)


def test_serve_listens_by_default_where_neither_vllm_nor_llama_cpp_does():
    assert selfmoa_serve.build_serve_parser().get_default("port") == selfmoa_serve.SERVE_PORT
    assert selfmoa_serve.SERVE_PORT not in (8000, 8080)
