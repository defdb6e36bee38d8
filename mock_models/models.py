"""The mock models: deterministic answers with the statistics of real ones, and a voting aggregator.

Answering a task question (the mechanism spec/mock.md describes):

1. *Latent knowledge*, drawn once per (model, question) from sha256: the probability ``p`` that a sample
   of this model answers this question right, ``p = Phi(a + SPREAD * z)``. ``z`` mixes the question's
   difficulty, shared by all models (weight ``SHARED``), with the model's own draw, and ``a`` is set so
   that the mean of ``p`` over questions is exactly the model's single-sample accuracy ``ACCURACY[model]
   [domain]``. The draw does not depend on the sample, so samples of one model are correlated; two
   models share only the difficulty, so they are less correlated.
2. *Per-sample noise*, drawn from the sample's seed: the sample is right with probability ``p``; otherwise
   it gives a wrong answer, usually the model's favourite distractor for that question (``FAVOURITE``),
   which is often the question's common misconception (``COMMON``).
3. At temperature 0 there is no noise: the model answers right if ``p >= 0.5``, else its favourite.

As an aggregator (its system message ends with a block of references in the format of spec/wire.md section 6;
only that last block counts, whatever blocks the messages held before it), the model
extracts each reference's final answer and votes: every reference counts once (so a synthesis carried r
times counts r times), and the aggregator adds ``BIAS`` votes for the right answer when it would answer
the question right itself (``p >= 0.5``). The top answer wins (ties: by a hash of the call). It then
writes a reply in its own style.

A reply reads like an LLM's: a sentence or two of reasoning in the model's style, then "The answer is X."
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics

from mock_models.tasks import Task, extract_answer, find_task

# Single-sample accuracy per model and domain, calibrated on the paper's Table 3 (generalist ~
# Qwen2-7B-Instruct "i", coder ~ DeepSeek-Coder-V2-Lite "d", mathematician ~ Qwen2-Math-7B "m";
# generalist-2 ~ Llama-3.1-8B of the paper's Table 7, of about the generalist's quality on MMLU).
ACCURACY = {
    "generalist": {"MMLU": 0.66, "CRUX": 0.36, "MATH": 0.54},
    "coder": {"MMLU": 0.61, "CRUX": 0.50, "MATH": 0.54},
    "mathematician": {"MMLU": 0.54, "CRUX": 0.28, "MATH": 0.70},
    "generalist-2": {"MMLU": 0.66, "CRUX": 0.33, "MATH": 0.48},
}
SPREAD = 1.5  # how far apart a model's per-question chances are: low = every question a coin toss
SHARED = 0.5  # the part of a question's difficulty that all models share
FAVOURITE = 0.7  # the chance that a wrong sample gives the model's favourite distractor for the question
COMMON = 0.5  # the chance that a model's favourite wrong answer is the question's common misconception
BIAS = 1.0  # extra votes an aggregator gives the right answer when it would answer it right itself
CONTEXT_LENGTH = {"generalist": 32768, "coder": 32768, "mathematician": 4096, "generalist-2": 8192, "echo": 8192}
MODELS = tuple(CONTEXT_LENGTH)
_STANDARD = statistics.NormalDist()

STYLE = {
    "generalist": ("Let me think this through step by step.", "Considering the question carefully,",
                   "Working through it,", "After checking each part,"),
    "coder": ("Tracing the logic line by line:", "Evaluating this like an interpreter,",
              "Stepping through the computation,", "Running it mentally:"),
    "mathematician": ("We compute directly.", "By careful calculation,", "Simplifying term by term,",
                      "Applying the rules of arithmetic,"),
    "generalist-2": ("Here is my reasoning.", "Thinking about what is asked,", "Breaking the problem down,",
                     "Looking at the details,"),
}


def unit(*parts) -> float:
    """A number in [0, 1) from sha256 over the parts: the only source of randomness of the models."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _normal(*parts) -> float:
    return _STANDARD.inv_cdf(min(max(unit(*parts), 1e-12), 1 - 1e-12))


def chance(model: str, task: Task) -> float:
    """The probability that a sample of ``model`` answers ``task`` right (fixed per model and question)."""
    accuracy = ACCURACY.get(model, {}).get(task.domain, 0.5)
    # E[Phi(a + s z)] = Phi(a / sqrt(1 + s^2)) for standard normal z: solve for a.
    a = _STANDARD.inv_cdf(accuracy) * math.sqrt(1 + SPREAD ** 2)
    z = math.sqrt(SHARED) * -_normal("difficulty", task.id) + math.sqrt(1 - SHARED) * _normal("skill", model, task.id)
    return _STANDARD.cdf(a + SPREAD * z)


def favourite(model: str, task: Task) -> str:
    """A model's favourite wrong answer: often the question's common misconception, else its own."""
    if unit("common", model, task.id) < COMMON:
        return task.distractors[int(unit("misconception", task.id) * len(task.distractors))]
    return task.distractors[int(unit("favourite", model, task.id) * len(task.distractors))]


