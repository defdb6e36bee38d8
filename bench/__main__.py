"""selfmoa benchmarks: ratios measured side by side in one run, printed as Markdown tables.

    python3 -m bench            # all of them (about 30 s on 2 cores)
    python3 -m bench P1 P3      # some of them

Run it with the virtual environment's Python (.venv/bin/python -m bench) for P3's comparison with
requests, which the test extra installs; with another Python P3 says that requests is missing.

Each benchmark starts the mock server (mock_models) in its own process, with injected latency where it
matters, and compares selfmoa's wall time with the limit the calls themselves set, or with another client
measured in the same run. Absolute times depend on the machine; the ratios are the point.

P1 batch fan-out      N prompts x Self-MoA n=6 at concurrency C: wall / max(critical path, calls x latency / C)
P2 Seq on the fly     n=30, w=6, r=3, samples arriving at a steady rate: wall / pipelined ideal
P3 client overhead    calls per second at zero latency: selfmoa.HTTPClient vs requests.Session vs urllib
P4 n in one request   requests and prompt tokens for Self-MoA n=6, server honouring n vs ignoring it
P5 memory             a 10,000-item batch: RSS growth from item 1,000 to item 10,000; the peak of a
                      fresh run and of a resume of its finished file, at 5,000 and 50,000 items
P6 mock capacity      requests per second the mock sustains at concurrency 32 with keep-alive
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import selfmoa  # noqa: E402
import selfmoa_batch  # noqa: E402
from bench.servers import mock_server  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is 17 * 23 + 4? Think briefly, then give the answer."}]




def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rss_mib() -> float:
    """Resident memory now (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- P1 -----------------------------------------------------------------------------------------------


def bare_client_batch(url: str, items: int, concurrency: int) -> float:
    """The same Self-MoA batch (one n=6 request, then one aggregation per item) by the plainest client:
    `concurrency` threads with a kept-alive http.client connection each. What the mock and the machine
    cost per call, without any orchestration."""
    import http.client
    import queue

    host, port = url.split("//")[1].split("/")[0].split(":")
    todo: queue.Queue = queue.Queue()
    for i in range(items):
        todo.put(i)

    def post(connection, body):
        connection.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
        return json.loads(connection.getresponse().read())

    def worker():
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            messages = [{"role": "user", "content": f"{MESSAGES[0]['content']} #{i}"}]
            first = post(connection, {"model": "generalist", "messages": messages, "n": 6, "seed": 0})
            refs = [c["message"]["content"] for c in first["choices"]]
            post(connection, {"model": "generalist", "seed": 0,
                              "messages": selfmoa.inject_references(messages, refs)})

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def p1_batch_fanout(items: int = 64, concurrency: int = 32, latency: float = 0.2) -> str:
    rows = []
    with mock_server("--latency", str(latency)) as url:
        bare = bare_client_batch(url, items, concurrency)
        ideal = max(2 * latency, 2 * items * latency / concurrency)
        rows.append(["bare http.client threads (no orchestration)", items, concurrency, 2 * items, f"{bare:.2f}",
                     f"{ideal:.2f}", f"{bare / ideal:.3f}"])
    # Cold: a new client, whose first request to the server and model goes alone (the probe of spec/wire.md
    # section 8, one call's latency once per process); warm: a client that has already had one item answered.
    for use_n, warm in ((True, False), (True, True), (False, False), (False, True)):
        with mock_server("--latency", str(latency)) as url, tempfile.TemporaryDirectory() as tmp:
            batch = selfmoa_batch.check_items([{"id": i, "prompt": f"{MESSAGES[0]['content']} #{i}"}
                                               for i in range(items)])
            client = selfmoa.HTTPClient(url)
            if warm:
                selfmoa_batch.run_batch(selfmoa_batch.check_items([{"id": "warm", "prompt": "Warm up."}]),
                                        os.path.join(tmp, "warm.jsonl"), method="self-moa", complete=client,
                                        concurrency=concurrency, model="generalist", n=6, seed=0, use_n=use_n)
            started = time.perf_counter()
            counts = selfmoa_batch.run_batch(batch, os.path.join(tmp, "out.jsonl"), method="self-moa", complete=client,
                                       concurrency=concurrency, model="generalist", n=6, seed=0, use_n=use_n)
            wall = time.perf_counter() - started
            records = [json.loads(line) for line in open(os.path.join(tmp, "out.jsonl"))]
            requests = sum(r["requests"] for r in records)
            assert counts["done"] == items, counts
            critical = max(r["requests"] for r in records) if use_n else 2  # calls one after another per item
            ideal = max(critical * latency, requests * latency / concurrency)
            rows.append([f"selfmoa run_batch, n in one request: {use_n}, {'warm' if warm else 'cold'} client", items,
                         concurrency, requests, f"{wall:.2f}",
                         f"{ideal:.2f}", f"**{wall / ideal:.3f}**"])
    return table(f"P1 batch fan-out ({latency:g} s per call; target wall/ideal <= 1.05)",
                 ["variant", "items", "C", "requests", "wall s", "ideal s", "wall / ideal"], rows)


# --- P2 -----------------------------------------------------------------------------------------------


def p2_seq_on_the_fly(n: int = 30, window: int = 6, carry: int = 3, latency: float = 0.2,
                      interval: float = 0.05) -> str:
    """Samples arrive one every `interval` s (a generator still producing) while rounds aggregate."""
    k = window - carry
    ready = [(i + 1) * interval for i in range(n)]  # when sample i exists
    rounds = selfmoa.seq_rounds(n, window, carry)
    # Pipelined ideal: round t starts when its last sample exists and round t-1 has ended.
    end = 0.0
    for t in range(rounds):
        last = min(n, window + t * k) - 1
        end = max(end, ready[last]) + latency
    pipelined = end
    all_first = ready[-1] + rounds * latency  # wait for every sample, then aggregate round after round
    with mock_server("--latency", str(latency)) as url:
        client = selfmoa.HTTPClient(url)
        started = time.perf_counter()

        def samples():
            for i in range(n):
                time.sleep(max(0.0, started + ready[i] - time.perf_counter()))
                yield f"Sample {i}: 17 * 23 + 4 = 395. The answer is 395."

        result = selfmoa.self_moa_seq(MESSAGES, complete=client, samples=samples(), aggregator="generalist",
                                      window=window, carry=carry, seed=0)
        wall = time.perf_counter() - started
    assert result.params["rounds"] == rounds
    return table(f"P2 Self-MoA-Seq on the fly (n={n}, w={window}, r={carry}; a sample every {interval:g} s, "
                 f"{latency:g} s per aggregation; target wall/pipelined <= 1.10)",
                 ["rounds", "wall s", "pipelined ideal s", "wall / ideal", "aggregate-after-all ideal s"],
                 [[rounds, f"{wall:.2f}", f"{pipelined:.2f}", f"**{wall / pipelined:.3f}**", f"{all_first:.2f}"]])


# --- P3 -----------------------------------------------------------------------------------------------


def p3_client_overhead(calls: int = 400) -> str:
    body = json.dumps({"model": "generalist", "messages": MESSAGES, "temperature": 0.7, "seed": 1}).encode()
    request = selfmoa.Request("generalist", tuple(MESSAGES), 0.7, None, 1, 1)
    rows = []
    with mock_server() as url:
        def timed(name, one_call):
            one_call()  # warm up (connect)
            started = time.perf_counter()
            for _ in range(calls):
                one_call()
            rate = calls / (time.perf_counter() - started)
            rows.append([name, calls, f"{rate:.0f}"])
            return rate

        client = selfmoa.HTTPClient(url)
        ours = timed("selfmoa.HTTPClient (keep-alive)", lambda: client(request))
        try:
            import requests
        except ImportError:
            theirs = None
            rows.append(["requests.Session (requests is not installed here: run python3 -m bench with "
                         ".venv/bin/python, or pip install requests)", "-", "-"])
        else:
            session = requests.Session()
            theirs = timed("requests.Session (keep-alive)",
                           lambda: session.post(url + "/chat/completions", data=body,
                                                headers={"Content-Type": "application/json"}).json())
        timed("urllib.request (new connection per call)", lambda: json.load(urllib.request.urlopen(
            urllib.request.Request(url + "/chat/completions", data=body,
                                   headers={"Content-Type": "application/json"}))))
    ratio = f"(selfmoa / requests = {ours / theirs:.2f})" if theirs else ""
    return table(f"P3 client overhead at zero latency, one thread (target selfmoa >= requests) {ratio}",
                 ["client", "calls", "calls / s"], rows)


# --- P4 -----------------------------------------------------------------------------------------------


def p4_n_in_one_request(n: int = 6) -> str:
    rows = []
    for flags, label in (((), "honours n (vLLM, SGLang, OpenAI)"), (("--ignore-n",), "ignores n (llama.cpp)")):
        with mock_server(*flags) as url:
            result = selfmoa.self_moa(MESSAGES, "generalist", n=n, complete=selfmoa.HTTPClient(url), seed=0)
        proposals = [c for c in result.trace if c.role == "proposer"]
        rows.append([label, result.calls, result.requests, len(proposals),
                     sum(c.prompt_tokens or 0 for c in proposals)])
    return table(f"P4 Self-MoA n={n}: samples in one request", ["server", "generations", "requests",
                                                               "sample requests", "sample prompt tokens"], rows)


# --- P5 -----------------------------------------------------------------------------------------------


def p5_memory(items: int = 10_000, concurrency: int = 32) -> str:
    marks: dict[int, float] = {}

    def progress(finished, failed, total, elapsed):
        if finished in (1_000, items) or finished % 1000 == 0:
            marks[finished] = rss_mib()

    with mock_server() as url, tempfile.TemporaryDirectory() as tmp:
        batch = selfmoa_batch.check_items([{"id": i, "prompt": f"Question number {i}: what is {i} + {i}?"}
                                     for i in range(items)])
        started = time.perf_counter()
        counts = selfmoa_batch.run_batch(batch, os.path.join(tmp, "out.jsonl"), method="self-moa",
                                   complete=selfmoa.HTTPClient(url), concurrency=concurrency, progress=progress,
                                   model="generalist", n=6, seed=0)
        wall = time.perf_counter() - started
    assert counts["done"] == items, counts
    first, last = marks.get(1_000), marks.get(items)
    growth = table(f"P5 memory over a {items:,}-item Self-MoA batch (n=6, C={concurrency}, {wall:.0f} s)",
                   ["RSS at item 1,000 (MiB)", f"RSS at item {items:,} (MiB)", "growth (MiB)"],
                   [[f"{first:.1f}", f"{last:.1f}", f"**{last - first:+.1f}**"]])
    return growth + "\n" + p5_end_of_run_peaks()


# The peak of one batch process (its whole life: the run, the final rewrite, or a resume), in its own process
# so that no other benchmark's peak counts. The items run through a plain completion function (no HTTP):
# the point is what the output file costs, read back and rewritten at the end of a run and on a resume.
PEAK_RUN = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import selfmoa_batch
items, output = int(sys.argv[2]), sys.argv[3]
batch = selfmoa_batch.check_items({"id": i, "prompt": f"Question number {i}: what is {i} + {i}?"}
                                  for i in range(items))
def complete(request):
    return f"The answer is {len(request.messages[-1]['content'])}, as the references agree. " * 3
if output == "-":  # the items alone, and their fingerprints: what any run holds
    prints = [selfmoa_batch._fingerprint(item.messages, "self-moa", {"n": 2}) for item in batch]
    print(0, 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    sys.exit()
counts = selfmoa_batch.run_batch(batch, output, method="self-moa", complete=complete, concurrency=8,
                                 model="generalist", n=2, seed=0)
print(counts["done"], counts["skipped"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def p5_end_of_run_peaks(sizes: tuple[int, ...] = (5_000, 50_000)) -> str:
    """Peak RSS of a fresh run (which ends by rewriting its output) and of a resume of the finished file
    (nothing left to do: the output is read back and checked), at two item counts."""
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for items in sizes:
            output = os.path.join(tmp, f"out-{items}.jsonl")
            peaks = []
            for expect, path in (("items", "-"), ("run", output), ("resume", output)):
                started = time.perf_counter()
                done, skipped, peak = subprocess.run(
                    [sys.executable, "-c", PEAK_RUN, str(ROOT), str(items), path], check=True,
                    capture_output=True, text=True).stdout.split()
                assert (int(done), int(skipped)) == {"items": (0, 0), "run": (items, 0), "resume": (0, items)}[expect]
                peaks.append((float(peak), time.perf_counter() - started))
            size = os.path.getsize(output) / 2 ** 20
            rows.append([f"{items:,}", f"{size:.0f}", f"{peaks[0][0]:.0f}",
                         f"{peaks[1][0]:.0f} ({peaks[1][1]:.0f} s)", f"{peaks[2][0]:.0f} ({peaks[2][1]:.0f} s)",
                         f"**{max(peaks[1][0], peaks[2][0]) - peaks[0][0]:+.0f}**"])
    return table("P5 peak memory of a whole batch process: holding the items only, a fresh run (ending in the "
                 "rewrite), and a resume of the finished file (Self-MoA n=2, no HTTP)",
                 ["items", "output (MiB)", "items alone: peak RSS (MiB)", "run: peak RSS (MiB)",
                  "resume of the finished file: peak RSS (MiB)", "most over the items alone (MiB)"], rows)


# --- P6 -----------------------------------------------------------------------------------------------


def p6_mock_capacity(concurrency: int = 32, seconds: float = 3.0) -> str:
    import http.client

    body = json.dumps({"model": "generalist", "messages": MESSAGES, "temperature": 0.7, "seed": 1})
    counts = [0] * concurrency
    with mock_server() as url:
        host, port = url.split("//")[1].split("/")[0].split(":")
        stop = time.perf_counter() + seconds

        def hammer(slot):
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            while time.perf_counter() < stop:
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                connection.getresponse().read()
                counts[slot] += 1

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rate = sum(counts) / (time.perf_counter() - started)
    return table(f"P6 mock server capacity (keep-alive, {concurrency} client connections, {seconds:g} s)",
                 ["requests", "requests / s"], [[sum(counts), f"{rate:.0f}"]])


BENCHMARKS = {"P1": p1_batch_fanout, "P2": p2_seq_on_the_fly, "P3": p3_client_overhead,
              "P4": p4_n_in_one_request, "P5": p5_memory, "P6": p6_mock_capacity}


def build_parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").split("\n\n")
    return argparse.ArgumentParser(prog="python3 -m bench", description=doc[0] + "\n\n" + doc[4],
                                   epilog=doc[3] + "\n\n" + doc[2],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str]) -> int:
    parser = build_parser()
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"the benchmarks to run, among "
                        f"{', '.join(BENCHMARKS)} (default: all of them)")
    chosen = [name.upper() for name in parser.parse_args(argv).names] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    print(f"selfmoa {selfmoa.__version__}, Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {platform.system()}\n")
    for name in chosen:
        started = time.perf_counter()
        print(BENCHMARKS[name](), flush=True)
        print(f"({name} took {time.perf_counter() - started:.1f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
