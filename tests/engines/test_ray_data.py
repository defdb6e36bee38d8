"""examples/ray_data.py on a real local Ray against the mock models: every item exactly once, also when a worker
process is killed in the middle of the run, and the records a batch writes.

Ray is an optional extra: these tests are skipped (with the reason) where `ray[data]` is not installed. CI runs
them in a virtual environment of their own after the default run (.ci/run); by hand:

    python3 -m venv .ci-venv/ray && .ci-venv/ray/bin/pip install -e '.[test]' 'ray[data]'
    .ci-venv/ray/bin/python -m pytest -n 0 tests/engines/test_ray_data.py
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]'); CI runs this in its "
                                       "optional Ray job")

import selfmoa  # noqa: E402
import selfmoa_batch  # noqa: E402
from mock_models import MockServer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGS = ["-m", "generalist", "-n", "2", "--seed", "11", "--concurrency", "4"]
ITEMS = 500


def write_input(path: pathlib.Path) -> list[int]:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Question {i}: what is {i} times 3?", "gold": str(3 * i)})
                            + "\n" for i in range(ITEMS)), encoding="utf-8")
    return list(range(ITEMS))


def pipeline(folder: pathlib.Path, base_url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / "ray_data.py"), *FLAGS, "--base-url", base_url,
                             "-i", "in.jsonl", "-o", "out.jsonl", "--workers", "2", "--num-cpus", "2", *extra],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0"})


def records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def answered_by_one_batch(folder: pathlib.Path, base_url: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "selfmoa.py"), *FLAGS, "--base-url", base_url, "-i", "in.jsonl",
                           "-o", "batch.jsonl"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return records(folder / "batch.jsonl")


def test_the_ray_pipeline_answers_500_items_exactly_once_with_two_workers_as_a_batch_writes_them(tmp_path):
    ids = write_input(tmp_path / "in.jsonl")
    with MockServer() as server:
        run = pipeline(tmp_path, server.base_url)
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        assert f"{ITEMS} items ({ITEMS} run, 0 failed" in err
        got = records(tmp_path / "out.jsonl")
        assert [record["id"] for record in got] == ids
        assert all(record["status"] == "ok" for record in got)
        batch = answered_by_one_batch(tmp_path, server.base_url)
        served = len(server.requests)
        # The records a batch writes: the same answers, fingerprints and inputs, so a batch rerun makes no call.
        assert [(r["answer"], r["fingerprint"], r["input"], r["method"]) for r in got] == \
            [(r["answer"], r["fingerprint"], r["input"], r["method"]) for r in batch]
        again = subprocess.run([sys.executable, str(ROOT / "selfmoa.py"), *FLAGS, "--base-url", server.base_url, "-i",
                                "in.jsonl", "-o", "out.jsonl"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and f"{ITEMS} already done" in again.stderr, again.stderr
        assert len(server.requests) == served
    assert not (tmp_path / "out.parts.jsonl").exists()


def ray_workers() -> dict[int, str]:
    """The processes of the pipeline's workers (Ray titles them after the class they run), by pid."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if "Answerer" in title and title.startswith("ray::"):
                found[int(entry.name)] = title
    return found


@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc (Linux)")
def test_a_ray_worker_killed_mid_run_is_replaced_and_every_item_is_still_answered_exactly_once(tmp_path):
    ids = write_input(tmp_path / "in.jsonl")
    with MockServer(latency=0.05) as server:  # about 20 s of work: long enough to kill a worker in the middle
        run = pipeline(tmp_path, server.base_url)
        try:
            deadline = time.monotonic() + 300
            while len(server.requests) < 150 or not ray_workers():
                assert run.poll() is None, run.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the pipeline never got going"
                time.sleep(0.05)
            victim = sorted(ray_workers())[0]
            at_kill = len(server.requests)
            os.kill(victim, signal.SIGKILL)
            _, err = run.communicate(timeout=600)
        finally:
            if run.poll() is None:
                run.kill()
        assert at_kill < 2 * ITEMS * 0.8, f"the worker was killed too late to matter ({at_kill} requests)"
        assert run.returncode == 0, err[-3000:]
        got = records(tmp_path / "out.jsonl")
        assert [record["id"] for record in got] == ids
        assert all(record["status"] == "ok" for record in got)
        # Nothing answered twice reached the output, and the killed worker's rows were run again.
        assert len({record["id"] for record in got}) == ITEMS
        assert len(server.requests) >= 2 * ITEMS
        batch = answered_by_one_batch(tmp_path, server.base_url)
        assert [r["answer"] for r in got] == [r["answer"] for r in batch]


def test_the_pipeline_refuses_bad_flags_before_starting_ray(tmp_path):
    write_input(tmp_path / "in.jsonl")
    for argv, complaint in ((["--workers", "0"], "--workers 0"), (["--shard", "0/2"], "--shard"),
                            (["--json"], "the Ray pipeline runs a batch")):
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "ray_data.py"), *FLAGS, "--base-url",
                               "http://127.0.0.1:9/v1", "-i", "in.jsonl", "-o", "out.jsonl", *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and complaint in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert selfmoa.__version__ and selfmoa_batch.BATCH_FORMAT == 1


def test_items_without_ids_or_with_line_separators_in_their_text_and_a_crashed_drivers_parts(tmp_path):
    """An input that ray.data.read_text would split wrongly (a raw U+2028 inside a string; items without an id,
    whose id is their position) is handed to Ray by the driver instead; a parts file a crashed driver left is
    resumed: its answered items make no call. The output is still exactly the batch's."""
    prompts = [f"Question {i}:\u2028what is {i} times 3?" if i % 5 == 0 else f"Question {i}?" for i in range(20)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts),
                                       encoding="utf-8")
    assert "\u2028" in (tmp_path / "in.jsonl").read_text(encoding="utf-8")
    with MockServer() as server:
        batch = answered_by_one_batch(tmp_path, server.base_url)
        left = [json.dumps(record) + "\n" for record in batch[:6]]
        (tmp_path / "out.parts.jsonl").write_text("".join(left) + left[6 - 1][:30], encoding="utf-8")  # torn tail
        before = len(server.requests)
        run = pipeline(tmp_path, server.base_url)
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        assert "the driver reads it and hands Ray its records" in err
        assert "6 items already answered" in err
        assert len(server.requests) - before == 2 * 14  # the 14 others only: one sample request, one aggregation
    got = records(tmp_path / "out.jsonl")
    assert [record["id"] for record in got] == list(range(20))
    assert [(r["answer"], r["fingerprint"], r["input"]) for r in got] == \
        [(r["answer"], r["fingerprint"], r["input"]) for r in batch]
