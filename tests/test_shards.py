"""Shards and merge (spec/batch.md, section 8): N processes run one input, and `selfmoa merge` joins their
outputs only when every input item is answered exactly once, for the input's fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import selfmoa
import selfmoa_batch
from mock_models import MockServer
from tests import test_readme

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = ["-m", "generalist", "-n", "2", "--seed", "7", "--concurrency", "4"]


def write_input(path: pathlib.Path, count: int, start: int = 0) -> list[str]:
    ids = [f"q{i}" for i in range(start, start + count)]
    path.write_text("".join(json.dumps({"id": item_id, "prompt": f"What is {i} plus {i}?", "dataset": "toy"}) + "\n"
                            for i, item_id in enumerate(ids, start)), encoding="utf-8")
    return ids


def cli(*argv: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """selfmoa's command line run in this process with ``cwd`` as the working folder: its exit status and what it
    printed, as running ``selfmoa.py`` gives them (``process`` runs it as a process of its own)."""
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = selfmoa.main(list(argv), environ=os.environ)
            except SystemExit as exit:  # argparse's usage errors
                code = exit.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def process(*argv: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "selfmoa.py"), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """A 300-item input run as three shard processes at once against one mock server."""
    folder = tmp_path_factory.mktemp("shards")
    ids = write_input(folder / "in.jsonl", 300)
    with MockServer() as server:
        processes = [subprocess.Popen([sys.executable, str(ROOT / "selfmoa.py"), *FLAGS, "--base-url", server.base_url,
                                       "-i", "in.jsonl", "-o", f"out.{k}.jsonl", "--shard", f"{k}/3"],
                                      cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for k in range(3)]
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
        single = cli(*FLAGS, "--base-url", server.base_url, "-i", "in.jsonl", "-o", "single.jsonl", cwd=folder)
        assert single.returncode == 0, single.stderr
    return folder, ids


def shard_files(folder: pathlib.Path) -> list[str]:
    return [f"out.{k}.jsonl" for k in range(3)]


def test_B10_three_shard_processes_merge_into_exactly_the_300_answers_in_input_order(three_shards, tmp_path):
    """Three shards of a 300-item input, run as three processes, each answer their own items only; merged, they are
    exactly the 300 answers in input order, line for line what one process running the whole input writes."""
    folder, ids = three_shards
    per_shard = [[record["id"] for record in lines(folder / name)] for name in shard_files(folder)]
    assert sorted(sum(per_shard, [])) == sorted(ids)
    for k, shard in enumerate(per_shard):
        assert shard and all(selfmoa_batch.shard_of(item_id, 3) == k for item_id in shard)
    merged = process("merge", *FLAGS, "-i", "in.jsonl", "-o", str(tmp_path / "all.jsonl"), *shard_files(folder),
                     cwd=folder)
    assert merged.returncode == 0, merged.stderr
    assert "merged 300 items from 3 shard outputs" in merged.stderr
    records = lines(tmp_path / "all.jsonl")
    assert [record["id"] for record in records] == ids
    assert all(record["status"] == "ok" for record in records)
    single = lines(folder / "single.jsonl")
    assert [(r["answer"], r["fingerprint"], r["input"]) for r in records] == \
        [(r["answer"], r["fingerprint"], r["input"]) for r in single]


def test_B10_a_merged_output_is_a_finished_batch_output_so_a_rerun_makes_no_call(three_shards, tmp_path):
    folder, _ = three_shards
    merged = cli("merge", *FLAGS, "-i", "in.jsonl", "-o", str(tmp_path / "all.jsonl"), *shard_files(folder), cwd=folder)
    assert merged.returncode == 0, merged.stderr
    with MockServer() as server:
        again = cli(*FLAGS, "--base-url", server.base_url, "-i", "in.jsonl", "-o", str(tmp_path / "all.jsonl"),
                    cwd=folder)
        assert again.returncode == 0, again.stderr
        assert server.requests == []
    assert "0 answered, 0 failed, 300 already done" in again.stderr


def test_B10_merge_writes_the_alpaca_eval_format_of_one_whole_run(three_shards, tmp_path):
    folder, _ = three_shards
    out = tmp_path / "outputs.json"
    merged = cli("merge", *FLAGS, "-i", "in.jsonl", "-o", str(out), "--format", "alpaca_eval", *shard_files(folder),
                 cwd=folder)
    assert merged.returncode == 0, merged.stderr
    entries = json.loads(out.read_text(encoding="utf-8"))
    single = lines(folder / "single.jsonl")
    assert entries == [{"instruction": r["input"]["prompt"], "output": r["answer"], "dataset": "toy",
                        "generator": "selfmoa-self-moa-generalist-n2"} for r in single]
    assert [r["id"] for r in lines(tmp_path / "outputs.json.jsonl")] == [r["id"] for r in single]


def corrupt(folder: pathlib.Path, tmp_path: pathlib.Path, kind: str) -> tuple[list[str], str]:
    """Shard outputs with one defect of `kind`, and a text the merge's message must hold."""
    names = []
    for k in range(3):
        data = (folder / f"out.{k}.jsonl").read_bytes()
        (tmp_path / f"out.{k}.jsonl").write_bytes(data)
        names.append(str(tmp_path / f"out.{k}.jsonl"))
    first = tmp_path / "out.0.jsonl"
    content = first.read_bytes().split(b"\n")[:-1]
    record = json.loads(content[-1])
    if kind == "missing":
        first.write_bytes(b"\n".join(content[:-1]) + b"\n")
        return names, f"1 item(s) of the input have no line in any shard output (is a shard's output missing, or " \
                      f"was it run with another N?): ids {json.dumps(record['id'])}"
    if kind == "duplicated":
        with open(tmp_path / "out.1.jsonl", "ab") as file:
            file.write(content[-1] + b"\n")
        return names, f"id {json.dumps(record['id'])} in {first} line {len(content)}, {tmp_path / 'out.1.jsonl'} line"
    if kind == "foreign":
        other = dict(record, id="not-in-the-input")
        with open(tmp_path / "out.2.jsonl", "ab") as file:
            file.write(json.dumps(other).encode() + b"\n")
        return names, f"answer an id that is not in this input (an output of another input?): " \
                      f"{tmp_path / 'out.2.jsonl'} line"
    if kind == "failed":
        failed = {key: value for key, value in record.items() if key != "answer"}
        failed.update(status="error", error="model 'generalist': HTTP 500")
        first.write_bytes(b"\n".join([*content[:-1], json.dumps(failed).encode()]) + b"\n")
        return names, f"1 item(s) failed (status \"error\"); run their shard's command again to retry them: " \
                      f"id {json.dumps(record['id'])} in {first} line {len(content)}"
    if kind == "stale":
        changed = dict(record, input={**record["input"], "prompt": "another prompt"},
                       fingerprint=hashlib.sha256(b"another").hexdigest())
        first.write_bytes(b"\n".join([*content[:-1], json.dumps(changed).encode()]) + b"\n")
        return names, "1 line(s) answer another prompt or configuration than this input with these flags"
    if kind == "torn":
        first.write_bytes(b"\n".join(content) + b"\n" + content[0][:40])
        return names, f"{first}: its last line is cut off"
    if kind == "not ours":
        first.write_bytes(b'{"id": 1, "prompt": "an input line"}\n')
        return names, f"{first}: line 1 is not a selfmoa batch record"
    if kind == "given twice":
        return [*names, names[0]], f"{names[0]}: given twice"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, status", [("missing", 1), ("duplicated", 1), ("foreign", 1), ("failed", 1),
                                          ("stale", 1), ("torn", 2), ("not ours", 2), ("given twice", 2)])
