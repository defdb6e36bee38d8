"""What `selfmoa serve` costs, measured side by side in one run (zero model latency, so only overhead shows).

    python3 -m bench.serve            # about 20 s on 2 cores
    python3 -m bench.serve --quick    # fewer repetitions

S1 added latency   one Self-MoA request (n=2: one sample request, one aggregation) through `selfmoa serve`
                   vs the same `self_moa` call made by the library in this process; median of interleaved
                   repetitions. Target: under 5 ms added per request.
S2 proxy rate      requests per second of pass-through (any other model name) vs calling the mock directly,
                   from the same client threads with kept-alive connections.

The mock and the server each run in a process of their own, so that neither competes with the measuring
client for the GIL. Absolute numbers depend on the machine; the differences and ratios are the point.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import statistics
import sys
import threading
import time
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import selfmoa  # noqa: E402
from bench.servers import server_process as process  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is 17 * 23 + 4? Think briefly, then give the answer."}]




class Poster:
    """POST JSON over one kept-alive connection (the leanest client, so that it adds least to what is measured)."""

    def __init__(self, base_url: str):
        parts = urllib.parse.urlsplit(base_url)
        self.path = parts.path + "/chat/completions"
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def __call__(self, body: dict) -> dict:
        self.connection.request("POST", self.path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)


def s1_added_latency(mock_url: str, serve_url: str, repetitions: int) -> str:
    client = selfmoa.HTTPClient(mock_url)
    poster = Poster(serve_url)
    library, served = [], []
    for i in range(repetitions + 5):  # interleaved, so that drift hits both alike; the first 5 warm up
        started = time.perf_counter()
        answer = selfmoa.self_moa(MESSAGES, "generalist", n=2, seed=i, complete=client).answer
        library_time = time.perf_counter() - started
        started = time.perf_counter()
        reply = poster({"model": "self-moa/generalist", "messages": MESSAGES, "seed": i, "selfmoa": {"n": 2}})
        served_time = time.perf_counter() - started
        assert reply["choices"][0]["message"]["content"] == answer, "serve and the library disagree"
        if i >= 5:
            library.append(library_time)
            served.append(served_time)
    lib, srv = statistics.median(library), statistics.median(served)
    added = srv - lib
    rows = [["library: self_moa(..., n=2) in this process", f"{lib * 1000:.2f}", ""],
            ["through selfmoa serve: POST self-moa/generalist", f"{srv * 1000:.2f}",
             f"**{added * 1000:+.2f}** ({'meets' if added < 0.005 else 'MISSES'} < 5 ms)"]]
    return table(f"S1 added latency per request (median of {repetitions}, zero model latency, 2 calls each)",
                 ["path", "ms per request", "added by serve"], rows)


def rate(base_url: str, model: str, threads: int, seconds: float) -> float:
    """Requests per second that `threads` kept-alive clients get in `seconds` (bounded in time)."""
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def work(slot: int) -> None:
        poster = Poster(base_url)
        while time.perf_counter() < deadline:
            poster({"model": model, "messages": MESSAGES, "seed": counts[slot], "max_tokens": 16})
            counts[slot] += 1

    workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def s2_proxy_rate(mock_url: str, serve_url: str, threads: int, seconds: float, rounds: int = 5) -> str:
    rate(serve_url, "generalist", threads, 0.3)  # warm up both paths
    rate(mock_url, "generalist", threads, 0.3)
    direct, through = [], []
    for _ in range(rounds):  # alternated, so that the load of a shared machine hits both alike
        direct.append(rate(mock_url, "generalist", threads, seconds))
        through.append(rate(serve_url, "generalist", threads, seconds))
    ratios = sorted(t / d for t, d in zip(through, direct))
    rows = [["direct to the mock", f"{statistics.median(direct):.0f}", "1.00"],
            ["passed through selfmoa serve", f"{statistics.median(through):.0f}",
             f"**{statistics.median(ratios):.2f}** (rounds: {ratios[0]:.2f} to {ratios[-1]:.2f})"]]
    return table(f"S2 pass-through rate (median of {rounds} alternated rounds of {seconds:g} s, {threads} client "
                 f"threads, zero model latency)", ["path", "requests/s", "ratio to direct"], rows)


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n\n")
    parser = argparse.ArgumentParser(prog="python3 -m bench.serve", description=doc[0] + "\n\n" + doc[2],
                                     epilog=doc[3], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few seconds)")
    quick = parser.parse_args(argv).quick
    with process("-m", "mock_models", "--port", "0") as mock_url, \
            process("selfmoa.py", "serve", "--port", "0", "--base-url", mock_url, "--concurrency", "8") as serve_url:
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
        print(s1_added_latency(mock_url, serve_url, 40 if quick else 200))
        print(s2_proxy_rate(mock_url, serve_url, 4, 0.5 if quick else 1.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
