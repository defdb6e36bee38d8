"""The mock task world: questions with ground truth in three domains modelled on the paper's benchmarks.

- ``MATH``: arithmetic, e.g. "Compute 37 * 12 + 5." (answer: an integer);
- ``CRUX``: predict what a tiny Python program prints (answer: the printed value);
- ``MMLU``: four-option multiple choice (answer: a letter A-D).

Every question is generated from (domain, index, seed) through sha256, reads like a benchmark question,
and carries its answer in its own text: ``find_task`` recomputes the ground truth from the prompt alone,
which is how the mock models know what the right answer is. ``extract_answer`` pulls the final answer out
of any reply ("The answer is X." and sensible fallbacks); ``is_correct`` scores a reply against a task.

>>> task = make_tasks("MATH", 1, seed=0)[0]
>>> task.prompt
"Compute 84 - 63 - 39. Multiplication comes before addition and subtraction. End with 'The answer is N.'"
>>> task.answer
'-18'
>>> find_task(task.prompt).answer   # recomputed from the text alone (its id is a hash of the text)
'-18'
>>> find_task("What is 2 + 2?") is None
True
>>> extract_answer("First 21, then 21 - 39; so the answer is -18."), is_correct("The answer is 18.", task)
('-18', False)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

DOMAINS = ("MATH", "CRUX", "MMLU")


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    domain: str
    prompt: str
    answer: str
    distractors: tuple = dataclasses.field(default=(), compare=False, repr=False)


def _numbers(*parts, count: int, low: int, high: int) -> list[int]:
    """``count`` integers in [low, high] drawn from sha256 over the parts."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return [low + int.from_bytes(digest[2 * i:2 * i + 2], "big") % (high - low + 1) for i in range(count)]


# --- MATH ---------------------------------------------------------------------------------------------

_MATH = re.compile(r"Compute (\d+) ([*+-]) (\d+) ([*+-]) (\d+)\.")


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


def _math(a: int, op1: str, b: int, op2: str, c: int) -> tuple[str, tuple]:
    # Precedence as in Python: * before + and -.
    if op2 == "*" and op1 != "*":
        value = _apply(a, op1, b * c)
    else:
        value = _apply(_apply(a, op1, b), op2, c)
    left_to_right = _apply(_apply(a, op1, b), op2, c)
    wrong = [left_to_right, _apply(a, op1, _apply(b, op2, c)), value + 1, value - 1, value + 10, value - 10,
             value + c, value * 2]
    return str(value), tuple(dict.fromkeys(str(w) for w in wrong if w != value))


def _make_math(index: int, seed: int) -> Task:
    a, b, c, o1, o2 = _numbers("MATH", seed, index, count=5, low=2, high=99)
    op1, op2 = "*+-"[o1 % 3], "*+-"[o2 % 3]
    prompt = (f"Compute {a} {op1} {b} {op2} {c}. Multiplication comes before addition and subtraction. "
              f"End with 'The answer is N.'")
    answer, distractors = _math(a, op1, b, op2, c)
    return Task(f"MATH-{seed}-{index}", "MATH", prompt, answer, distractors)


# --- CRUX ---------------------------------------------------------------------------------------------

_PROGRAMS = {
    "sum_even": ("def f(xs):\n    total = 0\n    for x in xs:\n        if x % 2 == 0:\n            total += x\n"
                 "        else:\n            total -= 1\n    return total"),
    "count_gt": ("def f(xs):\n    count = 0\n    for x in xs:\n        if x > {k}:\n            count += x % 3\n"
                 "    return count"),
    "alt_sum": ("def f(xs):\n    sign, acc = 1, 0\n    for x in xs:\n        acc += sign * x\n        sign = -sign\n"
                "    return acc"),
    "max_pair": ("def f(xs):\n    best = 0\n    for i in range(len(xs) - 1):\n"
                 "        best = max(best, xs[i] + xs[i + 1])\n    return best"),
}
_CRUX = re.compile(r"def f\(xs\):\n(?P<body>.*?)\nprint\(f\(\[(?P<xs>[\d, ]+)\]\)\)", re.DOTALL)


