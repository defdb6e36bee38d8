"""The invariants of spec/invariants.md, property tests through the seam with a recording fake, in one place.

Each test is named after the invariant it checks (test_<ID>_...) and listed under it in spec/invariants.md;
tests/test_spec.py checks both directions. The methods under test are selfmoa's, or those of the module named
by SELFMOA_IMPL (spec/exercises.md): the tests call ``impl.moa``, ``impl.self_moa`` and ``impl.self_moa_seq``
and read what was sent with their own reader of wire.md section 6. A test that needs a trace is skipped for
an implementation whose results keep none; the tests of selfmoa's prompt builders, client, measures and
command line test selfmoa.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import pathlib
import re
import threading
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import selfmoa
from tests import protocol
from tests.fakes import Recorder, digest, impl, reference_moa, reference_seq, references_in

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_N = 16  # methods.md section 5


def trace_of(result):
    """The trace of a result or of an error's partial (methods.md section 7). selfmoa must keep one; for
    another implementation the test is skipped when it keeps none (spec/exercises.md: traces are optional)."""
    trace = getattr(result, "trace", None)
    if trace is None:
        assert impl is not selfmoa, "selfmoa keeps a trace, also in every error's partial"
        pytest.skip(f"{impl.__name__} keeps no trace")
    return trace


def texts_returned(fake: Recorder) -> int:
    """The calls a run made, counted on the wire: the texts the fake returned."""
    return sum(r.n if fake.honour_n else 1 for r in fake.requests if not fake.fails_on(r))


def rounds_for(n: int, window: int, carry: int) -> int:
    """methods.md section 3: T = 1 if n <= w, else 1 + ceil((n - w) / (w - r))."""
    return 1 if n <= window else 1 + math.ceil((n - window) / (window - carry))

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


def proposer_outputs(result, layer: int) -> dict[int, str]:
    """Position -> output of every successful proposer of a layer, from the trace."""
    out = {}
    for call in trace_of(result):
        if call.role == "proposer" and call.layer == layer:
            for index, output in zip(call.indices, call.outputs):
                out[index] = output
    return out


# --- MoA ----------------------------------------------------------------------------------------------


@given(plan=plans, messages=conversations, seed=seeds, honour_n=st.booleans())
def test_M1_calls_are_proposer_layer_sizes_plus_one(plan, messages, seed, honour_n):
    """calls = sum of the proposer layer sizes + 1, whether or not the server honours n."""
    fake = Recorder(honour_n=honour_n)
    result = impl.moa(messages, plan, "alpha", complete=fake, seed=seed)
    assert texts_returned(fake) == sum(len(layer) for layer in plan) + 1
    assert getattr(result, "calls", texts_returned(fake)) == texts_returned(fake)
    if getattr(result, "trace", None) is not None:
        assert [c.role for c in result.trace].count("aggregator") == 1


@given(plan=plans, messages=conversations, seed=st.integers(0, 100), use_n=st.booleans())
@settings(max_examples=30)
def test_M2_references_are_numbered_in_configuration_order(plan, messages, seed, use_n):
    """Reference i in every injected prompt is the output of proposer i, whatever order calls finished in."""
    fake = Recorder(reverse=True)  # later proposers answer first
    result = impl.moa(messages, plan, "beta", complete=fake, seed=seed, use_n=use_n, concurrency=4)
    for number in range(1, len(plan) + 1):
        outputs = proposer_outputs(result, number)
        expected = [outputs[j] for j in range(len(plan[number - 1]))]
        next_layer_requests = [r for r in fake.requests if references_in(r.messages) == expected]
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
    assert references_in(out) == references


@given(plan=plans, messages=conversations, seed=seeds)
def test_M3_caller_messages_are_never_mutated_by_a_run(plan, messages, seed):
    """A whole MoA run leaves the caller's message list exactly as it was."""
    if isinstance(impl, protocol.Implementation):
        pytest.skip("Python-only: over spec/protocol.md the program receives a copy of the caller's messages")
    before = copy.deepcopy(messages)
    impl.moa(messages, plan, "alpha", complete=Recorder(), seed=seed)
    assert messages == before


@given(plan=plans, messages=conversations, seed=seeds)
def test_M4_each_layer_sees_exactly_the_previous_layer(plan, messages, seed):
    """Layer 1 sees no references; layer l sees layer l-1's outputs; the aggregator sees the last layer."""
    fake = Recorder()
    result = impl.moa(messages, plan, "gamma", complete=fake, seed=seed)
    by_layer = {number: proposer_outputs(result, number) for number in range(1, len(plan) + 1)}
    for request in fake.requests:
        refs = references_in(request.messages)
        if not refs:
            assert list(request.messages) == messages  # layer 1: the prompt as given
            continue
        assert any(refs == [by_layer[number][j] for j in range(len(plan[number - 1]))]
                   for number in by_layer), "a request saw something other than one whole previous layer"
    final = [call for call in trace_of(result) if call.role == "aggregator"][0]
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
        with pytest.raises(impl.NotEnoughProposals) as caught:
            impl.moa("Q", plan, "alpha" if "alpha" not in broken else "beta", complete=fake, seed=seed,
                        min_ok=min_ok)
        assert caught.value.failures and all(f.model in broken for f in caught.value.failures)
        assert "min_ok" in str(caught.value) and "scripted failure" in str(caught.value)
        assert caught.value.partial is not None and trace_of(caught.value.partial)
        return
    aggregator = next(m for m in MODELS if m not in broken) if len(broken) < 3 else None
    if aggregator is None:
        return
    result = impl.moa("Q", plan, aggregator, complete=fake, seed=seed, min_ok=min_ok)
    final = [call for call in trace_of(result) if call.role == "aggregator"][0]
    kept = [j for j, m in enumerate(plan[-1]) if m not in broken]
    assert final.references == kept
    last = proposer_outputs(result, len(plan))
    request = [r for r in fake.requests if r.model == aggregator and references_in(r.messages)
               and r.temperature == 0.7 and r.seed == seed and r.n == 1][-1]
    assert references_in(request.messages) == [last[j] for j in kept]


def test_M5_a_layer_with_no_survivor_is_an_error_not_zero_references():
    """Nothing is silently degraded to an aggregation over zero references."""
    fake = Recorder(fail={"alpha"})
    with pytest.raises(impl.NotEnoughProposals, match="layer 1: only 0 of 2"):
        impl.moa("Q", ["alpha", "alpha"], "beta", complete=fake)
    assert all(r.model == "alpha" for r in fake.requests)


