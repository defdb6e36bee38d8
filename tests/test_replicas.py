"""Several servers of one model (replicas): calls spread by what is in flight, failover without spending the
retry budget, a cool-down for a failing replica, keys only to the replicas of their model, capacity caps."""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import requests

import selfmoa
import selfmoa_batch
from mock_models import MockServer
from tests.scripted_server import ScriptedServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [{"id": f"p{i}", "prompt": f"Compute {i} * 3 + 1. Multiplication comes before addition."} for i in range(30)]


def served(server: MockServer) -> int:
    return sum(entry["path"] == "/v1/chat/completions" for entry in server.requests)


def test_a_batch_spreads_its_calls_evenly_over_three_replicas(tmp_path):
    """Equal latency: each of three replicas gets within 10% of a third of the requests."""
    with MockServer(latency=0.02) as a, MockServer(latency=0.02) as b, MockServer(latency=0.02) as c:
        client = selfmoa.HTTPClient(endpoints={"generalist": [selfmoa.Endpoint(a.base_url), b.base_url,
                                                              selfmoa.Endpoint(c.base_url)]})
        counts = selfmoa_batch.run_batch(selfmoa_batch.check_items(PROMPTS), str(tmp_path / "out.jsonl"),
                                         complete=client, concurrency=6, model="generalist", n=2, seed=0)
        loads = [served(server) for server in (a, b, c)]
    assert counts["done"] == 30 and sum(loads) == 60
    assert all(abs(load - 20) <= 2 for load in loads), loads
    assert {url: count["requests"] for url, count in client.servers().items()} == {
        server.base_url: load for server, load in zip((a, b, c), loads)}


