"""Reproduce the findings of *Rethinking Mixture-of-Agents* offline, against the mock models.

    python -m bench.reproduce [--out DIR] [--questions Q] [--compositions K]

It runs selfmoa exactly as a user would, through its command line in batch mode (one batch per
configuration, with --trace), against the mock server, on the mock task world (MATH, CRUX, MMLU with
ground truth), and prints Markdown tables analogous to the paper's:

1. Table 3: each model alone, mixed MoA compositions, Self-MoA of each model, Self-MoA with the best
   model per task; accuracy per domain and on average.
2. Table 7: two models of similar quality mixed 3 + 3 versus Self-MoA of each.
3. Table 4: over random proposer compositions, the fit score = a * quality + b * diversity + c on
   standardised inputs, per domain (quality: the mean accuracy of the proposals; diversity: their mean
   Vendi score).
4. Self-MoA-Seq (window 6, carry 3) against one-shot Self-MoA as the number of samples grows.

These are simulations: the mock models' accuracies are calibrated on the paper's Table 3, but every
outcome below comes out of the mechanism (correlated latent knowledge per model, a vote by the aggregator),
not from numbers written in. With --out DIR the results are also written as JSON and the figures as SVG.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.regression import fit_quality_diversity  # noqa: E402
from mock_models import MockServer  # noqa: E402
from mock_models.tasks import is_correct, make_tasks  # noqa: E402

DOMAINS = ("MMLU", "CRUX", "MATH")
LETTER = {"i": "generalist", "d": "coder", "m": "mathematician", "j": "generalist-2"}
AGGREGATOR = "generalist"  # the paper's Table 3 aggregates with Qwen2-7B-Instruct, its "i"


class Runner:
    """Runs selfmoa's command line on a task set against one mock server, one batch per configuration."""

    def __init__(self, base_url: str, workdir: str, seed: int):
        self.base_url, self.workdir, self.seed = base_url, workdir, seed
        self.count = 0

    def run(self, tasks, flags: list[str]) -> list[dict]:
        self.count += 1
        tag = f"run{self.count}"
        source = os.path.join(self.workdir, f"{tag}.in.jsonl")
        target = os.path.join(self.workdir, f"{tag}.out.jsonl")
        with open(source, "w", encoding="utf-8") as file:
            for task in tasks:
                file.write(json.dumps({"id": task.id, "prompt": task.prompt, "domain": task.domain}) + "\n")
        argv = [sys.executable, str(ROOT / "selfmoa.py"), "--base-url", self.base_url, *flags,
                "--seed", str(self.seed), "--concurrency", "16", "--trace", "--diversity", "-i", source,
                "-o", target]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"selfmoa failed ({done.returncode}): {' '.join(argv)}\n{done.stderr}")
        by_id = {task.id: task for task in tasks}
        records = []
        with open(target, encoding="utf-8") as file:
            for line in file:
                record = json.loads(line)
                task = by_id[record["id"]]
                proposals = [output for call in record["trace"] if call["role"] == "proposer" and call["layer"] == 1
                             for output in call["outputs"]]
                records.append({"id": task.id, "domain": task.domain, "correct": is_correct(record["answer"], task),
                                "quality": sum(is_correct(p, task) for p in proposals) / len(proposals),
                                "diversity": record["diversity"]["1"], "calls": record["calls"]})
        return records


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def by_domain(records: list[dict], key: str = "correct") -> dict[str, float]:
    out = {d: 100 * mean(r[key] for r in records if r["domain"] == d) for d in DOMAINS}
    out["avg"] = mean(out[d] for d in DOMAINS)
    return out


def moa_flags(letters: str, aggregator: str = AGGREGATOR) -> list[str]:
    flags = ["--method", "moa", "-a", aggregator]
    for letter in letters:
        flags += ["-p", LETTER[letter]]
    return flags


