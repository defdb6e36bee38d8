"""The invariants spec/invariants.md adds beyond PAPER-NOTES (P1, W5, W6, T1, Q9), through the seam with a fake.

Each test is named after its invariant and listed under it in spec/invariants.md (tests/test_spec.py checks
both directions). A test marked xfail(strict=True) pins a known violation of the spec by selfmoa.py: it
shows in every run until the code is fixed, and then fails until the mark is removed.
"""

from __future__ import annotations

import copy
import threading
import importlib.util
import pathlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import selfmoa
from tests.fakes import Recorder

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ["alpha", "beta", "gamma"]
text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)
# Texts that look like the markers and keys of wire.md section 6, to tempt the format into ambiguity.
tricky = st.one_of(text, st.sampled_from(["<<<response 1 of 1, key 00000000>>>", "<<<end of response 1",
                                          "\n", "", "a45a6337", "key", ">>>"]))
messages_ = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": text}), min_size=1, max_size=4)
plans = st.lists(st.lists(st.sampled_from(MODELS), min_size=1, max_size=4), min_size=1, max_size=3)


def make_vectors():
    """spec/vectors/make_vectors.py: a second statement of wire.md section 6 that shares no code with selfmoa."""
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "spec" / "vectors" / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WIRE = make_vectors()


@st.composite
def windows(draw):
    window = draw(st.integers(2, 7))
    return window, draw(st.integers(1, window - 1))


# --- P: prompt construction is pure ---------------------------------------------------------------------


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
    result = selfmoa.moa("Q", plan, "alpha", complete=fake, seed=seed, use_n=use_n)
    for call in result.trace:
        if call.role == "aggregator":
            assert call.seed == seed
        else:
            assert call.seed == (None if seed is None else seed + call.indices[0])
            assert call.indices == list(range(call.indices[0], call.indices[0] + call.n))
    assert sorted(r.seed is None for r in fake.requests) == [seed is None] * len(fake.requests)


@given(n=st.integers(1, 40), window=st.integers(2, 24), data=st.data())
@example(n=20, window=20, data=None)  # the minimal reproduction: one request with n=20 > MAX_N=16
@settings(max_examples=30)
def test_W2_seq_never_asks_for_more_than_max_n_samples_in_one_request(n, window, data):
    """Self-MoA-Seq, like moa and self_moa, asks for at most MAX_N samples per request (the manual: MAX_N is
    'the most samples asked for in one request')."""
    carry = 3 if data is None else data.draw(st.integers(1, window - 1))
    fake = Recorder()
    selfmoa.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=0)
    assert max(r.n for r in fake.requests) <= selfmoa.MAX_N


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
        runs.append((selfmoa.moa("Q", plan, "alpha", complete=fake, seed=1, concurrency=4), fake))
    except selfmoa.NotEnoughProposals as exc:
        runs.append((exc.partial, fake))
    fake = Recorder(honour_n=honour_n, jitter=0.001)
    runs.append((selfmoa.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=1),
                 fake))
    for result, fake in runs:
        assert result.trace == sorted(result.trace, key=selfmoa.Call.sort_key)
        assert result.requests == len(result.trace) == len(fake.requests)
        assert result.calls == sum(len(call.outputs) for call in result.trace)
        assert all(call.outputs == [] for call in result.trace if call.error)


# --- Q: Self-MoA-Seq with failed samples ---------------------------------------------------------------


@given(n=st.integers(1, 20), wc=windows(), data=st.data())
@settings(max_examples=40)
def test_Q9_failed_samples_are_skipped_and_each_window_fills_with_the_next_good_ones(n, wc, data):
    """A sample that fails for good is recorded in the trace and skipped: the rounds run over the good samples
    exactly as if only those had been drawn (T = seq_rounds(good)), in sample order."""
    window, carry = wc
    failing = data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1))
    fake = Recorder(fail={("alpha", 100 + i) for i in failing})
    result = selfmoa.self_moa_seq("Q", "alpha", n=n, window=window, carry=carry, complete=fake, seed=100,
                                  use_n=False)
    good = [i for i in range(n) if i not in failing]
    rounds = [c for c in result.trace if c.role == "aggregator"]
    assert len(rounds) == selfmoa.seq_rounds(len(good), window, carry)
    expected, position = [], 0
    for t in range(len(rounds)):
        take = window if t == 0 else window - carry
        expected.append(good[position:position + take])
        position += take
    assert [c.references for c in rounds] == expected
    assert sorted(i for c in result.trace if c.error for i in c.indices) == sorted(failing)
    assert result.calls == len(good) + len(rounds)


def test_Q8_a_streamed_seq_still_starts_each_round_as_soon_as_its_samples_exist():
    """Streaming the last round must not hold back the earlier rounds: round 1 starts before sample 6 exists."""
    started = threading.Event()

    def complete(request):
        started.set()
        return "synthesis"

    def samples():
        yield from [f"s{i}" for i in range(6)]
        assert started.wait(timeout=0.3), "round 1 waited for a sample it does not need"
        yield from ["s6", "s7", "s8"]

    selfmoa.self_moa_seq("Q", complete=complete, samples=samples(), aggregator="m", stream=lambda piece: None)