# --- Self-MoA -----------------------------------------------------------------------------------------


@given(n=st.integers(1, 8), messages=conversations, seed=seeds, honour_n=st.booleans(), use_n=st.booleans())
def test_S1_self_moa_sends_the_same_aggregator_prompt_as_moa(n, messages, seed, honour_n, use_n):
    """Self-MoA's aggregator prompt equals MoA's with one layer of the same model n times."""
    a, b = Recorder(honour_n=honour_n), Recorder(honour_n=honour_n)
    one = impl.self_moa(messages, "alpha", n=n, complete=a, seed=seed, use_n=use_n)
    two = impl.moa(messages, ["alpha"] * n, "alpha", complete=b, seed=seed, use_n=use_n)
    if seed is not None:
        assert a.aggregator_requests()[-1] == b.aggregator_requests()[-1]
        assert one.answer == two.answer
    assert len(references_in(a.aggregator_requests()[-1].messages)) == n


@given(n=st.integers(1, 8), layers=st.integers(2, 4), honour_n=st.booleans())
def test_S2_self_moa_makes_n_calls_per_layer_plus_one(n, layers, honour_n):
    """Self-MoA makes n + 1 calls with one proposer layer, n per proposer layer in general."""
    fake = Recorder(honour_n=honour_n)
    result = impl.self_moa("Q", "alpha", n=n, layers=layers, complete=fake, seed=1)
    assert texts_returned(fake) == n * (layers - 1) + 1
    assert len(fake.requests) == (layers - 1) * (1 if honour_n else n) + 1
    assert getattr(result, "calls", texts_returned(fake)) == texts_returned(fake)
    assert getattr(result, "requests", len(fake.requests)) == len(fake.requests)


# --- Self-MoA-Seq -------------------------------------------------------------------------------------


@given(n=st.integers(1, 40), wc=windows(), seed=seeds)
def test_Q1_round_count_and_single_window_equals_self_moa(n, wc, seed):
    """One aggregation if n <= w (and then Self-MoA's result); else 1 + ceil((n - w) / (w - r)); n + T calls."""
    window, carry = wc
    fake = Recorder()
    result = impl.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=seed)
    expected = 1 if n <= window else 1 + math.ceil((n - window) / (window - carry))
    assert len(fake.aggregator_requests()) == expected
    assert getattr(result, "calls", n + expected) == n + expected
    if isinstance(getattr(result, "params", None), dict) and "rounds" in result.params:
        assert result.params["rounds"] == expected
    if n <= window and seed is not None:
        plain = impl.self_moa("Q", "alpha", n=n, complete=Recorder(), seed=seed)
        assert result.answer == plain.answer


@given(samples=st.lists(text, min_size=1, max_size=30), wc=windows())
def test_Q2_every_sample_is_new_in_exactly_one_round_in_order(samples, wc):
    """Each sample is a new candidate in exactly one round, in sample order; no round lacks new samples."""
    window, carry = wc
    fake = Recorder()
    result = impl.self_moa_seq("Q", complete=fake, samples=iter(samples), aggregator="alpha",
                               window=window, carry=carry, n=None)  # None is n left out (methods.md 3)
    new = [references_in(r.messages)[0 if t == 0 else carry:] for t, r in enumerate(fake.requests)]
    assert [text for round_ in new for text in round_] == samples
    assert all(new)
    if getattr(result, "trace", None) is not None:
        assert [call.references for call in result.trace] == \
            [list(range(sum(map(len, new[:t])), sum(map(len, new[:t + 1])))) for t in range(len(new))]


@given(n=st.integers(1, 30), wc=windows(), honour_n=st.booleans())
def test_Q3_no_aggregation_holds_more_than_the_window(n, wc, honour_n):
    """No aggregation call holds more than w responses, carried copies included."""
    window, carry = wc
    fake = Recorder(honour_n=honour_n)
    impl.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=3)
    sizes = [len(references_in(r.messages)) for r in fake.aggregator_requests()]
    assert sizes and max(sizes) <= window


@given(samples=st.lists(text, min_size=1, max_size=25), wc=windows())
def test_Q4_rounds_carry_exactly_the_previous_synthesis_first(samples, wc):
    """Round 1 holds no synthesis; round t >= 2 holds s_(t-1) exactly r times, first, and nothing older."""
    window, carry = wc
    fake = Recorder()
    impl.self_moa_seq("Q", complete=fake, samples=samples, aggregator="alpha", window=window, carry=carry)
    syntheses = [fake.text(request, 0) for request in fake.requests]  # what each round answered
    for t, request in enumerate(fake.requests):
        refs = references_in(request.messages)
        if t == 0:
            assert refs == samples[:window]
            continue
        assert refs[:carry] == [syntheses[t - 1]] * carry
        assert not set(syntheses[:t - 1]) - {syntheses[t - 1]} & set(refs), "an older synthesis shown again"


@given(samples=st.lists(text, min_size=1, max_size=25), wc=windows(), seed=seeds)
def test_Q5_the_result_is_the_last_synthesis_and_matches_the_reference(samples, wc, seed):
    """The answer is s_T exactly, and equals a plain sequential implementation of the spec."""
    window, carry = wc
    fake = Recorder()
    result = impl.self_moa_seq("Q", complete=fake, samples=samples, aggregator="alpha", window=window,
                                  carry=carry, seed=seed)
    assert result.answer == fake.text(fake.requests[-1], 0)  # the last round's synthesis
    expected, windows_ = reference_seq(Recorder(), [{"role": "user", "content": "Q"}], samples, "alpha",
                                       window, carry, seed)
    assert result.answer == expected
    assert [references_in(r.messages) for r in fake.requests] == windows_


@given(n=st.integers(2, 20), wc=windows(), data=st.data())
def test_Q6_no_sample_is_dropped_without_an_error_saying_so(n, wc, data):
    """Every sample is either aggregated or recorded as failed; too few good samples is an error."""
    window, carry = wc
    failing = data.draw(st.sets(st.integers(0, n - 1), max_size=n))
    min_ok = data.draw(st.integers(1, n))
    fake = Recorder(fail={("alpha", 100 + i) for i in failing})
    good = n - len(failing)
    try:
        result = impl.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=100,
                                      use_n=False, min_ok=min_ok)
    except impl.NotEnoughProposals as exc:
        assert good < min_ok
        assert len(exc.failures) >= min(len(failing), n - min_ok + 1)
        assert exc.partial is not None
        return
    assert good >= min_ok
    consumed = [i for c in trace_of(result) if c.role == "aggregator" for i in c.references]
    failed = [i for c in trace_of(result) if c.error for i in c.indices]
    assert sorted(consumed + failed) == list(range(n))
    assert set(failed) == failing