def reproduce(questions: int = 60, compositions: int = 50, sample_counts=(6, 12, 18, 24, 30), seed: int = 0,
              parallel: int = 2) -> dict:
    tasks = [task for domain in DOMAINS for task in make_tasks(domain, questions, seed=seed)]
    mmlu = [task for task in tasks if task.domain == "MMLU"]
    results: dict = {"questions_per_domain": questions, "seed": seed}
    with MockServer() as server, tempfile.TemporaryDirectory() as workdir, \
            concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        runner = Runner(server.base_url, workdir, seed)

        def submit(tasks_, flags):
            return pool.submit(runner.run, tasks_, flags)

        # Table 3: mixed compositions and Self-MoA of each model, all with the same aggregator.
        table3_specs = {"mixed iimmdd": "iimmdd", "mixed mmmddd": "mmmddd", "mixed iiiimd": "iiiimd",
                        "mixed iiiddd": "iiiddd", "Self-MoA iiiiii": "iiiiii", "Self-MoA dddddd": "dddddd",
                        "Self-MoA mmmmmm": "mmmmmm"}
        table3_jobs = {label: submit(tasks, moa_flags(spec)) for label, spec in table3_specs.items()}
        # Table 7: two generalists of similar quality, on MMLU.
        table7_specs = {"Self-MoA iiiiii": "iiiiii", "Self-MoA jjjjjj": "jjjjjj", "mixed iiijjj": "iiijjj"}
        table7_jobs = {label: submit(mmlu, moa_flags(spec)) for label, spec in table7_specs.items()}
        # Table 4: random compositions of six proposers from the four models.
        rng = random.Random(seed)
        regression_tasks = [t for d in DOMAINS for t in make_tasks(d, max(10, questions // 2), seed=seed + 1)]
        mixes = ["".join(sorted(rng.choice("idmj") for _ in range(6))) for _ in range(compositions)]
        regression_jobs = [(mix, submit(regression_tasks, moa_flags(mix))) for mix in mixes]
        table3 = {label: job.result() for label, job in table3_jobs.items()}
        # Seq against one-shot Self-MoA, each domain with its best model (by single-sample accuracy).
        alone = {letter: by_domain(table3[f"Self-MoA {letter * 6}"], "quality") for letter in "idm"}
        best = {d: max("idm", key=lambda letter: alone[letter][d]) for d in DOMAINS}
        seq_jobs = {}
        for domain in DOMAINS:
            model = LETTER[best[domain]]
            subset = [task for task in tasks if task.domain == domain]
            for n in sample_counts:
                seq_jobs[(domain, "one-shot", n)] = submit(subset, ["--method", "self-moa", "-m", model, "-n", str(n)])
                seq_jobs[(domain, "seq", n)] = submit(subset, ["--method", "self-moa-seq", "-m", model, "-n", str(n),
                                                                "--window", "6", "--carry", "3"])
        table7 = {label: job.result() for label, job in table7_jobs.items()}
        regression = [(mix, job.result()) for mix, job in regression_jobs]
        seq = {key: job.result() for key, job in seq_jobs.items()}
        results["runs"] = runner.count

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
    # Table 4: one point per (composition, domain).
    points = {d: [] for d in DOMAINS}
    for mix, records in regression:
        for d in DOMAINS:
            rs = [r for r in records if r["domain"] == d]
            points[d].append({"mix": mix, "quality": 100 * mean(r["quality"] for r in rs),
                              "diversity": mean(r["diversity"] for r in rs),
                              "score": 100 * mean(r["correct"] for r in rs)})
    results["table4_points"] = points
    results["table4"] = {d: fit_quality_diversity([(p["quality"], p["diversity"], p["score"])
                                                           for p in points[d]]) for d in DOMAINS}
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
    out.append("\n### Self-MoA-Seq (window 6, carry 3) vs one-shot Self-MoA, best model per task, accuracy (%)\n")
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


# --- Figures, drawn as SVG with the standard library ----------------------------------------------------


def svg_lines(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> str:
    width, height, pad = 560, 360, 56
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys) - 2, max(ys) + 2
    sx = lambda x: pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)  # noqa: E731
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">{xlabel}</text>',
             f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">{ylabel}</text>']
    for value in sorted(set(xs)):
        parts.append(f'<text x="{sx(value):.1f}" y="{height - pad + 16}" text-anchor="middle">{value:g}</text>')
    for k in range(5):
        value = y0 + k * (y1 - y0) / 4
        parts.append(f'<text x="{pad - 6}" y="{sy(value) + 4:.1f}" text-anchor="end">{value:.0f}</text>')
    for index, (name, points) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{width - pad + 4}" y="{pad + 14 * index}" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_scatter(points: list[dict], title: str) -> str:
    width, height, pad = 560, 360, 56
    qs = [p["quality"] for p in points]
    ds = [p["diversity"] for p in points]
    ss = [p["score"] for p in points]
    sx = lambda x: pad + (x - min(qs)) / ((max(qs) - min(qs)) or 1) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - min(ds)) / ((max(ds) - min(ds)) or 1) * (height - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">quality: mean proposal accuracy '
             f'({min(qs):.0f} to {max(qs):.0f} %)</text>',
             f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">'
             f'diversity: Vendi ({min(ds):.2f} to {max(ds):.2f})</text>']
    for p in points:
        t = (p["score"] - min(ss)) / ((max(ss) - min(ss)) or 1)
        colour = f"rgb({int(40 + 200 * t)},{int(60 + 40 * (1 - t))},{int(220 - 200 * t)})"
        parts.append(f'<circle cx="{sx(p["quality"]):.1f}" cy="{sy(p["diversity"]):.1f}" r="5" fill="{colour}">'
                     f'<title>{p["mix"]}: score {p["score"]:.1f}</title></circle>')
    parts.append(f'<text x="{width - pad}" y="{pad - 8}" text-anchor="end">colour: MoA score, blue low, red high</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_outputs(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2, default=str)
    counts = list(next(iter(results["seq"].values()))["seq"])
    series = {f"{d} {kind}": [(n, results["seq"][d][kind][n]) for n in counts]
              for d in DOMAINS for kind in ("one-shot", "seq")}
    with open(os.path.join(out, "accuracy_vs_samples.svg"), "w", encoding="utf-8") as file:
        file.write(svg_lines(series, "Accuracy vs number of samples", "samples n", "accuracy (%)"))
    for d, points in results["table4_points"].items():
        with open(os.path.join(out, f"quality_vs_diversity_{d}.svg"), "w", encoding="utf-8") as file:
            file.write(svg_scatter(points, f"{d}: MoA compositions, quality vs diversity"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="DIR", help="also write results.json and SVG figures here")
    parser.add_argument("--questions", type=int, default=60, help="questions per domain (default: 60)")
    parser.add_argument("--compositions", type=int, default=50, help="random compositions for the fit (default: 50)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = reproduce(args.questions, args.compositions, seed=args.seed)
    print(markdown(results))
    print(f"({results['runs']} selfmoa batch runs in {time.monotonic() - started:.0f} s; a simulation with mock "
          f"models, not the paper's numbers)")
    if args.out:
        write_outputs(results, args.out)
        print(f"results and figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