def answer_alone(model: str, task: Task, temperature: float, sample: object) -> str:
    """The final answer a model gives to a task on its own, for one sample."""
    p = chance(model, task)
    if temperature == 0:
        return task.answer if p >= 0.5 else favourite(model, task)
    if unit("right", model, task.id, sample) < p:
        return task.answer
    if unit("which-wrong", model, task.id, sample) < FAVOURITE:
        return favourite(model, task)
    return task.distractors[int(unit("wrong", model, task.id, sample) * len(task.distractors))]


def aggregate(model: str, task: Task, references: list[str], sample: object) -> tuple[str, dict]:
    """The aggregator's vote over the references' answers, biased by its own knowledge."""
    votes: dict[str, float] = {}
    for reference in references:
        answer = extract_answer(reference)
        if answer is not None:
            votes[answer] = votes.get(answer, 0.0) + 1.0
    if chance(model, task) >= 0.5 and task.answer in votes:
        votes[task.answer] += BIAS
    if not votes:
        return answer_alone(model, task, 0.0, sample), votes
    best = max(votes.values())
    tied = sorted(answer for answer, count in votes.items() if count == best)
    return tied[int(unit("tie", model, task.id, sample) * len(tied))], votes


def write(model: str, task: Task, answer: str, sample: object, votes: dict | None = None) -> str:
    """A reply in the model's style that ends with the answer."""
    style = STYLE.get(model, STYLE["generalist"])
    opener = style[int(unit("style", model, task.id, sample) * len(style))]
    if votes is not None:
        total = sum(votes.values())
        if len(votes) == 1:
            return (f"{opener} I found that every response gives {answer} ({total:g} of {total:g} votes), and it "
                    f"checks out. "
                    f"The answer is {answer}.")
        return (f"{opener} I compared {len(votes)} distinct answers across the responses; {answer} is the best "
                f"supported ({votes.get(answer, 0):g} of {total:g} votes) and it checks out. "
                f"The answer is {answer}.")
    detail = {
        "MATH": "I evaluate the products first, then the sums and differences from left to right.",
        "CRUX": "I follow the loop over the list and track each variable as it changes.",
        "MMLU": "I rule out the options that do not fit and keep the one that does.",
    }[task.domain]
    return f"{opener} {detail} The answer is {answer}."


_SENTENCES = ("This depends on the context, but the usual approach works well.",
              "A good first step is to state the goal precisely.",
              "Most practitioners would start with the simplest option and measure.",
              "The trade-offs are mainly cost, speed and reliability.",
              "It helps to check the assumptions against a small example.",
              "In short, prefer the clear solution unless the numbers say otherwise.")


def generic(model: str, question: str, sample: object, references: list[str]) -> str:
    """A plausible reply to a prompt that is not a task question."""
    topic = " ".join(re.findall(r"\w+", question)[:6]) or "your question"
    picks = sorted(_SENTENCES, key=lambda s: unit("generic", model, question, sample, s))[:2]
    if references:
        responses = "one response" if len(references) == 1 else f"{len(references)} responses"
        return (f"Drawing on {responses} about {topic}: " + " ".join(picks))
    style = STYLE.get(model, STYLE["generalist"])[int(unit("style", model, question, sample) * 4)]
    return f"{style} On {topic}: " + " ".join(picks)


def echo(messages: list[dict]) -> str:
    return "\n\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)


# --- Reading the aggregator prompt (spec/wire.md section 6), written from the spec, not from selfmoa -----

_LAST = re.compile(r"\n<<<end of response (\d+), key ([0-9a-f]{8})>>>\s*\Z")


def references_in(system: str) -> list[str]:
    """The references of the block that ends the system message (the one the client added last).

    A system message can hold older blocks before it (a prompt built by another MoA, an instruction quoting
    one): only the last block counts. Its last line gives N and the key K; no reference contains K, so the
    last line "<<<response 1 of N, key K>>>" opens it.
    """
    found = _LAST.search(system)
    if not found:
        return []
    count, key = int(found.group(1)), found.group(2)
    position = system.rfind(f"<<<response 1 of {count}, key {key}>>>\n")
    out = []
    for i in range(1, count + 1):
        begin, end = f"<<<response {i} of {count}, key {key}>>>\n", f"\n<<<end of response {i}, key {key}>>>"
        start = system.find(begin, position) if position >= 0 else -1
        stop = system.find(end, start + len(begin) - 1) if start >= 0 else -1
        if start < 0 or stop < 0:
            return []
        out.append(system[start + len(begin):stop])
        position = stop + len(end)
    return out


def reply(model: str, messages: list[dict], temperature: float, sample: object) -> str:
    """The reply of ``model`` to a chat; ``sample`` identifies the random draw (effective seed, or a salt)."""
    if model == "echo":
        return echo(messages)
    system = messages[0]["content"] if messages and messages[0].get("role") == "system" else ""
    references = references_in(system)
    users = [m["content"] for m in messages if m.get("role") == "user"]
    question = users[-1] if users else ""
    task = find_task(question)
    if task is None:
        return generic(model, question, sample, references)
    if references:
        answer, votes = aggregate(model, task, references, sample)
        return write(model, task, answer, sample, votes)
    return write(model, task, answer_alone(model, task, temperature, sample), sample)
