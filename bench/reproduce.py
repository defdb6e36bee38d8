"""Reproduce the findings of *Rethinking Mixture-of-Agents* offline, against the mock models.

    python3 -m bench.reproduce [--out DIR] [--questions Q] [--compositions K] [--seed S] [--via-cli]

It is ``selfmoa eval`` run on the mock task world: each domain (MATH, CRUX, MMLU, with ground truth) is
exported as a dataset, and the evaluator samples the mock models once per question, aggregates every
composition from that pool, grades, and fits; this module only chooses the experiments and lays the
evaluators' results out as Markdown tables analogous to the paper's:

1. Table 3: each model alone, mixed MoA compositions, Self-MoA of each model, Self-MoA with the best
   model per task; accuracy per domain and on average.
2. Table 7: two models of similar quality mixed 3 + 3 versus Self-MoA of each.
3. Table 4: over random proposer compositions, the fit score = a * quality + b * diversity + c on
   standardised inputs, per domain (quality: the mean accuracy of the proposals; diversity: their mean
   Vendi score).
4. Self-MoA-Seq (window 6, carry 3) against one-shot Self-MoA as the number of samples grows, with the
   best model per domain (``--seq-model best``).

Two ways to run, with identical results (tests/test_reproduce.py compares them):

- by default, in this process: ``selfmoa_eval.evaluate`` with a completion function that answers from the
  mock models directly (the mock server's reply rule without the HTTP), a few seconds;
- with --via-cli, exactly as a user would: ``selfmoa eval`` on the exported datasets against the mock
  server over HTTP.

These are simulations: the mock models' accuracies are calibrated on the paper's Table 3, but every
outcome below comes out of the mechanism (correlated latent knowledge per model, a vote by the aggregator),
not from numbers written in. With --out DIR the tables are also written as Markdown and JSON, each
evaluation's own report (report.md, results.json) and dataset go to DIR/evals/, and, when matplotlib is
installed (pip install -e '.[bench]'), the figures as PNG and SVG (see bench/plots.py).
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
import selfmoa_eval  # noqa: E402
from mock_models import MockServer, models  # noqa: E402
from mock_models.server import count_tokens  # noqa: E402
from mock_models.tasks import make_tasks  # noqa: E402

DOMAINS = ("MMLU", "CRUX", "MATH")
LETTER = {"i": "generalist", "d": "coder", "m": "mathematician", "j": "generalist-2"}
GRADER = {"MMLU": "choice", "CRUX": "crux", "MATH": "number"}
AGGREGATOR = "i"  # the paper's Table 3 aggregates with Qwen2-7B-Instruct, its "i"
WINDOW, CARRY = 6, 3
TABLE3 = {"mixed iimmdd": "iimmdd", "mixed mmmddd": "mmmddd", "mixed iiiimd": "iiiimd", "mixed iiiddd": "iiiddd",
          "Self-MoA iiiiii": "iiiiii", "Self-MoA dddddd": "dddddd", "Self-MoA mmmmmm": "mmmmmm"}
TABLE7 = {"Self-MoA iiiiii": "iiiiii", "Self-MoA jjjjjj": "jjjjjj", "mixed iiijjj": "iiijjj"}
FIGURES_HINT = "figures skipped: matplotlib is not installed; pip install -e '.[bench]' and run again to draw them"


# === The datasets and the runner =======================================================================


def dataset(domain: str, questions: int, seed: int) -> list[dict]:
    """A domain of the mock task world as a selfmoa eval dataset: id, prompt, answer, grader."""
    return [{"id": task.id, "prompt": task.prompt, "answer": task.answer, "grader": GRADER[domain]}
            for task in make_tasks(domain, questions, seed=seed)]


@functools.lru_cache(maxsize=1 << 16)
def _line_tokens(line: str) -> int:
    return count_tokens(line)


def _prompt_tokens(messages: list[dict]) -> int:
    """The mock server's ``prompt_tokens(messages)``, counted line by line (no token holds a line break, so the
    counts add up) with each line's count kept: a question's samples recur in many aggregators' prompts."""
    return sum(sum(map(_line_tokens, message["content"].split("\n"))) + 4 for message in messages) + 2