@pytest.mark.parametrize("failing, min_ok, rounds_before", [
    ({11}, 12, 2),     # rounds 1 (0-5) and 2 (6-8) are filled before the filling reaches sample 11
    ({8}, 12, 1),      # round 2 reaches sample 8
    ({2}, 12, 0),      # round 1 reaches sample 2
    ({5, 11}, 11, 2),  # at 5: 5 good + 6 after it = 11 may still succeed; at 11: 10 < 11
    ({5, 11}, 12, 0),  # at 5: 5 + 6 < 12
])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_Q6_too_few_good_samples_is_found_where_the_windows_reach_the_failure(failing, min_ok, rounds_before,
                                                                              concurrency):
    """A failed sample counts for min_ok when the filling of the windows reaches it, in sample order, never when
    its reply arrives: the rounds aggregated before NotEnoughProposals are those filled before it, and every
    sample request is still sent (methods.md section 6), whatever the concurrency and timing."""
    fake = Recorder(fail={("alpha", 100 + i) for i in failing}, jitter=0.002)
    with pytest.raises(impl.NotEnoughProposals, match=f"min_ok={min_ok}") as caught:
        impl.self_moa_seq("Q", "alpha", n=12, window=6, carry=3, aggregator="beta", complete=fake, seed=100,
                          use_n=False, min_ok=min_ok, concurrency=concurrency)
    assert len(fake.aggregator_requests()) == rounds_before
    assert len(fake.requests) == 12 + rounds_before
    assert getattr(caught.value.partial, "requests", len(fake.requests)) == len(fake.requests)


@given(plan=plans, n=st.integers(1, 20), wc=windows(), seed=st.integers(0, 1000))
@settings(max_examples=15)
def test_Q7_same_seed_gives_the_same_result_and_trace_whatever_the_scheduling(plan, n, wc, seed):
    """Threaded runs with shuffled completion order equal a one-thread run, result and trace alike."""
    window, carry = wc

    def runs(concurrency, jitter):
        fake = Recorder(jitter=jitter)
        a = impl.moa("Q", plan, "alpha", complete=fake, seed=seed, concurrency=concurrency)
        b = impl.self_moa_seq("Q", "beta", n=n, window=window, carry=carry, complete=fake, seed=seed,
                                 concurrency=concurrency)
        return [(r.answer, [strip_timing(c) for c in trace_of(r)]) for r in (a, b)]

    assert runs(8, 0.003) == runs(1, 0.0)


def strip_timing(call) -> dict:
    data = dict(vars(call))
    data.pop("latency")
    return data


@given(plan=plans, messages=conversations, seed=st.integers(0, 1000))
@settings(max_examples=20)
def test_M2_threaded_moa_equals_the_sequential_reference(plan, messages, seed):
    """A concurrent run sends byte-identical prompts and returns the same answer as the plain loop."""
    fake = Recorder(jitter=0.002)
    result = impl.moa(messages, plan, "gamma", complete=fake, seed=seed, use_n=False)
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
        with pytest.raises((impl.ModelError, selfmoa.ModelError), match="404") as caught:  # the client raises selfmoa's
            impl.self_moa_seq("What is 2 + 2?", "generalist", n=10, window=4, carry=1, aggregator="nope",
                                 complete=selfmoa.HTTPClient(server.base_url, retries=0), seed=0,
                                 concurrency=concurrency)
        received = [entry["body"] for entry in server.requests if entry["path"] == "/v1/chat/completions"]
    partial = caught.value.partial
    trace = trace_of(partial)
    assert partial.requests == len(received) == (4 if honour_n else 11)
    assert sorted((c.model, c.n, c.seed) for c in trace) == \
        sorted((b["model"], b.get("n", 1), b.get("seed")) for b in received)
    assert all(bool(call.outputs) != bool(call.error) for call in partial.trace)


@pytest.mark.parametrize("use_n, bug_at, rounds_before", [
    (False, 2, 0), (False, 7, 1), (False, 10, 2),
    (True, 6, 0),  # the server ignores n and sample 2 fails: round 1 is 0, 1, 3-6; the request for 6-8 and
    (True, 8, 1),  # its fallbacks for 7 and 8 go out before round 1, but a bug on 8 waits for round 2
])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_E1_a_bug_on_a_sample_is_raised_where_the_windows_reach_it(use_n, bug_at, rounds_before, concurrency):
    """Seq, n=12, w=6, r=3: a bug in the completion function on one sample is raised when the window filling
    reaches that sample, like a failed sample (methods.md section 6), not when its request returns, so the
    rounds before it are aggregated whatever the timing, and every sample request is still sent."""
    sent = []

    def complete(request):
        if references_in(request.messages):
            sent.append("agg")
            return "synthesis"
        sent.append(request.seed - 100)
        time.sleep(0.001 * (request.seed % 3))
        if request.seed == 100 + bug_at:
            raise RuntimeError(f"bug at {bug_at}")
        if use_n and request.seed == 102:
            raise impl.ModelError("sample 2 fails", model=request.model, status=500)
        return f"t{request.seed}"  # one text, whatever n asks for

    with pytest.raises(RuntimeError, match=f"bug at {bug_at}") as caught:
        impl.self_moa_seq("Q", "m", n=12, window=6, carry=3, seed=100, use_n=use_n, complete=complete,
                          concurrency=concurrency)
    samples = sorted(x for x in sent if x != "agg")
    assert sent.count("agg") == rounds_before
    assert {0, 6, 9} <= set(samples) if use_n else samples == list(range(12))  # every planned request is sent
    assert getattr(caught.value.partial, "requests", len(sent)) == len(sent)


def test_E1_a_generators_own_exception_carries_the_rounds_already_paid_for():
    """An exception raised by the caller's sample generator propagates unchanged, with partial attached."""
    def samples():
        yield from ["a", "b", "c"]
        raise OSError("the sample file went away")

    with pytest.raises(OSError, match="went away") as caught:
        impl.self_moa_seq("Q", complete=Recorder(), samples=samples(), aggregator="m", window=2, carry=1)
    assert [call.round for call in trace_of(caught.value.partial)] == [1, 2]


