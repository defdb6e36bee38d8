"""LiteLLM's proxy in front of `selfmoa serve` and behind selfmoa, configured exactly as README's section "Past one
machine" shows (its two YAML files, with the mock models in place of the GPUs), checking answers, streaming and
where each key goes.

LiteLLM is not a dependency: these tests are skipped (with the reason) where `litellm[proxy]` is not installed.
CI runs them in a virtual environment of their own after the default run (.ci/run); by hand:

    python3 -m venv .ci-venv/litellm && .ci-venv/litellm/bin/pip install -e '.[test]' 'litellm[proxy]'
    .ci-venv/litellm/bin/python -m pytest -n 0 tests/engines/test_litellm.py
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("litellm.proxy.proxy_server", reason="LiteLLM's proxy is not installed (pip install "
                                                         "'litellm[proxy]'); CI runs this in its optional LiteLLM job")
import requests  # noqa: E402
import yaml  # noqa: E402  (a dependency of litellm[proxy])

from mock_models import MockServer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
GATEWAY_KEY = "sk-gateway-7f3a9c"  # what the gateway's clients send
SERVE_KEY = "s3rve-key-5be1"  # selfmoa serve's --server-key: known to the gateway only
SERVE_UPSTREAM_KEY = "upstream-of-serve-0d2"  # serve's key to its model server
BEHIND_KEY = "vllm-key-91c4"  # the gateway's key to the three model servers behind it
ALL_KEYS = (GATEWAY_KEY, SERVE_KEY, SERVE_UPSTREAM_KEY, BEHIND_KEY)


def readme_config(name: str) -> dict:
    """The YAML file README shows under `# NAME`, parsed."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"```yaml\n# {re.escape(name)}\n(.*?)```", text, re.DOTALL)
    assert found, f"README.md lost its {name} block"
    return yaml.safe_load(found.group(1))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args[0]} exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """mock <- selfmoa serve <- LiteLLM (front), and three mocks <- LiteLLM (behind): one proxy, README's configs."""
    folder = tmp_path_factory.mktemp("litellm")
    serve_upstream = MockServer(api_key=SERVE_UPSTREAM_KEY).start()
    behind = [MockServer(api_key=BEHIND_KEY).start() for _ in range(3)]
    serve = subprocess.Popen([sys.executable, str(ROOT / "selfmoa.py"), "serve", "--base-url", serve_upstream.base_url,
                              "--api-key", SERVE_UPSTREAM_KEY, "--port", "0", "-n", "3"],
                             env={**os.environ, "SELFMOA_SERVER_KEY": SERVE_KEY}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    proxy = None
    try:
        serve_url = serve.stdout.readline().strip()
        assert serve_url.startswith("http://127.0.0.1:"), serve.stderr.read()
        front, back = readme_config("litellm-front.yaml"), readme_config("litellm-behind.yaml")
        for entry in front["model_list"]:  # this serve in place of localhost:8100
            assert entry["litellm_params"]["api_base"] == "http://localhost:8100/v1"
            entry["litellm_params"]["api_base"] = serve_url
        assert len(back["model_list"]) == 3
        for entry, server in zip(back["model_list"], behind):  # the three mocks in place of the GPUs
            entry["litellm_params"]["api_base"] = server.base_url
        assert front["general_settings"] == back["general_settings"]
        config = {"model_list": front["model_list"] + back["model_list"],
                  "router_settings": back["router_settings"], "general_settings": front["general_settings"]}
        (folder / "litellm.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        port = free_port()
        litellm = pathlib.Path(sys.executable).parent / "litellm"
        log = open(folder / "litellm.log", "w")  # noqa: SIM115 (closed at the end)
        proxy = subprocess.Popen([str(litellm), "--config", str(folder / "litellm.yaml"), "--host", "127.0.0.1",
                                  "--port", str(port)], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "LITELLM_MASTER_KEY": GATEWAY_KEY, "SELFMOA_SERVER_KEY": SERVE_KEY,
                                      "VLLM_KEY": BEHIND_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                      "NO_DOCS": "True"})
        gateway = f"http://127.0.0.1:{port}"
        wait_for(f"{gateway}/health/liveliness", proxy, 240)
        yield {"gateway": gateway, "serve": serve_url, "serve_upstream": serve_upstream, "behind": behind,
               "folder": folder}
    finally:
        for process in (proxy, serve):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        serve_upstream.close()
        for server in behind:
            server.close()


def authorization(entry: dict) -> str | None:
    """The Authorization header a mock server received (header names are case-insensitive)."""
    return next((value for name, value in entry["headers"].items() if name.lower() == "authorization"), None)


def ask(url: str, key: str, **body) -> requests.Response:
    return requests.post(f"{url.removesuffix('/v1')}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         timeout=120, json=body, stream=bool(body.get("stream")))


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def no_key_in(response: requests.Response, raw: bytes) -> None:
    shown = raw.decode("utf-8", "replace") + json.dumps(dict(response.headers))
    for key in (SERVE_KEY, SERVE_UPSTREAM_KEY, BEHIND_KEY):
        assert key not in shown


def test_litellm_in_front_of_serve_answers_self_moa_as_serve_itself_does(chain):
    through = ask(chain["gateway"], GATEWAY_KEY, model="self-moa/generalist", messages=QUESTION, seed=5)
    assert through.status_code == 200, through.text
    direct = ask(chain["serve"], SERVE_KEY, model="self-moa/generalist", messages=QUESTION, seed=5)
    assert direct.status_code == 200, direct.text
    answer = through.json()["choices"][0]["message"]["content"]
    assert answer == direct.json()["choices"][0]["message"]["content"]
    assert "Drawing on 3 responses" in answer  # the mock's aggregator: three samples were aggregated
    assert through.json()["usage"]["completion_tokens"] > 0
    no_key_in(through, through.content)


def test_litellm_in_front_of_serve_streams_the_answer(chain):
    whole = ask(chain["gateway"], GATEWAY_KEY, model="self-moa/generalist", messages=QUESTION, seed=6)
    streamed = ask(chain["gateway"], GATEWAY_KEY, model="self-moa/generalist", messages=QUESTION, seed=6, stream=True)
    assert streamed.status_code == 200
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    raw = b"".join(streamed.iter_content(chunk_size=None))
    events = [line[len(b"data: "):] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    pieces = [json.loads(event) for event in events[:-1]]
    text = "".join(choice["delta"].get("content") or "" for piece in pieces for choice in piece["choices"])
    assert len([piece for piece in pieces if piece["choices"] and piece["choices"][0]["delta"].get("content")]) > 1
    assert text == whole.json()["choices"][0]["message"]["content"]
    no_key_in(streamed, raw)


def test_keys_stay_where_they_belong_through_the_front_chain(chain):
    """The gateway admits its own key only (not serve's); serve's key and its upstream's key never reach the
    gateway's clients, even in an error relayed from serve; the gateway's key never reaches a model server."""
    assert ask(chain["gateway"], "wrong", model="self-moa/generalist", messages=QUESTION).status_code in (400, 401)
    assert ask(chain["gateway"], SERVE_KEY, model="self-moa/generalist", messages=QUESTION).status_code in (400, 401)
    refused = ask(chain["gateway"], GATEWAY_KEY, model="self-moa/generalist", messages=QUESTION,
                  extra_body={"selfmoa": {"n": 0}}, selfmoa={"n": 0})
    assert refused.status_code >= 400
    no_key_in(refused, refused.content)
    sent = chain["serve_upstream"].requests
    assert sent and all(authorization(entry) == f"Bearer {SERVE_UPSTREAM_KEY}" for entry in sent)
    for entry in sent:
        assert not any(key in json.dumps(entry) for key in (GATEWAY_KEY, SERVE_KEY))


def test_litellm_behind_selfmoa_spreads_a_batch_over_three_servers(chain):
    folder = chain["folder"]
    (folder / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"What is {i} squared?"}) + "\n"
                                             for i in range(30)), encoding="utf-8")
    flags = ["-m", "generalist", "-n", "3", "--seed", "2", "--concurrency", "6", "-i", "in.jsonl"]
    done = subprocess.run([sys.executable, str(ROOT / "selfmoa.py"), *flags, "--base-url", f"{chain['gateway']}/v1",
                           "--api-key", GATEWAY_KEY, "-o", "via-gateway.jsonl"], cwd=folder, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "30 answered, 0 failed" in done.stderr
    counts = [len([e for e in server.requests if e["path"] == "/v1/chat/completions"]) for server in chain["behind"]]
    assert all(count > 0 for count in counts) and sum(counts) >= 60, counts
    for server in chain["behind"]:
        for entry in server.requests:
            assert authorization(entry) == f"Bearer {BEHIND_KEY}"
            assert GATEWAY_KEY not in json.dumps(entry)
    samples = [e["body"] for server in chain["behind"] for e in server.requests if e["body"].get("n") == 3]
    assert samples and all(body.get("seed") == 2 for body in samples)  # n and seed pass through the router
    with MockServer() as alone:  # the same answers as from one server directly
        direct = subprocess.run([sys.executable, str(ROOT / "selfmoa.py"), *flags, "--base-url", alone.base_url,
                                 "-o", "direct.jsonl"], cwd=folder, capture_output=True, text=True, timeout=300)
        assert direct.returncode == 0, direct.stderr

    def answers(name: str) -> list[str]:
        return [json.loads(line)["answer"] for line in (folder / name).read_text(encoding="utf-8").splitlines()]

    assert answers("via-gateway.jsonl") == answers("direct.jsonl")
    assert GATEWAY_KEY not in (folder / "via-gateway.jsonl").read_text(encoding="utf-8")