def mock_complete(request: selfmoa.Request) -> selfmoa.Reply:
    """A completion function that answers from the mock models without HTTP, by the mock server's rule:
    choice j of a request with seed S is sample S + j, temperature 0 is greedy, and a prompt over the
    model's context length fails. Only seeded requests: an unseeded one would not be reproducible."""
    if request.seed is None and request.temperature > 0:
        raise ValueError("the in-process runner needs seeded requests; pass seed= to the method")
    messages = [dict(message) for message in request.messages]
    used = _prompt_tokens(messages)
    if used + (request.max_tokens or 0) > models.CONTEXT_LENGTH[request.model]:
        raise selfmoa.ModelError(f"the prompt ({used} tokens) exceeds the context length", model=request.model)
    samples = ["greedy" if request.temperature == 0 else request.seed + j for j in range(request.n)]
    texts = [models.reply(request.model, messages, request.temperature, sample) for sample in samples]
    return selfmoa.Reply(texts, ["stop"] * len(texts), prompt_tokens=used,
                         completion_tokens=sum(count_tokens(text) for text in texts), model=request.model)


def flags(letters: str, compositions: list[str], seed: int, seq: tuple[int, ...] = ()) -> list[str]:
    """The selfmoa eval flags of one evaluation."""
    out = [arg for letter in letters for arg in ("-M", f"{letter}={LETTER[letter]}")]
    out += ["--compositions", ",".join(compositions), "-a", AGGREGATOR, "--seed", str(seed)]
    if seq:
        out += ["--seq", ",".join(map(str, seq)), "--seq-model", "best", "--window", str(WINDOW), "--carry", str(CARRY)]
    return out


