"""The invariants of spec/invariants.md, one property test each, run through the seam with a recording fake.

Each test is named after the invariant it checks (M1..M5 for MoA, S1..S2 for Self-MoA, Q1..Q7 for
Self-MoA-Seq); tests/test_spec.py checks that every invariant of the spec has its test.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import selfmoa
from tests.fakes import Recorder, digest, reference_moa, reference_seq

MODELS = ["alpha", "beta", "gamma"]
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)

user_message = st.builds(lambda t: {"role": "user", "content": t or "?"}, text)
system_message = st.builds(lambda t: {"role": "system", "content": t}, text)
conversations = st.builds(
    lambda system, turns: ([system] if system else []) + turns,
    st.none() | system_message,
    st.lists(user_message, min_size=1, max_size=3),
)
layer = st.lists(st.sampled_from(MODELS), min_size=1, max_size=5)
plans = st.lists(layer, min_size=1, max_size=3)
seeds = st.none() | st.integers(0, 10_000)


@st.composite
def windows(draw):
    """A valid (window, carry) pair: 2 <= window, 1 <= carry < window."""
    window = draw(st.integers(2, 8))
    return window, draw(st.integers(1, window - 1))


def proposer_outputs(result: selfmoa.Result, layer: int) -> dict[int, str]:
    """Position -> output of every successful proposer of a layer, from the trace."""
    out = {}
    for call in result.trace:
        if call.role == "proposer" and call.layer == layer:
            for index, output in zip(call.indices, call.outputs):
                out[index] = output
    return out


# --- MoA ----------------------------------------------------------------------------------------------


@given(plan=plans, messages=conversations, seed=seeds, honour_n=st.booleans())
def test_M1_calls_are_proposer_layer_sizes_plus_one(plan, messages, seed, honour_n):
    """calls = sum of the proposer layer sizes + 1, whether or not the server honours n."""
    result = selfmoa.moa(messages, plan, "alpha", complete=Recorder(honour_n=honour_n), seed=seed)
    assert result.calls == sum(len(layer) for layer in plan) + 1
    assert [c.role for c in result.trace].count("aggregator") == 1


@given(plan=plans, messages=conversations, seed=st.integers(0, 100), use_n=st.booleans())
@settings(max_examples=30)
def test_M2_references_are_numbered_in_configuration_order(plan, messages, seed, use_n):
    """Reference i in every injected prompt is the output of proposer i, whatever order calls finished in."""
    fake = Recorder(reverse=True)  # later proposers answer first
    result = selfmoa.moa(messages, plan, "beta", complete=fake, seed=seed, use_n=use_n, concurrency=4)
    for number in range(1, len(plan) + 1):
        outputs = proposer_outputs(result, number)
        expected = [outputs[j] for j in range(len(plan[number - 1]))]
        next_layer_requests = [r for r in fake.requests if selfmoa.read_references(r.messages) == expected]
        assert next_layer_requests, f"no request of layer {number + 1} holds layer {number}'s outputs in order"


@given(messages=conversations, references=st.lists(text, max_size=5), instruction=text.filter(str.strip))
@example(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
         references=["A"], instruction="Merge.")
def test_M3_injection_keeps_messages_and_never_mutates(messages, references, instruction):
    """A system message gets the block after a blank line, else one is prepended; the rest pass unchanged."""
    before = copy.deepcopy(messages)
    out = selfmoa.inject_references(messages, references, instruction)
    assert messages == before
    if not references:
        assert out == messages and out is not messages
        return
    block = selfmoa.format_references(references, instruction)
    if messages[0]["role"] == "system":
        assert out[0] == {"role": "system", "content": messages[0]["content"] + "\n\n" + block}
        assert out[1:] == messages[1:]
    else:
        assert out[0] == {"role": "system", "content": block}
        assert out[1:] == messages
    assert selfmoa.read_references(out) == references


@given(plan=plans, messages=conversations, seed=seeds)
def test_M3_caller_messages_are_never_mutated_by_a_run(plan, messages, seed):
    """A whole MoA run leaves the caller's message list exactly as it was."""
    before = copy.deepcopy(messages)
    selfmoa.moa(messages, plan, "alpha", complete=Recorder(), seed=seed)
    assert messages == before


