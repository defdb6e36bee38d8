#!/usr/bin/env python3
"""selfmoa_eval: does Self-MoA help on *your* models and *your* data? The paper's experiments, on any server.

This module runs the protocol of *Rethinking Mixture-of-Agents* (Li et al., 2025, arXiv 2502.00674) against
OpenAI-compatible servers: each candidate model answers each question ``n`` times at temperature 0.7, once;
every proposer composition (the paper's Table 3: ``iiiiii``, ``iimmdd``, ... over models ``i``, ``m``,
``d``), every Self-MoA and every Self-MoA-Seq run is aggregated from that one pool of samples, by the methods
of ``selfmoa`` given the samples; each answer is graded; and the report relates accuracy to the quality and
the diversity of the proposals (the paper's Table 4 fit). It is ``selfmoa eval`` and ``python3 -m
selfmoa_eval``; it needs the Python standard library, ``selfmoa.py`` and ``selfmoa_batch.py`` beside it
(matplotlib draws the figures, and math-verify grades ``math`` items, where installed). ``spec/eval.md``
specifies the dataset, the pool, the graders and the report.

Public API
----------
==========================  ===================================================================
``read_dataset``            read and check a JSONL dataset: ``prompt`` or ``messages``, ``answer``
``questions_from``          the same for records given as Python objects
``Question``                one dataset item: id, messages, reference answer, grader
``grade``                   grade one response: ``(extracted answer, correct)``
``GRADERS``                 the graders by name: choice, number, exact, crux, math
``Experiment``              what to run: the models, compositions, aggregator, ``n``, the Seq sweep
``evaluate``                run an experiment (resumable), grade it, write the report
``plan``                    the calls an experiment still needs, with token and cost estimates
``fit_quality_diversity``   the Table 4 fit: accuracy = a * quality + b * diversity + c
``main``                    the command line (``selfmoa eval --help``)
``EVAL_FORMAT``             the version of ``results.json`` (1)
==========================  ===================================================================

>>> grade("So the total is 1,234.", "1234", "number")
('1,234', True)
>>> grade("Both (A) and (C) look close; the answer is (C).", "C", "choice")
('C', True)
>>> grade("[ANSWER]f([1, 2]) == [2, 4][/ANSWER]", "[2,4]", "crux")
('[2, 4]', True)

On the command line::

    selfmoa eval data.jsonl --base-url http://localhost:8000/v1 -M i=Qwen/Qwen2-7B-Instruct \\
        -M m=Qwen/Qwen2-Math-7B-Instruct -M d=deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct --out results/
    selfmoa eval data.jsonl -M i=qwen --seq 6,12,24 --out results/ --dry-run    # calls, tokens, cost

Licence: MIT. Copyright (c) 2026 the selfmoa authors.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import fractions
import functools
import hashlib
import json
import math
import os
import re
import string
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import selfmoa
import selfmoa_batch
from selfmoa import ConfigError, Message, Reply, Request, SelfMoAError, _check

__all__ = ["EVAL_FORMAT", "Experiment", "GRADERS", "Question", "evaluate", "fit_quality_diversity", "grade", "main",
           "plan", "questions_from", "read_dataset"]

EVAL_FORMAT = 1  # the version of results.json
POOL_FILE, REPORT_FILE, RESULTS_FILE = "pool.jsonl", "report.md", "results.json"
REPORT_TITLE = "# selfmoa eval report"  # the first line of every report.md this module writes


# ======================================================================================================
# Grading: the final answer of a response, compared with the reference answer
# ======================================================================================================
#
# Every grader takes any text and returns (the answer it extracted, or None; whether it is right). None of
# them raises, whatever the text (tests/test_eval.py tries hostile ones). The rules are spec/eval.md section 3.

_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_MAX_CHARS = 100_000  # a response longer than this is graded on its last 100,000 characters


def _tail(text: str) -> str:
    return text[-_MAX_CHARS:] if isinstance(text, str) else ""


def _boxed(text: str) -> str | None:
    r"""The contents of the last ``\boxed{...}`` (or ``\fbox{...}``), braces balanced; None without one.

    >>> _boxed(r"so \boxed{\frac{1}{2}} and done")
    '\\frac{1}{2}'
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth, begin = 1, position
    while position < len(text):
        char = text[position]
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return text[begin:position]
        position += 1
    return None


def _after_answer_is(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of that line; None without one."""
    matches = list(_ANSWER_IS.finditer(text))
    found = matches[-1] if matches else None
    if found is None:
        return None
    return text[found.end():].split("\n", 1)[0]


def _strip_markup(text: str) -> str:
    return text.replace("**", "").replace("__", "").replace("`", "").replace("$", "").strip()


# --- multiple choice ----------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJ"
_CHOICE_STARTS = re.compile(r"\s*(?i:option\s+|choice\s+)?(?:\(([A-Ja-j])\)|\[([A-Ja-j])\]|([A-J])(?![\w'])|"
                            r"([a-j])(?=\s*[).:]|\s*$))")
_PARENTHESISED = re.compile(r"\(([A-J])\)")
_LINE_LETTER = re.compile(r"^\s*([A-J])[).:](?:\s|$)", re.MULTILINE)


def _choice_at(text: str) -> str | None:
    found = _CHOICE_STARTS.match(_strip_markup(text).lstrip("*:# \t"))
    if not found:
        return None
    letter = next(group for group in found.groups() if group)
    # "option a" / "answer is a" alone is ambiguous with the article; only a letter in brackets, or followed by
    # ")", "." or ":" or the end, counts in lower case (the regular expression requires it).
    return letter.upper()


def extract_choice(response: str) -> str | None:
    """The option letter (A to J) a response chose.

    Rules, first that applies: the last ``\\boxed{X}``; the letter after the last "answer is" / "answer:";
    a response that is only a letter (``B``, ``(B)``, ``B)``, ``B.``); the last ``(X)``; the last line that
    starts with ``X)`` or ``X.``.

    >>> [extract_choice(t) for t in ["B", "(b)", "B) Paris", "The answer is C.", "I'd say (D) because (A) is wrong"]]
    ['B', 'B', 'B', 'C', 'A']
    """
    text = _tail(response)
    boxed = _boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed)
        letter = _choice_at(inner)
        if letter:
            return letter
    after = _after_answer_is(text)
    if after is not None:
        letter = _choice_at(after)
        if letter:
            return letter
    whole = _strip_markup(text).rstrip(".")
    if re.fullmatch(r"\(?[A-Ja-j]\)?", whole):
        return whole.strip("()").upper()
    letter = _choice_at(text) if re.match(r"\s*\(?[A-J][).:]", text) else None
    if letter:
        return letter
    found = _PARENTHESISED.findall(text)
    if found:
        return found[-1]
    found = _LINE_LETTER.findall(text)
    return found[-1] if found else None


def _reference_choice(answer: str) -> str | None:
    letter = answer.strip().strip("().").upper()
    return letter if len(letter) == 1 and letter in _LETTERS else None


def grade_choice(response: str, answer: str) -> tuple[str | None, bool]:
    """Multiple choice: the extracted letter equals the reference letter (``"B"``, ``"(B)"``)."""
    letter = extract_choice(response)
    return letter, letter is not None and letter == _reference_choice(answer)


# --- a final number -----------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?![\d,]*\.\d)|[-+\u2212]?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([-+]?[\d.,]+)\s*\}")
_MAX_DIGITS = 400  # a longer number is not read (no answer), so a hostile one costs nothing


def parse_number(text: str) -> fractions.Fraction | None:
    r"""The value of a number as written: ``1,234``, ``-3.50``, ``+7``, ``3/4``, ``\frac{3}{4}``; None if it is not one.

    >>> parse_number("1,234"), parse_number(r"\frac{-3}{4}"), parse_number("2.50"), parse_number("1,23")
    (Fraction(1234, 1), Fraction(-3, 4), Fraction(5, 2), None)
    """
    text = _FRAC.sub(r"\1/\2", text.strip().replace("\u2212", "-").replace("$", "").rstrip("%").strip())
    if len(text) > _MAX_DIGITS or not re.fullmatch(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
                                                  r"(?:\s*/\s*\d+)?", text):
        return None
    numerator, _, denominator = text.replace(",", "").replace(" ", "").partition("/")
    try:
        value = fractions.Fraction(numerator)
        return value / fractions.Fraction(denominator) if denominator else value
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_in(text: str) -> list[str]:
    return [found.group().replace(" ", "") for found in _NUMBER.finditer(_FRAC.sub(r"\1/\2", text))]


def extract_number(response: str) -> str | None:
    r"""The final number of a response, as written.

    Rules, first that applies: the last number in the last ``\boxed{...}``; the first number after the last
    "answer is" / "answer:"; the last number in the text. A number may have thousands commas, a sign, a
    decimal part, or be a fraction ``a/b`` or ``\frac{a}{b}``.

    >>> [extract_number(t) for t in ["The answer is 1,234.", r"so \boxed{\frac{3}{4}}", "x = -2.5, then 7"]]
    ['1,234', '3/4', '7']
    """
    text = _tail(response)
    boxed = _boxed(text)
    if boxed is not None:
        found = _numbers_in(boxed)
        if found:
            return found[-1]
    after = _after_answer_is(text)
    if after is not None:
        found = _numbers_in(after)
        if found:
            return found[0]
    found = _numbers_in(text)
    return found[-1] if found else None


def grade_number(response: str, answer: str) -> tuple[str | None, bool]:
    """A final number: equal in value to the reference (``1,234`` = ``1234`` = ``1234.0``; ``0.5`` = ``1/2``)."""
    extracted = extract_number(response)
    expected = parse_number(answer)
    if expected is None:  # a reference that is no number: compared as text
        return grade_exact(response, answer)
    value = parse_number(extracted) if extracted is not None else None
    return extracted, value is not None and value == expected


# --- exact match after normalisation --------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans({char: " " for char in string.punctuation})


def normalise(text: str) -> str:
    """Text for exact match: Unicode NFKC, case folded, punctuation and the articles a, an, the dropped,
    whitespace collapsed.

    >>> normalise("  The Eiffel-Tower. ")
    'eiffel tower'
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_exact(response: str) -> str:
    r"""The final answer of a free-form response: the last ``\boxed{...}``, else what follows the last
    "answer is" / "answer:" on its line, else the whole response."""
    text = _tail(response)
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    after = _after_answer_is(text)
    return _strip_markup(after) if after is not None and after.strip() else text.strip()


