"""The Ray Data pipeline (examples/ray_data.py) next to one selfmoa batch process, on the same mock, in one run.

    python3 -m bench.ray_data                     # needs ray[data]; about a minute on 2 CPUs
    python3 -m bench.ray_data --items 500 --latency 0.05 --workers 2 --concurrency 16

Both run Self-MoA (n=2, seed 0: one sample request and one aggregation per item) over the same input against
one mock server (a process of its own, ``--latency`` seconds per request), with the same number of calls in
flight: the batch with ``--concurrency C``, the pipeline with ``--workers W`` Ray workers of C / W items at
once each. Printed: wall seconds and items per second of each, the pipeline's also without Ray's start-up
(its own timing of the dataset), and the ratios pipeline / batch. Both outputs are checked: every item once,
the same answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from bench.__main__ import table
from bench.servers import ROOT, mock_server

FLAGS = ["-m", "generalist", "-n", "2", "--seed", "0"]


def timed(argv: list[str], folder: str) -> tuple[float, str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=folder, env=environ, capture_output=True, text=True,
                          timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, done.stderr


def answers(path: str) -> list[tuple]:
    with open(path, encoding="utf-8") as file:
        return [(record["id"], record["status"], record.get("answer")) for record in map(json.loads, file)]


def compare(items: int, latency: float, workers: int, concurrency: int) -> str:
    with tempfile.TemporaryDirectory() as folder, mock_server("--latency", str(latency)) as url:
        with open(os.path.join(folder, "in.jsonl"), "w", encoding="utf-8") as file:
            file.writelines(json.dumps({"id": i, "prompt": f"Compute {i} * 7 + 2."}) + "\n" for i in range(items))
        batch_wall, _ = timed([str(ROOT / "selfmoa.py"), *FLAGS, "--base-url", url, "--concurrency", str(concurrency),
                               "-i", "in.jsonl", "-o", "batch.jsonl"], folder)
        ray_wall, log = timed([str(ROOT / "examples" / "ray_data.py"), *FLAGS, "--base-url", url, "--concurrency",
                               str(max(1, concurrency // workers)), "--workers", str(workers), "-i", "in.jsonl",
                               "-o", "ray.jsonl", "--num-cpus", str(os.cpu_count() or 2)], folder)
        found = re.search(r"in ([0-9.]+) s with", log)
        ray_work = float(found[1]) if found else float("nan")
        batch, ray = answers(os.path.join(folder, "batch.jsonl")), answers(os.path.join(folder, "ray.jsonl"))
        assert batch == ray and len(batch) == items and all(status == "ok" for _, status, _ in batch)
    rows = [["one selfmoa batch process", f"{batch_wall:.2f}", f"{items / batch_wall:.1f}", "1.00", ""],
            [f"Ray Data, {workers} workers, with Ray's start-up", f"{ray_wall:.2f}", f"{items / ray_wall:.1f}",
             f"**{batch_wall / ray_wall:.2f}**", ""],
            [f"Ray Data, {workers} workers, the dataset alone", f"{ray_work:.2f}", f"{items / ray_work:.1f}",
             f"**{batch_wall / ray_work:.2f}**", "same answers, every item once"]]
    return table(f"Ray Data pipeline vs one selfmoa process ({items} items, Self-MoA n=2, mock at {latency:g} s per "
                 f"request, {concurrency} calls in flight)", ["run", "wall s", "items / s", "throughput ratio", ""],
                 rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.ray_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500, help="items in the batch (500)")
    parser.add_argument("--latency", type=float, default=0.05, help="the mock's seconds per request (0.05)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (2)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight in all (16)")
    args = parser.parse_args(argv)
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        print(f"bench.ray_data: skipped: Ray Data is not installed ({exc}); pip install 'ray[data]'")
        return 0
    print(compare(args.items, args.latency, args.workers, args.concurrency), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