def run_eval(records: list[dict], argv: list[str], out: str, base_url: str | None = None) -> dict:
    """One evaluation: the dataset written to out/dataset.jsonl, then ``selfmoa eval`` on it, in this process
    against the mock models (``base_url`` None) or as a command against the mock server at ``base_url``.
    Returns its results.json. Either way it draws no figures of its own (the reproduction draws its own)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "dataset.jsonl")
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    if base_url is None:
        args = selfmoa_eval.build_parser().parse_args([path, "--out", out, *argv])
        experiment = selfmoa_eval._experiment(args)
        return selfmoa_eval.evaluate(selfmoa_eval.read_dataset(path), experiment, complete=mock_complete, out=out,
                                     concurrency=1, source="dataset.jsonl", figures=False)
    command = [sys.executable, str(ROOT / "selfmoa.py"), "eval", path, "--out", out, "--base-url", base_url,
               "--concurrency", "16", "--no-figures", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"selfmoa eval failed ({done.returncode}): {' '.join(command)}\n{done.stderr}")
    with open(os.path.join(out, selfmoa_eval.RESULTS_FILE), encoding="utf-8") as file:
        return json.load(file)


def _run_job(job: tuple[str, list[dict], list[str], str, str | None]) -> tuple[str, dict]:
    name, records, argv, out, base_url = job
    return name, run_eval(records, argv, out, base_url)


# === The experiment ===================================================================================


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def regression_mixes(compositions: int, seed: int) -> list[str]:
    """``compositions`` distinct random compositions of six proposers over i, d, m, j (there are 84)."""
    every = sorted({"".join(sorted(mix)) for mix in itertools.combinations_with_replacement("dijm", 6)})
    if not 4 <= compositions <= len(every):
        raise ValueError(f"compositions={compositions}: the fit needs 4 to {len(every)} distinct compositions")
    return random.Random(seed).sample(every, compositions)


def jobs(questions: int, compositions: int, sample_counts, seed: int) -> dict[str, tuple[list[dict], list[str]]]:
    """Every evaluation of the reproduction: name -> (dataset records, selfmoa eval flags)."""
    regression = list(dict.fromkeys(regression_mixes(compositions, seed) + [letter * 6 for letter in "idmj"]))
    out = {}
    for domain in DOMAINS:
        out[f"{domain}-table3"] = (dataset(domain, questions, seed),
                                   flags("idm", list(TABLE3.values()), seed, tuple(sample_counts)))
        out[f"{domain}-table4"] = (dataset(domain, max(10, questions // 2), seed + 1), flags("idmj", regression, seed))
    out["MMLU-table7"] = (dataset("MMLU", questions, seed), flags("ij", list(TABLE7.values()), seed))
    return out


def reproduce(questions: int = 60, compositions: int = 50, sample_counts=(6, 12, 18, 24, 30), seed: int = 0,
              via_cli: bool = False, parallel: int = 1, out: str | None = None) -> dict:
    """Run every evaluation (see ``jobs``) and return the tables' data (see ``markdown``) as a dict.

    ``parallel`` evaluations go at once: in-process ones then go to a pool of that many processes (started by
    spawning, so a script that calls this with ``parallel > 1`` needs the ``if __name__ == "__main__":`` guard).
    Each evaluation writes its dataset, pool and report to ``out/evals/<name>/`` (a temporary folder without
    ``out``).
    """
    planned = jobs(questions, compositions, sample_counts, seed)
    with contextlib.ExitStack() as stack:
        folder = os.path.join(out, "evals") if out else stack.enter_context(tempfile.TemporaryDirectory())
        base_url = stack.enter_context(MockServer(max_concurrency=8)).base_url if via_cli else None
        if via_cli or parallel <= 1:
            pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(max(1, parallel))
        else:  # the in-process runs are CPU-bound: one process per core
            pool = concurrent.futures.ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            # The longest evaluations first, so that the processes finish together.
            order = sorted(planned, key=lambda name: (not name.endswith("table3"), name))
            evals = dict(pool.map(_run_job, [(name, *planned[name], os.path.join(folder, name), base_url)
                                             for name in order]))
    results: dict = {"questions_per_domain": questions, "seed": seed, "runs": len(evals),
                     "calls": sum(e["manifest"]["spent"]["calls"] for e in evals.values())}

    def cell(evaluation: dict, composition: str) -> dict:
        return next(row for row in evaluation["cells"] if row.get("composition") == composition)

    # Table 3: each model alone, then the mixes and Self-MoA of each, all with the same aggregator (i).
    rows3: dict[str, dict] = {f"{letter} alone": {} for letter in "idm"}
    rows3.update({label: {} for label in TABLE3})
    best = {}
    for domain in DOMAINS:
        evaluation = evals[f"{domain}-table3"]
        for row in evaluation["cells"]:
            if row["kind"] == "alone":
                rows3[f"{row['model']} alone"][domain] = row["accuracy"]
        for label, composition in TABLE3.items():
            rows3[label][domain] = cell(evaluation, composition)["accuracy"]
        best[domain] = evaluation["manifest"]["seq_model"]  # the model with the best single samples
    rows3["Self-MoA, best model per task"] = {d: rows3[f"Self-MoA {best[d] * 6}"][d] for d in DOMAINS}
    for row in rows3.values():
        row["avg"] = mean(row[d] for d in DOMAINS)
    results["table3"] = rows3
    results["best_model_per_task"] = {d: LETTER[best[d]] for d in DOMAINS}
    # Table 7: two generalists of similar quality, on MMLU.
    results["table7"] = {label: {"MMLU": cell(evals["MMLU-table7"], composition)["accuracy"],
                                 "quality": cell(evals["MMLU-table7"], composition)["quality"],
                                 "diversity": cell(evals["MMLU-table7"], composition)["diversity"]}
                         for label, composition in TABLE7.items()}
    # Table 4: one point per composition and domain, and each domain's fit over them.
    points = {d: [{"mix": row["composition"], "quality": row["quality"], "diversity": row["diversity"],
                   "score": row["accuracy"]} for row in evals[f"{d}-table4"]["cells"] if row["kind"] == "composition"]
              for d in DOMAINS}
    results["table4_points"] = points
    results["self_moa_points"] = {d: [p for p in points[d] if len(set(p["mix"])) == 1] for d in DOMAINS}
    results["table4"] = {d: evals[f"{d}-table4"]["fit"] for d in DOMAINS}
    # Seq against one-shot Self-MoA, each domain with its best model.
    results["seq"] = {d: {kind: {row["n"]: row[kind] for row in evals[f"{d}-table3"]["seq"]}
                          for kind in ("one-shot", "seq")} for d in DOMAINS}
    results["seq_calls"] = {row["n"]: {kind: row[f"{kind}_calls_per_item"] for kind in ("one-shot", "seq")}
                            for row in evals[f"{DOMAINS[0]}-table3"]["seq"]}
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
    out.append(f"\n### Table 4 analogue: score = a * quality + b * diversity + c over {n_mix} compositions (random "
               "mixes and each model's Self-MoA; standardised inputs)\n")
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
                        help="run selfmoa eval's command line against the mock server over HTTP (same results, slower)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = reproduce(args.questions, args.compositions, seed=args.seed, via_cli=args.via_cli, parallel=2,
                        out=args.out)
    print(markdown(results))
    how = "selfmoa eval commands against the mock server" if args.via_cli else "evaluations run in-process"
    print(f"({results['runs']} {how}, {results['calls']} calls, in {time.monotonic() - started:.0f} s; a simulation "
          f"with mock models, not the paper's numbers)")
    if args.out:
        written = write_outputs(results, args.out)
        print(f"written to {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