def grade_exact(response: str, answer: str) -> tuple[str | None, bool]:
    """Exact match of ``normalise``-d texts: the extracted final answer against the reference."""
    extracted = extract_exact(response)
    return extracted, normalise(extracted) == normalise(answer) and normalise(answer) != ""


# --- CRUX-style output equality -------------------------------------------------------------------------

_CRUX_TAGS = re.compile(r"\[ANSWER\](.*?)\[/ANSWER\]", re.DOTALL)
_FENCE = re.compile(r"```[\w+-]*\n(.*?)```", re.DOTALL)
_MAX_LITERAL = 10_000  # characters of a literal that are parsed at most


def _literal(text: str) -> tuple[bool, Any]:
    """(True, value) if ``text`` is a Python literal (also with a final full stop), else (False, None)."""
    text = text.strip()
    for candidate in (text, text[:-1].rstrip() if text.endswith(".") else None):
        if not candidate or len(candidate) > _MAX_LITERAL:
            continue
        try:
            return True, ast.literal_eval(candidate)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError):
            continue
    return False, None


def extract_output(response: str) -> str | None:
    """What a response says a program outputs (CRUXEval's output prediction).

    Rules, first that applies: the last ``[ANSWER] ... [/ANSWER]`` (CRUXEval's format), and in it the right
    side of ``assert f(...) == X`` or ``f(...) == X``; the right side of the last ``assert ... == X``; what
    follows the last "answer is" / "output is" / "answer:" on its line; the last fenced code block; the last
    non-empty line.

    >>> extract_output("[ANSWER]assert f('ab') == 'ba'[/ANSWER]"), extract_output("The output is [3, 1].")
    ("'ba'", '[3, 1].')
    """
    text = _tail(response)

    def right_side(part: str) -> str:
        found = re.search(r"==\s*(.*)\Z", part.strip(), re.DOTALL)
        return found.group(1).strip() if found and re.match(r"\s*(?:assert\s+)?\w+\s*\(", part) else part.strip()

    tags = _CRUX_TAGS.findall(text)
    if tags:
        return right_side(tags[-1])
    asserts = re.findall(r"^\s*assert\s+[^\n]*?==\s*([^\n]+)$", text, re.MULTILINE)
    if asserts:
        return asserts[-1].strip()
    matches = list(re.finditer(r"(?:answer|output)\s*(?:is|:)\s*:?", text, re.IGNORECASE))
    found = matches[-1] if matches else None
    if found is not None:
        rest = _strip_markup(text[found.end():].split("\n", 1)[0])
        if rest:
            return rest
    fences = _FENCE.findall(text)
    if fences and fences[-1].strip():
        return fences[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def grade_crux(response: str, answer: str) -> tuple[str | None, bool]:
    """CRUX-style output equality: both sides read as Python literals (``ast.literal_eval``, never run) and
    equal as values (``[1, 2]`` = ``[1,2]``; ``'a'`` = ``"a"``); text that is no literal compares as text."""
    extracted = extract_output(response)
    if extracted is None:
        return None, False
    ok_expected, expected = _literal(answer)
    ok_given, given = _literal(extracted)
    if ok_expected and ok_given:
        try:
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (given, expected))
            same = (type(given) is type(expected) or numbers) and bool(given == expected)
        except (RecursionError, MemoryError, ValueError, TypeError):
            same = False
        return extracted, same
    return extracted, " ".join(extracted.rstrip(".").split()) == " ".join(answer.split())


# --- math, with the optional math-verify --------------------------------------------------------------

MATH_VERIFY_HINT = "the math grader needs the optional package math-verify: pip install math-verify"


def _math_verify() -> Any:
    """The math_verify module; ConfigError naming the package when it is not installed."""
    try:
        import math_verify  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise ConfigError(MATH_VERIFY_HINT) from None
    return math_verify


def grade_math(response: str, answer: str) -> tuple[str | None, bool]:
    """Mathematical equivalence by math-verify (``parse`` then ``verify``), where installed; a response it
    cannot parse is wrong."""
    verifier = _math_verify()
    try:
        gold, given = verifier.parse(answer), verifier.parse(_tail(response))
        return (str(given[-1]) if given else None), bool(verifier.verify(gold, given))
    except Exception:  # noqa: BLE001 (math-verify parses arbitrary LaTeX; any failure is "not verified")
        return None, False


GRADERS: dict[str, Callable[[str, str], tuple[str | None, bool]]] = {
    "choice": grade_choice, "number": grade_number, "exact": grade_exact, "crux": grade_crux, "math": grade_math}


def infer_grader(answer: str) -> str:
    """The grader ``auto`` picks for a reference answer: ``choice`` for a letter, ``number`` for a number,
    else ``exact``.

    >>> infer_grader("(B)"), infer_grader("-1,234.5"), infer_grader("Paris")
    ('choice', 'number', 'exact')
    """
    if _reference_choice(answer) is not None and len(answer.strip()) <= 3:
        return "choice"
    return "number" if parse_number(answer) is not None else "exact"


def grade(response: str, answer: str, grader: str = "auto") -> tuple[str | None, bool]:
    """Grade one response against the reference answer: ``(the answer extracted from it, whether it is right)``."""
    grader = infer_grader(answer) if grader == "auto" else grader
    _check(grader in GRADERS, "grader", grader, "unknown grader", f"pass one of auto, {', '.join(GRADERS)}")
    return GRADERS[grader](response if isinstance(response, str) else "", answer)


# ======================================================================================================
# The dataset
# ======================================================================================================


@dataclasses.dataclass(frozen=True)
class Question:
    """One dataset item: its id, its chat messages, the reference answer and the grader that checks it."""

    id: str | int
    messages: list[Message]
    answer: str
    grader: str


def questions_from(records: Sequence[Any], grader: str = "auto", source: str = "dataset") -> list[Question]:
    """Questions from dataset records (dicts): each needs ``prompt`` or ``messages`` and ``answer``."""
    return _questions(selfmoa_batch.check_items(list(records), source), grader, source)


def read_dataset(path: str, grader: str = "auto") -> list[Question]:
    """Read a JSONL dataset (or a JSON list): one object per item with ``prompt`` (or ``messages``), ``answer``
    (a string or a number), optionally ``id`` and ``grader``. Every bad line is reported at once, by number.
    ``grader`` applies to items without one of their own."""
    return _questions(selfmoa_batch.read_items(path), grader, path)


def _questions(items: Sequence[selfmoa_batch.Item], grader: str, source: str) -> list[Question]:
    _check(grader == "auto" or grader in GRADERS, "grader", grader, "unknown grader",
           f"pass one of auto, {', '.join(GRADERS)}")
    questions, problems = [], []
    for position, item in enumerate(items, 1):
        answer, own = item.record.get("answer"), item.record.get("grader", grader)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            problems.append(f"  item {position} (id {item.id!r}): 'answer' must be a non-empty string or a number")
            continue
        if own != "auto" and own not in GRADERS:
            problems.append(f"  item {position} (id {item.id!r}): 'grader' {own!r} is unknown; use one of auto, "
                            f"{', '.join(GRADERS)}")
            continue
        questions.append(Question(item.id, item.messages, answer, infer_grader(answer) if own == "auto" else own))
    if problems:
        raise ConfigError(f"{source}: {len(problems)} bad item(s); fix them and run again:\n" + "\n".join(problems))
    if any(question.grader == "math" for question in questions):
        _math_verify()  # before any call
    return questions