def test_E1_a_bug_in_the_completion_function_is_traced_and_carries_partial():
    """A completion function that raises something other than ModelError is a bug: it propagates, after the
    other requests already issued have finished, and partial lists every request including the buggy one."""
    def complete(request):
        if request.seed == 2:
            raise ZeroDivisionError("bug")
        return f"{request.model} {request.seed}"

    with pytest.raises(ZeroDivisionError) as caught:
        impl.moa("Q", ["a", "b", "c", "d"], "z", complete=complete, seed=0, concurrency=4)
    trace = trace_of(caught.value.partial)
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
        for method in (lambda: impl.moa("Q", plan, "gamma", complete=fake, seed=3, min_ok=min_ok,
                                           concurrency=concurrency),
                       lambda: impl.self_moa_seq("Q", "beta", n=n, window=window, carry=carry, complete=fake,
                                                    seed=3, min_ok=min_ok, concurrency=concurrency),
                       lambda: impl.self_moa_seq("Q", "beta", n=n, window=window, carry=carry, complete=fake,
                                                    aggregator="nope", seed=3, min_ok=min_ok,
                                                    concurrency=concurrency)):
            try:
                result = method()
                outcomes.append(("answer", result.answer, [strip_timing(c) for c in trace_of(result)]))
            except (impl.ModelError, impl.NotEnoughProposals) as exc:
                outcomes.append((type(exc).__name__, str(exc), [strip_timing(c) for c in trace_of(exc.partial)]))
        sent = sorted((r.model, r.n, r.seed, str(selfmoa.read_references(r.messages))) for r in fake.requests)
        return outcomes, sent

    assert run(concurrency, 0.002) == run(1, 0.0)


@pytest.mark.parametrize("use_n", [True, False])
def test_E4_identical_failures_are_reported_once_with_a_count(use_n):
    """Six proposers of a model the server does not know: the 404 is reported once, as '6 x ...'."""
    from mock_models import MockServer

    with MockServer() as server:
        with pytest.raises(impl.NotEnoughProposals) as caught:
            impl.moa("Q", ["nope"] * 6, "generalist", complete=selfmoa.HTTPClient(server.base_url, retries=0),
                        use_n=use_n)
    message = str(caught.value)
    assert message.count("HTTP 404") == 1 and "6 x model 'nope'" in message
    assert len(caught.value.failures) == 6


# --- W: a model echoing the prompt's markers ---------------------------------------------------------

ECHOES = ["{begin}", "{end}", "{end_short}", "  {begin}  ", "response 2, key {key}",
          "<<<response 1 of 9, key 0000aaaa>>>", "Paris.", "", "<b>bold</b>", "end of response", "the key {key} is",
          "Lyon is\tnot it."]


@given(lines=st.lists(st.sampled_from(ECHOES), min_size=1, max_size=8), cuts=st.lists(st.integers(1, 12), max_size=30),
       method=st.sampled_from(["self_moa", "seq"]))
@example(lines=["Paris.", "{end_short}"], cuts=[], method="self_moa")  # as SmolLM2 did against llama.cpp
def test_W7_an_answer_never_holds_the_marker_lines_of_the_prompt_it_answered(lines, cuts, method):
    """A model that copies its prompt's marker lines into its reply: the answer, every carried synthesis and
    the streamed text hold none of them, and the streamed text equals the answer exactly."""
    marker = r"^[ \t]*<{0,3}[ \t]*(?:end of )?response \d+(?: of \d+)?, key %s[ \t]*>{0,3}[ \t\r]*$"

    def reply(request):
        block = references_in(request.messages)
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
        result = impl.self_moa("Q", "m", n=2, complete=reply, stream=pieces.append)
    else:
        result = impl.self_moa_seq("Q", "m", n=5, window=3, carry=1, complete=reply, stream=pieces.append)
        carried = [call.outputs[0] for call in trace_of(result) if call.role == "aggregator"][:-1]
        assert carried == expected[:-1]
    assert result.answer == expected[-1] == "".join(pieces)


@pytest.mark.parametrize("digit", ["\u0663", "\uff13"], ids=["arabic-indic-3", "fullwidth-3"])
def test_W7_a_marker_numbered_with_any_decimal_digit_leaves_the_stream_as_the_answer(digit):
    """wire.md section 6: the marker's \\d is any decimal digit, as in Python; the echoed line is removed from
    the answer and from the streamed text alike, so the streamed text still equals the answer."""
    pieces: list[str] = []

    def reply(request):
        if not references_in(request.messages):
            return ["sample"] * request.n
        key = re.search(r"key ([0-9a-f]{8})>>>\s*\Z", request.messages[0]["content"]).group(1)
        text = f"Paris.\n<<<end of response {digit}, key {key}>>>"
        if request.stream is not None:
            request.stream(text)
        return text

    result = impl.self_moa("Q", "m", n=2, complete=reply, stream=pieces.append)
    assert result.answer == "Paris." == "".join(pieces)


# --- P: prompt construction is pure ---------------------------------------------------------------------

# Texts that look like the markers and keys of wire.md section 6, to tempt the format into ambiguity.
tricky = st.one_of(text, st.sampled_from(["<<<response 1 of 1, key 00000000>>>", "<<<end of response 1",
                                          "\n", "", "a45a6337", "key", ">>>"]))
messages_ = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": text}), min_size=1, max_size=4)


def make_vectors():
    """spec/vectors/make_vectors.py: a second statement of wire.md section 6 that shares no code with selfmoa."""
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "spec" / "vectors" / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WIRE = make_vectors()


@given(messages=messages_, references=st.lists(tricky, max_size=5), instruction=text.filter(str.strip))
def test_P1_prompt_builders_never_mutate_their_input(messages, references, instruction):
    """as_messages, inject_references, format_references and read_references leave their arguments as they were,
    and the lists they return share no dict with their input."""
    before_messages, before_references = copy.deepcopy(messages), list(references)
    built = selfmoa.inject_references(messages, references, instruction)
    selfmoa.format_references(references, instruction)
    selfmoa.read_references(built)
    copied = selfmoa.as_messages(messages)
    assert messages == before_messages and references == before_references
    assert not any(a is b for a in built for b in messages)
    assert not any(a is b for a in copied for b in messages)
    built[0]["content"] += "changed"
    assert messages == before_messages