def test_B11_a_missing_duplicated_or_foreign_line_fails_the_merge_naming_it_with_nothing_written(
        three_shards, tmp_path, kind, status):
    folder, _ = three_shards
    names, complaint = corrupt(folder, tmp_path, kind)
    before = {name: pathlib.Path(name).read_bytes() for name in names}
    out = tmp_path / "all.jsonl"
    merged = cli("merge", *FLAGS, "-i", str(folder / "in.jsonl"), "-o", str(out), *names, cwd=tmp_path)
    assert merged.returncode == status, merged.stderr
    assert complaint in merged.stderr, merged.stderr
    if status == 1:
        assert "so nothing was written" in merged.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({pathlib.Path(name).name for name in names})
    assert {name: pathlib.Path(name).read_bytes() for name in names} == before


def test_B11_merge_with_other_method_flags_than_the_shards_names_every_line_as_stale(three_shards, tmp_path):
    """The fingerprints carry the method flags: a merge given others (here -n 3) refuses every line, so shards run
    with different flags cannot be joined into one output that claims one configuration."""
    folder, _ = three_shards
    flags = [flag if flag != "2" else "3" for flag in FLAGS]
    merged = cli("merge", *flags, "-i", "in.jsonl", "-o", str(tmp_path / "all.jsonl"), *shard_files(folder),
                 cwd=folder)
    assert merged.returncode == 1
    assert "300 line(s) answer another prompt or configuration" in merged.stderr
    assert "give merge the method flags the shards ran with" in merged.stderr
    assert not (tmp_path / "all.jsonl").exists()


