"""Today's servers (issue 22, spec/wire.md sections 2 and 8): selfmoa against mock servers that behave like OpenAI's
reasoning models, Anthropic's compatible endpoint (n refused), thinking models with and without a reasoning
parser, and servers that each say in their own way that a prompt exceeds the context window."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import selfmoa
import selfmoa_serve
from mock_models import MockServer
from mock_models.server import THOUGHT_OPENER

PROMPT = "Compute 37 * 12 + 5."
KINDS = {
    "openai-reasoning": {"openai_reasoning": True, "thinking": "reasoning_content"},
    "refuse-n": {"refuse_n": True},
    "thinking-in-content": {"thinking": "content"},
    "thinking-in-reasoning": {"thinking": "reasoning"},
    "all-at-once": {"openai_reasoning": True, "refuse_n": True, "thinking": "content"},
}
METHOD_FLAGS = {
    "self-moa": ["-m", "generalist", "-n", "4"],
    "moa": ["--method", "moa", "-p", "generalist", "-p", "coder", "-p", "generalist", "-a", "coder"],
    "self-moa-seq": ["--method", "self-moa-seq", "-m", "generalist", "-n", "5", "--window", "3", "--carry", "1"],
}


def run(capsys, argv):
    code = selfmoa.main(argv, environ={})
    out, err = capsys.readouterr()
    return code, out, err


def bodies(server, status=None):
    return [e["body"] for e in server.requests if e["body"] is not None and (status is None or e["status"] == status)]


def aggregations(server):
    return [b for b in bodies(server) if selfmoa.read_references(b["messages"])]


def refused_field(body: dict) -> str:
    """Which field the mock refused (it checks temperature, then max_tokens, then n)."""
    if body.get("temperature") not in (None, 1):
        return "temperature"
    return "max_tokens" if "max_tokens" in body else "n"


def assert_each_refusal_paid_once(server):
    """Each adaptation costs at most one refused request per server, model and field."""
    paid = [(b["model"], refused_field(b)) for b in bodies(server, 400)]
    assert len(paid) == len(set(paid)), paid


def assert_no_thought_shown(server, *texts):
    for body in aggregations(server):
        for reference in selfmoa.read_references(body["messages"]):
            assert THOUGHT_OPENER not in reference and "<think>" not in reference
    for text in texts:
        assert THOUGHT_OPENER not in text and "<think>" not in text


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_H1_every_method_works_with_default_flags_against_todays_servers(capsys, kind, method):
    with MockServer(**KINDS[kind]) as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "--seed", "1", *METHOD_FLAGS[method], PROMPT])
        assert code == 0, err
        assert out.strip().endswith("The answer is 449.") or "The answer is" in out
        assert_each_refusal_paid_once(server)
        assert_no_thought_shown(server, out)
        for line in err.splitlines():  # each adaptation announced once, on stderr
            assert err.count(line) == 1 and "refuses" in line
        if KINDS[kind].get("openai_reasoning"):
            assert all("temperature" not in b and "max_tokens" not in b for b in bodies(server, 200))
        if KINDS[kind].get("refuse_n"):
            assert all(b.get("n", 1) == 1 for b in bodies(server, 200))


@pytest.mark.parametrize("kind", ["openai-reasoning", "thinking-in-content", "all-at-once"])
def test_H1_token_limits_are_adapted_and_the_stream_shows_no_thought(capsys, kind):
    with MockServer(**KINDS[kind], thought_tokens=12) as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "--max-tokens", "200",
                                      "--aggregator-max-tokens", "300", "--stream", PROMPT])
        assert code == 0, err
        assert_each_refusal_paid_once(server)
        assert_no_thought_shown(server, out)
        if KINDS[kind].get("openai_reasoning"):
            assert "refuses max_tokens" in err and "max_completion_tokens" in err
            assert {b.get("max_completion_tokens") for b in bodies(server, 200)} == {200, 300}


def test_H2_json_and_traces_show_what_was_actually_sent(capsys):
    with MockServer(openai_reasoning=True) as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "-n", "2",
                                      "--aggregator-max-tokens", "300", "--json", PROMPT])
        assert code == 0, err
        data = json.loads(out)
        assert {a["field"] for a in data["adaptations"]} == {"temperature", "max_tokens"}
        aggregator = [c for c in data["trace"] if c["role"] == "aggregator"][0]
        assert aggregator["temperature"] is None and aggregator["max_tokens"] is None
        assert aggregator["fields"] == {"max_completion_tokens": 300}
        assert aggregator["adapted"] == {"temperature": None, "max_tokens": None, "max_completion_tokens": 300}
        assert all(c["temperature"] is None for c in data["trace"])
        assert "usage" in data and data["usage"]["reasoning_tokens"] == 0


def test_H1_a_mixed_moa_with_a_reasoning_model_as_aggregator(capsys):
    with MockServer() as plain, MockServer(openai_reasoning=True, thinking="content") as reasoning:
        code, out, err = run(capsys, ["--base-url", plain.base_url, "--endpoint", f"mathematician={reasoning.base_url}",
                                      "--method", "moa", "-p", "generalist", "-p", "coder", "-a", "mathematician",
                                      "--aggregator-max-tokens", "400", PROMPT])
        assert code == 0, err
        assert not bodies(plain, 400) and len(bodies(reasoning, 400)) == 2  # temperature, then max_tokens: once each
        assert_no_thought_shown(reasoning, out)
        assert all("temperature" in b for b in bodies(plain))  # the proposers' server was never adapted


def test_H3_explicit_values_a_server_refuses_end_in_an_error_naming_the_flag(capsys):
    for flag in ("--temperature", "--aggregator-temperature"):
        with MockServer(openai_reasoning=True) as server:
            code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", flag, "0.5", PROMPT])
            assert code == 1 and flag in err and "Only the default (1) value is supported" in err
            assert "never dropped" in err
            # --temperature: the first request is refused, and no other is sent. --aggregator-temperature: the
            # proposers' default temperature was dropped (one refusal), then the aggregator's own was refused.
            assert [b.get("temperature") for b in bodies(server, 400)] == (
                [0.5] if flag == "--temperature" else [0.7, 0.5])
    with MockServer(openai_reasoning=True) as server:  # the request fields: named too
        code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist",
                                    "--aggregator-field", "temperature=0.5", PROMPT])
        assert code == 2 and "--aggregator-temperature" in err


def test_H4_extra_fields_reach_exactly_the_requests_of_their_role_and_model(capsys):
    with MockServer() as server:
        code, out, err = run(capsys, [
            "--base-url", server.base_url, "--method", "moa", "-p", "generalist", "-p", "coder", "-p", "coder",
            "-a", "mathematician", "--layers", "3", "--field", "top_k=5", "--proposer-field", "top_p=0.5",
            "--aggregator-field", "reasoning_effort=high", "--field", "coder:min_p=0.1",
            "--aggregator-field", "mathematician:presence_penalty=0.2", "--aggregator-field", "temperature=null",
            "--proposer-field", "generalist:chat_template_kwargs={\"enable_thinking\": false}", PROMPT])
        assert code == 0, err
        sent = bodies(server, 200)
        assert len(sent) == 5  # layer 1 and 2: generalist, coder (n=2); the aggregator
        for body in sent:
            aggregator = body["model"] == "mathematician"
            assert body["top_k"] == 5
            assert ("top_p" in body) == (not aggregator) and ("reasoning_effort" in body) == aggregator
            assert ("min_p" in body) == (body["model"] == "coder")
            assert ("presence_penalty" in body) == aggregator and ("temperature" in body) == (not aggregator)
            assert ("chat_template_kwargs" in body) == (body["model"] == "generalist")


OVERFLOW_CHECKS = ["openai", "vllm", "llama.cpp", "empty-stream"]


@pytest.mark.parametrize("shape", OVERFLOW_CHECKS)
def test_H7_each_overflow_shape_is_an_immediate_clear_error(capsys, shape):
    """The proposals fit the window; the aggregation over them does not: exit 1 within the one request that
    overflowed, not retried, naming the model, the role and the fix; the proposals stay in partial."""
    with MockServer(context_length=150, overflow=shape) as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "-n", "4", "--seed", "3",
                                      "--json", *(["--retries", "4"]), PROMPT])
        if shape == "empty-stream":  # llama-cpp-python's 200 with an empty stream: only a streamed request gets it
            assert code == 1 and "context window" in err
            code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "-n", "4", "--seed",
                                          "3", "--stream", PROMPT])
        assert code == 1
        assert "context window" in err and "aggregator" in err and "not retried" in err
        assert "model 'generalist'" in err and "--window" in err and "-n" in err
        overflowed = [e for e in server.requests if e["body"] and selfmoa.read_references(e["body"]["messages"])]
        assert len(overflowed) == (2 if shape == "empty-stream" else 1)  # one per run: never retried
        if shape != "empty-stream":
            partial = json.loads(out)
            assert [c["role"] for c in partial["trace"]] == ["proposer", "aggregator"]
            assert len(partial["trace"][0]["outputs"]) == 4 and "context window" in partial["trace"][1]["error"]


@pytest.mark.parametrize("where", ["reasoning_content", "content"])
def test_H6_a_limit_spent_thinking_fails_the_samples_naming_the_flag_and_is_not_asked_again(capsys, where):
    with MockServer(thinking=where, thought_tokens=40) as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "-n", "3", "--max-tokens",
                                    "10", PROMPT])
        assert code == 1 and "spent thinking" in err and "--max-tokens" in err
        assert len(server.requests) == 1  # the n=3 request; no sample asked for again with the same limit
    with MockServer(thinking="reasoning_content", thought_tokens=40) as server:  # the aggregator's own flag
        code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "-n", "2",
                                    "--aggregator-max-tokens", "10", PROMPT])
        assert code == 1 and "spent thinking" in err and "--aggregator-max-tokens" in err


def test_H1_a_batch_of_20_pays_each_adaptation_once(capsys, tmp_path):
    items = tmp_path / "in.jsonl"
    items.write_text("".join(json.dumps({"id": i, "prompt": f"Compute {i} * 3 + 1."}) + "\n" for i in range(20)))
    output = tmp_path / "out.jsonl"
    with MockServer(openai_reasoning=True, refuse_n=True, thinking="content") as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "generalist", "-n", "3", "--max-tokens",
                                    "300", "--concurrency", "8", "-i", str(items), "-o", str(output)])
        assert code == 0, err
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        assert len(lines) == 20 and all(line["status"] == "ok" for line in lines)
        assert all(THOUGHT_OPENER not in line["answer"] for line in lines)
        assert all(line["adapted"] for line in lines)
        assert_each_refusal_paid_once(server)
        assert len(bodies(server, 400)) == 3  # temperature, max_tokens, n: once each in the whole batch
        assert_no_thought_shown(server)
        assert sum("refuses" in line for line in err.splitlines()) == 3


def test_H1_serve_runs_the_methods_on_todays_servers_and_passes_standard_fields_to_the_answer():
    with MockServer(openai_reasoning=True, thinking="content") as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url, announce=lambda line: None), port=0) as server:
        url = server.base_url + "/chat/completions"
        reply = requests.post(url, json={"model": "self-moa/generalist", "messages": [{"role": "user", "content":
                                        PROMPT}], "max_completion_tokens": 300, "reasoning_effort": "low",
                                         "selfmoa": {"n": 3}}, timeout=30)
        assert reply.status_code == 200, reply.text
        answer = reply.json()["choices"][0]["message"]["content"]
        assert THOUGHT_OPENER not in answer and answer.endswith("The answer is 449.")
        sent = bodies(upstream, 200)
        assert [b.get("reasoning_effort") for b in sent] == [None, "low"]  # the answer's request alone
        assert sent[-1]["max_completion_tokens"] == 300
        streamed = requests.post(url, json={"model": "self-moa/generalist", "stream": True, "messages": [
            {"role": "user", "content": PROMPT}], "selfmoa": {"n": 2}}, timeout=30)
        pieces = [json.loads(line[5:]) for line in streamed.text.splitlines()
                  if line.startswith("data:") and "[DONE]" not in line]
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p.get("choices"))
        assert THOUGHT_OPENER not in text and "<think>" not in text and text.endswith("The answer is 449.")
        assert_each_refusal_paid_once(upstream)
        explicit = requests.post(url, json={"model": "self-moa/generalist", "temperature": 0.3, "messages": [
            {"role": "user", "content": PROMPT}], "selfmoa": {"n": 2}}, timeout=30)
        assert explicit.status_code == 502 and "never dropped" in explicit.json()["error"]["message"]


# --- Properties (spec/invariants.md H2, H5) ------------------------------------------------------------------------

FORMATS = st.sampled_from(["plain", "think", "think-twice", "reasoning-field", "spaces"])


def dressed(answer: str, form: str, i: int) -> str:
    """An answer as a thinking model's reply of that format shows it (what the seam receives)."""
    thought = f"<think>\nthought {i}: maybe <b>7</b>?\n</think>"
    return {"plain": answer, "think": f"{thought}\n\n{answer}", "think-twice": f"  {thought}{thought}\n{answer}",
            "reasoning-field": answer, "spaces": f"\n{thought}   {answer}"}[form]


