"""Behaviour of the methods beyond the invariants: streaming, samples on the fly, concurrency, checks."""

from __future__ import annotations

import threading
import time

import pytest

import selfmoa
from tests.fakes import Recorder


def test_only_the_final_aggregation_is_streamed():
    pieces = []
    fake = Recorder()
    result = selfmoa.moa("Q", ["a", "b"], "c", layers=3, complete=fake, stream=pieces.append, seed=1)
    streamed = [r for r in fake.requests if r.stream is not None]
    assert len(streamed) == 1 and streamed[0].model == "c" and "".join(pieces) == result.answer


@pytest.mark.parametrize("samples, streamed", [
    ([f"s{i}" for i in range(10)], [False, False, False, True]),  # known length: the last round is known
    ((f"s{i}" for i in range(9)), [False, False, False, True]),   # the generator ran dry filling it
    ((f"s{i}" for i in range(10)), [False, False, False, False]),  # full last round of unknown length:
], ids=["list", "generator-short-last-round", "generator-full-last-round"])  # not known last, not streamed
def test_self_moa_seq_streams_only_its_last_round_and_never_waits_to_find_out(samples, streamed):
    pieces = []
    fake = Recorder()
    result = selfmoa.self_moa_seq("Q", complete=fake, samples=samples, aggregator="m", window=4, carry=2,
                                  stream=pieces.append)
    assert [r.stream is not None for r in fake.requests] == streamed
    assert "".join(pieces) == (result.answer if streamed[-1] else "")


def test_self_moa_seq_starts_each_round_as_soon_as_its_samples_exist():
    """Round 1 runs while the generator still holds back the later samples."""
    round_one_started = threading.Event()

    def complete(request):
        round_one_started.set()
        return "synthesis"

    def samples():
        for i in range(6):
            yield f"s{i}"
        assert round_one_started.wait(timeout=5), "round 1 waited for samples it does not need"
        for i in range(6, 9):
            yield f"s{i}"

    result = selfmoa.self_moa_seq("Q", complete=complete, samples=samples(), aggregator="m")
    assert [c.references for c in result.trace] == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]


def test_generated_samples_are_requested_round_by_round_and_aggregations_jump_the_queue():
    """With n > window, samples go in per-round requests; a ready aggregation is not stuck behind them."""
    order = []
    lock = threading.Lock()

    def complete(request):
        kind = "agg" if selfmoa.read_references(request.messages) else f"samples{request.n}"
        with lock:
            order.append(kind)
        time.sleep(0.05)  # room for the orchestrator to queue round 1 while the worker is busy
        return [f"t{request.seed}-{j}" for j in range(request.n)]

    result = selfmoa.self_moa_seq("Q", "m", n=12, window=6, carry=3, complete=complete, seed=0, concurrency=1)
    requests = [(c.role, c.n, c.seed) for c in result.trace]
    assert requests[:3] == [("proposer", 6, 0), ("proposer", 3, 6), ("proposer", 3, 9)]
    # One worker: it may already have picked the next sample request when round 1 becomes ready, but
    # round 1 overtakes every request still queued (first-in-first-out would run it after all samples).
    last_samples = len(order) - 1 - order[::-1].index("samples3")
    assert order[0] == "samples6" and order.index("agg") < last_samples


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


def test_errors_keep_the_work_already_done():
    def complete(request):
        if selfmoa.read_references(request.messages):
            raise selfmoa.ModelError("aggregator down", model=request.model, status=503)
        return "draft"

    with pytest.raises(selfmoa.ModelError, match="aggregator down") as caught:
        selfmoa.self_moa("Q", "m", n=3, complete=complete)
    partial = caught.value.partial
    assert partial is not None and partial.calls == 3  # one text per request: 1 + 2 fallback requests
    assert [c.role for c in partial.trace] == ["proposer"] * 3 + ["aggregator"] and partial.trace[-1].error


def test_a_bug_in_the_completion_function_propagates_unchanged():
    def complete(request):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        selfmoa.moa("Q", ["a"], "b", complete=complete)


def test_a_completion_function_returning_nonsense_is_a_type_error():
    with pytest.raises(TypeError, match="must return a Reply, a str or a list of str"):
        selfmoa.moa("Q", ["a"], "b", complete=lambda request: 42)