# --- W: the wire and the prompt format -----------------------------------------------------------------


@given(messages=messages_, references=st.lists(tricky, max_size=6))
@example(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
         references=["a45a6337", "4", "5"])
def test_W5_the_aggregator_prompt_is_byte_identical_to_wire_md(messages, references):
    """inject_references with the default instruction equals an independent rendering of wire.md section 6,
    and the default instruction is the one wire.md quotes."""
    assert selfmoa.DEFAULT_INSTRUCTION == WIRE.default_instruction()
    assert selfmoa.inject_references(messages, references) == WIRE.inject(messages, references,
                                                                          WIRE.default_instruction())
    if references:
        assert selfmoa.reference_key(references) == WIRE.key_for(references)


@given(plan=plans, seed=st.none() | st.integers(0, 10_000), use_n=st.booleans(), honour_n=st.booleans())
@settings(max_examples=40)
def test_W6_every_aggregation_carries_the_base_seed_and_position_i_carries_s_plus_i(plan, seed, use_n, honour_n):
    """Proposer position i has seed S + i in every layer (the first position of a request with n), every
    aggregation has S, and without a seed no request carries one."""
    fake = Recorder(honour_n=honour_n)
    result = impl.moa("Q", plan, "alpha", complete=fake, seed=seed, use_n=use_n)
    assert fake.requests[-1].seed == seed  # the aggregation comes last
    assert sorted(r.seed is None for r in fake.requests) == [seed is None] * len(fake.requests)
    for call in trace_of(result):
        if call.role == "aggregator":
            assert call.seed == seed
        else:
            assert call.seed == (None if seed is None else seed + call.indices[0])
            assert call.indices == list(range(call.indices[0], call.indices[0] + call.n))


@given(n=st.integers(1, 40), window=st.integers(2, 24), data=st.data())
@example(n=20, window=20, data=None)  # the minimal reproduction: one request with n=20 > MAX_N=16
@settings(max_examples=30)
def test_W2_seq_never_asks_for_more_than_max_n_samples_in_one_request(n, window, data):
    """Self-MoA-Seq, like moa and self_moa, asks for at most MAX_N samples per request (the manual: MAX_N is
    'the most samples asked for in one request')."""
    carry = 3 if data is None else data.draw(st.integers(1, window - 1))
    fake = Recorder()
    impl.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=0)
    assert max(r.n for r in fake.requests) <= MAX_N


def test_W2_large_n_is_split_into_requests_of_at_most_max_n_keeping_the_seed_convention():
    """n = 2 * MAX_N + 3 samples: requests of 16, 16 and 3, with seeds S, S + 16, S + 32."""
    fake = Recorder()
    result = impl.self_moa("Q", "m", n=MAX_N * 2 + 3, complete=fake, seed=100)
    proposals = [(r.n, r.seed) for r in fake.requests if not references_in(r.messages)]
    assert sorted(proposals, key=lambda p: p[1]) == [(16, 100), (16, 116), (3, 132)]  # sent in any order
    assert getattr(result, "calls", 36) == 36


def test_W2_a_reply_with_no_choice_at_all_fails_the_request_and_a_none_choice_is_asked_again():
    """An empty reply to a request for n samples fails every position it asked for, none asked again (as the
    wire's 'no choices' error, methods.md section 5); a None choice is asked for again alone with seed S + i."""
    sent = []

    def complete(request):
        sent.append((request.n, request.seed))
        if references_in(request.messages):
            return "synthesis"
        return {3: [], 2: [None, "b"]}.get(request.n, "again")

    with pytest.raises(impl.NotEnoughProposals) as caught:
        impl.self_moa("Q", "m", n=3, seed=0, complete=complete)
    assert sent == [(3, 0)] and len(caught.value.failures) == 3
    sent.clear()
    assert impl.self_moa("Q", "m", n=2, seed=10, complete=complete).answer == "synthesis"
    assert sent == [(2, 10), (1, 10), (1, 10)]  # sample 0 again, alone; then the aggregation


def test_W1_a_lone_surrogate_in_a_returned_text_is_replaced_before_it_is_shown_or_returned():
    """Any completion function, not only the HTTP client, may return a lone surrogate (half an emoji): it is
    replaced by U+FFFD before the text is used, so the reference key (sha256 of UTF-8) can be computed and
    the references read back are the replaced texts (methods.md section 5)."""
    shown = []

    def complete(request):
        references = references_in(request.messages)
        if references:
            shown.append(references)
            return "\udc00 done"
        return ["a\ud800b", "x\udfff"][:request.n]

    result = impl.self_moa("Q", "m", n=2, complete=complete)
    assert shown == [["a\ufffdb", "x\ufffd"]] and result.answer == "\ufffd done"


def test_W4_only_the_final_aggregation_is_streamed():
    """MoA with 3 layers: of all requests, only the aggregator's carries the stream, and it streams the answer."""
    pieces: list[str] = []
    fake = Recorder()
    result = impl.moa("Q", ["a", "b"], "c", layers=3, complete=fake, stream=pieces.append, seed=1)
    streamed = [r for r in fake.requests if getattr(r, "stream", None) is not None]
    assert len(streamed) == 1 and streamed[0].model == "c" and "".join(pieces) == result.answer


@pytest.mark.parametrize("samples, streamed", [
    ([f"s{i}" for i in range(10)], [False, False, False, True]),  # known length: the last round is known
    ((f"s{i}" for i in range(9)), [False, False, False, True]),   # the generator ran dry filling it
    ((f"s{i}" for i in range(10)), [False, False, False, False]),  # full last round of unknown length:
], ids=["list", "generator-short-last-round", "generator-full-last-round"])  # not known last, not streamed
def test_W4_seq_streams_only_its_last_round_and_never_waits_to_find_out(samples, streamed):
    """Self-MoA-Seq streams its last round only when that is known without pulling another sample."""
    pieces: list[str] = []
    fake = Recorder()
    result = impl.self_moa_seq("Q", complete=fake, samples=samples, aggregator="m", window=4, carry=2,
                               stream=pieces.append)
    assert [getattr(r, "stream", None) is not None for r in fake.requests] == streamed
    assert "".join(pieces) == (result.answer if streamed[-1] else "")


# --- T: the trace ----------------------------------------------------------------------------------------


