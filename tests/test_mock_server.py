"""The mock server on its own, through `requests` (an independent client): endpoints, errors, streaming,
n, seeds, determinism across processes, fault injection, abuse."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mock_models import MockServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "Compute 12 * 7 + 3. Multiplication comes before addition."}]


@pytest.fixture(scope="module")
def server():
    with MockServer() as running:
        yield running


def chat(server, session=requests, **body):
    body.setdefault("model", "generalist")
    body.setdefault("messages", USER)
    return session.post(server.base_url + "/chat/completions", json=body, timeout=10)


def assert_alive(server):
    assert requests.get(server.base_url.replace("/v1", "/health"), timeout=5).json() == {"status": "ok"}


def test_chat_completion_is_shaped_like_openais(server):
    reply = chat(server, seed=1)
    data = reply.json()
    assert reply.status_code == 200 and reply.headers["Content-Length"] == str(len(reply.content))
    assert data["object"] == "chat.completion" and data["model"] == "generalist" and data["id"].startswith("chatcmpl-")
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert choice["message"]["content"].endswith(".") and "The answer is" in choice["message"]["content"]
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_models_and_health(server):
    listed = requests.get(server.base_url + "/models", timeout=5).json()
    assert listed["object"] == "list"
    assert {m["id"] for m in listed["data"]} == {"generalist", "coder", "mathematician", "generalist-2", "echo"}
    assert all(m["context_length"] > 0 for m in listed["data"])
    assert_alive(server)


def test_n_choices_and_the_seed_convention(server):
    many = chat(server, n=4, seed=10).json()["choices"]
    singles = [chat(server, seed=10 + j).json()["choices"][0] for j in range(4)]
    assert [c["index"] for c in many] == [0, 1, 2, 3]
    assert [c["message"]["content"] for c in many] == [c["message"]["content"] for c in singles]


def test_ignoring_n_returns_one_choice():
    with MockServer(honour_n=False) as lone:
        assert len(chat(lone, n=5, seed=1).json()["choices"]) == 1


def test_temperature_zero_is_fixed_and_sampling_varies_with_the_seed(server):
    greedy = {chat(server, temperature=0, seed=s).json()["choices"][0]["message"]["content"] for s in range(5)}
    sampled = {chat(server, temperature=1.0, seed=s).json()["choices"][0]["message"]["content"] for s in range(8)}
    assert len(greedy) == 1 and len(sampled) > 1


def test_max_tokens_cuts_with_finish_reason_length_and_stop_sequences(server):
    cut = chat(server, max_tokens=3, seed=1).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 3
    full = chat(server, seed=1).json()["choices"][0]["message"]["content"]
    stopped = chat(server, seed=1, stop=["answer"]).json()["choices"][0]
    assert stopped["message"]["content"] == full[:full.index("answer")] and stopped["finish_reason"] == "stop"


def test_streaming_sends_deltas_a_finish_chunk_usage_and_done(server):
    with requests.post(server.base_url + "/chat/completions", timeout=10, stream=True,
                       json={"model": "coder", "messages": USER, "seed": 2, "stream": True,
                             "stream_options": {"include_usage": True}}) as reply:
        assert reply.headers["Content-Type"] == "text/event-stream"
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == chat(server, model="coder", seed=2).json()["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("send, status, param", [
    (lambda url: requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}), 400, None),
    (lambda url: requests.post(url, json={"messages": USER}), 400, "model"),
    (lambda url: requests.post(url, json={"model": "gpt-9", "messages": USER}), 404, "model"),
    (lambda url: requests.post(url, json={"model": "coder"}), 400, "messages"),
    (lambda url: requests.post(url, json={"model": "coder", "messages": [{"role": "user"}]}), 400, "messages[0]"),
    (lambda url: requests.post(url, json={"model": "coder", "messages": USER, "temperature": 5}), 400, "temperature"),
    (lambda url: requests.post(url, json={"model": "coder", "messages": USER, "n": 0}), 400, "n"),
    (lambda url: requests.post(url, json={"model": "coder", "messages": USER, "stream": "yes"}), 400, "stream"),
    (lambda url: requests.post(url, json={"model": "mathematician", "messages": USER, "max_tokens": 10_000}),
     400, "messages"),
    (lambda url: requests.post(url, data=b"x" * 1_000_001, headers={"Content-Type": "application/json"}), 413, None),
    (lambda url: requests.post(url.replace("chat/completions", "nowhere"), json={}), 404, None),
])
def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, send, status, param):
    reply = send(server.base_url + "/chat/completions")
    error = reply.json()["error"]
    assert reply.status_code == status and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    if status == 400 and param == "messages" and "max_tokens" in str(reply.request.body):
        assert error["code"] == "context_length_exceeded"
    assert_alive(server)


def test_api_key_is_required_when_set():
    with MockServer(api_key="sk-mock") as guarded:
        assert chat(guarded).status_code == 401
        ok = guarded.base_url + "/chat/completions"
        assert requests.post(ok, json={"model": "coder", "messages": USER},
                             headers={"Authorization": "Bearer sk-mock"}, timeout=5).status_code == 200
        assert guarded.requests[-1]["headers"]["Authorization"] == "Bearer sk-mock"


def test_the_request_log_records_what_was_sent(server):
    before = len(server.requests)
    chat(server, seed=99, model="echo")
    entry = server.requests[before]
    assert entry["path"] == "/v1/chat/completions" and entry["body"]["seed"] == 99 and entry["status"] == 200


def test_echo_returns_what_it_was_sent(server):
    text = chat(server, model="echo", messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text.json()["choices"][0]["message"]["content"] == "system: S\n\nuser: U"


def test_replies_are_identical_across_processes_and_hash_seeds():
    code = ("from mock_models import models; import json; print(json.dumps([models.reply(m, "
            "[{'role': 'user', 'content': t.prompt}], 0.7, s) for m in models.MODELS[:4] "
            "for t in __import__('mock_models').make_tasks('CRUX', 5) for s in range(3)]))")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1 and len(json.loads(outputs.pop())) == 60


def test_fault_injection_rates_and_kinds_are_deterministic_and_within_tolerance():
    with MockServer(fault_rate=0.3, faults=("429", "500", "503"), fault_seed=7, retry_after=0) as faulty:
        session = requests.Session()
        statuses = [chat(faulty, session, seed=i).status_code for i in range(300)]
        first = [e["fault"] for e in faulty.requests]
    with MockServer(fault_rate=0.3, faults=("429", "500", "503"), fault_seed=7, retry_after=0) as again:
        for i in range(300):
            chat(again, seed=i)
        second = [e["fault"] for e in again.requests]
    failed = sum(status != 200 for status in statuses)
    assert first == second
    assert 60 <= failed <= 120  # 30% of 300 = 90, with a generous tolerance for a fixed seed
    assert {s for s in statuses if s != 200} == {429, 500, 503}


@pytest.mark.parametrize("kind", ["429", "500", "503", "drop", "truncate", "stall"])
def test_each_fault_kind_as_a_client_sees_it(kind):
    with MockServer(fault_rate=1.0, faults=(kind,), retry_after=3, stall_seconds=2.0) as faulty:
        if kind in ("429", "500", "503"):
            reply = chat(faulty)
            assert reply.status_code == int(kind) and reply.json()["error"]["message"].startswith("injected")
            if kind == "429":
                assert reply.headers["Retry-After"] == "3"
        elif kind == "drop":
            with pytest.raises(requests.ConnectionError):
                chat(faulty)
        elif kind == "truncate":
            with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.ConnectionError)):
                chat(faulty).json()
        else:
            with pytest.raises(requests.Timeout):
                requests.post(faulty.base_url + "/chat/completions", json={"model": "coder", "messages": USER},
                              timeout=0.2)
        assert_alive(faulty)


def test_a_retried_identical_request_gets_a_fresh_draw():
    with MockServer(fault_rate=0.5, faults=("500",), fault_seed=3) as faulty:
        statuses = [chat(faulty, seed=1).status_code for _ in range(20)]
    assert 200 in statuses and 500 in statuses


def raw_exchange(server, payload: bytes, timeout: float = 3.0) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def framed(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


nesting_bomb = st.builds(lambda opener, depth, tail: opener * depth + tail,
                         st.sampled_from([b"[", b'{"a":', b'[{"b":']),
                         st.integers(1_000, 200_000), st.sampled_from([b"", b"1", b"]" * 10]))
surrogate = st.sampled_from(["\\ud83d", "\\udc00", "a\\udfffb", "\\ud800\\ud800"])
lone_surrogate_body = st.builds(
    lambda where, escape: (json.dumps({"model": "echo", "messages": [{"role": "user", "content": "PLACE"}]})
                           if where == "content" else json.dumps({"model": "PLACE", "messages": USER})
                           if where == "model" else json.dumps({"model": "echo", "messages": [{"role": "user",
                                                                                                "content": "x"}],
                                                               "stop": ["PLACE"]})).replace("PLACE", escape).encode(),
    st.sampled_from(["content", "model", "stop"]), surrogate)


@given(payload=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda body: b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body, st.binary(max_size=200)),
    st.builds(lambda body: b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\nContent-Type: application/json\r\n\r\n" + body,
              st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["model", "messages", "n", "seed", "stream", "role", "content"]),
                               inner, max_size=4), max_leaves=8).map(lambda v: json.dumps(v).encode())),
    st.builds(lambda name, value: b"GET /health HTTP/1.1\r\n" + name + b": " + value + b"\r\n\r\n",
              st.binary(min_size=1, max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b and b":" not in b),
              st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    nesting_bomb.map(framed), lone_surrogate_body.map(framed),
))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_get_a_well_formed_http_response_and_the_server_stays_up(server, payload):
    """Whatever arrives, the answer (if any) is well-formed HTTP, and the server keeps serving."""
    answer = raw_exchange(server, payload)
    if answer:
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n")[0]
        assert status_line.startswith(b"HTTP/1.") and status_line.split()[1].isdigit()
        length = [line for line in head.split(b"\r\n")[1:] if line.lower().startswith(b"content-length:")]
        assert length, head
    assert_alive(server)


@given(body=st.one_of(nesting_bomb, lone_surrogate_body, st.binary(max_size=100).map(lambda b: b"\xff" + b)))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_malformed_request_gets_an_openai_shaped_4xx_and_the_server_stays_up(server, body):
    """A JSON nesting bomb, a lone surrogate escape anywhere, or bytes that are not UTF-8 JSON: the answer is a
    4xx with an OpenAI-shaped error body (never a dropped connection or a 5xx), and the server keeps serving."""
    answer = raw_exchange(server, framed(body))
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b"\r\n")[0].split()[1])
    assert 400 <= status < 500, head
    assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
    assert_alive(server)


@pytest.mark.parametrize("length, status", [("\u00b2".encode(), 400), (b"12a", 400), (b"-5", 400),
                                            (b"9" * 5000, 413), (b"99999999999999999999", 413)])
def test_an_odd_content_length_gets_400_or_413_not_a_500(server, length, status):
    """A Content-Length that is not plain ASCII digits ("²" passes str.isdigit, not int) is a 400; one too long
    for int() or for the body limit is a 413; never the 500 of a mock bug, and the server keeps serving."""
    answer = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                          + b"\r\n\r\n{}")
    assert answer.split(b"\r\n")[0].split()[1] == str(status).encode(), answer[:200]
    assert_alive(server)


def test_the_server_survives_a_flood_of_idle_connections():
    with MockServer(client_timeout=1.0) as flooded:
        idle = [socket.create_connection((flooded.host, flooded.port), timeout=5) for _ in range(50)]
        try:
            assert chat(flooded).status_code == 200
        finally:
            for sock in idle:
                sock.close()


def test_command_line_prints_its_url_first_and_serves():
    process = subprocess.Popen([sys.executable, "-m", "mock_models", "--port", "0"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        reply = requests.post(url + "/chat/completions", json={"model": "coder", "messages": USER}, timeout=10)
        assert reply.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def demo_steps(output: str) -> list[tuple[str, str]]:
    """The demo's shell lines ("$ ..." and their continuation lines), each with the output it shows under it."""
    steps: list[tuple[str, str]] = []
    lines = output.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            command = lines[i][2:]
            while command.count("'") % 2:  # a quoted PROMPT spans lines
                i += 1
                command += "\n" + lines[i]
            shown = []
            while i + 1 < len(lines) and lines[i + 1].startswith("  "):
                i += 1
                shown.append(lines[i][2:])
            steps.append((command, "\n".join(shown)))
        i += 1
    return steps


