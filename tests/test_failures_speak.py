"""Failures that speak: on the command line, every proposer or sample that failed and was dropped is named on
standard error (model, reason, "continuing with K of N"), a batch names each cause once, and a model that does
not exist on its server is called that, with the names the server offers (GET /v1/models)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

import selfmoa
from mock_models import MockServer

MOCK_MODELS = "coder, echo, generalist, generalist-2, mathematician"


def run(capsys, argv, environ=None):
    code = selfmoa.main(argv, environ=environ if environ is not None else {})
    out, err = capsys.readouterr()
    return code, out, err


def test_a_mistyped_proposer_is_named_on_stderr_with_what_the_server_offers(capsys):
    """The issue's example: a typo among three proposers. The run still succeeds on two (dropping a failed
    proposer is the method), but not silently."""
    with MockServer() as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "--method", "moa", "-p", "generalist",
                                      "-p", "genralist-typo", "-p", "coder", "-a", "generalist", "hi"])
    assert code == 0 and "Drawing on 2 responses" in out
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("selfmoa: proposer 2 (genralist-typo) failed and was dropped: model 'genralist-typo'")
    assert "HTTP 404" in lines[0] and lines[0].endswith("; continuing with 2 of 3 proposers")
    assert "server said" not in lines[0]  # the whole reply is --json's to show
    assert lines[1] == (f"selfmoa: model 'genralist-typo' does not exist on its server {server.base_url} (HTTP 404); "
                        f"it offers: {MOCK_MODELS} (did you mean 'generalist-2'?)")


def test_a_model_that_does_not_exist_fails_the_run_and_is_named_as_such(capsys):
    with MockServer() as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "genralist", "hi"])
    assert code == 1 and out == ""
    assert (f"selfmoa: model 'genralist' does not exist on its server {server.base_url} (HTTP 404); it offers: "
            f"{MOCK_MODELS} (did you mean 'generalist'?)") in err.splitlines()
    assert "selfmoa: 1 request had been made; --json shows them" in err.splitlines()


def test_a_404_from_every_replica_names_them_all(capsys):
    with MockServer() as one, MockServer() as two:
        code, _, err = run(capsys, ["--endpoint", f"nope={one.base_url}", "--endpoint", f"nope={two.base_url}",
                                    "-m", "nope", "-n", "2", "hi"])
    assert code == 1
    assert f"selfmoa: model 'nope' does not exist on any of its 2 servers (HTTP 404); it offers: {MOCK_MODELS}" \
        in err.splitlines()
    assert len(one.requests) == len(two.requests) == 1  # asked once each, then GET /v1/models (not logged)


def test_dropped_samples_are_counted_per_layer_and_cause(capsys):
    """Self-MoA with one request per sample (--no-n), two of six failing for good: both named, once."""
    failing = {2, 5}

    def complete(request):
        if request.seed is not None and request.seed in failing and not selfmoa.read_references(request.messages):
            raise selfmoa.ModelError("overloaded", model=request.model, url="http://h/v1/chat/completions",
                                     status=503, attempts=5)
        return f"answer {request.seed}"

    result = selfmoa.self_moa("hi", "q", n=6, complete=complete, seed=0, use_n=False)
    assert selfmoa.dropped_report(result) == [
        "samples 3, 6 (q) failed and were dropped: model 'q' at http://h/v1/chat/completions: HTTP 503: overloaded "
        "(after 5 attempts); continuing with 4 of 6 samples"]


def test_moa_layers_each_report_their_drops(capsys):
    def complete(request):
        if request.model == "bad":
            raise selfmoa.ModelError("boom", model="bad", status=500)
        return "fine"

    result = selfmoa.moa("hi", ["a", "bad", "b"], "a", layers=3, complete=complete)
    assert [line.split(":")[0] for line in selfmoa.dropped_report(result)] == ["layer 1", "layer 2"]
    assert all(line.endswith("continuing with 2 of 3 proposers") for line in selfmoa.dropped_report(result))


def test_nothing_is_reported_when_nothing_was_dropped(capsys):
    with MockServer() as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, "--method", "moa", "-p", "generalist", "-p", "coder",
                                    "-a", "generalist", "hi"])
    assert (code, err) == (0, "")


def test_a_layer_that_stops_the_run_is_left_to_the_error(capsys):
    """Every proposer failed: the error names the failures; no "continuing" line contradicts it."""
    with MockServer() as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, "--method", "moa", "-p", "x", "-p", "y",
                                    "-a", "generalist", "hi"])
    assert code == 1 and "continuing" not in err and "only 0 of 2 proposers succeeded" in err


def test_a_batch_names_each_cause_once(capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in range(5)))
    with MockServer() as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, "--method", "moa", "-p", "generalist",
                                    "-p", "genralist-typo", "-a", "generalist", "-i", str(prompts),
                                    "-o", str(tmp_path / "answers.jsonl")])
    assert code == 0
    lines = err.splitlines()
    assert [line for line in lines if "failed for good" in line] == [
        f"selfmoa: 5 calls failed for good: model 'genralist-typo' at {server.base_url}/chat/completions: HTTP 404: "
        f"The model 'genralist-typo' does not exist"]
    assert sum("does not exist on its server" in line for line in lines) == 1
    assert lines[-1].startswith("selfmoa: 5 answered, 0 failed")


class Lister(http.server.BaseHTTPRequestHandler):
    """A server whose GET /v1/models answers whatever the test puts in ``listing`` (404 to every POST)."""

    listing: bytes = b""
    seen: list = []

    def do_GET(self):  # noqa: N802
        Lister.seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.listing)))
        self.end_headers()
        self.wfile.write(self.listing)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"error": {"message": "no such model"}}'
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("listing, expected", [
    (b'{"data": [{"id": "b"}, {"id": "a"}, {"id": "b"}, {"nope": 1}, {"id": ""}, {"id": 3}, "x"]}', ["a", "b"]),
    (b'{"data": [{"id": "evil\\u001b[2J"}]}', ["evil\ufffd[2J"]),
    (b'{"data": [{"id": "KEY-sk-0123456789abcdef"}]}', ["KEY-***"]),
    (b"not json", None), (b'{"data": 5}', None), (b"[" * 100_000, None), (b"[]", None),
])
def test_models_lists_what_the_server_offers_safely(listing, expected):
    """HTTPClient.models: the ids of GET /models, sorted, without repeats; control characters and the key (which
    is sent, to the endpoint it belongs to) never shown; None for anything that is not a model list."""
    Lister.listing, Lister.seen = listing, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Lister)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()  # shutdown() waits a poll
    try:
        client = selfmoa.HTTPClient(selfmoa.Endpoint(f"http://127.0.0.1:{httpd.server_port}/v1",
                                                     api_key="sk-0123456789abcdef"), timeout=5)
        found = client.models("m")
    finally:
        httpd.shutdown()
        httpd.server_close()
    if expected == ["KEY-***"]:
        assert found is not None and len(found) == 1 and "0123456789" not in found[0]
    else:
        assert found == expected
    assert Lister.seen[0]["Authorization"] == "Bearer sk-0123456789abcdef"


def test_models_is_none_when_no_server_answers():
    client = selfmoa.HTTPClient("http://127.0.0.1:9/v1", timeout=2)
    assert client.models("m") is None


def test_json_names_no_server_that_the_run_did_not_use(capsys):
    """With every model on its own --endpoint, the default endpoint (the OpenAI API) got nothing and is not listed
    under "servers", so nothing suggests that a request, or a key, went there."""
    with MockServer() as server:
        code, out, _ = run(capsys, ["--endpoint", f"generalist={server.base_url}", "-m", "generalist", "-n", "2",
                                    "--json", "hi"], environ={"OPENAI_API_KEY": "sk-openai-key-0123"})
        assert code == 0
        assert json.loads(out)["servers"] == {server.base_url: {"requests": 2, "failed": 0}}
        other = server.base_url.replace("127.0.0.1", "localhost")
        code, out, _ = run(capsys, ["--base-url", server.base_url, "--endpoint", f"coder={other}",
                                    "-m", "generalist", "-n", "2", "--json", "hi"])
    assert code == 0 and json.loads(out)["servers"] == {server.base_url: {"requests": 2, "failed": 0},
                                                         other: {"requests": 0, "failed": 0}}


@pytest.mark.parametrize("flags, environ, says", [
    (["--base-url", "{url}"], {"OPENAI_API_KEY": "sk-withheld-0123"},
     "selfmoa: $OPENAI_API_KEY was not sent to {url}, on purpose: it goes only to the OpenAI API or to "
     "$OPENAI_BASE_URL, never to another --base-url. Give this server's key with --api-key KEY, or, if "
     "$OPENAI_API_KEY is its key, export OPENAI_BASE_URL={url} instead of --base-url"),
    (["--base-url", "{url}"], {}, "selfmoa: no key was sent to {url}: give this server's key with --api-key KEY"),
    (["--endpoint", "generalist={url}"], {"OPENAI_API_KEY": "sk-withheld-0123"},
     "selfmoa: model 'generalist' has its own --endpoint and was sent no key: the key of such a model comes from "
     "$SELFMOA_API_KEY_GENERALIST alone; export SELFMOA_API_KEY_GENERALIST=..."),
])
def test_a_401_after_a_key_was_withheld_on_purpose_says_why_and_the_fix(capsys, flags, environ, says):
    with MockServer(api_key="sk-the-right-one") as server:
        argv = [flag.format(url=server.base_url) for flag in flags] + ["-m", "generalist", "hi"]
        code, _, err = run(capsys, argv, environ=environ)
    assert code == 1 and "HTTP 401" in err
    assert says.format(url=server.base_url) in err.splitlines()
    assert "sk-withheld" not in err


@pytest.mark.parametrize("flags, environ", [
    (["--api-key", "sk-wrong-key-0123"], {}),
    ([], {"OPENAI_API_KEY": "sk-wrong-key-0123", "OPENAI_BASE_URL": "{url}"}),
    (["--endpoint", "generalist={url}"], {"SELFMOA_API_KEY_GENERALIST": "sk-wrong-key-0123"}),
])
def test_a_401_for_a_key_that_was_sent_adds_no_explanation(capsys, flags, environ):
    """Only a withheld key is explained: a wrong key that was sent is the server's message to give."""
    with MockServer(api_key="sk-the-right-one") as server:
        base = [] if environ.get("OPENAI_BASE_URL") or "--endpoint" in flags else ["--base-url", server.base_url]
        argv = base + [flag.format(url=server.base_url) for flag in flags] + ["-m", "generalist", "hi"]
        code, _, err = run(capsys, argv, environ={k: v.format(url=server.base_url) for k, v in environ.items()})
    assert code == 1 and "HTTP 401" in err
    assert "was not sent" not in err and "no key was sent" not in err and "was sent no key" not in err


def test_a_batch_explains_a_withheld_key_once(capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in range(3)))
    with MockServer(api_key="sk-the-right-one") as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "-n", "2", "-i", str(prompts),
                                    "-o", str(tmp_path / "answers.jsonl")], environ={"OPENAI_API_KEY": "sk-withheld-0"})
    assert code == 1
    assert sum(line.startswith("selfmoa: $OPENAI_API_KEY was not sent to") for line in err.splitlines()) == 1
    assert [line for line in err.splitlines() if "failed for good" in line] == [
        f"selfmoa: 3 calls failed for good: model 'generalist' at {server.base_url}/chat/completions: HTTP 401: "
        f"Incorrect API key provided"]


def test_self_moa_seq_counts_its_dropped_samples_over_all_rounds():
    def complete(request):
        if request.seed in (3, 7) and not selfmoa.read_references(request.messages):
            raise selfmoa.ModelError("boom", model=request.model, status=500)
        return f"x {request.seed}"

    result = selfmoa.self_moa_seq("hi", "q", n=12, complete=complete, seed=0, use_n=False)
    assert selfmoa.dropped_report(result) == [
        "samples 4, 8 (q) failed and were dropped: model 'q': HTTP 500: boom; continuing with 10 of 12 samples"]
