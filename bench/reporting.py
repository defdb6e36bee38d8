"""Reporting never dominates: the cost of --json (and of --diversity) next to the run itself.

    python3 -m bench.reporting [--samples N] [--repeat R]

Runs the command line in-process, Self-MoA-Seq with n samples (default 300, window 6, carry 3) against the
mock server in a process of its own, three ways, side by side and R times each (the median counts): plain
(the answer only), --json (answer, trace of every call, usage), and --json --diversity (the Vendi score of
the samples too, O(n^3) in pure Python). Prints a Markdown table with each wall time and its ratio to the
plain run. The promise: --json costs at most 1.5 times the plain run; only --diversity may cost more.
Exit status 1 if --json breaks the promise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import selfmoa  # noqa: E402
from bench.servers import mock_server  # noqa: E402

LIMIT = 1.5  # --json / plain, at most




def timed(argv: list[str]) -> float:
    """Wall time of one command-line run, its output swallowed."""
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        status = selfmoa.main(argv, environ={})
    elapsed = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"selfmoa {' '.join(argv)} exited with {status}")
    return elapsed


def measure(samples: int, repeat: int) -> list[tuple[str, float]]:
    with mock_server() as url:
        base = ["--base-url", url, "--method", "self-moa-seq", "-m", "generalist", "-n", str(samples),
                "--seed", "0", "--concurrency", "16", "--no-stream", "What is 17 * 23 + 4?"]
        ways = {"plain": base, "--json": base + ["--json"], "--json --diversity": base + ["--json", "--diversity"]}
        timed(base)  # warm up the server's and the client's connections
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(repeat):
            for way, argv in ways.items():  # interleaved, so that a slow moment hits every way alike
                times[way].append(timed(argv))
    return [(way, statistics.median(values)) for way, values in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.reporting", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="Self-MoA-Seq samples (default: 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each way; the median counts (default: 3)")
    args = parser.parse_args(argv)
    results = measure(args.samples, args.repeat)
    plain = results[0][1]
    print(f"### Reporting cost: Self-MoA-Seq, n={args.samples}, window 6, carry 3 "
          f"({selfmoa.seq_rounds(args.samples)} rounds), median of {args.repeat}\n")
    print("| output | wall (s) | / plain |\n|---|---|---|")
    for way, seconds in results:
        print(f"| {way} | {seconds:.3f} | {seconds / plain:.2f} |")
    ratio = results[1][1] / plain
    verdict = "holds" if ratio <= LIMIT else "BROKEN"
    print(f"\n--json costs {ratio:.2f} x the plain run (promise: at most {LIMIT} x): {verdict}.")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