@given(plan=plans, messages=conversations, seed=seeds)
def test_M4_each_layer_sees_exactly_the_previous_layer(plan, messages, seed):
    """Layer 1 sees no references; layer l sees layer l-1's outputs; the aggregator sees the last layer."""
    fake = Recorder()
    result = selfmoa.moa(messages, plan, "gamma", complete=fake, seed=seed)
    by_layer = {number: proposer_outputs(result, number) for number in range(1, len(plan) + 1)}
    for request in fake.requests:
        refs = selfmoa.read_references(request.messages)
        if not refs:
            assert list(request.messages) == messages  # layer 1: the prompt as given
            continue
        assert any(refs == [by_layer[number][j] for j in range(len(plan[number - 1]))]
                   for number in by_layer), "a request saw something other than one whole previous layer"
    final = [call for call in result.trace if call.role == "aggregator"][0]
    assert final.references == list(range(len(plan[-1])))
    assert result.answer == final.outputs[0]


@given(plan=plans, seed=st.integers(0, 50), data=st.data())
def test_M5_failed_proposers_are_dropped_and_numbering_stays_contiguous(plan, seed, data):
    """Failures are dropped, survivors keep their order; fewer than min_ok raises with the failures named."""
    broken = data.draw(st.sets(st.sampled_from(MODELS)))
    min_ok = data.draw(st.integers(1, min(len(layer) for layer in plan)))
    fake = Recorder(fail=broken)
    survivors = [[m for m in layer if m not in broken] for layer in plan]
    if any(len(layer) < min_ok for layer in survivors):
        with pytest.raises(selfmoa.NotEnoughProposals) as caught:
            selfmoa.moa("Q", plan, "alpha" if "alpha" not in broken else "beta", complete=fake, seed=seed,
                        min_ok=min_ok)
        assert caught.value.failures and all(f.model in broken for f in caught.value.failures)
        assert "min_ok" in str(caught.value) and "scripted failure" in str(caught.value)
        assert caught.value.partial is not None and caught.value.partial.trace
        return
    aggregator = next(m for m in MODELS if m not in broken) if len(broken) < 3 else None
    if aggregator is None:
        return
    result = selfmoa.moa("Q", plan, aggregator, complete=fake, seed=seed, min_ok=min_ok)
    final = [call for call in result.trace if call.role == "aggregator"][0]
    kept = [j for j, m in enumerate(plan[-1]) if m not in broken]
    assert final.references == kept
    last = proposer_outputs(result, len(plan))
    request = [r for r in fake.requests if r.model == aggregator and selfmoa.read_references(r.messages)
               and r.temperature == 0.7 and r.seed == seed and r.n == 1][-1]
    assert selfmoa.read_references(request.messages) == [last[j] for j in kept]


def test_M5_a_layer_with_no_survivor_is_an_error_not_zero_references():
    """Nothing is silently degraded to an aggregation over zero references."""
    fake = Recorder(fail={"alpha"})
    with pytest.raises(selfmoa.NotEnoughProposals, match="layer 1: only 0 of 2"):
        selfmoa.moa("Q", ["alpha", "alpha"], "beta", complete=fake)
    assert all(r.model == "alpha" for r in fake.requests)


# --- Self-MoA -----------------------------------------------------------------------------------------


@given(n=st.integers(1, 8), messages=conversations, seed=seeds, honour_n=st.booleans(), use_n=st.booleans())
def test_S1_self_moa_sends_the_same_aggregator_prompt_as_moa(n, messages, seed, honour_n, use_n):
    """Self-MoA's aggregator prompt equals MoA's with one layer of the same model n times."""
    a, b = Recorder(honour_n=honour_n), Recorder(honour_n=honour_n)
    one = selfmoa.self_moa(messages, "alpha", n=n, complete=a, seed=seed, use_n=use_n)
    two = selfmoa.moa(messages, ["alpha"] * n, "alpha", complete=b, seed=seed, use_n=use_n)
    if seed is not None:
        assert a.aggregator_requests()[-1] == b.aggregator_requests()[-1]
        assert one.answer == two.answer
    assert len(selfmoa.read_references(a.aggregator_requests()[-1].messages)) == n


@given(n=st.integers(1, 8), layers=st.integers(2, 4), honour_n=st.booleans())
def test_S2_self_moa_makes_n_calls_per_layer_plus_one(n, layers, honour_n):
    """Self-MoA makes n + 1 calls with one proposer layer, n per proposer layer in general."""
    result = selfmoa.self_moa("Q", "alpha", n=n, layers=layers, complete=Recorder(honour_n=honour_n), seed=1)
    assert result.calls == n * (layers - 1) + 1
    expected_requests = (layers - 1) * (1 if honour_n else n) + 1
    assert result.requests == expected_requests


