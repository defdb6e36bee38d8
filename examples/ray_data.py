#!/usr/bin/env python3
"""Run MoA, Self-MoA or Self-MoA-Seq over a JSONL dataset with Ray Data, on one machine or a Ray cluster.

The orchestration of a large batch goes to the cluster engine (its scheduling, retries of tasks whose worker
died, monitoring); the methods and the output records stay selfmoa's. Ray Data reads the input, hands blocks
of rows to a pool of workers (``map_batches`` over a class, so each worker keeps one ``selfmoa.HTTPClient``
and its connections), and the driver streams their records to a file that ``selfmoa merge`` logic then
checks and writes in input order: the output is exactly what ``selfmoa -i IN -o OUT`` writes with the same
flags (spec/batch.md), so a batch rerun on it makes no call and ``selfmoa merge`` accepts it.

    pip install 'ray[data]'                           # Ray is an extra: selfmoa itself needs none of it
    python3 examples/ray_data.py -m qwen -n 6 --base-url http://localhost:8000/v1 -i in.jsonl -o out.jsonl \\
        --workers 4 --concurrency 16
    python3 examples/ray_data.py --address auto ...   # on a running Ray cluster (shared storage for -i and -o)

It takes the main command's method and endpoint flags (``selfmoa --help``; ``--concurrency C`` is the items
each worker runs at once, and each item's calls at once) plus ``--workers`` (Ray actors),
``--batch-size`` (rows per task), ``--worker-cpus`` (CPUs Ray reserves per worker: they wait on HTTP, so a
fraction), ``--address`` and ``--num-cpus`` (for a local Ray). Keys come from the flags and environment
variables as for ``selfmoa`` and are handed to the workers in their constructor arguments.

Faults: a worker process that dies (killed, out of memory) is restarted by Ray and its task runs again
(Ray Data's actor pools default to unlimited restarts and task retries); its rows were never delivered, so
each item reaches the output once. The driver still drops a second record of an id, should one come, and
the final check refuses to write unless every item has exactly one answer. Items that failed (their
servers failed after selfmoa's own retries) are written with status "error": rerun the same command, or
``selfmoa`` on the output, to retry only those. A crashed driver leaves ``OUT.parts.jsonl``; the same
command then skips the items already answered there.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time
from typing import Any

# This file lives in examples/; selfmoa.py and selfmoa_batch.py are one folder up (or installed).
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import selfmoa  # noqa: E402
import selfmoa_batch  # noqa: E402

# Characters that str.splitlines(), and so ray.data.read_text, takes for line ends, but JSONL does not.
_SPLITLINES_ONLY = ("\u2028", "\u2029", "\x85", "\r")
_KEY_VARIABLES = ("OPENAI_BASE_URL", "OPENAI_API_KEY")


class Answerer:
    """One Ray worker: one HTTPClient for its whole life, the method run on every row of each batch handed to it."""

    def __init__(self, args: Any, environ: dict[str, str], method: str, options: dict[str, Any]):
        self.client = selfmoa.make_client(args, environ)
        self.method, self.options = method, options
        self.items_at_once = max(1, args.concurrency)
        self.threads = concurrent.futures.ThreadPoolExecutor(self.items_at_once, thread_name_prefix="item")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = batch["text"] if "text" in batch else batch["record"]
        positions = batch["position"] if "position" in batch else [None] * len(rows)
        items = []
        for text, position in zip(rows, positions):
            if not str(text).strip(" \t\r"):
                continue  # a blank line, skipped as a batch skips it
            record = json.loads(str(text))
            (item,) = selfmoa_batch.check_items([record])
            if "id" not in record:
                item.id = int(position)  # an item without an id has its position as id, as in a batch
            items.append(item)
        records = self.threads.map(lambda item: selfmoa_batch.answer_item(
            item, method=self.method, complete=self.client, **self.options), items)
        return {"line": [json.dumps(record, ensure_ascii=True) for record in records]}


def _parser() -> Any:
    parser = selfmoa.build_parser()
    parser.prog = "python3 examples/ray_data.py"
    parser.description = "Run a selfmoa method over a JSONL file with Ray Data (see this file's docstring)."
    parser.epilog = None
    add = parser.add_argument
    add("--workers", type=int, default=2, metavar="W", help="Ray workers (actors), each with one HTTP client "
        "(default: 2)")
    add("--batch-size", type=int, default=16, metavar="B", help="rows per Ray task (default: 16)")
    add("--worker-cpus", type=float, default=0.25, metavar="C", help="CPUs Ray reserves per worker (default: 0.25)")
    add("--address", metavar="ADDRESS", help="a Ray cluster to join, e.g. auto (default: start a local Ray)")
    add("--num-cpus", type=int, metavar="K", help="CPUs of the local Ray (default: the machine's)")
    return parser


def _parts_done(parts: str, prints: dict[tuple, str]) -> tuple[dict[tuple, bytes], int]:
    """The good lines of a previous driver's parts file (ok, current fingerprint), by id, and how many there were."""
    done: dict[tuple, bytes] = {}
    if not os.path.exists(parts):
        return done, 0
    with open(parts, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break  # a torn last line: that item runs again
            try:
                record = json.loads(line)
                key = (type(record["id"]).__name__, record["id"])
            except (ValueError, KeyError, TypeError):
                continue  # not a record: its item, if any, runs again
            if record.get("status") == "ok" and prints.get(key) == record.get("fingerprint"):
                done.setdefault(key, line)
    return done, len(done)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    try:
        if not (args.input and args.output) or args.prompt or args.format or args.trace or args.json:
            raise selfmoa.ConfigError("the Ray pipeline runs a batch: pass -i FILE and -o FILE (no PROMPT, --format, "
                                      "--trace or --json)")
        if args.shard is not None:
            raise selfmoa.ConfigError("--shard: Ray spreads the items over its workers itself; drop --shard")
        for flag, value, least in (("--workers", args.workers, 1), ("--batch-size", args.batch_size, 1)):
            if value < least:
                raise selfmoa.ConfigError(f"{flag} {value}: pass {flag} >= {least}")
        options = selfmoa._method_options(args, environ)
        selfmoa.make_client(args, environ)  # a bad URL or key is a usage error here, not in every worker
        items = selfmoa_batch.read_items(args.input)
    except selfmoa.ConfigError as exc:
        print(f"ray_data: error: {exc}", file=sys.stderr)
        return 2
    try:
        import ray
        import ray.data
    except ImportError as exc:
        print(f"ray_data: error: Ray Data is not installed ({exc}); pip install 'ray[data]' (selfmoa itself needs "
              f"none of it)", file=sys.stderr)
        return 2
    method = args.method
    prints = {(type(item.id).__name__, item.id): selfmoa_batch.fingerprint(item, method=method, **options)
              for item in items}
    parts = f"{os.path.splitext(args.output)[0]}.parts.jsonl"
    done, reused = _parts_done(parts, prints)
    keys = {name: value for name, value in environ.items()
            if name in _KEY_VARIABLES or name.startswith("SELFMOA_API_KEY_")}

    with open(args.input, "rb") as file:
        raw = file.read().decode("utf-8-sig")
    by_line = not raw.lstrip().startswith("[") and all("id" in item.record for item in items) \
        and not any(char in raw.replace("\r\n", "\n") for char in _SPLITLINES_ONLY)
    if args.address is None:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    else:
        ray.init(address=args.address)
    started = time.monotonic()
    todo = len(items) - reused
    if done:
        print(f"ray_data: {reused} items already answered in {parts}; running the other {todo}", file=sys.stderr)
    if by_line:
        dataset = ray.data.read_text(args.input, drop_empty_lines=True)
        if done:
            skip = set(done)
            dataset = dataset.filter(lambda row: _row_key(row) not in skip)
    else:
        print("ray_data: the input has items without an id, is one JSON list, or holds U+2028, U+2029, U+0085 or a "
              "lone CR inside a line (ray.data.read_text would split there): the driver reads it and hands Ray "
              "its records", file=sys.stderr)
        dataset = ray.data.from_items([{"record": json.dumps(item.record), "position": position}
                                       for position, item in enumerate(items)
                                       if (type(item.id).__name__, item.id) not in done])
    solved = dataset.map_batches(Answerer, fn_constructor_kwargs={"args": args, "environ": keys, "method": method,
                                                                 "options": options},
                                 concurrency=args.workers, batch_size=args.batch_size, num_cpus=args.worker_cpus)
    seen, duplicates, failed = set(done), 0, 0
    with open(parts, "wb") as out:
        out.writelines(done.values())  # a previous driver's good lines; the rest of that file is dropped
        for row in solved.iter_rows():
            record = json.loads(row["line"])
            key = (type(record["id"]).__name__, record["id"])
            if key in seen:
                duplicates += 1  # a task that ran twice: the first record is kept
                continue
            seen.add(key)
            failed += record["status"] != "ok"
            out.write(row["line"].encode("ascii") + b"\n")
            out.flush()
            if len(seen) % 100 == 0:
                print(f"ray_data: {len(seen)}/{len(items)} items", file=sys.stderr)
    elapsed = time.monotonic() - started
    try:  # every item exactly once, in input order, as a batch writes it (failed items too, to be retried)
        selfmoa_batch.merge_outputs(items, [parts], args.output, method=method, keep_failed=True, **options)
    except selfmoa.SelfMoAError as exc:
        print(f"ray_data: {exc}\nray_data: the records are kept in {parts}", file=sys.stderr)
        return 2 if isinstance(exc, selfmoa.ConfigError) else 1
    os.unlink(parts)
    print(f"ray_data: {len(items)} items ({todo} run, {failed} failed, {duplicates} duplicate records dropped) "
          f"in {elapsed:.2f} s with {args.workers} Ray workers; results in {args.output}", file=sys.stderr)
    return 1 if failed else 0


def _row_key(row: dict[str, Any]) -> tuple:
    text = row["text"]
    item_id = json.loads(text)["id"]
    return type(item_id).__name__, item_id


if __name__ == "__main__":
    sys.exit(main())