def start_mock_process(*flags):
    process = subprocess.Popen([sys.executable, "-m", "mock_models", "--port", "0", *flags], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return process, process.stdout.readline().strip()


def test_a_replica_killed_mid_batch_costs_no_item_and_the_trace_shows_the_failover(tmp_path):
    """kill -9 one of three replicas while a batch runs, with retries=0: every item is answered exactly once;
    calls in flight on it, or sent to it after, are failed over to the others (recorded as an extra attempt,
    served by a survivor)."""
    victim, victim_url = start_mock_process("--latency", "0.05", "--max-concurrency", "8")
    try:
        with MockServer(latency=0.05) as a, MockServer(latency=0.05) as b:
            client = selfmoa.HTTPClient([victim_url, a.base_url, b.base_url], retries=0, cooldown=60)
            output = tmp_path / "out.jsonl"
            result: dict = {}
            runner = threading.Thread(target=lambda: result.update(selfmoa_batch.run_batch(
                selfmoa_batch.check_items(PROMPTS), str(output), complete=client, concurrency=6, trace=True,
                model="generalist", n=2, seed=0)))
            runner.start()
            for _ in range(500):
                if client.servers()[victim_url]["requests"] >= 4:
                    break
                time.sleep(0.01)
            victim.kill()
            runner.join(30)
    finally:
        victim.kill()
        victim.wait()
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert result["done"] == 30 and result["failed"] == 0
    assert sorted(line["id"] for line in lines) == sorted(p["id"] for p in PROMPTS)
    calls = [call for line in lines for call in line["trace"]]
    urls = collections.Counter(call["url"] for call in calls)
    assert urls[victim_url + "/chat/completions"] >= 1, "the victim served calls before it died"
    failed_over = [call for call in calls if call["retries"] >= 1]
    assert failed_over and all(call["url"] != victim_url + "/chat/completions" for call in failed_over)
    assert client.servers()[victim_url]["failed"] >= 1


def test_a_replica_answering_503_for_a_while_is_avoided_then_used_again():
    """A replica failing 3 times in a row cools down (calls skip it, though turns alternate), is tried again after
    the cool-down, and once it answers it takes turns again; no call fails, though the retry budget is 0."""
    with ScriptedServer(("choices", 1)) as steady, ScriptedServer(
            *([("json", 503, {"error": {"message": "busy"}}, {})] * 4 + [("choices", 1)])) as flaky:
        client = selfmoa.HTTPClient([steady.base_url, flaky.base_url], retries=0, cooldown=0.15)
        calls, started = [], time.monotonic()  # (served by the flaky one, failed over)
        while sum(flaky_one for flaky_one, _ in calls) < 6 and len(calls) < 2000 and time.monotonic() - started < 5:
            reply = client(selfmoa.Request("m", ({"role": "user", "content": "hi"},)))
            calls.append((reply.url.startswith(flaky.base_url), reply.retries > 0))
            time.sleep(0.003)
    recovered = [flaky_one for flaky_one, _ in calls].index(True)
    before, after = calls[:recovered], calls[recovered:]
    assert len(flaky.log) == 4 + 6 and sum(failed_over for _, failed_over in before) == 4
    skipped = "".join("x" if failed_over else "." for _, failed_over in before)
    assert "..." in skipped, f"turns alternate, so three calls in a row skip it only while it cools: {skipped}"
    assert [flaky_one for flaky_one, _ in after[:10]] == [True, False] * 5, "back to taking turns"


def test_keys_go_to_the_replicas_of_their_model_and_nowhere_else(tmp_path, capsys):
    """$SELFMOA_API_KEY_<MODEL> reaches every replica of MODEL and nothing else; --api-key every default replica;
    $OPENAI_API_KEY none of them (they are not the OpenAI API)."""
    servers = [ScriptedServer() for _ in range(5)]
    for server in servers:
        server.__enter__()
    try:
        a1, a2, b1, d1, d2 = (server.base_url for server in servers)
        environ = {"SELFMOA_API_KEY_A": "sk-key-of-a", "SELFMOA_API_KEY_B": "sk-key-of-b", "OPENAI_API_KEY": "sk-o"}
        flags = ["--method", "moa", "-p", "a", "-p", "b", "-p", "c", "-p", "a", "-p", "c", "-a", "c",
                 "--endpoint", f"a={a1}", "--endpoint", f"b={b1}", "--endpoint", f"a={a2}",
                 "--base-url", d1, "--base-url", d2]
        for argv in ([*flags, "--api-key", "sk-default", "--json", "Q"], [*flags, "--json", "Q"]):
            code = selfmoa.main(argv, environ=environ)
            out, err = capsys.readouterr()
            assert code == 0, err
        summary = json.loads(out)["servers"]
        assert set(summary) == {a1, a2, b1, d1, d2} and all(count["requests"] >= 1 for count in summary.values())
    finally:
        for server in servers:
            server.__exit__()
    keys = [[entry["headers"].get("Authorization") for entry in server.log] for server in servers]
    assert set(keys[0]) == set(keys[1]) == {"Bearer sk-key-of-a"}
    assert set(keys[2]) == {"Bearer sk-key-of-b"}
    assert set(keys[3]) == set(keys[4]) == {"Bearer sk-default", None}  # --api-key, then no key at all
    assert all(len(k) >= 2 for k in keys)


def test_max_in_flight_caps_the_calls_each_server_sees_at_once(tmp_path):
    with MockServer(latency=0.02, max_concurrency=50) as a, MockServer(latency=0.02, max_concurrency=50) as b:
        client = selfmoa.HTTPClient([a.base_url, b.base_url], max_in_flight=2)
        counts = selfmoa_batch.run_batch(selfmoa_batch.check_items(PROMPTS[:12]), str(tmp_path / "out.jsonl"),
                                         complete=client, concurrency=8, model="generalist", n=2, seed=0)
    assert counts["done"] == 12
    assert a.peak_concurrency == b.peak_concurrency == 2


def test_the_mock_serves_max_concurrency_requests_at_once_and_queues_the_rest():
    with MockServer(latency=0.05, max_concurrency=2) as server:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        started = time.monotonic()
        threads = [threading.Thread(target=requests.post, args=(server.base_url + "/chat/completions",),
                                    kwargs={"json": body, "timeout": 10}) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.peak_concurrency == 2 and time.monotonic() - started >= 3 * 0.05 - 0.01  # 3 waves of 2
        assert len(server.requests) == 6


def test_replica_arguments_are_checked(capsys):
    for bad in ({"base_url": []}, {"endpoints": {"m": []}}, {"base_url": "http://h/v1", "max_in_flight": 0},
                {"base_url": "http://h/v1", "cooldown": -1}):
        try:
            selfmoa.HTTPClient(**bad)
        except selfmoa.ConfigError:
            continue
        raise AssertionError(f"{bad} was accepted")
    assert selfmoa.main(["--base-url", "http://127.0.0.1:9/v1", "--max-in-flight", "0", "-m", "m", "Q"],
                        environ={}) == 2
    assert "--max-in-flight 0" in capsys.readouterr().err


def test_with_every_replica_down_a_call_fails_as_with_one_server():
    """Two replicas refusing connections: the call is tried on each, then retried as usual, then fails."""
    client = selfmoa.HTTPClient(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"], retries=1, sleep=lambda s: None)
    try:
        client(selfmoa.Request("m", ({"role": "user", "content": "hi"},)))
    except selfmoa.ModelError as error:
        # one failover to the other replica, then the retry goes to the replica back from its cool-down first
        assert "could not reach" in str(error) and error.attempts == 3
    else:
        raise AssertionError("no replica is up, yet the call succeeded")
    assert list(client.servers().values()) == [{"requests": 2, "failed": 2}, {"requests": 1, "failed": 1}]


def test_a_batch_over_replicas_reports_the_requests_per_server(tmp_path, capsys):
    with ScriptedServer() as a, ScriptedServer() as b:
        (tmp_path / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:6]))
        code = selfmoa.main(["--base-url", a.base_url, "--base-url", b.base_url, "-m", "m", "-n", "1",
                             "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")], environ={})
        err = capsys.readouterr().err
    assert code == 0 and f"requests per server: {a.base_url} {len(a.log)} (0 failed), {b.base_url} {len(b.log)}" in err
    assert len(a.log) + len(b.log) == 12 and len(a.log) >= 1 and len(b.log) >= 1


