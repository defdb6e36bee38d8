"""Behaviour of the methods beyond the invariants: streaming, samples on the fly, concurrency, checks."""

from __future__ import annotations

import threading
import time

import pytest

import selfmoa
from tests.fakes import Recorder


def test_concurrency_bounds_calls_in_flight():
    in_flight, peak = [0], [0]
    lock = threading.Lock()

    def complete(request):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return "x"

    selfmoa.moa("Q", [f"m{i}" for i in range(12)], "agg", complete=complete, concurrency=3)
    assert peak[0] == 3


def test_a_layer_of_proposers_runs_concurrently():
    barrier = threading.Barrier(4, timeout=5)

    def complete(request):
        if not selfmoa.read_references(request.messages):
            barrier.wait()  # only returns once all 4 proposers are in flight together
        return request.model

    assert selfmoa.moa("Q", ["a", "b", "c", "d"], "z", complete=complete, concurrency=4).answer == "z"


def test_a_bug_in_the_completion_function_propagates_unchanged():
    def complete(request):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        selfmoa.moa("Q", ["a"], "b", complete=complete)


def test_a_completion_function_returning_nonsense_is_a_type_error():
    with pytest.raises(TypeError, match="must return a Reply, a str or a list of str"):
        selfmoa.moa("Q", ["a"], "b", complete=lambda request: 42)


def test_seq_with_no_samples_is_an_error_not_an_empty_answer():
    with pytest.raises(selfmoa.NotEnoughProposals, match="no samples were given"):
        selfmoa.self_moa_seq("Q", complete=Recorder(), samples=iter([]), aggregator="m")


def test_a_bad_sample_in_a_generator_keeps_the_rounds_already_done():
    def samples():
        yield from ["a", "b", "c"]
        yield 7

    with pytest.raises(selfmoa.ConfigError, match=r"samples\[3\]=7") as caught:
        selfmoa.self_moa_seq("Q", complete=Recorder(), samples=samples(), aggregator="m", window=2, carry=1)
    assert caught.value.partial is not None and len(caught.value.partial.trace) == 2


def test_error_tree():
    assert issubclass(selfmoa.ConfigError, ValueError)
    for cls in (selfmoa.ConfigError, selfmoa.ModelError, selfmoa.NotEnoughProposals):
        assert issubclass(cls, selfmoa.SelfMoAError)


def test_result_is_json_serialisable():
    import json

    result = selfmoa.self_moa_seq("Q", "m", n=8, complete=Recorder(), seed=0)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["answer"] == result.answer and len(data["trace"]) == result.requests


def test_an_empty_sample_list_is_blamed_on_samples():
    with pytest.raises(selfmoa.ConfigError, match=r"samples=\[\]: there is nothing to aggregate"):
        selfmoa.self_moa_seq("Q", complete=Recorder(), samples=[], aggregator="m")


def test_a_short_generator_fails_min_ok_before_aggregating():
    fake = Recorder()
    with pytest.raises(selfmoa.NotEnoughProposals, match=r"only 2 samples succeeded, fewer than min_ok=3$"):
        selfmoa.self_moa_seq("Q", complete=fake, samples=iter(["a", "b"]), aggregator="m", min_ok=3)
    assert fake.requests == []