def test_B11_merge_replaces_only_a_selfmoa_output_keeping_what_it_replaces(three_shards, tmp_path):
    folder, _ = three_shards
    out = tmp_path / "all.jsonl"
    out.write_text("my notes\n", encoding="utf-8")
    merged = cli("merge", *FLAGS, "-i", "in.jsonl", "-o", str(out), *shard_files(folder), cwd=folder)
    assert merged.returncode == 2 and "not a selfmoa output file" in merged.stderr
    assert out.read_text(encoding="utf-8") == "my notes\n"
    old = lines(folder / "single.jsonl")[:5]
    old[0]["answer"] = "an older answer"
    out.write_text("".join(json.dumps(record) + "\n" for record in old), encoding="utf-8")
    merged = cli("merge", *FLAGS, "-i", "in.jsonl", "-o", str(out), *shard_files(folder), cwd=folder)
    assert merged.returncode == 0, merged.stderr
    assert len(lines(out)) == 300
    assert [r["answer"] for r in lines(tmp_path / "all.removed.jsonl")] == ["an older answer"]
    for argv in (["-o", "out.1.jsonl"], ["-o", "in.jsonl"]):
        refused = cli("merge", *FLAGS, "-i", "in.jsonl", *argv, *shard_files(folder), cwd=folder)
        assert refused.returncode == 2, refused.stderr
    assert len(lines(folder / "out.1.jsonl")) < 300 and (folder / "in.jsonl").read_text().startswith('{"id": "q0"')


# --- the shard of an item -------------------------------------------------------------------------------------

def test_B10_shard_of_matches_the_specs_vectors():
    """spec/batch.md section 8 gives these, so that another implementation puts every id in the same shard."""
    assert [selfmoa_batch.shard_of(item_id, 3) for item_id in (0, 3, "0", "alpaca-17")] == [1, 2, 1, 0]
    assert [selfmoa_batch.shard_of(item_id, 1000) for item_id in (0, 1, "0", "q0", "é")] == [515, 82, 279, 247, 833]
    key = hashlib.sha256(b"str:alpaca-17").digest()[:8]
    assert selfmoa_batch.shard_of("alpaca-17", 1000) == int.from_bytes(key, "big") % 1000
    assert selfmoa_batch.shard_of(-5, 7) == int.from_bytes(hashlib.sha256(b"int:-5").digest()[:8], "big") % 7
    assert selfmoa_batch.shard_of("é", 10) == int.from_bytes(hashlib.sha256("str:é".encode()).digest()[:8], "big") % 10


ids = st.lists(st.one_of(st.integers(-10**12, 10**12), st.text(st.characters(exclude_categories=("Cs",)), max_size=20)),
               unique_by=lambda i: (type(i), i), min_size=1, max_size=40)


@settings(max_examples=60)
@given(ids=ids, count=st.integers(1, 9), extra=st.integers(0, 10), seed=st.integers(0, 1000))
def test_B10_a_shard_depends_on_the_id_alone_so_growing_or_reordering_the_input_moves_nothing(ids, count, extra,
                                                                                              seed):
    """Every item is in exactly one shard; appending items or shuffling the input leaves every item in its shard."""
    items = selfmoa_batch.check_items([{"id": i, "prompt": "p"} for i in ids])
    shards = [selfmoa_batch.shard_items(items, k, count) for k in range(count)]
    assert sorted((type(item.id).__name__, item.id) for shard in shards for item in shard) == \
        sorted((type(i).__name__, i) for i in ids)
    grown = list(ids) + [f"new-{j}" for j in range(extra) if f"new-{j}" not in ids]
    random.Random(seed).shuffle(grown)
    moved = selfmoa_batch.check_items([{"id": i, "prompt": "p"} for i in grown])
    for k in range(count):
        before = {(type(item.id), item.id) for item in shards[k]}
        after = {(type(item.id), item.id) for item in selfmoa_batch.shard_items(moved, k, count)}
        assert before <= after


def test_B10_one_and_the_string_one_are_different_ids_in_different_places():
    assert selfmoa_batch.shard_of(1, 1 << 20) != selfmoa_batch.shard_of("1", 1 << 20)


@pytest.mark.parametrize("shard, complaint", [
    ("3/3", "K counts from 0 to N-1"), ("0/0", "K counts from 0 to N-1"), ("1", "expected K/N"),
    ("-1/3", "expected K/N"), ("a/b", "expected K/N"), ("1/3/4", "expected K/N"), ("１/3", "expected K/N")])