# --- Self-MoA-Seq -------------------------------------------------------------------------------------


@given(n=st.integers(1, 40), wc=windows(), seed=seeds)
def test_Q1_round_count_and_single_window_equals_self_moa(n, wc, seed):
    """One aggregation if n <= w (and then Self-MoA's result); else 1 + ceil((n - w) / (w - r))."""
    window, carry = wc
    result = selfmoa.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=Recorder(), seed=seed)
    rounds = [c for c in result.trace if c.role == "aggregator"]
    expected = 1 if n <= window else 1 + math.ceil((n - window) / (window - carry))
    assert len(rounds) == expected == selfmoa.seq_rounds(n, window, carry) == result.params["rounds"]
    assert result.calls == n + expected
    if n <= window and seed is not None:
        plain = selfmoa.self_moa("Q", "alpha", n=n, complete=Recorder(), seed=seed)
        assert result.answer == plain.answer


@given(samples=st.lists(text, min_size=1, max_size=30), wc=windows())
def test_Q2_every_sample_is_new_in_exactly_one_round_in_order(samples, wc):
    """Each sample is a new candidate in exactly one round, in sample order; no round lacks new samples."""
    window, carry = wc
    fake = Recorder()
    result = selfmoa.self_moa_seq("Q", complete=fake, samples=iter(samples), aggregator="alpha",
                                  window=window, carry=carry)
    rounds = [c for c in result.trace if c.role == "aggregator"]
    consumed = [i for call in rounds for i in call.references]
    assert consumed == list(range(len(samples)))
    assert all(call.references for call in rounds)
    for call, request in zip(rounds, fake.requests):
        shown = selfmoa.read_references(request.messages)[call.carried:]
        assert shown == [samples[i] for i in call.references]


@given(n=st.integers(1, 30), wc=windows(), honour_n=st.booleans())
def test_Q3_no_aggregation_holds_more_than_the_window(n, wc, honour_n):
    """No aggregation call holds more than w responses, carried copies included."""
    window, carry = wc
    fake = Recorder(honour_n=honour_n)
    selfmoa.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=3)
    sizes = [len(selfmoa.read_references(r.messages)) for r in fake.aggregator_requests()]
    assert sizes and max(sizes) <= window


@given(samples=st.lists(text, min_size=1, max_size=25), wc=windows())
def test_Q4_rounds_carry_exactly_the_previous_synthesis_first(samples, wc):
    """Round 1 holds no synthesis; round t >= 2 holds s_(t-1) exactly r times, first, and nothing older."""
    window, carry = wc
    fake = Recorder()
    result = selfmoa.self_moa_seq("Q", complete=fake, samples=samples, aggregator="alpha", window=window,
                                  carry=carry)
    rounds = [c for c in result.trace if c.role == "aggregator"]
    assert rounds[0].carried == 0
    for previous, (call, request) in zip([None] + rounds, zip(rounds, fake.requests)):
        refs = selfmoa.read_references(request.messages)
        if previous is None:
            assert refs == [samples[i] for i in call.references]
            continue
        synthesis = previous.outputs[0]
        assert call.carried == carry and refs[:carry] == [synthesis] * carry
        assert refs[carry:] == [samples[i] for i in call.references]
        older = [c.outputs[0] for c in rounds[:rounds.index(previous)]]
        assert not any(o in refs for o in older if o != synthesis)


@given(samples=st.lists(text, min_size=1, max_size=25), wc=windows(), seed=seeds)
def test_Q5_the_result_is_the_last_synthesis_and_matches_the_reference(samples, wc, seed):
    """The answer is s_T exactly, and equals a plain sequential implementation of the spec."""
    window, carry = wc
    fake = Recorder()
    result = selfmoa.self_moa_seq("Q", complete=fake, samples=samples, aggregator="alpha", window=window,
                                  carry=carry, seed=seed)
    rounds = [c for c in result.trace if c.role == "aggregator"]
    assert result.answer == rounds[-1].outputs[0]
    expected, windows_ = reference_seq(Recorder(), [{"role": "user", "content": "Q"}], samples, "alpha",
                                       window, carry, seed)
    assert result.answer == expected
    assert [selfmoa.read_references(r.messages) for r in fake.requests] == windows_