@pytest.mark.parametrize("call, match", [
    (lambda c: selfmoa.self_moa_seq("Q", "m", complete=c, window=1), r"window=1: .*pass window >= 2"),
    (lambda c: selfmoa.self_moa_seq("Q", "m", complete=c, window=4, carry=4), r"carry=4: .*between 1 and 3"),
    (lambda c: selfmoa.self_moa_seq("Q", "m", complete=c, carry=0), r"carry=0"),
    (lambda c: selfmoa.self_moa("Q", "m", complete=c, n=0), r"n=0: .*pass n >= 1"),
    (lambda c: selfmoa.self_moa("Q", "m", complete=c, temperature=0), r"temperature=0: .*above 0"),
    (lambda c: selfmoa.moa("Q", ["a"], "b", complete=c, temperature=2.5), r"temperature=2.5: .*0 to 2"),
    (lambda c: selfmoa.moa("Q", ["a"], "b", complete=c, aggregator_max_tokens=0), r"aggregator_max_tokens=0"),
    (lambda c: selfmoa.moa("Q", [], "b", complete=c), r"proposers=\[\]: .*at least one proposer"),
    (lambda c: selfmoa.moa("Q", [["a"], []], "b", complete=c), r"layer 2"),
    (lambda c: selfmoa.moa("Q", ["a"], "", complete=c), r"aggregator=''"),
    (lambda c: selfmoa.moa("Q", ["a"], "b", complete=c, layers=1), r"layers=1: .*at least 2"),
    (lambda c: selfmoa.moa("Q", [["a"]], "b", complete=c, layers=3), r"layers=3: .*layers=2"),
    (lambda c: selfmoa.moa("Q", ["a", "b"], "b", complete=c, min_ok=3), r"min_ok=3: .*between 1 and 2"),
    (lambda c: selfmoa.moa("Q", ["a"], "b", complete=c, seed=1.5), r"seed=1.5"),
    (lambda c: selfmoa.moa("Q", ["a"], "b", complete=c, concurrency=0), r"concurrency=0"),
    (lambda c: selfmoa.moa("", ["a"], "b", complete=c), r"prompt='': the prompt is empty"),
    (lambda c: selfmoa.moa([{"role": "user"}], ["a"], "b", complete=c), r"prompt\[0\]"),
    (lambda c: selfmoa.moa("Q", ["a"], "b", complete=None), r"complete=None"),
    (lambda c: selfmoa.self_moa_seq("Q", complete=c, samples=["x"], n=3, aggregator="m"), r"n=3: .*not both"),
    (lambda c: selfmoa.self_moa_seq("Q", complete=c, samples="abc", aggregator="m"), r"samples='abc'"),
    (lambda c: selfmoa.HTTPClient("http://x/v1", retries=-1), r"retries=-1"),
    (lambda c: selfmoa.HTTPClient("http://x/v1", timeout=0), r"timeout=0"),
])
def test_bad_arguments_are_refused_up_front_naming_argument_value_and_fix(call, match):
    fake = Recorder()
    with pytest.raises(selfmoa.ConfigError, match=match):
        call(fake)
    assert fake.requests == []


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


def test_large_n_is_split_into_requests_of_at_most_max_n_keeping_the_seed_convention():
    fake = Recorder()
    result = selfmoa.self_moa("Q", "m", n=selfmoa.MAX_N * 2 + 3, complete=fake, seed=100)
    proposals = [(r.n, r.seed) for r in fake.requests if not selfmoa.read_references(r.messages)]
    assert proposals == [(16, 100), (16, 116), (3, 132)]
    assert result.calls == 36


def test_an_empty_sample_list_is_blamed_on_samples():
    with pytest.raises(selfmoa.ConfigError, match=r"samples=\[\]: there is nothing to aggregate"):
        selfmoa.self_moa_seq("Q", complete=Recorder(), samples=[], aggregator="m")


def test_a_short_generator_fails_min_ok_before_aggregating():
    fake = Recorder()
    with pytest.raises(selfmoa.NotEnoughProposals, match=r"only 2 samples succeeded, fewer than min_ok=3$"):
        selfmoa.self_moa_seq("Q", complete=fake, samples=iter(["a", "b"]), aggregator="m", min_ok=3)
    assert fake.requests == []