def test_B10_a_bad_shard_is_a_usage_error_naming_the_flag_before_any_file_is_read(tmp_path, shard, complaint):
    done = cli("-m", "m", "-i", "absent.jsonl", "-o", "out.jsonl", f"--shard={shard}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"--shard {shard!r}: {complaint}" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_B10_shard_goes_with_a_jsonl_batch_only(tmp_path):
    write_input(tmp_path / "in.jsonl", 3)
    alone = cli("-m", "m", "--shard", "0/2", "hello", cwd=tmp_path)
    assert alone.returncode == 2 and "--shard: it shapes a batch's output" in alone.stderr
    alpaca = cli("-m", "m", "-i", "in.jsonl", "-o", "out.json", "--format", "alpaca_eval", "--shard", "0/2",
                 cwd=tmp_path)
    assert alpaca.returncode == 2 and "pass it to selfmoa merge" in alpaca.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_B10_an_empty_shard_writes_an_empty_output_that_merges(tmp_path):
    """With more shards than items some shards are empty: they still finish and write an (empty) output file."""
    write_input(tmp_path / "in.jsonl", 2)
    with MockServer() as server:
        for k in range(8):
            done = cli(*FLAGS, "--base-url", server.base_url, "-i", "in.jsonl", "-o", f"out.{k}.jsonl", "--shard",
                       f"{k}/8", cwd=tmp_path)
            assert done.returncode == 0, done.stderr
    sizes = [len(lines(tmp_path / f"out.{k}.jsonl")) for k in range(8)]
    assert sum(sizes) == 2 and sizes.count(0) >= 6
    merged = cli("merge", *FLAGS, "-i", "in.jsonl", "-o", "all.jsonl", *[f"out.{k}.jsonl" for k in range(8)],
                 cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert [r["id"] for r in lines(tmp_path / "all.jsonl")] == ["q0", "q1"]


def test_merge_outputs_is_the_library_form_of_the_merge(tmp_path):
    items = selfmoa_batch.check_items([{"id": i, "prompt": f"p{i}"} for i in range(20)])

    def toy(request):
        return "answer to " + request.messages[-1]["content"][-40:]

    for k in range(2):
        selfmoa_batch.run_batch(selfmoa_batch.shard_items(items, k, 2), str(tmp_path / f"o{k}.jsonl"), model="a",
                                n=2, complete=toy, concurrency=3)
    counts = selfmoa_batch.merge_outputs(items, [str(tmp_path / "o0.jsonl"), str(tmp_path / "o1.jsonl")],
                                         str(tmp_path / "all.jsonl"), model="a", n=2, concurrency=3)
    assert counts == {"total": 20, "sources": 2, "moved": 0}
    assert [r["id"] for r in lines(tmp_path / "all.jsonl")] == list(range(20))
    record = selfmoa_batch.answer_item(items[3], model="a", n=2, complete=toy)
    assert selfmoa_batch.output_line(record) == (tmp_path / "all.jsonl").read_bytes().split(b"\n")[3] + b"\n"
    with pytest.raises(selfmoa.SelfMoAError, match="have no line in any shard output"):
        selfmoa_batch.merge_outputs(items, [str(tmp_path / "o0.jsonl")], str(tmp_path / "x.jsonl"), model="a", n=2)


# --- README -------------------------------------------------------------------------------------------------

MERGE_HELP = re.compile(r"(<!-- merge-help:start -->\n```\n)(.*?)(```\n<!-- merge-help:end -->)", re.DOTALL)


def merge_help() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    return selfmoa_batch.build_merge_parser().format_help()


def test_readme_shows_exactly_merge_help(monkeypatch):
    """The README's `selfmoa merge --help` block is the parser's help (word for word on Python 3.13+)."""
    monkeypatch.setenv("COLUMNS", "100")
    found = MERGE_HELP.search(test_readme.README.read_text(encoding="utf-8"))
    assert found, "README.md lost its <!-- merge-help:start --> ... <!-- merge-help:end --> block"
    stale = "README.md's merge help is stale: run python3 -m tests.test_shards --update (with Python 3.10-3.12)"
    if sys.version_info < test_readme.HELP_FORMAT_CHANGED:
        assert found.group(2) == merge_help(), stale
    else:
        assert test_readme.metavar_once(found.group(2)) == test_readme.metavar_once(merge_help()), stale


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    if sys.version_info >= test_readme.HELP_FORMAT_CHANGED:
        sys.exit("update the README with Python 3.10-3.12: their argparse prints the help the README shows")
    text = test_readme.README.read_text(encoding="utf-8")
    test_readme.README.write_text(MERGE_HELP.sub(lambda m: m.group(1) + merge_help() + m.group(3), text),
                                  encoding="utf-8")
    print("README.md updated")