def _run_program(name: str, xs: list[int], k: int) -> tuple[str, tuple]:
    if name == "sum_even":
        value = sum(x if x % 2 == 0 else -1 for x in xs)
        wrong = [sum(x for x in xs if x % 2 == 0), sum(xs), value + 1]
    elif name == "count_gt":
        value = sum(x % 3 for x in xs if x > k)
        wrong = [sum(1 for x in xs if x > k), sum(x % 3 for x in xs if x >= k), value + 1]
    elif name == "alt_sum":
        value = sum(x if i % 2 == 0 else -x for i, x in enumerate(xs))
        wrong = [-value, sum(xs), value + xs[-1]]
    else:
        value = max(0, *(xs[i] + xs[i + 1] for i in range(len(xs) - 1)))
        wrong = [max(xs), sum(sorted(xs)[-2:]), value - 1]
    return str(value), tuple(dict.fromkeys(str(w) for w in wrong if w != value))


def _make_crux(index: int, seed: int) -> Task:
    pick, k, *xs = _numbers("CRUX", seed, index, count=7, low=1, high=19)
    name = sorted(_PROGRAMS)[pick % len(_PROGRAMS)]
    code = _PROGRAMS[name].replace("{k}", str(k))
    prompt = (f"What does this Python program print?\n\n{code}\nprint(f({list(xs)}))\n\n"
              f"End with 'The answer is OUTPUT.'")
    answer, distractors = _run_program(name, xs, k)
    return Task(f"CRUX-{seed}-{index}", "CRUX", prompt, answer, distractors)


def _identify_program(body: str) -> tuple[str, int] | None:
    for name, template in _PROGRAMS.items():
        pattern = re.escape(template.split("\n", 1)[1]).replace(re.escape("{k}"), r"(\d+)")
        found = re.fullmatch(pattern, body)
        if found:
            return name, int(found.group(1)) if found.groups() else 0
    return None


# --- MMLU ---------------------------------------------------------------------------------------------

_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
             "Australia": "Canberra", "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago",
             "Vietnam": "Hanoi", "Ghana": "Accra", "Portugal": "Lisbon", "Turkey": "Ankara",
             "Morocco": "Rabat", "Poland": "Warsaw", "Thailand": "Bangkok"}
_MMLU = re.compile(r"^(?P<stem>.*?)\nA\) (?P<A>.*)\nB\) (?P<B>.*)\nC\) (?P<C>.*)\nD\) (?P<D>.*)\n", re.DOTALL)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _mmlu_truth(stem: str, options: list[str]) -> int | None:
    """The index of the correct option, recomputed from the question."""
    if stem.startswith("Which of the following numbers is prime?"):
        primes = [i for i, o in enumerate(options) if o.isdigit() and _is_prime(int(o))]
        return primes[0] if len(primes) == 1 else None
    found = re.match(r"What is the capital of (\w+)\?", stem)
    if found and found.group(1) in _CAPITALS:
        return options.index(_CAPITALS[found.group(1)]) if _CAPITALS[found.group(1)] in options else None
    if stem.startswith("Which of the following is the largest?"):
        values = [eval_fraction(o) for o in options]
        if None in values:
            return None
        best = max(value for value in values if value is not None)
        return values.index(best) if values.count(best) == 1 else None
    return None


def eval_fraction(text: str) -> float | None:
    found = re.fullmatch(r"(\d+)/(\d+)", text)
    return int(found.group(1)) / int(found.group(2)) if found else None


def _fraction_value(fraction: str) -> float:
    """The value of a fraction this module wrote itself (so it always parses)."""
    value = eval_fraction(fraction)
    assert value is not None, fraction
    return value