@given(n=st.integers(2, 20), wc=windows(), data=st.data())
def test_Q6_no_sample_is_dropped_without_an_error_saying_so(n, wc, data):
    """Every sample is either aggregated or recorded as failed; too few good samples is an error."""
    window, carry = wc
    failing = data.draw(st.sets(st.integers(0, n - 1), max_size=n))
    min_ok = data.draw(st.integers(1, n))
    fake = Recorder(fail={("alpha", 100 + i) for i in failing})
    good = n - len(failing)
    try:
        result = selfmoa.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=100,
                                      use_n=False, min_ok=min_ok)
    except selfmoa.NotEnoughProposals as exc:
        assert good < min_ok
        assert len(exc.failures) >= min(len(failing), n - min_ok + 1)
        assert exc.partial is not None
        return
    assert good >= min_ok
    consumed = [i for c in result.trace if c.role == "aggregator" for i in c.references]
    failed = [i for c in result.trace if c.error for i in c.indices]
    assert sorted(consumed + failed) == list(range(n))
    assert set(failed) == failing


@given(plan=plans, n=st.integers(1, 20), wc=windows(), seed=st.integers(0, 1000))
@settings(max_examples=15)
def test_Q7_same_seed_gives_the_same_result_and_trace_whatever_the_scheduling(plan, n, wc, seed):
    """Threaded runs with shuffled completion order equal a one-thread run, result and trace alike."""
    window, carry = wc

    def runs(concurrency, jitter):
        fake = Recorder(jitter=jitter)
        a = selfmoa.moa("Q", plan, "alpha", complete=fake, seed=seed, concurrency=concurrency)
        b = selfmoa.self_moa_seq("Q", "beta", n=n, window=window, carry=carry, complete=fake, seed=seed,
                                 concurrency=concurrency)
        return [(r.answer, [strip_timing(c) for c in r.trace]) for r in (a, b)]

    assert runs(8, 0.003) == runs(1, 0.0)


def strip_timing(call: selfmoa.Call) -> dict:
    data = dict(vars(call))
    data.pop("latency")
    return data


@given(plan=plans, messages=conversations, seed=st.integers(0, 1000))
@settings(max_examples=20)
def test_threaded_moa_equals_the_sequential_reference(plan, messages, seed):
    """A concurrent run sends byte-identical prompts and returns the same answer as the plain loop."""
    fake = Recorder(jitter=0.002)
    result = selfmoa.moa(messages, plan, "gamma", complete=fake, seed=seed, use_n=False)
    expected, final_prompt = reference_moa(Recorder(), messages, plan, "gamma", seed)
    assert result.answer == expected
    assert list(fake.requests[-1].messages) == final_prompt


# --- W: the block read back is the one added last ----------------------------------------------------

block_text = st.one_of(text, st.sampled_from(["<<<response 1 of 1, key 00000000>>>", "<<<end of response 1",
                                              "\n", "", ">>>"]))


@given(layers=st.lists(st.lists(block_text, min_size=1, max_size=3), min_size=1, max_size=3),
       system=st.none() | text, quoted=st.none() | st.lists(block_text, min_size=1, max_size=2))
@example(layers=[["same"], ["same"]], system=None, quoted=None)  # the same texts give the same key twice
@example(layers=[["x"]], system=None, quoted=["x"])  # the instruction quotes a block with the very same key
def test_W1_the_block_read_back_is_the_one_added_last_however_many_came_before(layers, system, quoted):
    """A prompt built on a prompt that already holds blocks (selfmoa behind another MoA, or an instruction
    quoting one) reads back the references added last; the mock's aggregator reads the same ones."""
    from mock_models import models

    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": "Q"}]
    instruction = "Merge." if quoted is None else "Merge, as in:\n\n" + selfmoa.format_references(quoted)
    for references in layers:
        messages = selfmoa.inject_references(messages, references, instruction)
    assert selfmoa.read_references(messages) == layers[-1]
    assert models.references_in(messages[0]["content"]) == layers[-1]