@given(plan=plans, n=st.integers(1, 12), wc=windows(), honour_n=st.booleans(), data=st.data())
@settings(max_examples=30)
def test_T1_the_trace_has_one_call_per_request_in_spec_order_and_counts_generations(plan, n, wc, honour_n, data):
    """One Call per request, ordered by (layer, round, proposers before the aggregator, position), never by
    timing; calls = texts returned (failed requests count 0), requests = len(trace)."""
    broken = data.draw(st.sets(st.sampled_from(["beta", "gamma"]), max_size=1))
    window, carry = wc
    runs = []
    fake = Recorder(honour_n=honour_n, jitter=0.001, fail=broken)
    try:
        runs.append((impl.moa("Q", plan, "alpha", complete=fake, seed=1, concurrency=4), fake))
    except impl.NotEnoughProposals as exc:
        runs.append((exc.partial, fake))
    fake = Recorder(honour_n=honour_n, jitter=0.001)
    runs.append((impl.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=1), fake))
    for result, fake in runs:
        trace = trace_of(result)
        assert [trace_key(call) for call in trace] == sorted(trace_key(call) for call in trace)
        assert result.requests == len(trace) == len(fake.requests)
        assert result.calls == sum(text is not None for call in trace for text in call.outputs)  # None: no text
        assert all(call.outputs == [] for call in trace if call.error)


def trace_key(call) -> tuple:
    """methods.md section 7: (layer, round, proposers before the aggregator, first position, larger n first)."""
    return (call.layer, call.round or 0, call.role == "aggregator", call.indices[0] if call.indices else 0, -call.n)


# --- Q: Self-MoA-Seq: failed samples, and rounds that start as soon as they can --------------------------


@given(n=st.integers(1, 20), wc=windows(), data=st.data())
@settings(max_examples=40)
def test_Q9_failed_samples_are_skipped_and_each_window_fills_with_the_next_good_ones(n, wc, data):
    """A sample that fails for good is recorded in the trace and skipped: the rounds run over the good samples
    exactly as if only those had been drawn (T = the round count of the good samples), in sample order."""
    window, carry = wc
    failing = data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1))
    fake = Recorder(fail={("alpha", 100 + i) for i in failing})
    result = impl.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=100, use_n=False)
    good = [i for i in range(n) if i not in failing]
    texts = {r.seed - 100: fake.text(r, 0) for r in fake.requests if not references_in(r.messages)}
    expected, position = [], 0
    while position < len(good):
        take = window if not expected else window - carry
        expected.append([texts[i] for i in good[position:position + take]])
        position += take
    rounds = fake.aggregator_requests()
    assert len(rounds) == len(expected) == rounds_for(len(good), window, carry)
    assert [references_in(r.messages)[0 if t == 0 else carry:] for t, r in enumerate(rounds)] == expected
    trace = trace_of(result)
    assert sorted(i for c in trace if c.error for i in c.indices) == sorted(failing)
    assert result.calls == len(good) + len(rounds)


@pytest.mark.parametrize("stream", [None, lambda piece: None], ids=["plain", "streamed"])
def test_Q8_seq_starts_each_round_as_soon_as_its_samples_exist(stream):
    """Round 1 runs while the caller's generator still holds back the later samples, also when the last round
    is to be streamed (knowing which round is last must not hold the earlier ones back)."""
    round_one_started = threading.Event()
    shown: list[list[str]] = []

    def complete(request):
        shown.append(references_in(request.messages))
        round_one_started.set()
        return "synthesis"

    def samples():
        yield from [f"s{i}" for i in range(6)]
        assert round_one_started.wait(timeout=5), "round 1 waited for samples it does not need"
        yield from ["s6", "s7", "s8"]

    impl.self_moa_seq("Q", complete=complete, samples=samples(), aggregator="m", stream=stream)
    assert shown == [[f"s{i}" for i in range(6)], ["synthesis"] * 3 + ["s6", "s7", "s8"]]


def test_Q8_a_ready_round_overtakes_samples_only_later_rounds_need():
    """With n > window, samples go in per-round requests; a ready aggregation is not stuck behind them."""
    order = []
    lock = threading.Lock()

    def complete(request):
        kind = "agg" if references_in(request.messages) else f"samples{request.n}"
        with lock:
            order.append(kind)
        time.sleep(0.05)  # room for the orchestrator to queue round 1 while the worker is busy
        return [f"t{request.seed}-{j}" for j in range(request.n)]

    impl.self_moa_seq("Q", "m", n=12, window=6, carry=3, complete=complete, seed=0, concurrency=1)
    # One worker: it may already have picked the next sample request when round 1 becomes ready, but
    # round 1 overtakes every request still queued (first-in-first-out would run it after all samples).
    last_samples = len(order) - 1 - order[::-1].index("samples3")
    assert order[0] == "samples6" and order.index("agg") < last_samples


# --- E: errors --------------------------------------------------------------------------------------------


def test_E1_errors_keep_the_work_already_done():
    """A failed aggregation raises its ModelError, with the samples already drawn in partial."""
    def complete(request):
        if references_in(request.messages):
            raise impl.ModelError("aggregator down", model=request.model, status=503)
        return "draft"

    with pytest.raises(impl.ModelError, match="aggregator down") as caught:
        impl.self_moa("Q", "m", n=3, complete=complete)
    partial = caught.value.partial
    assert [c.role for c in trace_of(partial)] == ["proposer"] * 3 + ["aggregator"] and partial.trace[-1].error
    assert partial.calls == 3  # one text per request: 1 + 2 fallback requests