@given(forms=st.lists(FORMATS, min_size=1, max_size=6),
       answers=st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(
           lambda t: t.strip(" \t\r\n") and not t.lstrip(" \t\r\n").startswith("<think>") and "<<<" not in t),
           min_size=6, max_size=6),
       stream_pieces=st.integers(1, 7))
@settings(max_examples=60, deadline=None)
@example(forms=["think", "plain"], answers=["\x0c", "0", "0", "0", "0", "0"], stream_pieces=1)  # not a blank
def test_H5_references_shown_to_an_aggregator_are_exactly_the_answers_with_thoughts_removed(forms, answers,
                                                                                          stream_pieces):
    shown: list[list[str]] = []
    streamed: list[str] = []

    def model(request):
        references = selfmoa.read_references(request.messages)
        if references:
            shown.append(references)
            final = dressed("final " + answers[0], forms[0], 99)
            if request.stream is not None:
                size = max(1, len(final) // stream_pieces)
                for start in range(0, len(final), size):
                    request.stream(final[start:start + size])
            return final
        seed = request.seed
        return [dressed(answers[(seed + j) % 6], forms[(seed + j) % len(forms)], seed + j) for j in range(request.n)]
    result = selfmoa.self_moa("Q", "m", n=len(forms), complete=model, seed=0, stream=streamed.append)
    def removed(answer: str, form: str) -> str:  # the rule of wire.md section 2: the blanks after a thought go too
        return answer if form in ("plain", "reasoning-field") else answer.lstrip(" \t\r\n")
    expected = [removed(answers[i % 6], forms[i % len(forms)]) for i in range(len(forms))]
    assert shown == [expected] and result.answer == "final " + answers[0]
    assert "".join(streamed) == result.answer


REQUESTS = st.builds(
    selfmoa.Request, model=st.sampled_from(["m", "o4-mini"]), messages=st.just(({"role": "user", "content": "Q"},)),
    temperature=st.sampled_from([None, 0.0, 0.7, 1.0]), max_tokens=st.sampled_from([None, 1, 512]),
    n=st.integers(1, 16), seed=st.sampled_from([None, 0, 7]),
    fields=st.dictionaries(st.sampled_from(["top_p", "reasoning_effort", "chat_template_kwargs"]),
                           st.sampled_from([0.5, "high", {"enable_thinking": False}]), max_size=2),
    optional=st.sampled_from([frozenset(), frozenset({"temperature"})]))


@given(request=REQUESTS, single=st.booleans(), renamed=st.booleans(), dropped=st.booleans())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_H2_adapted_requests_differ_from_the_original_only_as_documented(request, single, renamed, dropped):
    learned = selfmoa._Learned()
    learned.single, learned.renamed = single, renamed
    if dropped:
        learned.dropped.add("temperature")
    original, none = selfmoa.HTTPClient._body(request)
    adapted, changes = selfmoa.HTTPClient._body(request, learned)
    assert none == {}
    expected = dict(original)
    if single and original.get("n", 1) > 1:
        expected["n"] = 1
    if renamed and "max_tokens" in original:
        expected["max_completion_tokens"] = expected.pop("max_tokens")
    if dropped and "temperature" in request.optional and "temperature" in original:
        del expected["temperature"]  # only a value the caller did not choose
    assert adapted == expected
    for name in set(original) | set(adapted):  # `adapted` reports exactly the differences
        if original.get(name) != adapted.get(name) or (name in original) != (name in adapted):
            assert changes[name] == adapted.get(name)
    assert set(changes) == {name for name in set(original) | set(adapted)
                            if (name in original) != (name in adapted) or original.get(name) != adapted.get(name)}


@given(text=st.lists(st.sampled_from(["<think>", "</think>", "a", " ", "\n", "<", "t", ">", "<thi"]),
                    max_size=12).map("".join),
       cuts=st.lists(st.integers(0, 40), max_size=6))
@settings(max_examples=300)
def test_H5_the_stream_shows_exactly_the_answer_without_thoughts_whatever_the_pieces(text, cuts):
    out: list[str] = []
    flt = selfmoa._ThoughtFilter(out.append)
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    for start, end in zip(bounds, bounds[1:]):
        flt(text[start:end])
    flt.close()
    answer, _ = selfmoa.split_thoughts(text)
    assert "".join(out) == answer


def test_H4_serve_takes_fields_in_its_selfmoa_object_and_its_flags():
    with MockServer() as upstream, selfmoa_serve.ModelServer(
            selfmoa.HTTPClient(upstream.base_url), port=0,
            defaults={"aggregator_fields": {"top_k": 4}, "fields": {"min_p": 0.1}}) as server:
        reply = requests.post(server.base_url + "/chat/completions", timeout=30, json={
            "model": "moa/mathematician", "messages": [{"role": "user", "content": PROMPT}], "top_p": 0.9,
            "selfmoa": {"proposers": ["generalist", "coder"], "fields": {"presence_penalty": 0.5},
                        "models": {"coder": {"top_k": 2}}, "aggregator_models": {"mathematician": {"min_p": 0.2}}}})
        assert reply.status_code == 200, reply.text
        sent = {b["model"]: b for b in bodies(upstream, 200)}
        assert sent["generalist"].get("presence_penalty") == 0.5 and "min_p" not in sent["generalist"]
        assert sent["coder"]["top_k"] == 2 and "top_p" not in sent["coder"]  # the request's own: the answer's
        assert sent["mathematician"]["top_p"] == 0.9 and sent["mathematician"]["top_k"] == 4
        assert sent["mathematician"]["min_p"] == 0.2 and "presence_penalty" not in sent["mathematician"]
        bad = requests.post(server.base_url + "/chat/completions", timeout=30, json={
            "model": "self-moa/generalist", "messages": [{"role": "user", "content": PROMPT}],
            "selfmoa": {"fields": {"n": 3}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("selfmoa.fields")
    args = selfmoa_serve.build_serve_parser().parse_args(["--aggregator-field", "reasoning_effort=low",
                                                           "--field", "coder:top_k=3"])
    proposing, aggregating = selfmoa.role_settings(args)
    assert aggregating.fields == {"reasoning_effort": "low"} and proposing.models == {"coder": {"top_k": 3}}