def test_every_replica_and_its_key_is_known_to_whoever_must_blank_keys():
    """The serve front end blanks every upstream key from its replies: it must see every replica's key."""
    client = selfmoa.HTTPClient([selfmoa.Endpoint("http://127.0.0.1:9/v1", "sk-first-0000"),
                                 selfmoa.Endpoint("http://127.0.0.1:10/v1", "sk-second-000")],
                                endpoints={"m": ["http://127.0.0.1:11/v1", selfmoa.Endpoint("http://127.0.0.1:12/v1",
                                                                                            "sk-third-0000")]})
    assert [e.api_key for e in selfmoa._endpoints_of(client)] == ["sk-first-0000", "sk-second-000", None,
                                                                   "sk-third-0000"]
    assert [e.base_url for e in client.replicas("m")] == ["http://127.0.0.1:11/v1", "http://127.0.0.1:12/v1"]
    assert client.endpoint_for("other").base_url == "http://127.0.0.1:9/v1"


def test_a_call_waiting_for_a_free_slot_takes_it_as_soon_as_its_server_frees_one():
    """--max-in-flight: a call waiting for a slot on server A starts as soon as A frees one, even when a call
    waiting for another server B has waited longer (a freed slot must not wake only B's waiter, which finds B
    still full, while A's waiter sleeps on: that stalled MoA over one-request-at-a-time servers)."""
    a, b = selfmoa.Endpoint("http://127.0.0.1:9/v1"), selfmoa.Endpoint("http://127.0.0.1:10/v1")
    client = selfmoa.HTTPClient(endpoints={"a": a, "b": b}, max_in_flight=1)
    assert client._replicas.pick([a], set()) is a and client._replicas.pick([b], set()) is b  # both full now
    started: dict[str, float] = {}

    def wait_for(endpoint):
        client._replicas.pick([endpoint], set())
        started[endpoint.base_url] = time.monotonic()

    waiters = []
    for endpoint in (b, a):  # B's waiter first: it has waited longer
        waiters.append(threading.Thread(target=wait_for, args=(endpoint,), daemon=True))
        waiters[-1].start()
        for _ in range(500):
            if len(client._replicas._slots._waiters) == len(waiters):
                break
            time.sleep(0.002)
    freed = time.monotonic()
    client._replicas.settle(a, "ok")
    waiters[1].join(2)
    assert started[a.base_url] - freed < 0.5, "A's waiter slept on although A had a free slot"
    assert b.base_url not in started, "B is still full"
    client._replicas.settle(b, "ok")
    waiters[0].join(2)
    assert b.base_url in started


def test_a_replica_without_the_model_404_hands_the_call_to_another_replica_without_cooling_it():
    """A replica answering 404 (another model is loaded there) does not fail the call while another replica is
    left: the call goes there at once, no retry spent; the 404 replica is not cooled down, since it may serve
    other models. With every replica answering 404 the call fails as before, naming the model."""
    missing = ("json", 404, {"error": {"message": "The model `m` does not exist."}}, {})
    with ScriptedServer(missing) as wrong, ScriptedServer(("choices", None)) as right:
        client = selfmoa.HTTPClient([wrong.base_url, right.base_url], retries=0)
        reply = client(selfmoa.Request("m", ({"role": "user", "content": "Q"},)))
        assert reply.texts and len(wrong.log) == 1 and len(right.log) == 1 and reply.retries == 1
        client(selfmoa.Request("m", ({"role": "user", "content": "Q"},)))
        client(selfmoa.Request("m", ({"role": "user", "content": "Q"},)))
        assert len(wrong.log) >= 2  # still picked in turn: not cooling down
        both_wrong = selfmoa.HTTPClient([wrong.base_url, wrong.base_url.replace("/v1", "/v1/")], retries=0)
        with pytest.raises(selfmoa.ModelError, match="404"):
            both_wrong(selfmoa.Request("m", ({"role": "user", "content": "Q"},)))