# (the call, how its message must start: name=value: (methods.md section 4), selfmoa's own wording or None).
# Every implementation must start its message as the spec says and give a reason after it; the wording is
# selfmoa's and is checked for selfmoa only, since the spec fixes the start of the message, not its prose.
@pytest.mark.parametrize("call, starts, wording", [
    (lambda c: impl.self_moa_seq("Q", "m", complete=c, window=1), r"window=1: ", r"pass window >= 2"),
    (lambda c: impl.self_moa_seq("Q", "m", complete=c, window=4, carry=4), r"carry=4: ", r"between 1 and 3"),
    (lambda c: impl.self_moa_seq("Q", "m", complete=c, carry=0), r"carry=0: ", None),
    (lambda c: impl.self_moa("Q", "m", complete=c, n=0), r"n=0: ", r"pass n >= 1"),
    (lambda c: impl.self_moa("Q", "m", complete=c, proposing={"temperature": 0}), r"temperature=0: ", r"above 0"),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, proposing={"temperature": 2.5}), r"temperature=2\.5: ",
     r"0 to 2"),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, aggregating={"max_tokens": 0}), r"aggregator_max_tokens=0: ",
     None),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, aggregating={"fields": {"n": 2}}),
     r"aggregator_fields\[n\]=2: ", r"leave n out"),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, proposing={"fields": {"temperature": 0.5}}),
     r"fields\[temperature\]=0\.5: ", r"temperature="),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, proposing={"top_p": 0.5}), r"proposing=", r"fields"),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c,
                        proposing={"max_tokens": 9, "fields": {"max_completion_tokens": 9}}), r"max_tokens=9: ",
     r"once"),
    (lambda c: impl.moa("Q", [], "b", complete=c), r"proposers=\[\]: ", r"at least one proposer"),
    (lambda c: impl.moa("Q", [["a"], []], "b", complete=c),
     r"proposers \(layer 2\)=\[\]: |proposers=\[\['a'\], \[\]\]: .*layer 2", r"layer 2"),
    (lambda c: impl.moa("Q", ["a"], "", complete=c), r"aggregator='': ", None),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, layers=1), r"layers=1: ", r"at least 2"),
    (lambda c: impl.moa("Q", [["a"]], "b", complete=c, layers=3), r"layers=3: ", r"layers=2"),
    (lambda c: impl.moa("Q", ["a", "b"], "b", complete=c, min_ok=3), r"min_ok=3: ", r"between 1 and 2"),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, seed=1.5), r"seed=1\.5: ", None),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, concurrency=0), r"concurrency=0: ", None),
    (lambda c: impl.moa("", ["a"], "b", complete=c), r"prompt='': ", r"the prompt is empty"),
    (lambda c: impl.moa([{"role": "user"}], ["a"], "b", complete=c), r"prompt\[0\]=\{'role': 'user'\}: ", None),
    (lambda c: impl.moa("Q", ["a"], "b", complete=None), r"complete=None: ", None),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, instruction=" "), r"instruction=' ': ", None),
    (lambda c: impl.moa("Q", ["a"], "b", complete=c, stream="no"), r"stream='no': ", None),
    (lambda c: impl.self_moa_seq("Q", complete=c, samples=["x"], n=3, aggregator="m"), r"n=3: ", r"not both"),
    (lambda c: impl.self_moa_seq("Q", complete=c, samples="abc", aggregator="m"), r"samples='abc': ", None),
    (lambda c: impl.self_moa_seq("Q", complete=c, samples=["x"], aggregator="m", min_ok=2), r"min_ok=2: ", None),
])
def test_E2_bad_arguments_are_refused_up_front_naming_argument_value_and_fix(call, starts, wording):
    """Each bad argument raises ConfigError (a ValueError) before any request, its message starting
    `name=value: ` and going on with the reason (selfmoa's wording checked for selfmoa)."""
    fake = Recorder()
    with pytest.raises(impl.ConfigError) as caught:
        call(fake)
    assert isinstance(caught.value, ValueError) and fake.requests == []
    message = str(caught.value)
    named = re.match(f"(?:{starts})", message)
    assert named and message[named.end():].strip(), f"should start {starts!r} and give a reason: {message!r}"
    if impl is selfmoa and wording is not None:
        assert re.search(wording, message), f"selfmoa's wording {wording!r} is gone: {message!r}"


@pytest.mark.parametrize("make, match", [
    (lambda: selfmoa.HTTPClient("http://x/v1", retries=-1), r"retries=-1"),
    (lambda: selfmoa.HTTPClient("http://x/v1", timeout=0), r"timeout=0"),
])
def test_E2_a_bad_client_argument_is_refused_naming_it(make, match):
    with pytest.raises(selfmoa.ConfigError, match=match):
        make()


# --- V: the Vendi score, and reporting that never dominates ------------------------------------------

words = st.text("abcdefgh", min_size=1, max_size=3)
word_texts = st.lists(st.lists(words, min_size=0, max_size=6).map(" ".join), min_size=1, max_size=8)


@given(text=st.lists(words, max_size=6).map(" ".join), n=st.integers(1, 10))
def test_V1_vendi_of_identical_items_is_one(text, n):
    """n copies of one text have Vendi score 1."""
    assert selfmoa.vendi_score([text] * n) == pytest.approx(1.0)


@given(n=st.integers(1, 12))
def test_V1_vendi_of_mutually_orthogonal_items_is_n(n):
    """n texts that share no word have Vendi score n."""
    assert selfmoa.vendi_score([f"w{i} x{i}" for i in range(n)]) == pytest.approx(n)


@given(items=word_texts, data=st.data())
def test_V1_vendi_is_permutation_invariant(items, data):
    """Reordering the texts leaves the Vendi score unchanged."""
    shuffled = data.draw(st.permutations(items))
    assert selfmoa.vendi_score(shuffled) == pytest.approx(selfmoa.vendi_score(items), abs=1e-7)


@given(items=word_texts)
def test_V1_vendi_is_between_one_and_n(items):
    """1 <= VS <= n for any texts."""
    assert 1.0 <= selfmoa.vendi_score(items) <= len(items)


def test_V2_reporting_computes_diversity_only_when_asked():
    """to_dict() leaves the O(n^3) Vendi score out unless asked: reporting never costs more than the run."""
    result = selfmoa.moa("Q", ["a", "b"], "c", layers=3, complete=lambda r: f"{r.model} says {r.seed}", seed=0)
    assert "diversity" not in result.to_dict() and "diversity" not in result.to_dict(trace=False)
    data = result.to_dict(diversity=True)
    assert set(data["diversity"]) == {"1", "2"}
    assert data["diversity"]["1"] == selfmoa.vendi_score(["a says 0", "b says 1"])


def test_V2_the_command_line_computes_diversity_only_with_the_diversity_flag(monkeypatch, capsys):
    """--json alone never runs the O(n^3) Vendi score; --json --diversity does."""
    import json

    from mock_models import MockServer

    calls = []
    monkeypatch.setattr(selfmoa, "vendi_score", lambda texts: calls.append(len(texts)) or 1.0)
    with MockServer() as server:
        argv = ["--base-url", server.base_url, "-m", "generalist", "-n", "3", "--seed", "0", "--json", "Hi"]
        assert selfmoa.main(argv, environ={}) == 0
        assert calls == [] and "diversity" not in json.loads(capsys.readouterr().out)
        assert selfmoa.main(argv + ["--diversity"], environ={}) == 0
        assert calls == [3] and json.loads(capsys.readouterr().out)["diversity"] == {"1": 1.0}