def _dataset_hash(questions: Sequence[Question]) -> str:
    canonical = json.dumps([[q.id, q.messages, q.answer, q.grader] for q in questions], sort_keys=True,
                           ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# ======================================================================================================
# The experiment: models, compositions, and the cells of the report
# ======================================================================================================

# The paper's Table 3 mixes over its three models i, m, d (Qwen2-7B-Instruct, Qwen2-Math-7B-Instruct,
# DeepSeek-Coder-V2-Lite-Instruct), written over the first, second and third model given.
PAPER_MIXES = ("iimmdd", "mmmddd", "iiiimd", "iiiddd")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What to run. ``models`` maps a letter to a model name (``{"i": "Qwen/Qwen2-7B-Instruct", ...}``);
    ``compositions`` are strings over those letters, one letter per proposer (None: each model's Self-MoA,
    plus the paper's mixes when there are three models and ``n`` is 6); ``aggregator`` is a letter or a
    model name (None: the first model); ``seq`` the sample counts of the Self-MoA-Seq sweep, of
    ``seq_model`` (a letter, ``"best"`` for the model with the best single samples, or None: the first)."""

    models: Mapping[str, str]
    compositions: Sequence[str] | None = None
    aggregator: str | None = None
    n: int = 6
    seq: Sequence[int] = ()
    seq_model: str | None = None
    window: int = 6
    carry: int = 3
    seed: int | None = None
    proposing: selfmoa.Sampling | Mapping[str, Any] | None = None  # the samples' requests (a Sampling)
    aggregating: selfmoa.Sampling | Mapping[str, Any] | None = None  # the aggregations'
    instruction: str | None = None
    layout: str = "keyed"

    def checked(self) -> Experiment:
        """This experiment with its defaults filled in; ConfigError naming what is wrong."""
        models = dict(self.models)
        _check(isinstance(self.models, Mapping) and len(models) > 0, "models", self.models,
               "an evaluation needs at least one model", 'pass e.g. {"i": "Qwen/Qwen2-7B-Instruct"} (-M i=MODEL)')
        for letter, model in models.items():
            _check(isinstance(letter, str) and len(letter) == 1 and letter.isalnum(), "models", letter,
                   "each model is named by one letter or digit", "write -M i=MODEL")
            selfmoa._check_model(f"models[{letter!r}]", model)
        _check(selfmoa._is_int(self.n) and self.n >= 1, "n", self.n, "each model is sampled n times per question",
               "pass n >= 1 (the paper uses 6)")
        letters = list(models)
        compositions = list(self.compositions) if self.compositions is not None else \
            [letter * self.n for letter in letters] + (
                [mix.translate(str.maketrans("imd", "".join(letters))) for mix in PAPER_MIXES]
                if len(letters) == 3 and self.n == 6 else [])
        compositions = list(dict.fromkeys(compositions))
        for composition in compositions:
            _check(isinstance(composition, str) and composition != "" and set(composition) <= set(letters),
                   "compositions", composition, f"a composition is a string of the model letters {''.join(letters)}",
                   "pass e.g. iimmdd (two samples of each of i, m, d)")
        aggregator = letters[0] if self.aggregator is None else self.aggregator
        _check(isinstance(aggregator, str) and aggregator.strip() != "", "aggregator", aggregator,
               "it is a model letter or a model name", "pass a letter given with -M, or a model name")
        seq = sorted(set(self.seq))
        for count in seq:
            _check(selfmoa._is_int(count) and count >= 1, "seq", count, "a Seq run aggregates n >= 1 samples",
                   "pass sample counts such as 6,12,24")
        selfmoa._check_window(self.window, self.carry)
        seq_model = letters[0] if self.seq_model is None else self.seq_model
        _check(seq_model == "best" or seq_model in models, "seq_model", seq_model,
               "it is the letter of the model whose samples the Seq sweep aggregates", "pass a letter, or best")
        settings = selfmoa._settings(complete=print, proposing=self.proposing, aggregating=self.aggregating,
                                     seed=self.seed, concurrency=1, instruction=self.instruction, use_n=True,
                                     stream=None, layout=self.layout)
        temperature = settings.proposing.temperature
        _check(temperature is None or temperature > 0, "temperature", temperature,
               "the samples' diversity comes from sampling; at 0 every sample is the same",
               "pass a temperature above 0 (the paper samples at 0.7)")
        return dataclasses.replace(self, models=models, compositions=compositions, aggregator=aggregator,
                                   seq=seq, seq_model=seq_model, proposing=settings.proposing,
                                   aggregating=settings.aggregating)

    @property
    def sampling(self) -> tuple[selfmoa.Sampling, selfmoa.Sampling]:
        """The proposers' and the aggregator's request settings (of a checked experiment)."""
        assert isinstance(self.proposing, selfmoa.Sampling) and isinstance(self.aggregating, selfmoa.Sampling)
        return self.proposing, self.aggregating

    @property
    def aggregator_model(self) -> str:
        assert self.aggregator is not None
        return self.models.get(self.aggregator, self.aggregator)

    def needs(self, best: str | None = None) -> dict[str, int]:
        """How many samples of each model letter the experiment uses (``best``: the letter ``"best"`` means)."""
        counts = {letter: self.n for letter in self.models}
        for composition in self.compositions or ():
            for letter in set(composition):
                counts[letter] = max(counts[letter], composition.count(letter))
        seq_letter = best if self.seq_model == "best" else self.seq_model
        if self.seq and seq_letter is not None:
            counts[seq_letter] = max(counts[seq_letter], max(self.seq))
        return counts


@dataclasses.dataclass(frozen=True)
class _Aggregation:
    """One aggregation cell of one question: a composition's MoA, or a one-shot or Seq run over n samples."""

    cell: str  # "composition iimmdd", "one-shot 12", "seq 12"
    method: str  # "moa", "self-moa" or "self-moa-seq"
    picks: tuple[tuple[str, int], ...]  # (letter, sample number) of each proposal, in order
    aggregator: str  # the aggregator's model name


def _cells(experiment: Experiment, seq_letter: str | None) -> list[_Aggregation]:
    cells = []
    for composition in experiment.compositions or ():
        seen: dict[str, int] = {}
        picks = []
        for letter in composition:  # the k-th occurrence of a letter takes that model's sample k
            picks.append((letter, seen.get(letter, 0)))
            seen[letter] = seen.get(letter, 0) + 1
        method = "self-moa" if len(set(composition)) == 1 else "moa"
        cells.append(_Aggregation(f"composition {composition}", method, tuple(picks), experiment.aggregator_model))
    if seq_letter is not None:  # Self-MoA proper: the model aggregates its own samples
        model = experiment.models[seq_letter]
        for count in experiment.seq:
            drawn = tuple((seq_letter, k) for k in range(count))
            cells.append(_Aggregation(f"one-shot {count}", "self-moa", drawn, model))
            cells.append(_Aggregation(f"seq {count}", "self-moa-seq", drawn, model))
    return cells


# ======================================================================================================
# The store: one resumable file of samples and aggregations, in batch's line format
# ======================================================================================================
#
# pool.jsonl holds one line per sample and one per aggregation, appended as each finishes, in the versioned
# line format of selfmoa_batch (spec/batch.md), so it has the same guarantees: one writer at a time (the
# lock), a torn last line cut off, a file that is not ours never touched, and a line used again only when
# its fingerprint (what produced it) matches. A killed run, rerun, asks only for what has no line.


def _key(*parts: Any) -> str:
    return json.dumps(parts, ensure_ascii=False)


def _hash(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class _Store:
    """pool.jsonl of one evaluation (one experiment): its records by key, and its appending writer."""

    def __init__(self, path: str, experiment: Experiment):
        self.path, self.experiment = path, experiment
        self.lock = threading.Lock()
        self.records: dict[str, dict] = {}
        self.descriptor: int | None = None
        self._sample_ids: dict[tuple[type, str | int, str, int], tuple[str, str]] = {}
        self._cells: dict[tuple[type, str | int, str], tuple[list[tuple[str, str]], str | None]] = {}

    def open(self) -> None:
        descriptor, _ = selfmoa_batch._open_output(self.path)
        try:
            data = selfmoa_batch._read_descriptor(descriptor)
            records, keep = selfmoa_batch._parse_output(data, self.path)
            if keep < len(data):
                os.ftruncate(descriptor, keep)  # a torn last line from a killed run: its work is done again
            elif data and not data.endswith(b"\n"):
                selfmoa_batch._write_all(descriptor, b"\n")
        except BaseException:
            os.close(descriptor)
            raise
        self.descriptor = descriptor
        for record, _ in records:
            if record["status"] == "ok" or self.records.get(record["id"], {}).get("status") != "ok":
                self.records[record["id"]] = record

    def done(self, key: str, fingerprint: str) -> dict | None:
        record = self.records.get(key)
        return record if record and record["status"] == "ok" and record["fingerprint"] == fingerprint else None

    def sample_id(self, question: Question, model: str, number: int) -> tuple[str, str]:
        """The key and fingerprint of a sample's line, computed once per sample: the cells and the grading
        look each sample up many times."""
        memo = (type(question.id), question.id, model, number)
        found = self._sample_ids.get(memo)
        if found is None:
            found = self._sample_ids[memo] = (_key("sample", question.id, model, number),
                                              _sample_fingerprint(question, model, number, self.experiment))
        return found

    def sample(self, question: Question, model: str, number: int) -> dict | None:
        """The line of a sample drawn with this experiment's settings, if it holds one that is ok."""
        return self.done(*self.sample_id(question, model, number))

    def proposals(self, question: Question, cell: _Aggregation) -> tuple[list[tuple[str, str]], str | None]:
        """A cell's proposals on a question, (model, text) of each pick whose sample is held, and the fingerprint
        of their aggregation (None without proposals). Computed once, when the samples are all drawn: running
        the aggregations and grading them both ask."""
        memo = (type(question.id), question.id, cell.cell)
        found = self._cells.get(memo)
        if found is None:
            proposals = [(model, text) for model, text in _sample_texts(self, question, self.experiment, cell.picks)
                         if text is not None]
            fingerprint = _aggregation_fingerprint(question, cell, proposals, self.experiment) if proposals else None
            found = self._cells[memo] = (proposals, fingerprint)
        return found

    def write(self, *records: dict) -> None:
        """Append the lines in one write: a killed run seldom keeps only some of one request's samples (which
        would make the rerun ask for the rest in a request of its own, whose prompt tokens count again)."""
        data = b"".join(selfmoa_batch._dump_line(record) for record in records)
        with self.lock:
            assert self.descriptor is not None
            selfmoa_batch._write_all(self.descriptor, data)
            for record in records:
                self.records[record["id"]] = record

    def close(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None


def _line(key: str, *, method: str, fingerprint: str, answer: str | None, error: str | None, about: dict,
          calls: int, usage: dict) -> dict:
    record: dict[str, Any] = {"selfmoa_batch": selfmoa_batch.BATCH_FORMAT, "id": key,
                              "status": "ok" if error is None else "error"}
    record["answer" if error is None else "error"] = answer if error is None else error
    record.update({"method": method, "fingerprint": fingerprint, "calls": calls, "usage": usage, "input": about})
    return record


# ======================================================================================================
# Running: the pool of samples, then the aggregations
# ======================================================================================================


class _Counter:
    """Calls and tokens spent in this process, and progress on stderr."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.progress, self.lock = progress, threading.Lock()
        self.calls = self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.started = time.monotonic()
        self.shown = 0.0
        self.models: dict[str, set[str]] = {}

    def add(self, calls: int, prompt: int | None, completion: int | None) -> None:
        with self.lock:
            self.calls += calls
            self.requests += 1
            self.prompt_tokens += prompt or 0
            self.completion_tokens += completion or 0

    def reported(self, model: str, reported: str | None) -> None:
        if reported:
            with self.lock:
                self.models.setdefault(model, set()).add(reported)

    def show(self, phase: str, done: int, total: int, items: tuple[int, int], force: bool = False) -> None:
        """A progress line (at most one every 2 s unless ``force``): the phase's work and items done, calls,
        tokens, time so far and an estimate of the time left."""
        now = time.monotonic()
        if self.progress is None or (not force and now - self.shown < 2.0):
            return
        self.shown = now
        elapsed = now - self.started
        eta = f", about {elapsed / done * (total - done):.0f} s left" if 0 < done < total else ""
        self.progress(f"{phase}: {done}/{total}, items {items[0]}/{items[1]} done; {self.calls} calls, "
                      f"{self.prompt_tokens + self.completion_tokens} tokens, {elapsed:.0f} s{eta}")


def _items_left(positions: Iterable[int], count: int) -> tuple[dict[int, int], Callable[[], tuple[int, int]]]:
    """Per question position, the pieces of work still to do; and a function giving (items done, items)."""
    left: dict[int, int] = {}
    for position in positions:
        left[position] = left.get(position, 0) + 1
    return left, lambda: (count - sum(1 for value in left.values() if value > 0), count)


class _PoolRun(selfmoa._Run):
    """A run that only draws samples, and reports each request as it finishes."""

    on_call: Callable[[selfmoa.Call], None]

    def _record(self, call: selfmoa.Call, started: float) -> None:
        super()._record(call, started)
        self.on_call(call)


def _sample_fingerprint(question: Question, model: str, number: int, experiment: Experiment) -> str:
    seed = None if experiment.seed is None else experiment.seed + number
    proposing = experiment.sampling[0]
    return _hash({"messages": question.messages, "model": model, "temperature": proposing.sent_temperature(model),
                  "max_tokens": proposing.max_tokens, "fields": proposing.request_fields(model), "seed": seed})


def _samples(store: _Store, questions: Sequence[Question], experiment: Experiment, needs: Mapping[str, int], *,
             complete: Callable[[Request], Any], concurrency: int, counter: _Counter, use_n: bool = True) -> None:
    """Draw every sample the experiment needs that the store does not hold: sample k of a model with seed S + k,
    consecutive missing samples in one request with n (at most MAX_N), each written as its request finishes."""
    settings = selfmoa._settings(complete=complete, proposing=experiment.proposing, aggregating=None,
                                 seed=experiment.seed, concurrency=concurrency, instruction=None, use_n=use_n,
                                 stream=None)
    jobs = []
    for position, question in enumerate(questions):
        for letter, count in needs.items():
            model = experiment.models[letter]
            missing = [k for k in range(count) if not store.sample(question, model, k)]
            for _, run_of in _runs(missing):
                jobs.append((position, question, model, run_of))
    total, done = sum(len(run_of) for *_, run_of in jobs), [0]
    if not jobs:
        return
    left, items = _items_left((position for position, *_, run_of in jobs for _ in run_of), len(questions))
    run = _PoolRun(settings, method="sample", params={})

    def on_call(call: selfmoa.Call) -> None:
        question, model = lookup[(call.model, call.layer)]
        position = call.layer - 1
        outputs = call.outputs or [None] * len(call.indices)
        counter.add(sum(text is not None for text in outputs), call.prompt_tokens, call.completion_tokens)
        share = _shares(call.completion_tokens, len(call.indices))
        lines = []
        for place, (number, text) in enumerate(zip(call.indices, outputs + [None] * len(call.indices))):
            if text is None and call.error is None:
                continue  # the server gave no text here: asked for again on its own
            usage = {"prompt_tokens": (call.prompt_tokens or 0) if place == 0 else 0, "completion_tokens": share[place]}
            key, fingerprint = store.sample_id(question, model, number)
            lines.append(_line(key, method="sample", fingerprint=fingerprint, answer=text,
                               error=call.error, about={"item": question.id, "model": model, "sample": number,
                                                        "reported": sorted(counter.models.get(model, ()))},
                               calls=int(text is not None), usage=usage))
        store.write(*lines)
        with counter.lock:
            done[0] += len(lines)
            left[position] -= len(lines)
        counter.show("samples", done[0], total, items())

    # Requests are told apart by (model, layer): each question's samples run as "layer" = its position + 1.
    lookup = {(experiment.models[letter], position + 1): (question, experiment.models[letter])
              for position, question in enumerate(questions) for letter in needs}
    run.on_call = on_call
    with run:
        futures = []
        for position, question, model, run_of in jobs:
            futures += run.samples(model=model, messages=question.messages, first=run_of[0], count=len(run_of),
                                   layer=position + 1, references=[], remaining=2)
        for future in futures:
            with contextlib.suppress(concurrent.futures.CancelledError):
                future.result()
    counter.show("samples", done[0], total, items(), force=True)


def _runs(numbers: list[int]) -> list[tuple[int, list[int]]]:
    """Consecutive runs of sorted numbers: [0, 1, 2, 5, 6] -> [(0, [0, 1, 2]), (5, [5, 6])]."""
    runs: list[tuple[int, list[int]]] = []
    for number in numbers:
        if runs and runs[-1][1][-1] == number - 1:
            runs[-1][1].append(number)
        else:
            runs.append((number, [number]))
    return runs


def _shares(total: int | None, parts: int) -> list[int]:
    """``total`` tokens split over ``parts`` samples as evenly as whole numbers allow (the first get the rest)."""
    total = total or 0
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _sample_texts(store: _Store, question: Question, experiment: Experiment, picks: Iterable[tuple[str, int]]
                  ) -> list[tuple[str, str | None]]:
    """(model, text or None for a failed sample) of each pick."""
    out = []
    for letter, number in picks:
        model = experiment.models[letter]
        record = store.sample(question, model, number)
        out.append((model, record["answer"] if record is not None else None))
    return out


def _aggregation_fingerprint(question: Question, cell: _Aggregation, proposals: list[tuple[str, str]],
                             experiment: Experiment) -> str:
    return _hash({"messages": question.messages, "method": cell.method, "proposals": proposals,
                  "aggregator": cell.aggregator, "aggregating": experiment.sampling[1].params(),
                  "seed": experiment.seed,
                  "instruction": experiment.instruction, "layout": experiment.layout,
                  "window": experiment.window if cell.method == "self-moa-seq" else None,
                  "carry": experiment.carry if cell.method == "self-moa-seq" else None})


def _aggregate(question: Question, cell: _Aggregation, proposals: list[tuple[str, str]], experiment: Experiment,
               complete: Callable[[Request], Any]) -> selfmoa.Result:
    """One aggregation by the method itself, given the proposals (no sample is asked for)."""
    texts = [text for _, text in proposals]
    common: dict[str, Any] = {"complete": complete, "aggregator": cell.aggregator,
                              "aggregating": experiment.aggregating, "seed": experiment.seed,
                              "instruction": experiment.instruction, "layout": experiment.layout, "concurrency": 1}
    if cell.method == "self-moa-seq":
        return selfmoa.self_moa_seq(question.messages, proposals[0][0], samples=texts, window=experiment.window,
                                    carry=experiment.carry, **common)
    if cell.method == "self-moa" and len({model for model, _ in proposals}) == 1:
        return selfmoa.self_moa(question.messages, proposals[0][0], samples=texts, **common)
    return selfmoa.moa(question.messages, [model for model, _ in proposals], samples=texts, **common)


def _aggregations(store: _Store, questions: Sequence[Question], experiment: Experiment, cells: Sequence[_Aggregation],
                  *, complete: Callable[[Request], Any], concurrency: int, counter: _Counter) -> None:
    """Run every aggregation the store does not hold, each on the pool of samples; lines written as they finish.
    Identical aggregations (same proposals, same aggregator, same method) run once."""
    todo: dict[str, tuple[int, Question, _Aggregation, list[tuple[str, str]], str]] = {}
    for position, question in enumerate(questions):
        for cell in cells:
            proposals, fingerprint = store.proposals(question, cell)
            if fingerprint is None:
                continue  # every sample of it failed: reported as not answered
            key = _key("aggregation", question.id, fingerprint)
            if store.done(key, fingerprint) or key in todo:
                continue
            todo[key] = (position, question, cell, proposals, fingerprint)
    if not todo:
        return
    pool = selfmoa._Pool(concurrency)
    done = [0]
    left, items = _items_left((job[0] for job in todo.values()), len(questions))

    def solve(key: str, position: int, question: Question, cell: _Aggregation, proposals: list[tuple[str, str]],
              fingerprint: str) -> None:
        about = {"item": question.id, "cell": cell.cell, "method": cell.method}
        result: selfmoa.Result | None
        with selfmoa._on_shared_pool(pool, (position,)):
            try:
                result = _aggregate(question, cell, proposals, experiment, complete)
                answer, error = result.answer, None
            except SelfMoAError as exc:
                result, answer, error = exc.partial, None, str(exc)
        calls = result.calls if result is not None else 0
        usage = result.usage if result is not None else {}
        for call in result.trace if result is not None else []:
            counter.add(sum(text is not None for text in call.outputs), call.prompt_tokens, call.completion_tokens)
        store.write(_line(key, method=cell.method, fingerprint=fingerprint, answer=answer, error=error, about=about,
                          calls=calls, usage={"prompt_tokens": usage.get("prompt_tokens", 0),
                                              "completion_tokens": usage.get("completion_tokens", 0)}))
        with counter.lock:
            done[0] += 1
            left[position] -= 1
        counter.show("aggregations", done[0], len(todo), items())

    runners = concurrent.futures.ThreadPoolExecutor(max_workers=2 * concurrency, thread_name_prefix="eval")
    try:
        futures = [runners.submit(solve, key, *job) for key, job in todo.items()]
        for future in futures:
            future.result()
    finally:
        runners.shutdown(wait=True, cancel_futures=True)
        pool.shutdown()
    counter.show("aggregations", done[0], len(todo), items(), force=True)


# ======================================================================================================
# The numbers: accuracy with standard errors, quality, diversity, the Table 4 fit
# ======================================================================================================


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stderr(values: Sequence[float]) -> float | None:
    """The standard error of the mean: the sample standard deviation over sqrt(count); None below 2 values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def fit_quality_diversity(rows: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    """Least-squares fit of ``score = a * quality + b * diversity + c`` on standardised inputs (Table 4).

    ``rows`` are ``(quality, diversity, score)`` triples, one per composition. Quality and diversity are
    standardised (zero mean, unit variance) so that ``a`` and ``b`` compare: each is the change in score per
    standard deviation. Returns ``a``, ``b``, ``c``, their standard errors ``se_a``, ``se_b``, ``se_c``, ``r2``
    and ``n`` (the number of rows). ConfigError when the fit is not defined (fewer than 4 rows, a constant
    or collinear input).

    >>> fit = fit_quality_diversity([(q, d, 2 * q + d) for q, d in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1)]])
    >>> round(fit["a"] / fit["b"], 6) > 1, round(fit["r2"], 6)
    (True, 1.0)
    """
    _check(len(rows) >= 4, "rows", len(rows), "a fit of 3 coefficients needs at least 4 compositions",
           "evaluate more compositions (--compositions)")

    def standardised(values: list[float]) -> list[float]:
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        _check(spread > 1e-12, "rows", "a constant column", "quality and diversity must vary across compositions",
               "evaluate compositions that differ")
        return [(v - mean) / spread for v in values]

    quality = standardised([float(r[0]) for r in rows])
    diversity = standardised([float(r[1]) for r in rows])
    scores = [float(r[2]) for r in rows]
    design = [[q, d, 1.0] for q, d in zip(quality, diversity)]
    gram = [[sum(x[i] * x[j] for x in design) for j in range(3)] for i in range(3)]
    inverse = _invert3(gram)
    moments = [sum(x[i] * y for x, y in zip(design, scores)) for i in range(3)]
    a, b, c = (sum(inverse[i][j] * moments[j] for j in range(3)) for i in range(3))
    residuals = [y - (a * x[0] + b * x[1] + c) for x, y in zip(design, scores)]
    mean = sum(scores) / len(scores)
    total = sum((y - mean) ** 2 for y in scores)
    error = sum(r * r for r in residuals)
    sigma2 = error / max(1, len(rows) - 3)
    return {"a": a, "b": b, "c": c, "se_a": math.sqrt(max(0.0, sigma2 * inverse[0][0])),
            "se_b": math.sqrt(max(0.0, sigma2 * inverse[1][1])), "se_c": math.sqrt(max(0.0, sigma2 * inverse[2][2])),
            "r2": 1 - error / total if total else 1.0, "n": len(rows)}


def _invert3(m: list[list[float]]) -> list[list[float]]:
    """The inverse of a 3 x 3 matrix by cofactors."""
    cof = [[m[(i + 1) % 3][(j + 1) % 3] * m[(i + 2) % 3][(j + 2) % 3]
            - m[(i + 1) % 3][(j + 2) % 3] * m[(i + 2) % 3][(j + 1) % 3] for j in range(3)] for i in range(3)]
    det = sum(m[0][j] * cof[0][j] for j in range(3))
    _check(abs(det) > 1e-9 * max(1.0, max(abs(v) for row in m for v in row)) ** 3, "rows", "collinear",
           "quality and diversity move together exactly", "evaluate compositions where they vary independently")
    return [[cof[j][i] / det for j in range(3)] for i in range(3)]


def _usage(record: dict | None) -> tuple[int, int]:
    usage = (record or {}).get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _results(questions: Sequence[Question], experiment: Experiment, store: _Store, cells: Sequence[_Aggregation],
             seq_letter: str | None) -> dict[str, Any]:
    """Grade everything and compute every number of the report (results.json, less the manifest)."""
    items: list[dict[str, Any]] = []
    per_cell: dict[str, list[dict]] = {cell.cell: [] for cell in cells}
    alone: dict[str, list[float]] = {letter: [] for letter in experiment.models}
    alone_cost: dict[str, list[int]] = {letter: [0, 0, 0] for letter in experiment.models}
    for question in questions:
        entry: dict[str, Any] = {"id": question.id, "answer": question.answer, "grader": question.grader,
                                 "samples": {}, "cells": {}}
        graded: dict[tuple[str, int], bool] = {}
        for letter, model in experiment.models.items():
            marks: list[dict[str, Any]] = []
            count = max([experiment.n] + [len(cell.picks) for cell in cells if cell.picks[0][0] == letter])
            for number in range(count):
                record = store.sample(question, model, number)
                if record is None:
                    continue
                extracted, correct = grade(record["answer"], question.answer, question.grader)
                graded[(letter, number)] = correct
                if number < experiment.n:
                    marks.append({"extracted": extracted, "correct": correct})
                    prompt, completion = _usage(record)
                    cost = alone_cost[letter]
                    cost[0], cost[1], cost[2] = cost[0] + 1, cost[1] + prompt, cost[2] + completion
            entry["samples"][letter] = marks
            if marks:
                alone[letter].append(sum(bool(mark["correct"]) for mark in marks) / len(marks))
        for cell in cells:
            proposals, fingerprint = store.proposals(question, cell)
            outcome: dict[str, Any] = {"extracted": None, "correct": None, "answered": False}
            if fingerprint is not None:
                record = store.done(_key("aggregation", question.id, fingerprint), fingerprint)
                right = [graded[pick] for pick in cell.picks if pick in graded]
                quality = sum(right) / len(right) if right else 0.0
                diversity = _vendi(tuple(text for _, text in proposals)) if cell.cell.startswith("composition") \
                    else None
                sample_tokens = [0, 0]
                for letter, number in cell.picks:
                    key, _ = store.sample_id(question, experiment.models[letter], number)
                    prompt, completion = _usage(store.records.get(key))
                    sample_tokens[0] += prompt
                    sample_tokens[1] += completion
                if record is not None:
                    extracted, correct = grade(record["answer"], question.answer, question.grader)
                    prompt, completion = _usage(record)
                    outcome = {"extracted": extracted, "correct": correct, "answered": True, "quality": quality,
                               "diversity": diversity, "calls": len(proposals) + int(record.get("calls") or 0),
                               "aggregation_calls": int(record.get("calls") or 0),
                               "prompt_tokens": sample_tokens[0] + prompt,
                               "completion_tokens": sample_tokens[1] + completion}
            entry["cells"][cell.cell] = outcome
            per_cell[cell.cell].append(outcome)
        items.append(entry)

    rows: list[dict[str, Any]] = []
    for letter, model in experiment.models.items():
        values = alone[letter]
        calls, prompt, completion = alone_cost[letter]
        rows.append({"kind": "alone", "method": "single sample", "model": letter, "name": model,
                     "n": experiment.n, "accuracy": _percent(_mean(values)), "stderr": _percent(_stderr(values)),
                     "items": len(values), "quality": _percent(_mean(values)), "diversity": None,
                     "calls": calls, "tokens": {"prompt": prompt, "completion": completion}})
    for cell in cells:
        outcomes = [o for o in per_cell[cell.cell] if o["answered"]]
        scores = [float(o["correct"]) for o in outcomes]
        kind, _, label = cell.cell.partition(" ")
        row: dict[str, Any] = {"kind": kind, "method": cell.method, "n": len(cell.picks),
                               "accuracy": _percent(_mean(scores)), "stderr": _percent(_stderr(scores)),
                               "items": len(outcomes), "unanswered": len(per_cell[cell.cell]) - len(outcomes),
                               "quality": _percent(_mean([o["quality"] for o in outcomes])),
                               "diversity": _mean([o["diversity"] for o in outcomes if o["diversity"] is not None]),
                               "calls": sum(o["calls"] for o in outcomes),
                               "aggregation_calls": sum(o["aggregation_calls"] for o in outcomes),
                               "tokens": {"prompt": sum(o["prompt_tokens"] for o in outcomes),
                                          "completion": sum(o["completion_tokens"] for o in outcomes)}}
        row.update({"composition": label} if kind == "composition" else {"model": seq_letter})
        rows.append(row)

    compositions = [row for row in rows if row["kind"] == "composition" and row["items"]]
    try:
        fit: dict[str, Any] = fit_quality_diversity([(row["quality"], row["diversity"], row["accuracy"])
                                                     for row in compositions])
    except ConfigError as exc:
        fit = {"error": str(exc).split(": ", 1)[-1], "n": len(compositions)}
    seq = []
    for count in experiment.seq if seq_letter is not None else ():
        one, chained = (next(row for row in rows if row["kind"] == kind and row["n"] == count)
                        for kind in ("one-shot", "seq"))
        seq.append({"n": count, "one-shot": one["accuracy"], "one-shot_stderr": one["stderr"],
                    "seq": chained["accuracy"], "seq_stderr": chained["stderr"],
                    "one-shot_calls_per_item": one["calls"] / one["items"] if one["items"] else None,
                    "seq_calls_per_item": chained["calls"] / chained["items"] if chained["items"] else None})
    return {"cells": rows, "fit": fit, "seq": seq, "items": items}


@functools.lru_cache(maxsize=4096)
def _vendi(texts: tuple[str, ...]) -> float:
    return selfmoa.vendi_score(texts)


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 6)


# ======================================================================================================
# The report: report.md, results.json, the figures
# ======================================================================================================


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
    """report.md: the Table 3 analogue, the Table 4 fit, Seq against one-shot, calls and tokens."""
    manifest = results["manifest"]
    models = manifest["models"]
    out = [REPORT_TITLE, ""]
    dataset = manifest["dataset"]
    out.append(f"Dataset {dataset['source']}: {dataset['items']} items (sha256 {dataset['sha256'][:16]}). "
               f"Aggregator: {manifest['aggregator']}. Samples per model: n = {manifest['n']} at temperature "
               f"{manifest['temperature']}; seed {manifest['seed']}; prompt layout {manifest['layout']}. "
               f"selfmoa {manifest['selfmoa_version']}, {manifest['date']}.")
    out.append("")
    out.append("| letter | model | reported by the server |\n|---|---|---|")
    for letter, about in models.items():
        out.append(f"| {letter} | {about['name']} | {', '.join(about['reported']) or '-'} |")
    out.append("\n## Accuracy of each composition (the paper's Table 3)\n")
    out.append("'alone' is the accuracy of single samples (the proposals' quality). Quality: the mean accuracy of "
               "a cell's proposals; diversity: their Vendi score (1 = all alike, n = all different). Standard errors "
               "over items. Calls and tokens: what the cell would cost on its own (its samples and its "
               "aggregations); the pool shares samples between cells.\n")
    out.append("| proposers | method | accuracy (%) | s.e. | quality (%) | diversity | items | calls | tokens |\n"
               "|---|---|---|---|---|---|---|---|---|")
    for row in results["cells"]:
        if row["kind"] not in ("alone", "composition"):
            continue
        label = f"{row['model']} alone" if row["kind"] == "alone" else row["composition"]
        tokens = row["tokens"]["prompt"] + row["tokens"]["completion"]
        missing = f" ({row['unanswered']} not answered)" if row.get("unanswered") else ""
        out.append(f"| {label} | {row['method']} | {_number(row['accuracy'])} | {_number(row['stderr'])} | "
                   f"{_number(row['quality'])} | {_number(row['diversity'], 2)} | {row['items']}{missing} | "
                   f"{row['calls']} | {tokens} |")
    fit = results["fit"]
    out.append("\n## Quality against diversity (the paper's Table 4)\n")
    out.append("accuracy = a * quality + b * diversity + c over the compositions, on standardised inputs (a and b "
               "are points of accuracy per standard deviation), with standard errors.\n")
    if "error" in fit:
        out.append(f"Not fitted over {fit['n']} compositions: {fit['error']}.")
    else:
        out.append("| a (quality) | b (diversity) | c | R^2 | compositions |\n|---|---|---|---|---|")
        out.append(f"| {fit['a']:.2f} ± {fit['se_a']:.2f} | {fit['b']:.2f} ± {fit['se_b']:.2f} | "
                   f"{fit['c']:.2f} ± {fit['se_c']:.2f} | {fit['r2']:.2f} | {fit['n']} |")
    if results["seq"]:
        out.append(f"\n## Self-MoA-Seq against one-shot Self-MoA (model {manifest['seq_model']}, window "
                   f"{manifest['window']}, carry {manifest['carry']})\n")
        out.append("| n | one-shot (%) | s.e. | Seq (%) | s.e. | calls per item, one-shot | calls per item, Seq |\n"
                   "|---|---|---|---|---|---|---|")
        for row in results["seq"]:
            out.append(f"| {row['n']} | {_number(row['one-shot'])} | {_number(row['one-shot_stderr'])} | "
                       f"{_number(row['seq'])} | {_number(row['seq_stderr'])} | "
                       f"{_number(row['one-shot_calls_per_item'])} | {_number(row['seq_calls_per_item'])} |")
    spent = manifest["spent"]
    out.append(f"\n## Calls and tokens\n\nThe pool holds {spent['samples']} samples and {spent['aggregations']} "
               f"aggregations ({spent['calls']} calls, {spent['prompt_tokens']} prompt and "
               f"{spent['completion_tokens']} completion tokens); this run made {spent['this_run']['calls']} of "
               f"those calls.")
    return "\n".join(out) + "\n"


FIGURES_HINT = "figures skipped: matplotlib is not installed; pip install matplotlib (or the bench extra) to draw them"
FIGURE_STYLE = {"svg.hashsalt": "selfmoa-eval", "svg.fonttype": "none", "font.family": "DejaVu Sans",
                "font.size": 10, "figure.dpi": 100, "savefig.dpi": 100, "path.simplify": False}


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend; ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_figure(fig: Any, out: str, stem: str) -> list[str]:
    """Write ``fig`` as ``stem.png`` and ``stem.svg`` without dates or versions in them; returns the names."""
    names = [f"{stem}.png", f"{stem}.svg"]
    fig.savefig(os.path.join(out, names[0]), metadata={"Software": None})
    fig.savefig(os.path.join(out, names[1]), metadata={"Date": None, "Creator": None})
    return names


def draw(results: Mapping[str, Any], out: str) -> list[str]:
    """The figures of a report (PNG and SVG): accuracy per composition, quality against diversity, and
    accuracy against n for Seq and one-shot. ImportError when matplotlib is not installed."""
    plt = pyplot()
    written = []
    rows = [row for row in results["cells"] if row["kind"] in ("alone", "composition") and row["accuracy"] is not None]
    with plt.rc_context(FIGURE_STYLE):
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(rows) + 2), 4.2), layout="constrained")
        labels = [f"{row['model']} alone" if row["kind"] == "alone" else row["composition"] for row in rows]
        ax.bar(range(len(rows)), [row["accuracy"] for row in rows],
               yerr=[row["stderr"] or 0 for row in rows], capsize=3,
               color=["#bbbbbb" if row["kind"] == "alone" else "#1f77b4" if row["method"] == "moa" else "#2ca02c"
                      for row in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy per composition (grey: single samples; green: Self-MoA; blue: mixed MoA)")
        written += save_figure(fig, out, "accuracy")
        plt.close(fig)
        compositions = [row for row in rows if row["kind"] == "composition"]
        if compositions:
            fig, ax = plt.subplots(figsize=(6, 4.6), layout="constrained")
            dots = ax.scatter([row["quality"] for row in compositions], [row["diversity"] for row in compositions],
                              c=[row["accuracy"] for row in compositions], cmap="viridis", s=50)
            for row in compositions:
                ax.annotate(row["composition"], (row["quality"], row["diversity"]), textcoords="offset points",
                            xytext=(5, 3), fontsize=8)
            fig.colorbar(dots, ax=ax).set_label("accuracy (%)")
            ax.set_xlabel("quality: mean accuracy of the proposals (%)")
            ax.set_ylabel("diversity: Vendi score of the proposals")
            fit = results["fit"]
            ax.set_title("Quality against diversity" + ("" if "error" in fit else
                                                        f" (a = {fit['a']:.2f}, b = {fit['b']:.2f})"))
            written += save_figure(fig, out, "quality_vs_diversity")
            plt.close(fig)
        if results["seq"]:
            fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
            counts = [row["n"] for row in results["seq"]]
            for kind, style in (("seq", "-"), ("one-shot", "--")):
                ax.plot(counts, [row[kind] for row in results["seq"]], style, marker="o",
                        label="Self-MoA-Seq" if kind == "seq" else "one-shot Self-MoA")
            ax.set_xticks(counts)
            ax.set_xlabel("number of samples n")
            ax.set_ylabel("accuracy (%)")
            ax.legend()
            ax.set_title("Self-MoA-Seq against one-shot aggregation")
            written += save_figure(fig, out, "accuracy_vs_samples")
            plt.close(fig)
    return written


def _check_targets(out: str) -> None:
    """Refuse (ConfigError) an output folder whose report.md or results.json was not written by selfmoa eval."""
    for name, ours in ((REPORT_FILE, lambda data: data.startswith(REPORT_TITLE.encode() + b"\n")),
                       (RESULTS_FILE, lambda data: data.startswith(b'{\n  "selfmoa_eval": '))):
        path = os.path.join(out, name)
        try:
            data = selfmoa_batch._read_file(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass another --out folder") from None
        if data and not ours(data):
            raise ConfigError(f"{path} exists and was not written by selfmoa eval, so it was left untouched; pass "
                              f"another --out folder, or move it away")


# ======================================================================================================
# Evaluate, and plan before spending
# ======================================================================================================


def evaluate(questions: Sequence[Question], experiment: Experiment, *, complete: Callable[[Request], Any], out: str,
             concurrency: int = 8, use_n: bool = True, source: str = "dataset",
             progress: Callable[[str], None] | None = None, figures: bool = True) -> dict[str, Any]:
    """Run ``experiment`` on ``questions``: the pool of samples, then every aggregation, each written to
    ``out/pool.jsonl`` as it finishes (a rerun asks only for what is missing); then grade everything and write
    ``out/report.md``, ``out/results.json`` and, when matplotlib is installed and ``figures``, the figures.
    Returns the results (what results.json holds). ``progress`` receives lines for long runs."""
    experiment = experiment.checked()
    questions = list(questions)
    _check(len(questions) > 0 and all(isinstance(q, Question) for q in questions), "questions", "...",
           "an evaluation needs questions", "pass read_dataset(path) or questions_from(records)")
    _check(len({json.dumps(q.id) for q in questions}) == len(questions), "questions", "...",
           "two questions share an id", "give every item its own id")
    selfmoa._start(complete, concurrency)[0].shutdown()  # checks complete and concurrency
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot make the folder ({exc.strerror or exc}); pass a writable "
                          f"path") from None
    _check_targets(out)
    counter = _Counter(progress)

    def recording(request: Request) -> Any:
        reply = complete(request)
        if isinstance(reply, Reply):
            counter.reported(request.model, reply.model)
        return reply

    path = os.path.join(out, POOL_FILE)
    store = _Store(path, experiment)
    with selfmoa_batch._output_lock(path):
        store.open()
        try:
            best = None
            needs = experiment.needs()
            if experiment.seq_model == "best":
                _samples(store, questions, experiment, {letter: experiment.n for letter in experiment.models},
                         complete=recording, concurrency=concurrency, counter=counter, use_n=use_n)
                quality = {letter: _quality(store, questions, experiment, letter) for letter in experiment.models}
                best = max(experiment.models, key=quality.__getitem__)  # the first of equals
                needs = experiment.needs(best)
            _samples(store, questions, experiment, needs, complete=recording, concurrency=concurrency,
                     counter=counter, use_n=use_n)
            seq_letter = best or (experiment.seq_model if experiment.seq else None)
            cells = _cells(experiment, seq_letter)
            _aggregations(store, questions, experiment, cells, complete=recording, concurrency=concurrency,
                          counter=counter)
            results = _results(questions, experiment, store, cells, seq_letter)
            results = {"selfmoa_eval": EVAL_FORMAT,
                       "manifest": _manifest(questions, experiment, store, counter, seq_letter, source), **results}
            selfmoa_batch._write_atomically(os.path.join(out, RESULTS_FILE),
                                            (json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())
            selfmoa_batch._write_atomically(os.path.join(out, REPORT_FILE), markdown(results).encode())
        finally:
            store.close()
    if figures:
        try:
            results["figures"] = draw(results, out)
        except ImportError:
            results["figures"] = []
            if progress is not None:
                progress(FIGURES_HINT)
    return results


def _quality(store: _Store, questions: Sequence[Question], experiment: Experiment, letter: str) -> float:
    marks = []
    for question in questions:
        for _, text in _sample_texts(store, question, experiment, [(letter, k) for k in range(experiment.n)]):
            if text is not None:
                marks.append(grade(text, question.answer, question.grader)[1])
    return sum(marks) / len(marks) if marks else 0.0


def _manifest(questions: Sequence[Question], experiment: Experiment, store: _Store, counter: _Counter,
              seq_letter: str | None, source: str) -> dict[str, Any]:
    reported: dict[str, set[str]] = {model: set(ids) for model, ids in counter.models.items()}
    for record in store.records.values():
        about = record["input"]
        if record["method"] == "sample" and isinstance(about.get("reported"), list):
            reported.setdefault(about.get("model"), set()).update(map(str, about["reported"]))
    samples = sum(record["method"] == "sample" and record["status"] == "ok" for record in store.records.values())
    aggregations = sum(record["method"] != "sample" and record["status"] == "ok" for record in store.records.values())
    totals = [sum(_usage(record)[i] for record in store.records.values()) for i in (0, 1)]
    instruction = experiment.instruction if experiment.instruction is not None else (
        selfmoa.REFERENCE_INSTRUCTION if experiment.layout == "reference" else selfmoa.DEFAULT_INSTRUCTION)
    return {"selfmoa_version": selfmoa.__version__,
            "dataset": {"source": source, "items": len(questions), "sha256": _dataset_hash(questions),
                        "graders": sorted({q.grader for q in questions})},
            "models": {letter: {"name": model, "reported": sorted(reported.get(model, ()))}
                       for letter, model in experiment.models.items()},
            "aggregator": experiment.aggregator_model, "n": experiment.n, "compositions": experiment.compositions,
            "seq": list(experiment.seq), "seq_model": seq_letter, "window": experiment.window,
            "carry": experiment.carry, "seed": experiment.seed, **experiment.sampling[0].params(),
            **experiment.sampling[1].params("aggregator_"), "layout": experiment.layout,
            "instruction_sha256": hashlib.sha256(instruction.encode()).hexdigest(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "spent": {"samples": samples, "aggregations": aggregations,
                      "calls": sum(int(record.get("calls") or 0) for record in store.records.values()
                                   if record["status"] == "ok"),
                      "prompt_tokens": totals[0], "completion_tokens": totals[1],
                      "this_run": {"calls": counter.calls, "requests": counter.requests,
                                   "prompt_tokens": counter.prompt_tokens,
                                   "completion_tokens": counter.completion_tokens}}}


CHARS_PER_TOKEN = 4  # the dry run's estimate of prompt tokens: characters / 4, plus 4 per message
EXPECTED_COMPLETION = 300  # the dry run's guess of tokens per reply when --max-tokens is not given


def plan(questions: Sequence[Question], experiment: Experiment, *, out: str | None = None,
         prices: Mapping[str, tuple[float, float]] | None = None, expect_tokens: int | None = None) -> dict[str, Any]:
    """The calls ``evaluate`` would still make (none for what ``out/pool.jsonl`` already holds), per model, with
    an estimate of prompt and completion tokens and, given prices per million tokens (``{model or letter:
    (prompt, completion)}``), of the cost. Sends nothing.

    Tokens are estimated: a prompt as its characters / 4 plus 4 per message; a reply as ``expect_tokens``, else
    the proposers' ``max_tokens``, else 300. An aggregation's prompt holds the question, the instruction and
    its proposals. With ``seq_model="best"``, the best model is not known before sampling: the first is assumed.
    """
    experiment = experiment.checked()
    records: dict[str, dict] = {}
    if out is not None:
        path = os.path.join(out, POOL_FILE)
        try:
            data = selfmoa_batch._read_file(path)
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass another --out folder") from None
        for record, _ in selfmoa_batch._parse_output(data, path)[0]:
            if record["status"] == "ok":
                records[record["id"]] = record
    reply = expect_tokens or experiment.sampling[0].max_tokens or EXPECTED_COMPLETION
    aggregate_reply = expect_tokens or experiment.sampling[1].max_tokens or EXPECTED_COMPLETION
    seq_letter = next(iter(experiment.models)) if experiment.seq_model == "best" else experiment.seq_model
    needs = experiment.needs(seq_letter)
    cells = _cells(experiment, seq_letter if experiment.seq else None)
    instruction = len(experiment.instruction or selfmoa.DEFAULT_INSTRUCTION) // CHARS_PER_TOKEN
    per_model: dict[str, dict[str, Any]] = {}

    def add(model: str, calls: int, prompt: int, completion: int) -> None:
        row = per_model.setdefault(model, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
        row["calls"] += calls
        row["prompt_tokens"] += prompt
        row["completion_tokens"] += completion

    for question in questions:
        asked = sum(len(m["content"]) for m in question.messages) // CHARS_PER_TOKEN + 4 * len(question.messages)
        for letter, count in needs.items():
            model = experiment.models[letter]
            missing = [k for k in range(count) if records.get(_key("sample", question.id, model, k), {}).get(
                "fingerprint") != _sample_fingerprint(question, model, k, experiment)]
            requests = len(_runs(missing))
            add(model, len(missing), asked * requests, reply * len(missing))
        seen = set()
        for cell in cells:
            if (cell.method, cell.picks, cell.aggregator) in seen:
                continue
            seen.add((cell.method, cell.picks, cell.aggregator))
            done = [record for record in records.values() if record["method"] == cell.method
                    and record["input"].get("item") == question.id and record["input"].get("cell") == cell.cell]
            if done:
                continue
            if cell.method == "self-moa-seq":
                rounds = selfmoa.seq_rounds(len(cell.picks), experiment.window, experiment.carry)
                shown = min(len(cell.picks), experiment.window)
            else:
                rounds, shown = 1, len(cell.picks)
            add(cell.aggregator, rounds, rounds * (asked + instruction + shown * reply),
                rounds * aggregate_reply)
    prices = dict(prices or {})
    total_cost: float | None = 0.0
    for model, row in per_model.items():
        letters = [key for key, name in experiment.models.items() if name == model]
        price = prices.get(model) or (prices.get(letters[0]) if letters else None)
        row["cost"] = None if price is None else \
            (row["prompt_tokens"] * price[0] + row["completion_tokens"] * price[1]) / 1e6
        total_cost = None if total_cost is None or row["cost"] is None else total_cost + row["cost"]
    calls = sum(int(row["calls"]) for row in per_model.values())
    return {"models": per_model, "calls": calls, "cost": total_cost if prices else None,
            "prompt_tokens": sum(int(row["prompt_tokens"]) for row in per_model.values()),
            "completion_tokens": sum(int(row["completion_tokens"]) for row in per_model.values())}


# ======================================================================================================
# The command line
# ======================================================================================================

EVAL_DESCRIPTION = """\
Does Self-MoA help on your models and your data? Sample each model n times per question, once;
aggregate every proposer composition, each Self-MoA and the Self-MoA-Seq sweep from that pool; grade
the answers; write report.md and results.json (and figures, with matplotlib) to --out. A killed run,
rerun with the same command, asks only for what is missing."""

EVAL_EPILOG = """\
dataset:
  JSONL (or a JSON list), one object per item: "prompt" (or "messages"), "answer" (a string or a
  number), optionally "id" and "grader" (auto, choice, number, exact, crux or math).

models and compositions:
  -M i=Qwen/Qwen2-7B-Instruct -M m=... -M d=... names each model by a letter; a composition is a
  string of letters, one per proposer (iimmdd: two samples each of i, m and d). Default: each model's
  Self-MoA (iiiiii, ...) and, with three models and n = 6, the paper's mixes iimmdd, mmmddd, iiiimd,
  iiiddd over the first, second and third model. --endpoint takes a letter or a model name.

exit status:
  0 every call succeeded, 1 some failed (the report says which; rerun to retry them), 2 a usage error."""


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 6,12,24") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number, e.g. 6,12,24")
    return values


def _csv(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one composition, e.g. iiiiii,iimmdd")
    return values


# The flags selfmoa eval shares with the one-prompt command: the same actions (type, default, checks), with the
# help in eval's words where they differ.
_EVAL_HELP = {
    "temperature": "the samples' temperature (default: 0.7, dropped where a server refuses it)",
    "max_tokens": "the samples' token limit (default: the server's)",
    "proposer_field": "the same, for the samples only",
    "aggregator_field": "the same, for the aggregations only",
    "api_key": "the default endpoint's key (default: as for selfmoa)",
    "endpoint": "serve MODEL (a letter or a name) from its own endpoint (repeatable; again for replicas)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``selfmoa eval`` parser: its own flags, and the one-prompt command's that it shares (the same actions)."""
    parser = argparse.ArgumentParser(prog="selfmoa eval", description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = {action.dest: action for action in selfmoa.build_parser()._actions}

    def share(*dests: str) -> None:
        for dest in dests:
            action = copy.copy(shared[dest])
            action.help = _EVAL_HELP.get(dest, action.help)
            parser._add_action(action)

    add = parser.add_argument
    add("dataset", metavar="DATASET", help="the JSONL dataset")
    add("--out", metavar="DIR", help="where the pool, report.md, results.json and the figures go (required)")
    add("--no-figures", dest="figures", action="store_false",
        help="draw no figures, even where matplotlib is installed (the report and results.json are the same)")
    add("-M", "--model", action="append", metavar="LETTER=MODEL", help="a candidate model, named by a letter "
        "(repeat it; the first is the default aggregator)")
    add("--compositions", type=_csv, metavar="LIST", help="proposer compositions, comma-separated (default: see "
        "below)")
    add("-a", "--aggregator", metavar="LETTER|MODEL", help="the aggregator of every cell (default: the first model)")
    add("-n", "--samples", type=int, default=6, metavar="N", help="samples per model and question (default: 6)")
    add("--seq", type=_csv_ints, metavar="LIST", help="the Self-MoA-Seq sweep: sample counts, e.g. 6,12,24; each is "
        "run as Seq and as one-shot Self-MoA")
    add("--seq-model", metavar="LETTER|best", help="the model the Seq sweep samples (default: the first model; best: "
        "the one with the best single samples)")
    add("--window", type=int, default=6, metavar="W", help="Seq: responses per round (default: 6)")
    add("--carry", type=int, default=3, metavar="R",
        help="Seq: copies of the previous synthesis per round (default: 3)")
    share("seed")
    add("--grader", default="auto", choices=["auto", *GRADERS], help="the grader of items without one (default: "
        "auto: choice for a letter, number for a number, else exact)")
    share("temperature", "max_tokens", "aggregator_temperature", "aggregator_max_tokens", "field", "proposer_field",
          "aggregator_field", "instruction_file", "layout", "concurrency", "use_n")
    add("--dry-run", action="store_true",
        help="print the calls still to make and an estimate of their tokens and cost, and send nothing")
    add("--price", action="append", metavar="MODEL=IN,OUT", help="--dry-run: prices per million prompt and "
        "completion tokens of a model (a letter or a name), e.g. i=0.15,0.60")
    add("--expect-tokens", type=int, metavar="K", help="--dry-run: tokens per reply (default: --max-tokens, else 300)")
    share("base_url", "api_key", "endpoint", "max_in_flight", "timeout", "deadline", "retries")
    add("--version", action="version", version=f"selfmoa eval {selfmoa.__version__}")
    return parser


def _experiment(args: argparse.Namespace) -> Experiment:
    models: dict[str, str] = {}
    for spec in args.model or []:
        letter, sep, model = spec.partition("=")
        if not sep or len(letter) != 1 or not letter.isalnum() or not model.strip():
            raise ConfigError(f"--model {spec!r}: expected LETTER=MODEL, one letter or digit then the model's name; "
                              f"pass e.g. -M i=Qwen/Qwen2-7B-Instruct")
        if letter in models:
            raise ConfigError(f"--model {spec!r}: the letter {letter} is already {models[letter]!r}; give each model "
                              f"its own letter")
        models[letter] = model
    if not models:
        raise ConfigError("--model: name at least one model, e.g. -M i=Qwen/Qwen2-7B-Instruct")
    proposing, aggregating = selfmoa.role_settings(args)
    return Experiment(models=models, compositions=args.compositions, aggregator=args.aggregator, n=args.samples,
                      seq=args.seq or (), seq_model=args.seq_model, window=args.window, carry=args.carry,
                      seed=args.seed, proposing=proposing, aggregating=aggregating,
                      instruction=selfmoa._instruction_file(args.instruction_file), layout=args.layout)


def _prices(specs: Sequence[str] | None) -> dict[str, tuple[float, float]]:
    prices = {}
    for spec in specs or []:
        model, _, pair = spec.partition("=")
        parts = pair.split(",")
        try:
            values = tuple(float(part) for part in parts)
        except ValueError:
            values = ()
        if not model or len(values) != 2 or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ConfigError(f"--price {spec!r}: expected MODEL=IN,OUT, the prices in dollars per million prompt and "
                              f"completion tokens; pass e.g. --price i=0.15,0.60")
        prices[model] = (values[0], values[1])
    return prices


_EVAL_FLAGS = {"n": "--samples", "seq": "--seq", "seq_model": "--seq-model", "compositions": "--compositions",
               "models": "--model", "aggregator": "--aggregator", "window": "--window", "carry": "--carry",
               "temperature": "--temperature", "max_tokens": "--max-tokens", "seed": "--seed",
               "aggregator_temperature": "--aggregator-temperature", "layout": "--layout",
               "aggregator_max_tokens": "--aggregator-max-tokens", "concurrency": "--concurrency",
               "grader": "--grader", "instruction": "--instruction-file"}


def _usage_error(exc: ConfigError) -> str:
    message = str(exc)
    name, sep, rest = message.partition("=")
    if sep and name in _EVAL_FLAGS:
        value, _, why = rest.partition(": ")
        return f"{_EVAL_FLAGS[name]} {value}: {why}"
    return message


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``selfmoa eval``: returns the exit status (0 all calls succeeded, 1 some failed, 2 a usage error)."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    def refuse(exc: ConfigError) -> int:
        message = _usage_error(exc)
        if message.startswith("--"):
            parser.print_usage(sys.stderr)
        print(f"selfmoa eval: error: {message}", file=sys.stderr)
        return 2

    try:
        experiment = _experiment(args).checked()
        if args.price and not args.dry_run or args.expect_tokens is not None and not args.dry_run:
            raise ConfigError("--price and --expect-tokens shape the --dry-run estimate, so without --dry-run they "
                              "would have no effect; add --dry-run, or drop them")
        if not args.out:
            raise ConfigError("--out: name the folder for the pool and the report, e.g. --out results/")
        questions = read_dataset(args.dataset, args.grader)
        if args.dry_run:
            estimate = plan(questions, experiment, out=args.out, prices=_prices(args.price),
                            expect_tokens=args.expect_tokens)
            _print_plan(estimate, len(questions))
            return 0
        for i, spec in enumerate(args.endpoint or []):
            model, sep, url = spec.partition("=")
            if sep and model in experiment.models:  # a letter: the model it names
                args.endpoint[i] = f"{experiment.models[model]}={url}"
        client = selfmoa.make_client(args, environ)
    except ConfigError as exc:
        return refuse(exc)
    def progress(line: str) -> None:
        print(f"selfmoa eval: {line}", file=sys.stderr, flush=True)

    try:
        with client:
            results = evaluate(questions, experiment, complete=client, out=args.out, concurrency=args.concurrency,
                               use_n=args.use_n, source=os.path.basename(args.dataset), progress=progress,
                               figures=args.figures)
    except ConfigError as exc:
        return refuse(exc)
    except (SelfMoAError, OSError) as exc:
        print(f"selfmoa eval: {exc}; what finished is kept in {os.path.join(args.out, POOL_FILE)}; run the same "
              f"command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        client.abort()
        print(f"\nselfmoa eval: interrupted; what finished is kept in {os.path.join(args.out, POOL_FILE)}; run the "
              f"same command again to resume", file=sys.stderr)
        return 130
    failed = sum(row.get("unanswered", 0) for row in results["cells"])
    failed_samples = sum(record["status"] == "error" for record in _pool_records(args.out))
    print(f"selfmoa eval: wrote {os.path.join(args.out, REPORT_FILE)} and {RESULTS_FILE}"
          + (f" and {len(results['figures'])} figure files" if results.get("figures") else ""), file=sys.stderr)
    if failed or failed_samples:
        print(f"selfmoa eval: {failed_samples} sample(s) and {failed} cell answer(s) failed; run the same command "
              f"again to retry them", file=sys.stderr)
        return 1
    return 0


def _pool_records(out: str) -> list[dict]:
    path = os.path.join(out, POOL_FILE)
    latest: dict[str, dict] = {}
    for record, _ in selfmoa_batch._parse_output(selfmoa_batch._read_file(path), path)[0]:
        if record["status"] == "ok" or latest.get(record["id"], {}).get("status") != "ok":
            latest[record["id"]] = record
    return list(latest.values())


def _print_plan(estimate: Mapping[str, Any], items: int) -> None:
    print(f"selfmoa eval --dry-run: {estimate['calls']} calls still to make for {items} items (nothing was sent)")
    print("model\tcalls\tprompt tokens (est.)\tcompletion tokens (est.)\tcost (est.)")
    for model, row in estimate["models"].items():
        cost = "-" if row["cost"] is None else f"${row['cost']:.4f}"
        print(f"{model}\t{int(row['calls'])}\t{int(row['prompt_tokens'])}\t{int(row['completion_tokens'])}\t{cost}")
    total = "-" if estimate["cost"] is None else f"${estimate['cost']:.4f}"
    print(f"total\t{estimate['calls']}\t{estimate['prompt_tokens']}\t{estimate['completion_tokens']}\t{total}")


if __name__ == "__main__":
    sys.modules.setdefault("selfmoa_eval", sys.modules[__name__])
    sys.exit(main())
