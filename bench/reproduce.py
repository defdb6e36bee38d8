"""Reproduce the findings of *Rethinking Mixture-of-Agents* offline, against the mock models.

    python3 -m bench.reproduce [--out DIR] [--questions Q] [--compositions K] [--seed S] [--via-cli]

It runs selfmoa's three methods on the mock task world (MATH, CRUX, MMLU with ground truth) and prints
Markdown tables analogous to the paper's:

1. Table 3: each model alone, mixed MoA compositions, Self-MoA of each model, Self-MoA with the best
   model per task; accuracy per domain and on average.
2. Table 7: two models of similar quality mixed 3 + 3 versus Self-MoA of each.
3. Table 4: over random proposer compositions, the fit score = a * quality + b * diversity + c on
   standardised inputs, per domain (quality: the mean accuracy of the proposals; diversity: their mean
   Vendi score).
4. Self-MoA-Seq (window 6, carry 3) against one-shot Self-MoA as the number of samples grows.

Two ways to run, with identical results (tests/test_reproduce.py compares them record by record):

- by default, in this process: selfmoa's methods called as a library, with a completion function that
  answers from the mock models directly (the mock server's reply rule without the HTTP), a few seconds;
- with --via-cli, exactly as a user would: selfmoa's command line in batch mode, one batch per
  configuration, against the mock server over HTTP, about a minute on 2 cores.

These are simulations: the mock models' accuracies are calibrated on the paper's Table 3, but every
outcome below comes out of the mechanism (correlated latent knowledge per model, a vote by the aggregator),
not from numbers written in. With --out DIR the tables are also written as Markdown and JSON, and, when
matplotlib is installed (pip install -e '.[bench]'), the figures as PNG and SVG (see bench/plots.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import selfmoa  # noqa: E402
from bench.regression import fit_quality_diversity  # noqa: E402
from mock_models import MockServer, models  # noqa: E402
from mock_models.server import count_tokens, prompt_tokens  # noqa: E402
from mock_models.tasks import is_correct, make_tasks  # noqa: E402

DOMAINS = ("MMLU", "CRUX", "MATH")
LETTER = {"i": "generalist", "d": "coder", "m": "mathematician", "j": "generalist-2"}
AGGREGATOR = "generalist"  # the paper's Table 3 aggregates with Qwen2-7B-Instruct, its "i"
WINDOW, CARRY = 6, 3
FIGURES_HINT = "figures skipped: matplotlib is not installed; pip install -e '.[bench]' and run again to draw them"

# === Configurations ===================================================================================
# A configuration is (method, options): the keyword arguments of selfmoa's method, which are also its
# command-line flags. Every run is seeded, so a configuration's records are fixed.


def moa_config(letters: str, aggregator: str = AGGREGATOR) -> tuple[str, dict]:
    """MoA with one proposer per letter: moa_config("iid") proposes with generalist, generalist, coder."""
    return "moa", {"proposers": [LETTER[letter] for letter in letters], "aggregator": aggregator}


def command_line(method: str, options: dict) -> list[str]:
    """The selfmoa flags of a configuration: ("moa", {"proposers": ["coder"], ...}) -> --method moa -p coder ..."""
    flags = ["--method", method]
    names = {"aggregator": "-a", "model": "-m", "n": "-n", "window": "--window", "carry": "--carry"}
    for key, value in options.items():
        if key == "proposers":
            for proposer in value:
                flags += ["-p", proposer]
        else:
            flags += [names[key], str(value)]
    return flags


def score(task, answer: str, proposals: list[str], calls: int, diversity: float | None) -> dict:
    """One record: was the final answer right, how good and how diverse were the proposals, how many calls."""
    return {"id": task.id, "domain": task.domain, "correct": is_correct(answer, task),
            "quality": sum(is_correct(p, task) for p in proposals) / len(proposals),
            "diversity": diversity, "calls": calls}


# === Two ways to run a configuration on a list of questions, both giving its records ===================


def mock_complete(request: selfmoa.Request) -> selfmoa.Reply:
    """A completion function that answers from the mock models without HTTP, by the mock server's rule:
    choice j of a request with seed S is sample S + j, temperature 0 is greedy, and a prompt over the
    model's context length fails. Only seeded requests: an unseeded one would not be reproducible."""
    if request.seed is None and request.temperature > 0:
        raise ValueError("the in-process runner needs seeded requests; pass seed= to the method")
    messages = [dict(message) for message in request.messages]
    used = prompt_tokens(messages)
    if used + (request.max_tokens or 0) > models.CONTEXT_LENGTH[request.model]:
        raise selfmoa.ModelError(f"the prompt ({used} tokens) exceeds the context length", model=request.model)
    samples = ["greedy" if request.temperature == 0 else request.seed + j for j in range(request.n)]
    texts = [models.reply(request.model, messages, request.temperature, sample) for sample in samples]
    return selfmoa.Reply(texts, ["stop"] * len(texts), prompt_tokens=used,
                         completion_tokens=sum(count_tokens(text) for text in texts))