# --- E: the command line refuses flags without effect, and speaks in flags ---------------------------

CLI_URL = ["--base-url", "http://127.0.0.1:9/v1", "--retries", "0"]  # nothing listens: a refused run must not try
CLI_METHODS = {"moa": ["--method", "moa", "-p", "a", "-p", "b", "-a", "z"],
               "self-moa": ["--method", "self-moa", "-m", "q"],
               "self-moa-seq": ["--method", "self-moa-seq", "-m", "q"]}
CLI_ONLY = {"--layers": ({"moa", "self-moa"}, ["--layers", "3"]),  # flag: (the methods that use it, an example)
            "-n/--samples": ({"self-moa", "self-moa-seq"}, ["-n", "4"]),
            "--window": ({"self-moa-seq"}, ["--window", "4"]),
            "--carry": ({"self-moa-seq"}, ["--carry", "2"]),
            "--proposer": ({"moa"}, ["-p", "x"])}
CLI_REFUSED = [(method, flag, argv) for flag, (methods, argv) in CLI_ONLY.items()
               for method in CLI_METHODS if method not in methods]


def run_cli(capsys, argv):
    code = selfmoa.main(argv, environ={})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method, flag, argv", CLI_REFUSED, ids=[f"{m}{a[0]}" for m, _, a in CLI_REFUSED])
def test_E3_a_flag_the_method_does_not_use_is_refused_naming_flag_and_method(capsys, method, flag, argv):
    """--layers with self-moa-seq, --window/--carry with moa or self-moa, -n with moa, -p with self-moa: exit 2,
    naming the flag and the method, before any request."""
    code, out, err = run_cli(capsys, CLI_URL + CLI_METHODS[method] + argv + ["hi"])
    assert code == 2 and out == ""
    assert f"error: {flag}: --method {method} " in err and "no effect" in err


@pytest.mark.parametrize("method, argv", [(m, a) for flag, (methods, a) in CLI_ONLY.items() for m in sorted(methods)
                                          if flag != "--proposer"])
def test_E3_a_flag_the_method_uses_is_passed_on(method, argv):
    options = selfmoa._method_options(selfmoa.build_parser().parse_args(CLI_METHODS[method] + argv + ["hi"]), {})
    name = {"--layers": "layers", "-n": "n", "--window": "window", "--carry": "carry"}[argv[0]]
    assert options[name] == int(argv[1])


def test_E3_flags_left_out_take_the_methods_defaults():
    """Not giving --layers, -n, --window or --carry passes nothing: the library's defaults apply."""
    for argv in CLI_METHODS.values():
        options = selfmoa._method_options(selfmoa.build_parser().parse_args(argv + ["hi"]), {})
        assert not {"layers", "n", "window", "carry"} & set(options)


@pytest.mark.parametrize("argv, flag", [
    (["--method", "moa", "-p", "a", "-a", "z", "-m", "q"], "--model"),
    (["-m", "q", "--diversity"], "--diversity"),
    (["-m", "q", "--trace"], "--trace"),
    (["-m", "q", "--format", "jsonl"], "--format"),
    (["-m", "q", "--generator", "g"], "--generator"),
    (["-m", "q", "--json", "--stream"], "--stream"),
    (["-m", "q", "-i", "in.jsonl", "-o", "out.jsonl", "--json"], "--json"),
    (["-m", "q", "-i", "in.jsonl", "-o", "out.jsonl", "--stream"], "--stream"),
])
def test_E3_other_flags_without_effect_are_refused(capsys, argv, flag):
    """Flags that would change nothing (batch-only flags without a batch, --stream with --json, ...) exit 2
    naming the flag, before any file is read or call made."""
    argv = argv if "-i" in argv else argv + ["hi"]
    code, _, err = run_cli(capsys, CLI_URL + argv)
    assert code == 2 and f"error: {flag}: " in err and "no effect" in err


def test_E3_no_stream_in_a_batch_is_accepted(capsys, tmp_path):
    """--no-stream asks for what a batch does anyway (nothing streams): harmless, so not refused, unlike --stream."""
    from tests.scripted_server import ScriptedServer

    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hi"}\n', encoding="utf-8")
    with ScriptedServer() as server:
        code, _, err = run_cli(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "-i", str(prompts),
                                        "-o", str(tmp_path / "out.jsonl"), "--no-stream"])
    assert code == 0, err
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").count("\n") == 1


CLI_BAD = [["--layers", "1"], ["--layers", "0"], ["-n", "0"], ["--window", "1"], ["--carry", "0"], ["--carry", "9"],
           ["--min-ok", "0"], ["--min-ok", "99"], ["--temperature", "3"], ["--temperature", "0"], ["--max-tokens", "0"],
           ["--aggregator-temperature", "-1"], ["--aggregator-max-tokens", "0"], ["--concurrency", "0"],
           ["--seed", "-1", "--min-ok", "7"]]


@pytest.mark.parametrize("method", list(CLI_METHODS))
@pytest.mark.parametrize("bad", CLI_BAD, ids=[" ".join(b) for b in CLI_BAD])
def test_E3_usage_errors_speak_in_flags_not_in_library_arguments(capsys, method, bad):
    """A bad value is refused with exit 2 in the words of the command line: the flag, never 'name=value'."""
    if method == "moa" and bad == ["--temperature", "0"]:
        return  # MoA may sample at temperature 0; only Self-MoA's diversity needs more
    if any(flag in bad for flag in ("--layers", "-n", "--window", "--carry")):
        flag = next(f for f in CLI_ONLY if bad[0] in f.split("/"))
        if method not in CLI_ONLY[flag][0]:
            return  # refused as unused, checked above
    code, out, err = run_cli(capsys, CLI_URL + CLI_METHODS[method] + bad + ["hi"])
    assert code == 2 and out == "", err
    message = err.splitlines()[-1]
    assert message.startswith("selfmoa: error: --"), message
    assert not re.search(r"\b[a-z_]+=", message), f"library spelling in {message!r}"
    assert not re.search(r"(?<![-\w])(min_ok|max_tokens|aggregator_\w+|layers|window|carry|n) (>=|between)", message)