def test_demo_runs_every_method_and_its_commands_rerun_as_shown(tmp_path):
    """The demo's commands, pasted into a shell against a mock server of one's own (as its last lines say),
    print exactly the answers the demo showed: nothing hidden is added to them (no --json behind the scenes)."""
    done = subprocess.run([sys.executable, "-m", "mock_models", "demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("$ python3 selfmoa.py") == 9
    assert "| MATH | Self-MoA |" in done.stdout and "| MMLU | Self-MoA-Seq |" in done.stdout
    assert "python3 -m mock_models\n" in done.stdout and "export OPENAI_BASE_URL=http://127.0.0.1:8000/v1" \
        in done.stdout
    steps = demo_steps(done.stdout)
    commands = [(command, shown) for command, shown in steps if command.startswith("python3 selfmoa.py")]
    assert len(commands) == 9 and all(shown for _, shown in commands)
    (tmp_path / "python3").symlink_to(sys.executable)
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
    environ["PATH"] = f"{tmp_path}{os.pathsep}{environ.get('PATH', '')}"
    with MockServer() as own:
        scripts, prompt = [], ""
        for command, _ in steps:  # each command pasted into a shell of its own after the export and its PROMPT
            if command.startswith("PROMPT="):
                prompt = command
            elif command.startswith("python3 selfmoa.py"):
                scripts.append(f"export OPENAI_BASE_URL={own.base_url}\n{prompt}\n{command}")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at a time: the replies depend on each request
            ran = list(pool.map(lambda script: subprocess.run(  # alone; more would crowd the other tests' timing
                ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, env=environ,
                stdin=subprocess.DEVNULL), scripts))
    assert all(done.returncode == 0 for done in ran), [done.stderr for done in ran]
    assert [done.stdout for done in ran] == [shown + "\n" for _, shown in commands]


def test_latency_is_injected():
    with MockServer(latency=0.2) as slow:
        started = time.monotonic()
        chat(slow)
        assert time.monotonic() - started >= 0.2


def test_a_slow_client_is_cut_off_and_does_not_block_others():
    with MockServer(client_timeout=0.5) as server_:
        slow = socket.create_connection((server_.host, server_.port), timeout=5)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"mo")  # then nothing
        assert chat(server_).status_code == 200  # others are served meanwhile
        started = time.monotonic()
        assert slow.recv(100) == b""  # the server hung up on the stalled request
        assert time.monotonic() - started < 3
        slow.close()


def test_binds_loopback_by_default():
    with MockServer() as local:
        assert local.host == "127.0.0.1"


def test_a_body_over_the_limit_gets_its_413_while_the_client_is_still_sending(server):
    """The mock refuses a body over its limit without reading it, then drains what the client still sends before
    closing (a lingering close): closing with unread input would reset the connection, failing the client's send
    or destroying the 413 before it is read (this failed about one exchange in ten before)."""
    payload = framed(b'[{"b":' * 200_000)  # 1.2 MB, over the 1 MB limit
    for _ in range(40):
        answer = raw_exchange(server, payload)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert_alive(server)


def run_mock(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mock_models", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_mock_help_names_the_models_and_both_subcommands_and_runs_nothing():
    done = run_mock("--help")
    assert done.returncode == 0 and done.stderr == ""
    usage = done.stdout.split("\n\n")[0]
    assert "python3 -m mock_models [serve]" in usage and "python3 -m mock_models demo" in usage
    assert all(name in done.stdout for name in ("generalist", "coder", "mathematician", "generalist-2", "echo"))
    fault_seed = " ".join(done.stdout[done.stdout.index("--fault-seed N  "):].split("\n  -")[0].split())
    assert "seed" in fault_seed.replace("--fault-seed", "") and "default: 0" in fault_seed
    demo = run_mock("demo", "--help", timeout=10)
    assert demo.returncode == 0 and demo.stdout.startswith("usage: python3 -m mock_models demo")
    assert "Mock models serving" not in demo.stdout and "python3 -m mock_models" in demo.stdout


def mock_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``python3 -m mock_models ARGV``'s exit status, stdout and stderr, run in this process (for what ends at its
    flags: a usage error, --help)."""
    from mock_models.__main__ import main

    try:
        code = main(list(argv))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def start_mock(*flags: str) -> tuple[subprocess.Popen, str, str]:
    """``python3 -m mock_models FLAGS`` in a process: the process, its first stdout line and first stderr line."""
    process = subprocess.Popen([sys.executable, "-m", "mock_models", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert process.stdout is not None and process.stderr is not None
    return process, process.stdout.readline().strip(), process.stderr.readline().strip()


def test_the_start_up_lines_give_the_url_first_then_the_models_and_what_to_export():
    process, url, note = start_mock("--port", "0")
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert "generalist, coder, mathematician, generalist-2, echo" in note
        assert f"export OPENAI_BASE_URL={url}" in note
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_the_mock_listens_on_ipv6_loopback():
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("::1 cannot be bound here")
    process, url, _ = start_mock("--host", "::1", "--port", "0")
    try:
        assert url.startswith("http://[::1]:") and url.endswith("/v1"), url
        assert requests.post(url + "/chat/completions", json={"model": "coder", "messages": USER},
                             timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_retry_after_takes_fractions_of_a_second_and_sends_them(capsys):
    process, url, _ = start_mock("--port", "0", "--fault-rate", "1", "--faults", "429", "--retry-after", "0.1")
    try:
        reply = requests.post(url + "/chat/completions", json={"model": "coder", "messages": USER}, timeout=10)
        assert reply.status_code == 429 and reply.headers["Retry-After"] == "0.1"
    finally:
        process.terminate()
        process.wait(timeout=10)
    for bad in ("soon", "-1", "nan"):
        code, _, err = mock_main(capsys, "--retry-after", bad)
        assert code == 2 and "--retry-after" in err and "seconds" in err


# --- Today's servers (issue 22): reasoning models' restrictions, n refused, thoughts, context windows ---------


def stream_events(reply) -> list:
    return [json.loads(line[5:]) for line in reply.text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def test_openai_reasoning_refuses_temperature_and_max_tokens_with_openais_bodies():
    with MockServer(openai_reasoning=True) as running:
        refused = chat(running, temperature=0.7).json()["error"]
        assert refused == {"message": "Unsupported value: 'temperature' does not support 0.7 with this model. Only the "
                           "default (1) value is supported.", "type": "invalid_request_error",
                           "param": "temperature", "code": "unsupported_value"}
        refused = chat(running, max_tokens=50).json()["error"]
        assert refused == {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                           "'max_completion_tokens' instead.", "type": "invalid_request_error",
                           "param": "max_tokens", "code": "unsupported_parameter"}
        for accepted in ({"temperature": 1}, {}, {"max_completion_tokens": 5}):
            reply = chat(running, **accepted)
            assert reply.status_code == 200
            assert reply.json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
        assert chat(running, max_completion_tokens=5).json()["choices"][0]["finish_reason"] == "length"


def test_refuse_n_answers_n_above_one_with_a_400():
    with MockServer(refuse_n=True) as running:
        assert chat(running, n=2).status_code == 400
        assert chat(running, n=1).status_code == 200 and chat(running).status_code == 200


@pytest.mark.parametrize("where", ["content", "reasoning_content", "reasoning"])
def test_thinking_puts_thoughts_where_asked_and_counts_them(where):
    with MockServer(thinking=where, thought_tokens=20) as running:
        plain = MockServer()  # the same model's answer without thinking: what must remain once thoughts are removed
        with plain:
            answer = chat(plain, seed=4).json()["choices"][0]["message"]["content"]
        data = chat(running, seed=4).json()
        message, usage = data["choices"][0]["message"], data["usage"]
        if where == "content":
            assert message["content"].startswith("<think>\nThinking (mock):")
            assert message["content"].endswith("\n</think>\n\n" + answer) and "completion_tokens_details" not in usage
        else:
            assert message["content"] == answer and message[where].startswith("Thinking (mock):")
            assert usage["completion_tokens_details"]["reasoning_tokens"] == 20
            assert usage["completion_tokens"] == 20 + len(re.findall(r"\w+|[^\w\s]", answer))
        off = chat(running, seed=4, chat_template_kwargs={"enable_thinking": False}).json()
        assert off["choices"][0]["message"]["content"] == answer and where not in (
            off["choices"][0]["message"].keys() - {"content"})
        assert len(chat(running, seed=4, reasoning_effort="high").text) > len(chat(running, seed=4).text)
        events = stream_events(chat(running, seed=4, stream=True, stream_options={"include_usage": True}))
        pieces = [e["choices"][0]["delta"] for e in events if e["choices"]]
        assert "".join(d.get("content") or "" for d in pieces) == message["content"]
        if where != "content":
            assert "".join(d.get(where) or "" for d in pieces) == message[where]


def test_thinking_that_spends_the_whole_limit_leaves_no_answer():
    with MockServer(thinking="reasoning_content", thought_tokens=30) as running:
        choice = chat(running, seed=1, max_tokens=10).json()["choices"][0]
        assert choice["message"]["content"] is None and choice["finish_reason"] == "length"
    with MockServer(thinking="content", thought_tokens=30) as running:
        choice = chat(running, seed=1, max_tokens=10).json()["choices"][0]
        assert choice["message"]["content"].startswith("<think>") and "</think>" not in choice["message"]["content"]
        assert choice["finish_reason"] == "length"


def test_each_overflow_shape():
    long = [{"role": "user", "content": "word " * 40}]
    shapes = {"openai": lambda d: d["error"]["code"] == "context_length_exceeded",
              "vllm": lambda d: d["object"] == "error" and "maximum context length is 30" in d["message"],
              "llama.cpp": lambda d: d["error"]["type"] == "exceed_context_size_error" and d["error"]["n_ctx"] == 30,
              "empty-stream": lambda d: "exceed context window of 30" in d["error"]["message"]}
    for shape, check in shapes.items():
        with MockServer(context_length=30, overflow=shape) as running:
            reply = chat(running, messages=long)
            assert reply.status_code == 400 and check(reply.json()), shape
            streamed = chat(running, messages=long, stream=True)
            if shape == "empty-stream":
                assert streamed.status_code == 200 and streamed.text == "data: [DONE]\n\n"
            else:
                assert streamed.status_code == 400 and check(streamed.json()), shape
            assert chat(running).status_code == 200  # a short prompt fits


def test_new_flags_on_the_command_line(capsys):
    code, out, _ = mock_main(capsys, "--help")
    assert code == 0
    for flag in ("--openai-reasoning", "--refuse-n", "--thinking", "--thought-tokens", "--context-length",
                 "--overflow"):
        assert flag in out
    code, _, err = mock_main(capsys, "--thinking", "brain")
    assert code == 2 and "--thinking" in err
