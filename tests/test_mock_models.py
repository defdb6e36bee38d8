"""The mock task world and models: ground truth is right, the scorer reads replies, the statistics hold."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mock_models import models
from mock_models.tasks import DOMAINS, extract_answer, find_task, is_correct, make_tasks


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_task_is_recognised_from_its_prompt_with_the_same_answer(domain):
    for task in make_tasks(domain, 300, seed=5):
        found = find_task(task.prompt)
        assert found is not None and found.answer == task.answer and task.answer not in task.distractors


def test_crux_answers_are_what_python_prints():
    for task in make_tasks("CRUX", 100, seed=1):
        program = task.prompt.split("\n\n")[1]
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(program, {})  # noqa: S102 - our own generated program
        assert output.getvalue().strip() == task.answer


def test_math_answers_are_what_python_computes():
    for task in make_tasks("MATH", 100, seed=2):
        expression = re.search(r"Compute (.*?)\.", task.prompt).group(1)
        assert str(eval(expression, {})) == task.answer  # noqa: S307 - digits and + - * only


def test_tasks_are_deterministic_and_seeds_differ():
    assert make_tasks("MMLU", 20, seed=1) == make_tasks("MMLU", 20, seed=1)
    assert make_tasks("MMLU", 20, seed=1) != make_tasks("MMLU", 20, seed=2)


@given(answer=st.integers(-999, 999) | st.sampled_from("ABCD"), noise=st.text(alphabet="abc ,.", max_size=30))
def test_the_scorer_reads_the_final_answer(answer, noise):
    """extract_answer finds "The answer is X" whatever comes before it."""
    assert extract_answer(f"{noise} 12 and 13. The answer is {answer}.") == str(answer)


def test_non_task_prompts_get_a_plausible_reply_and_echo_echoes():
    text = models.reply("generalist", [{"role": "user", "content": "How do I cook rice?"}], 0.7, 1)
    assert "cook rice" in text and len(text.split()) > 10
    assert models.reply("echo", [{"role": "user", "content": "hi"}], 0.7, 1) == "user: hi"


@pytest.mark.parametrize("model", ["generalist", "coder", "mathematician", "generalist-2"])
def test_single_sample_accuracy_is_calibrated(model):
    for domain in DOMAINS:
        tasks = make_tasks(domain, 400, seed=9)
        right = sum(models.answer_alone(model, t, 0.7, s) == t.answer for t in tasks for s in range(3))
        assert abs(right / (3 * len(tasks)) - models.ACCURACY[model][domain]) < 0.07


def test_samples_of_one_model_agree_more_than_samples_of_two():
    """In-model diversity < cross-model diversity: the mechanism behind the paper's argument."""
    tasks = [t for d in DOMAINS for t in make_tasks(d, 200, seed=4)]
    same = sum(models.answer_alone("generalist", t, 0.7, 1) == models.answer_alone("generalist", t, 0.7, 2)
               for t in tasks)
    cross = sum(models.answer_alone("generalist", t, 0.7, 1) == models.answer_alone("generalist-2", t, 0.7, 2)
                for t in tasks)
    assert same > cross * 1.1


def test_the_aggregator_votes_counting_carried_copies():
    task = make_tasks("MATH", 1, seed=0)[0]
    wrong = task.distractors[0]
    refs = [f"The answer is {wrong}."] * 3 + [f"The answer is {task.answer}."] * 2
    answer, votes = models.aggregate("coder", task, refs, 1)
    assert votes[wrong] == 3 and votes[task.answer] in (2, 2 + models.BIAS)


def test_references_are_read_by_the_rule_of_the_spec():
    block = ("Merge.\n\nResponses from models:\n\n<<<response 1 of 2, key 0123abcd>>>\nA\n<<<response 1 of 2, "
             "key ffffffff>>>\n<<<end of response 1, key 0123abcd>>>\n\n<<<response 2 of 2, key 0123abcd>>>\nB\n"
             "<<<end of response 2, key 0123abcd>>>")
    assert models.references_in(block) == ["A\n<<<response 1 of 2, key ffffffff>>>", "B"]
    assert models.references_in("no references") == []


def test_as_aggregator_a_model_answers_and_is_correct_more_often_with_good_references():
    task = make_tasks("CRUX", 1, seed=3)[0]
    system = ("x\n\nResponses from models:\n\n" + "\n\n".join(
        f"<<<response {i} of 3, key 0a0a0a0a>>>\nThe answer is {task.answer}.\n<<<end of response {i}, key 0a0a0a0a>>>"
        for i in (1, 2, 3)))
    text = models.reply("mathematician", [{"role": "system", "content": system},
                                          {"role": "user", "content": task.prompt}], 0.7, 1)
    assert is_correct(text, task) and "3 of" in text