def run_in_process(seed: int, tasks, config: tuple[str, dict], diversity: bool = False) -> list[dict]:
    """The records of one configuration, run in this process (a function, so a process pool can run it)."""
    method, options = config
    records = []
    for task in tasks:
        result = selfmoa.METHODS[method](task.prompt, complete=mock_complete, seed=seed, concurrency=1, **options)
        proposals = result.proposals()[1]
        records.append(score(task, result.answer, proposals, result.calls,
                             selfmoa.vendi_score(proposals) if diversity else None))
    return records


class ViaCommandLine:
    """Runs selfmoa's command line in batch mode (with --trace) against one mock server, one batch per call."""

    def __init__(self, base_url: str, workdir: str, seed: int):
        self.base_url, self.workdir, self.seed = base_url, workdir, seed
        self._numbers = itertools.count(1)  # thread-safe: runs go in parallel

    def run(self, tasks, config: tuple[str, dict], diversity: bool = False) -> list[dict]:
        tag = f"run{next(self._numbers)}"
        source = os.path.join(self.workdir, f"{tag}.in.jsonl")
        target = os.path.join(self.workdir, f"{tag}.out.jsonl")
        with open(source, "w", encoding="utf-8") as file:
            for task in tasks:
                file.write(json.dumps({"id": task.id, "prompt": task.prompt, "domain": task.domain}) + "\n")
        argv = [sys.executable, str(ROOT / "selfmoa.py"), "--base-url", self.base_url, *command_line(*config),
                "--seed", str(self.seed), "--concurrency", "16", "--trace", "--diversity", "-i",
                source, "-o", target]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"selfmoa failed ({done.returncode}): {' '.join(argv)}\n{done.stderr}")
        by_id = {task.id: task for task in tasks}
        records = []
        with open(target, encoding="utf-8") as file:
            for line in file:
                record = json.loads(line)
                proposals = [output for call in record["trace"] if call["role"] == "proposer" and call["layer"] == 1
                             for output in call["outputs"]]
                records.append(score(by_id[record["id"]], record["answer"], proposals, record["calls"],
                                     record["diversity"]["1"] if diversity else None))
        return records


# === The experiment ===================================================================================


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def by_domain(records: list[dict], key: str = "correct") -> dict[str, float]:
    out = {d: 100 * mean(r[key] for r in records if r["domain"] == d) for d in DOMAINS}
    out["avg"] = mean(out[d] for d in DOMAINS)
    return out


