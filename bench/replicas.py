"""P7 replicas: batch throughput with 1, 2 and 4 capacity-limited replicas of one model, measured in one run.

    python3 -m bench.replicas                # about 10 s
    python3 -m bench.replicas --latency 0.2 --capacity 4 --seconds 2

Each replica is a mock server in a process of its own that works on at most ``--capacity`` requests at once
and queues the rest (``--max-concurrency``), every request taking ``--latency`` seconds: a GPU server with a
fixed number of batch slots. A replica then answers at most capacity / latency requests per second, so k
replicas can at best answer k times that. The batch (Self-MoA, n=2: one sample request and one aggregation
per item) is sized to take about ``--seconds`` at that best rate, and runs with --concurrency and
--max-in-flight matched to the replicas' total capacity. Printed: requests per second, the speed-up over one
replica, and that speed-up as a share of linear scaling (1.00 = k replicas give exactly k times one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import selfmoa
import selfmoa_batch
from bench.__main__ import table
from bench.servers import mock_server


def throughput(replicas: int, capacity: int, latency: float, seconds: float) -> tuple[int, int, float]:
    """Items, requests and wall seconds of one batch against ``replicas`` mock replicas."""
    best_rate = replicas * capacity / latency  # requests per second the replicas can answer at most
    items = max(4, round(best_rate * seconds / 2))  # two requests per item
    records = [{"id": i, "prompt": f"Compute {i} * 7 + 2. Multiplication comes before addition."}
               for i in range(items)]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(mock_server("--latency", str(latency), "--max-concurrency", str(capacity)))
                for _ in range(replicas)]
        client = stack.enter_context(selfmoa.HTTPClient(urls, max_in_flight=capacity))
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        warm = selfmoa_batch.check_items(records[:replicas * capacity])
        selfmoa_batch.run_batch(warm, os.path.join(folder, "warm.jsonl"), complete=client, model="generalist", n=2,
                          concurrency=replicas * capacity)  # connections open, processes warm
        started = time.perf_counter()
        counts = selfmoa_batch.run_batch(selfmoa_batch.check_items(records), os.path.join(folder, "out.jsonl"),
                                   complete=client, model="generalist", n=2, seed=0,
                                   concurrency=replicas * capacity)
        wall = time.perf_counter() - started
        assert counts["done"] == items, counts
    return items, 2 * items, wall


def p7_replicas(capacity: int = 4, latency: float = 0.2, seconds: float = 2.0, sizes=(1, 2, 4)) -> str:
    rows, base = [], None
    for replicas in sizes:
        items, requests, wall = throughput(replicas, capacity, latency, seconds)
        rate = requests / wall
        base = base or rate / replicas
        speedup = rate / base
        rows.append([replicas, items, requests, f"{wall:.2f}", f"{rate:.1f}", f"{replicas * capacity / latency:.0f}",
                     f"{speedup:.2f}", f"**{speedup / replicas:.2f}**"])
    return table(f"P7 replicas (each serves {capacity} at once, {latency:g} s per request; target >= 0.9 x linear)",
                 ["replicas", "items", "requests", "wall s", "requests / s", "capacity / s", "speed-up",
                  "share of linear"], rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=4, help="requests each replica serves at once (4)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request (0.2)")
    parser.add_argument("--seconds", type=float, default=2.0, help="target length of each batch (2)")
    args = parser.parse_args(argv)
    print(p7_replicas(args.capacity, args.latency, args.seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