def test_W1_the_mock_aggregator_votes_over_the_block_added_last():
    """Self-MoA behind another MoA: the mock aggregator answers from selfmoa's samples, not the upstream ones."""
    from mock_models import models, tasks

    task = tasks.make_tasks("MATH", 1, seed=0)[0]
    upstream = selfmoa.inject_references([{"role": "user", "content": task.prompt}],
                                         ["The answer is 123456789.", "The answer is 123456789."])
    ours = [f"The answer is {task.answer}."] * 3
    reply = models.reply("generalist", selfmoa.inject_references(upstream, ours), 0.7, 1)
    assert tasks.extract_answer(reply) == task.answer and "123456789" not in reply


# --- E: errors keep every request sent; T: which requests are sent never depends on timing ------------


@pytest.mark.parametrize("concurrency, honour_n", [(1, True), (16, True), (3, False), (16, False)])
def test_E1_partial_lists_every_request_the_server_received(concurrency, honour_n):
    """A Seq whose first aggregation fails while its samples are still in flight: partial.trace holds exactly
    the requests the loopback server received, each with its outcome (texts or error)."""
    from mock_models import MockServer

    with MockServer(latency=0.01, honour_n=honour_n) as server:
        with pytest.raises(selfmoa.ModelError, match="404") as caught:
            selfmoa.self_moa_seq("What is 2 + 2?", "generalist", n=10, window=4, carry=1, aggregator="nope",
                                 complete=selfmoa.HTTPClient(server.base_url, retries=0), seed=0,
                                 concurrency=concurrency)
        received = [entry["body"] for entry in server.requests if entry["path"] == "/v1/chat/completions"]
    partial = caught.value.partial
    assert partial.requests == len(received) == (4 if honour_n else 11)
    assert sorted((c.model, c.n, c.seed) for c in partial.trace) == \
        sorted((b["model"], b.get("n", 1), b.get("seed")) for b in received)
    assert all(bool(call.outputs) != bool(call.error) for call in partial.trace)


def test_E1_a_generators_own_exception_carries_the_rounds_already_paid_for():
    """An exception raised by the caller's sample generator propagates unchanged, with partial attached."""
    def samples():
        yield from ["a", "b", "c"]
        raise OSError("the sample file went away")

    with pytest.raises(OSError, match="went away") as caught:
        selfmoa.self_moa_seq("Q", complete=Recorder(), samples=samples(), aggregator="m", window=2, carry=1)
    assert [call.round for call in caught.value.partial.trace] == [1, 2]


def test_E1_a_bug_in_the_completion_function_is_traced_and_carries_partial():
    """A completion function that raises something other than ModelError is a bug: it propagates, after the
    other requests already issued have finished, and partial lists every request including the buggy one."""
    def complete(request):
        if request.seed == 2:
            raise ZeroDivisionError("bug")
        return f"{request.model} {request.seed}"

    with pytest.raises(ZeroDivisionError) as caught:
        selfmoa.moa("Q", ["a", "b", "c", "d"], "z", complete=complete, seed=0, concurrency=4)
    trace = caught.value.partial.trace
    assert [(c.indices, c.error) for c in trace] == [([0], None), ([1], None), ([2], "ZeroDivisionError: bug"),
                                                     ([3], None)]


def failing_at(salt: int, rate: float):
    """A pure failure rule: whether a request fails depends on its content and the salt, never on timing."""
    def fails(request) -> bool:
        key = digest(request.model, list(request.messages), request.n, request.seed, salt)
        return int(key[:8], 16) / 0xFFFFFFFF < rate
    return fails


@given(plan=plans, n=st.integers(1, 14), wc=windows(), salt=st.integers(0, 10_000),
       rate=st.sampled_from([0.0, 0.15, 0.4, 0.8]), honour_n=st.booleans(), concurrency=st.integers(2, 16),
       min_ok=st.integers(1, 2))