def reproduce(questions: int = 60, compositions: int = 50, sample_counts=(6, 12, 18, 24, 30), seed: int = 0,
              via_cli: bool = False, parallel: int = 1) -> dict:
    """Run every configuration and return the tables' data (see ``markdown``) as a dict.

    ``parallel`` runs go at once: in-process runs then go to a pool of that many processes (started by
    spawning, so a script that calls this with ``parallel > 1`` needs the ``if __name__ == "__main__":`` guard).
    """
    tasks = [task for domain in DOMAINS for task in make_tasks(domain, questions, seed=seed)]
    mmlu = [task for task in tasks if task.domain == "MMLU"]
    results: dict = {"questions_per_domain": questions, "seed": seed}
    with contextlib.ExitStack() as stack:
        if via_cli:
            server = stack.enter_context(MockServer())
            runner = ViaCommandLine(server.base_url, stack.enter_context(tempfile.TemporaryDirectory()), seed)
            pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(parallel)
            run = runner.run
        else:  # the runs are CPU-bound here: one process per core
            pool = concurrent.futures.ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) \
                if parallel > 1 else concurrent.futures.ThreadPoolExecutor(1)
            run = functools.partial(run_in_process, seed)
        stack.enter_context(pool)
        jobs: dict[tuple, concurrent.futures.Future] = {}

        def submit(tasks_, config, diversity=False):
            # A seeded configuration gives the same records on the same questions: run each one once.
            key = (config[0], json.dumps(config[1], sort_keys=True), tuple(t.id for t in tasks_), diversity)
            if key not in jobs:
                jobs[key] = pool.submit(run, tasks_, config, diversity)
            return jobs[key]

        # Table 3: mixed compositions and Self-MoA of each model, all with the same aggregator.
        table3_specs = {"mixed iimmdd": "iimmdd", "mixed mmmddd": "mmmddd", "mixed iiiimd": "iiiimd",
                        "mixed iiiddd": "iiiddd", "Self-MoA iiiiii": "iiiiii", "Self-MoA dddddd": "dddddd",
                        "Self-MoA mmmmmm": "mmmmmm"}
        table3_jobs = {label: submit(tasks, moa_config(spec)) for label, spec in table3_specs.items()}
        # Table 7: two generalists of similar quality, on MMLU.
        table7_specs = {"Self-MoA iiiiii": "iiiiii", "Self-MoA jjjjjj": "jjjjjj", "mixed iiijjj": "iiijjj"}
        table7_jobs = {label: submit(mmlu, moa_config(spec), True) for label, spec in table7_specs.items()}
        # Table 4: random compositions of six proposers from the four models; and, outside the fit, Self-MoA
        # of each model on the same questions, to mark in the quality/diversity figure.
        rng = random.Random(seed)
        regression_tasks = [t for d in DOMAINS for t in make_tasks(d, max(10, questions // 2), seed=seed + 1)]
        mixes = ["".join(sorted(rng.choice("idmj") for _ in range(6))) for _ in range(compositions)]
        regression_jobs = [(mix, submit(regression_tasks, moa_config(mix), True)) for mix in mixes]
        self_moa_jobs = [(letter * 6, submit(regression_tasks, moa_config(letter * 6), True)) for letter in "idmj"]
        table3 = {label: job.result() for label, job in table3_jobs.items()}
        # Seq against one-shot Self-MoA, each domain with its best model (by single-sample accuracy).
        alone = {letter: by_domain(table3[f"Self-MoA {letter * 6}"], "quality") for letter in "idm"}
        best = {d: max("idm", key=lambda letter: alone[letter][d]) for d in DOMAINS}
        seq_jobs = {}
        for domain in DOMAINS:
            model = LETTER[best[domain]]
            subset = [task for task in tasks if task.domain == domain]
            for n in sample_counts:
                seq_jobs[(domain, "one-shot", n)] = submit(subset, ("self-moa", {"model": model, "n": n}))
                seq_jobs[(domain, "seq", n)] = submit(subset, ("self-moa-seq", {"model": model, "n": n,
                                                                                "window": WINDOW, "carry": CARRY}))
        table7 = {label: job.result() for label, job in table7_jobs.items()}
        regression = [(mix, job.result()) for mix, job in regression_jobs]
        self_moa = [(mix, job.result()) for mix, job in self_moa_jobs]
        seq = {key: job.result() for key, job in seq_jobs.items()}
        results["runs"] = len(jobs)

    # Table 3 rows.
    rows3 = {f"{letter} alone": alone[letter] for letter in "idm"}
    rows3.update({label: by_domain(records) for label, records in table3.items()})
    best_row = {d: rows3[f"Self-MoA {best[d] * 6}"][d] for d in DOMAINS}
    best_row["avg"] = mean(best_row[d] for d in DOMAINS)
    rows3["Self-MoA, best model per task"] = best_row
    results["table3"] = rows3
    results["best_model_per_task"] = {d: LETTER[best[d]] for d in DOMAINS}
    # Table 7.
    results["table7"] = {label: {"MMLU": by_domain(records)["MMLU"],
                                 "quality": 100 * mean(r["quality"] for r in records),
                                 "diversity": mean(r["diversity"] for r in records)}
                         for label, records in table7.items()}

    # Table 4: one point per (composition, domain); the Self-MoA points are drawn, not fitted.
    def points(runs):
        out = {d: [] for d in DOMAINS}
        for mix, records in runs:
            for d in DOMAINS:
                rs = [r for r in records if r["domain"] == d]
                out[d].append({"mix": mix, "quality": 100 * mean(r["quality"] for r in rs),
                               "diversity": mean(r["diversity"] for r in rs),
                               "score": 100 * mean(r["correct"] for r in rs)})
        return out

    results["table4_points"] = points(regression)
    results["self_moa_points"] = points(self_moa)
    results["table4"] = {d: fit_quality_diversity([(p["quality"], p["diversity"], p["score"])
                                                           for p in results["table4_points"][d]]) for d in DOMAINS}
    # Seq vs one-shot.
    results["seq"] = {d: {kind: {n: 100 * mean(r["correct"] for r in seq[(d, kind, n)]) for n in sample_counts}
                          for kind in ("one-shot", "seq")} for d in DOMAINS}
    results["seq_calls"] = {n: {kind: mean(r["calls"] for r in seq[(DOMAINS[0], kind, n)])
                                for kind in ("one-shot", "seq")} for n in sample_counts}
    return results


def markdown(results: dict) -> str:
    out = []
    q = results["questions_per_domain"]
    out.append(f"### Table 3 analogue: accuracy (%) over {q} questions per domain; aggregator: generalist (i)\n")
    out.append("i = generalist, d = coder, m = mathematician; 'alone' = the accuracy of single samples.\n")
    out.append("| proposers | MMLU | CRUX | MATH | avg |\n|---|---|---|---|---|")
    for label, row in results["table3"].items():
        out.append(f"| {label} | " + " | ".join(f"{row[k]:.1f}" for k in (*DOMAINS, "avg")) + " |")
    out.append(f"\nBest model per task: {results['best_model_per_task']}.\n")
    out.append("### Table 7 analogue: two generalists of similar quality (i, j = generalist-2), MMLU\n")
    out.append("| proposers | MMLU | proposal quality | diversity (Vendi) |\n|---|---|---|---|")
    for label, row in results["table7"].items():
        out.append(f"| {label} | {row['MMLU']:.1f} | {row['quality']:.1f} | {row['diversity']:.2f} |")
    n_mix = len(next(iter(results["table4_points"].values())))
    out.append(f"\n### Table 4 analogue: score = a * quality + b * diversity + c over {n_mix} random compositions "
               "(standardised inputs)\n")
    out.append("| domain | a (quality) | b (diversity) | a > b | R^2 |\n|---|---|---|---|---|")
    for d, fit in results["table4"].items():
        out.append(f"| {d} | {fit['a']:.2f} ± {fit['se_a']:.2f} | {fit['b']:.2f} ± {fit['se_b']:.2f} | "
                   f"{'yes' if fit['a'] > fit['b'] else 'no'} | {fit['r2']:.2f} |")
    out.append(f"\n### Self-MoA-Seq (window {WINDOW}, carry {CARRY}) vs one-shot Self-MoA, best model per task, "
               "accuracy (%); aggregator: the best model itself\n")
    out.append("Unlike Table 3, whose rows all aggregate with the generalist, each domain's best model aggregates "
               "its own samples here, so one-shot at n=6 need not equal Table 3's best-model row.\n")
    counts = list(next(iter(results["seq"].values()))["seq"])
    out.append("| domain | method | " + " | ".join(f"n={n}" for n in counts) + " |\n|---|---|"
               + "---|" * len(counts))
    for d, kinds in results["seq"].items():
        for kind, row in kinds.items():
            out.append(f"| {d} | {kind} | " + " | ".join(f"{row[n]:.1f}" for n in counts) + " |")
    out.append("\n| calls per question | " + " | ".join(f"n={n}" for n in counts) + " |\n|---|"
               + "---|" * len(counts))
    for kind in ("one-shot", "seq"):
        out.append(f"| {kind} | " + " | ".join(f"{results['seq_calls'][n][kind]:.0f}" for n in counts) + " |")
    return "\n".join(out) + "\n"


def write_outputs(results: dict, out: str) -> list[str]:
    """Write tables.md and results.json to ``out``, and the figures when matplotlib is installed.

    Returns the names of the files written; without matplotlib it prints ``FIGURES_HINT`` instead of drawing.
    """
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tables.md"), "w", encoding="utf-8") as file:
        file.write(markdown(results))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2, default=str)
    written = ["tables.md", "results.json"]
    from bench import plots  # matplotlib is imported by plots.pyplot(), not on import
    try:
        pyplot = plots.pyplot()
    except ImportError:
        print(FIGURES_HINT)
        return written
    written += plots.draw(results, out, pyplot)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="DIR", help="also write tables.md, results.json and the figures here")
    parser.add_argument("--questions", type=int, default=60, help="questions per domain (default: 60)")
    parser.add_argument("--compositions", type=int, default=50, help="random compositions for the fit (default: 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--via-cli", action="store_true",
                        help="run selfmoa's command line against the mock server over HTTP (same results, slower)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = reproduce(args.questions, args.compositions, seed=args.seed, via_cli=args.via_cli, parallel=2)
    print(markdown(results))
    how = "selfmoa batch runs" if args.via_cli else "configurations run in-process"
    print(f"({results['runs']} {how} in {time.monotonic() - started:.0f} s; a simulation with mock "
          f"models, not the paper's numbers)")
    if args.out:
        written = write_outputs(results, args.out)
        print(f"written to {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