def _make_mmlu(index: int, seed: int) -> Task:
    kind, position, *rest = _numbers("MMLU", seed, index, count=10, low=0, high=9999)
    position %= 4
    if kind % 3 == 0:
        stem = "Which of the following numbers is prime?"
        primes = [p for p in range(11, 200) if _is_prime(p)]
        composites = [c for c in range(10, 200) if not _is_prime(c) and c % 2 and c % 5]
        correct = str(primes[rest[0] % len(primes)])
        wrong = list(dict.fromkeys(str(composites[r % len(composites)]) for r in rest[1:]))[:3]
    elif kind % 3 == 1:
        countries = sorted(_CAPITALS)
        country = countries[rest[0] % len(countries)]
        stem = f"What is the capital of {country}?"
        correct = _CAPITALS[country]
        others = [c for c in sorted(_CAPITALS.values()) if c != correct]
        wrong = list(dict.fromkeys(others[r % len(others)] for r in rest[1:]))[:3]
    else:
        stem = "Which of the following is the largest?"
        fractions = list(dict.fromkeys(f"{1 + r % 9}/{2 + (r // 9) % 9}" for r in rest))
        values = {f: _fraction_value(f) for f in fractions}
        unique = [f for f in fractions if list(values.values()).count(values[f]) == 1]
        unique.sort(key=values.__getitem__, reverse=True)
        correct, wrong = unique[0], unique[1:4]
    if len(wrong) < 3:  # rare: not enough distinct distractors from this draw, try the next index's numbers
        return _make_mmlu(index + 100_000, seed)
    options = wrong[:position] + [correct] + wrong[position:]
    letters = "ABCD"
    prompt = (f"{stem}\n" + "".join(f"{letters[i]}) {o}\n" for i, o in enumerate(options))
              + "\nAnswer with the letter of the correct option. End with 'The answer is X.'")
    return Task(f"MMLU-{seed}-{index}", "MMLU", prompt, letters[position],
                tuple(letters[i] for i in range(4) if i != position))


_MAKERS = {"MATH": _make_math, "CRUX": _make_crux, "MMLU": _make_mmlu}


def make_tasks(domain: str, count: int, seed: int = 0) -> list[Task]:
    """``count`` deterministic questions of a domain ("MATH", "CRUX" or "MMLU")."""
    if domain not in _MAKERS:
        raise ValueError(f"domain={domain!r}: choose one of {', '.join(DOMAINS)}")
    return [_MAKERS[domain](index, seed) for index in range(count)]


def find_task(text: str) -> Task | None:
    """The task a prompt asks, with its ground truth recomputed from the text; None if it is not one."""
    found = _MATH.search(text)
    if found:
        a, op1, b, op2, c = found.groups()
        answer, distractors = _math(int(a), op1, int(b), op2, int(c))
        return Task(_task_id("MATH", found.group(0)), "MATH", text, answer, distractors)
    found = _CRUX.search(text)
    if found:
        program = _identify_program(found.group("body"))
        if program:
            xs = [int(x) for x in found.group("xs").split(",") if x.strip()]
            answer, distractors = _run_program(program[0], xs, program[1])
            return Task(_task_id("CRUX", found.group(0)), "CRUX", text, answer, distractors)
    found = _MMLU.search(text)
    if found:
        options = [found.group(letter).strip() for letter in "ABCD"]
        truth = _mmlu_truth(found.group("stem").strip().splitlines()[-1], options)
        if truth is not None:
            letters = "ABCD"
            return Task(_task_id("MMLU", found.group(0)), "MMLU", text, letters[truth],
                        tuple(letters[i] for i in range(4) if i != truth))
    return None


def _task_id(domain: str, core: str) -> str:
    return f"{domain}-{hashlib.sha256(core.encode()).hexdigest()[:10]}"


_FINAL = re.compile(r"answer is:?\s*\**\s*([A-Za-z]\b|-?\d+(?:\.\d+)?)", re.IGNORECASE)


def extract_answer(reply: str) -> str | None:
    """The final answer of a reply: the last "answer is X", else the last number or lone option letter."""
    found = _FINAL.findall(reply or "")
    if found:
        value = found[-1]
        return value.upper() if value.isalpha() else value
    numbers = re.findall(r"-?\d+", reply or "")
    if numbers:
        return numbers[-1]
    letters = re.findall(r"\b([A-D])\)", reply or "")
    return letters[-1] if letters else None


def is_correct(reply: str, task: Task) -> bool:
    """Whether the reply's final answer is the task's ground truth."""
    return extract_answer(reply) == task.answer