@example(plan=[["alpha"]], n=10, wc=(4, 1), salt=0, rate=0.0, honour_n=False, concurrency=16, min_ok=1)
@settings(max_examples=30)
def test_T2_requests_and_trace_do_not_depend_on_concurrency_even_with_failures(plan, n, wc, salt, rate, honour_n,
                                                                               concurrency, min_ok):
    """The requests a run sends, its result or error, and its (partial) trace are the same at concurrency 1
    and at any other concurrency with shuffled timing, whichever requests fail (aggregations included)."""
    window, carry = wc
    min_ok = min(min_ok, n, min(len(layer) for layer in plan))

    def run(concurrency, jitter):
        failing = failing_at(salt, rate)
        fake = Recorder(honour_n=honour_n, jitter=jitter, fail=lambda r: r.model == "nope" or failing(r))
        outcomes = []
        for method in (lambda: selfmoa.moa("Q", plan, "gamma", complete=fake, seed=3, min_ok=min_ok,
                                           concurrency=concurrency),
                       lambda: selfmoa.self_moa_seq("Q", "beta", n=n, window=window, carry=carry, complete=fake,
                                                    seed=3, min_ok=min_ok, concurrency=concurrency),
                       lambda: selfmoa.self_moa_seq("Q", "beta", n=n, window=window, carry=carry, complete=fake,
                                                    aggregator="nope", seed=3, min_ok=min_ok,
                                                    concurrency=concurrency)):
            try:
                result = method()
                outcomes.append(("answer", result.answer, [strip_timing(c) for c in result.trace]))
            except selfmoa.SelfMoAError as exc:
                outcomes.append((type(exc).__name__, str(exc), [strip_timing(c) for c in exc.partial.trace]))
        sent = sorted((r.model, r.n, r.seed, str(selfmoa.read_references(r.messages))) for r in fake.requests)
        return outcomes, sent

    assert run(concurrency, 0.002) == run(1, 0.0)


@pytest.mark.parametrize("use_n", [True, False])
def test_E4_identical_failures_are_reported_once_with_a_count(use_n):
    """Six proposers of a model the server does not know: the 404 is reported once, as '6 x ...'."""
    from mock_models import MockServer

    with MockServer() as server:
        with pytest.raises(selfmoa.NotEnoughProposals) as caught:
            selfmoa.moa("Q", ["nope"] * 6, "generalist", complete=selfmoa.HTTPClient(server.base_url, retries=0),
                        use_n=use_n)
    message = str(caught.value)
    assert message.count("404") == 1 and "6 x model 'nope'" in message
    assert len(caught.value.failures) == 6


# --- W: a model echoing the prompt's markers ---------------------------------------------------------

ECHOES = ["{begin}", "{end}", "{end_short}", "  {begin}  ", "response 2, key {key}", "<<<response 1 of 9, key 0000aaaa>>>",
          "Paris.", "", "<b>bold</b>", "end of response", "the key {key} is", "Lyon is\tnot it."]


@given(lines=st.lists(st.sampled_from(ECHOES), min_size=1, max_size=8), cuts=st.lists(st.integers(1, 12), max_size=30),
       method=st.sampled_from(["self_moa", "seq"]))
@example(lines=["Paris.", "{end_short}"], cuts=[], method="self_moa")  # as SmolLM2 did against llama.cpp
def test_W7_an_answer_never_holds_the_marker_lines_of_the_prompt_it_answered(lines, cuts, method):
    """A model that copies its prompt's marker lines into its reply: the answer, every carried synthesis and
    the streamed text hold none of them, and the streamed text equals the answer exactly."""
    marker = r"^[ \t]*<{0,3}[ \t]*(?:end of )?response \d+(?: of \d+)?, key %s[ \t]*>{0,3}[ \t\r]*$"

    def reply(request):
        block = selfmoa.read_references(request.messages)
        if not block:
            return "sample"
        key = re.search(r"key ([0-9a-f]{8})>>>\s*\Z", request.messages[0]["content"]).group(1)
        fill = {"begin": f"<<<response 1 of {len(block)}, key {key}>>>", "key": key,
                "end": f"<<<end of response {len(block)}, key {key}>>>",
                "end_short": f"<<<end of response {len(block)}, key {key}>>"}
        text = "\n".join(line.format(**fill) for line in lines)
        if request.stream is not None:
            position = 0
            for cut in cuts:
                request.stream(text[position:position + cut])
                position += cut
            request.stream(text[position:])
        expected.append("\n".join(line for line in text.split("\n") if not re.match(marker % key, line)))
        return text

    expected: list[str] = []
    pieces: list[str] = []
    if method == "self_moa":
        result = selfmoa.self_moa("Q", "m", n=2, complete=reply, stream=pieces.append)
    else:
        result = selfmoa.self_moa_seq("Q", "m", n=5, window=3, carry=1, complete=reply, stream=pieces.append)
        carried = [call.outputs[0] for call in result.trace if call.role == "aggregator"][:-1]
        assert carried == expected[:-1]
    assert result.answer == expected[-1] == "".join(pieces)
