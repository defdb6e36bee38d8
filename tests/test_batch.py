"""Batch files (spec/batch.md): nothing lost, nothing mixed up, nothing foreign touched.

Most tests run `run_batch` or `main` in-process with a plain completion function whose reply is a pure
function of the request (a hash of the prompt, the number of references shown, and hostile text), so every
answer can be checked against the prompt it must belong to. A few cross a process boundary where that is the
point (a lock held by another process, kill -9, a file-size limit)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import selfmoa
import selfmoa_batch
from tests.scripted_server import ScriptedServer, completion

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Everything that some reader takes for a line end, NUL, a BOM, bidi controls, RTL text and an emoji.
HOSTILE = "\u2028|\u2029|\x85|\x00|\r|\r\n|\x0b|\x0c|\x1c|\x1d|\x1e|\ufeff|\u200f\u202e|שלום|😀|\"|\\"


def user_text(request) -> str:
    return "\n".join(m["content"] for m in request.messages if m["role"] == "user")


def answer_for(prompt: str, n: int) -> str:
    """What `echo` answers for an item: a hash of its prompt, how many samples were aggregated, hostile text."""
    return f"{hashlib.sha256(prompt.encode()).hexdigest()[:12]} of {n} {HOSTILE}"


class Echo:
    """A completion function: proposers draft, the aggregator answers `answer_for(prompt, references)`."""

    def __init__(self, fail=()):
        self.fail, self.calls, self.lock = set(fail), 0, threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.calls += 1
        prompt = user_text(request)
        if prompt in self.fail:
            raise selfmoa.ModelError("HTTP 500: the server is down", model=request.model, status=500)
        references = selfmoa.read_references(request.messages)
        return answer_for(prompt, len(references)) if references else f"draft {HOSTILE}"


def run(records, path, complete=None, **options):
    options = {"model": "m", "n": 2, "concurrency": 2, **options}
    return selfmoa_batch.run_batch(selfmoa_batch.check_items(records), str(path), complete=complete or Echo(),
                                   **options)


def read_output(path) -> list[dict]:
    data = pathlib.Path(path).read_bytes()
    assert data.endswith(b"\n") or not data
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def cli(capsys, monkeypatch, argv, complete=None):
    """`main` in-process, its HTTP client replaced by a completion function: (exit status, stdout, stderr)."""
    complete = complete or Echo()

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def __call__(self, request):
            return complete(request)

    monkeypatch.setattr(selfmoa, "make_client", lambda args, environ: Client())
    code = selfmoa.main(["-m", "m", "-n", "2", *map(str, argv)], environ={})
    out, err = capsys.readouterr()
    return code, out, err


def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# --- 1. A foreign file is never changed ---------------------------------------------------------------

RECORD = {"selfmoa_batch": 1, "id": "a", "status": "ok", "answer": "x", "method": "self-moa",
          "fingerprint": "0" * 64, "input": {"id": "a", "prompt": "p"}}
FOREIGN_LINES = [
    b"my notes", b"", b"{}", b'{"id": "a", "answer": "x"}', b"[1, 2]", b"\xff\xfe",
    json.dumps({**RECORD, "selfmoa_batch": 2}).encode(),                      # another format version
    json.dumps({**RECORD, "status": "done"}).encode(),                        # an unknown status
    json.dumps({k: v for k, v in RECORD.items() if k != "answer"}).encode(),  # "ok" without an answer
    json.dumps({**RECORD, "input": "p"}).encode(),                            # input not a record
    json.dumps({**RECORD, "id": True}).encode(),
]
FOREIGN_TAILS = [b"last line", b'{"keep": "me"}', b'{"selfmoa_batch": 2, "id": 1', b"{ ", b"\xe2\x80"]


@st.composite
def foreign_files(draw):
    """Bytes that are not a selfmoa output file: no marker at all, or our lines with one foreign line or tail."""
    ours = [selfmoa_batch._dump_line({**RECORD, "id": i}) for i in range(draw(st.integers(0, 3)))]
    kind = draw(st.sampled_from(["bytes", "text", "line", "tail"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=60).filter(lambda b: b"selfmoa_batch" not in b))
    if kind == "text":
        return draw(st.text(min_size=1, max_size=60).filter(lambda t: "selfmoa_batch" not in t)).encode()
    if kind == "line":
        at = draw(st.integers(0, len(ours)))
        return b"".join(ours[:at]) + draw(st.sampled_from(FOREIGN_LINES)) + b"\n" + b"".join(ours[at:])
    return b"".join(ours) + draw(st.sampled_from(FOREIGN_TAILS))


@given(content=foreign_files())
@example(content=b"my notes\nlast line")
@example(content=b'{"keep": "me"}')
@example(content=b"{")
@settings(max_examples=40)
def test_a_file_that_is_not_a_selfmoa_output_is_left_byte_for_byte_untouched(tmp_path_factory, content):
    """Any file with a line that is not a selfmoa record, or a tail that is not the start of one, is refused
    before any call, and it and its folder are exactly as they were."""
    folder = tmp_path_factory.mktemp("foreign")
    (folder / "out.jsonl").write_bytes(content)
    echo = Echo()
    with pytest.raises(selfmoa.ConfigError, match="not a selfmoa output file"):
        run([{"id": "a", "prompt": "p"}], folder / "out.jsonl", echo)
    assert (folder / "out.jsonl").read_bytes() == content
    assert echo.calls == 0 and sorted(p.name for p in folder.iterdir()) == ["out.jsonl"]


def test_the_issues_notes_and_one_line_config_are_refused_untouched_on_the_command_line(capsys, monkeypatch,
                                                                                          tmp_path):
    jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    for name, content in (("notes.txt", b"my notes\nlast line"), ("config.json", b'{"keep": "me"}')):
        (tmp_path / name).write_bytes(content)
        code, _, err = cli(capsys, monkeypatch, ["-i", tmp_path / "in.jsonl", "-o", tmp_path / name])
        assert code == 2 and "not a selfmoa output file" in err and "left untouched" in err
        assert (tmp_path / name).read_bytes() == content


def test_an_output_of_selfmoa_0_1_is_refused_with_the_reason_not_misread(tmp_path):
    old = b'{"id": "b", "prompt": "What is 6 * 7?", "answer": "42", "method": "self-moa", "error": "HTTP 500"}\n'
    (tmp_path / "out.jsonl").write_bytes(old)
    with pytest.raises(selfmoa.ConfigError, match="selfmoa 0.1 wrote it, mixing input fields and results"):
        run([{"id": "b", "prompt": "What is 6 * 7?", "answer": "42"}], tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == old


def test_a_foreign_file_where_moved_lines_would_go_is_refused_before_any_call(tmp_path):
    run([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}], tmp_path / "out.jsonl")
    before = (tmp_path / "out.jsonl").read_bytes()
    (tmp_path / "out.removed.jsonl").write_bytes(b"someone else's file\n")
    echo = Echo()
    with pytest.raises(selfmoa.ConfigError, match="out.removed.jsonl: line 1 is not a selfmoa batch record"):
        run([{"id": "a", "prompt": "p"}], tmp_path / "out.jsonl", echo)  # "b" would move
    assert echo.calls == 0 and (tmp_path / "out.jsonl").read_bytes() == before
    assert (tmp_path / "out.removed.jsonl").read_bytes() == b"someone else's file\n"


def test_a_torn_tail_after_a_crash_is_cut_and_its_item_runs_again(tmp_path):
    """The unfinished start of a record, however short, is recognised after whole records and cut off."""
    records = [{"id": i, "prompt": f"p{i}"} for i in range(3)]
    run(records, tmp_path / "out.jsonl")
    whole = (tmp_path / "out.jsonl").read_bytes()
    first = whole[:whole.index(b"\n") + 1]
    second = whole[len(first):whole.index(b"\n", len(first)) + 1]
    for cut in (1, 5, len(selfmoa_batch._LINE_START), len(second) - 2):  # - 1, a whole record: see the next test
        (tmp_path / "out.jsonl").write_bytes(first + whole[len(first):len(first) + cut])
        counts = run(records, tmp_path / "out.jsonl")
        assert counts["torn_bytes"] == cut and counts["skipped"] == 1 and counts["done"] == 2
        assert (tmp_path / "out.jsonl").read_bytes() == whole


def test_a_whole_last_record_without_its_newline_is_kept_not_cut_off_as_torn(tmp_path):
    """An editor may save the file without its final newline: that last line is a whole record, not a torn
    one. It is kept (reused if its item is current, moved to the sibling file if not), never deleted, here
    and in the sibling file itself, which then gets lines appended after it."""
    records = [{"id": i, "prompt": f"p{i}"} for i in range(3)]
    output, removed = tmp_path / "out.jsonl", tmp_path / "out.removed.jsonl"
    run(records, output)
    whole = read_output(output)
    output.write_bytes(output.read_bytes().rstrip(b"\n"))
    echo = Echo()
    counts = run(records[:1], output, echo)  # items 1 and 2, the last one among them, leave the input
    assert counts["torn_bytes"] == 0 and counts["skipped"] == 1 and echo.calls == 0
    assert read_output(output) == whole[:1] and read_output(removed) == whole[1:]
    removed.write_bytes(removed.read_bytes().rstrip(b"\n"))
    run(records[1:2], output)  # item 0 leaves too: its line is appended after the sibling's last one
    assert read_output(removed) == whole[1:] + whole[:1]


# --- 2. Results never collide with input fields -------------------------------------------------------


def test_a_gold_answer_in_the_input_stays_the_input_and_never_marks_a_failed_item_done(tmp_path):
    """A failed item's line has status "error" and no result "answer"; the gold answer stays under "input";
    the next run retries it; a success keeps the gold answer too."""
    records = [{"id": "b", "prompt": "What is 6 * 7?", "answer": "42"}]
    counts = run(records, tmp_path / "out.jsonl", Echo(fail={"What is 6 * 7?"}))
    [line] = read_output(tmp_path / "out.jsonl")
    assert counts["failed"] == 1 and line["status"] == "error" and "answer" not in line
    assert line["input"] == records[0] and "server is down" in line["error"]
    echo = Echo()
    counts = run(records, tmp_path / "out.jsonl", echo)
    [line] = read_output(tmp_path / "out.jsonl")
    assert counts["done"] == 1 and counts["skipped"] == 0 and echo.calls == 3
    assert line["status"] == "ok" and line["answer"] == answer_for("What is 6 * 7?", 2)
    assert line["input"] == records[0]


# --- 3. Lines end at "\n" only ------------------------------------------------------------------------

pieces = st.sampled_from(HOSTILE.split("|") + ["\ud7ff", "\ue000", "\U0010ffff", "a", " ", "\n", "{", "}"])
hostile_text = st.lists(pieces | st.text(st.characters(blacklist_categories=("Cs",)), max_size=4),
                        max_size=8).map("".join)


@given(prompts=st.lists(hostile_text, min_size=1, max_size=5), extra=hostile_text, ids=st.booleans())
@example(prompts=["\u2028", "\x85\u2029"], extra="\x00", ids=False)
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_unicode_survives_a_batch_run_and_its_resume_unchanged(tmp_path_factory, prompts, extra, ids):
    """Records holding any text (every line and paragraph separator, NEL, NUL, BOM, emoji, RTL), written raw
    into a JSONL file, are read back as they were, answered, and written one line each; the output splits
    into exactly those lines whatever one splits on; a resume reuses every line and changes no byte."""
    folder = tmp_path_factory.mktemp("unicode")
    field = extra if extra not in ("id", "prompt", "instruction", "messages") else "note"
    records = [{**({"id": f"{extra}{i}"} if ids else {}), "prompt": f"Q{prompt}", field: prompt}
               for i, prompt in enumerate(prompts)]
    jsonl(folder / "in.jsonl", records)
    items = selfmoa_batch.read_items(str(folder / "in.jsonl"))
    assert [item.record for item in items] == records
    selfmoa_batch.run_batch(items, str(folder / "out.jsonl"), complete=Echo(), model="m", n=2, concurrency=2)
    data = (folder / "out.jsonl").read_bytes()
    lines = read_output(folder / "out.jsonl")
    assert [line["input"] for line in lines] == records
    assert [line["answer"] for line in lines] == [answer_for(r["prompt"], 2) for r in records]
    assert len(data.decode("utf-8").splitlines()) == len(records)  # even str.splitlines() sees only our lines
    echo = Echo()
    counts = selfmoa_batch.run_batch(items, str(folder / "out.jsonl"), complete=echo, model="m", n=2)
    assert counts["skipped"] == len(records) and echo.calls == 0
    assert (folder / "out.jsonl").read_bytes() == data


def test_an_output_line_holding_raw_separators_is_still_one_record(tmp_path):
    """A record written with raw U+2028, U+2029 and U+0085 inside its strings (valid JSON, as another writer
    may produce) is one line: read, validated and reused, never split."""
    records = [{"id": i, "prompt": f"p{i}"} for i in range(2)]
    out = tmp_path / "out.jsonl"
    run(records, out)
    raw = out.read_bytes()
    for escape, char in ((b"\\u2028", "\u2028"), (b"\\u2029", "\u2029"), (b"\\u0085", "\x85")):
        assert escape in raw
        raw = raw.replace(escape, char.encode())
    out.write_bytes(raw)
    echo = Echo()
    assert run(records, out, echo)["skipped"] == 2 and echo.calls == 0
    assert [line["answer"] for line in read_output(out)] == [answer_for(f"p{i}", 2) for i in range(2)]


def test_hostile_text_round_trips_through_the_command_line_over_http(capsys, tmp_path):
    """End to end: raw separators in the input file and in the server's replies; a rerun sends nothing."""
    records = [{"id": f"q{i}\u2028", "prompt": f"say {HOSTILE} {i}", "note": "\x85\u2029"} for i in range(3)]
    jsonl(tmp_path / "in.jsonl", records)
    reply = json.dumps(completion([f"answer {HOSTILE}"]), ensure_ascii=False).encode()
    argv = ["-m", "m", "-n", "1", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]
    with ScriptedServer(("raw", 200, reply, {})) as server:
        assert selfmoa.main(["--base-url", server.base_url, *argv], environ={}) == 0
        requests = len(server.log)
        assert selfmoa.main(["--base-url", server.base_url, *argv], environ={}) == 0
        assert len(server.log) == requests
    err = capsys.readouterr().err
    assert "3 already done" in err
    lines = read_output(tmp_path / "out.jsonl")
    assert [line["input"] for line in lines] == records
    assert all(line["answer"] == f"answer {HOSTILE}" for line in lines)
    sent = {entry["body"]["messages"][-1]["content"] for entry in server.log}
    assert sent == {record["prompt"] for record in records}  # the raw separators reached the server intact


# --- 4. One writer at a time --------------------------------------------------------------------------


def test_a_second_run_on_the_same_output_is_refused_at_once_and_the_first_loses_nothing(tmp_path):
    """While a run holds the output, another run (here in another thread) exits with an error that names
    the lock and what to do, makes no call, and changes nothing; the first run then finishes every item."""
    release, started = threading.Event(), threading.Event()

    def slow(request):
        started.set()
        release.wait(10)
        return Echo()(request)

    records = [{"id": f"b{i}", "prompt": f"p{i}"} for i in range(6)]
    first = threading.Thread(target=run, args=(records, tmp_path / "out.jsonl", slow))
    first.start()
    try:
        assert started.wait(10)
        echo = Echo()
        with pytest.raises(selfmoa.ConfigError) as caught:
            run([{"id": f"a{i}", "prompt": f"other {i}"} for i in range(2)], tmp_path / "out.jsonl", echo)
        message = str(caught.value)
        assert "out.jsonl.lock" in message and f"pid {os.getpid()}" in message
        assert "wait for it to end, or pass another output file" in message and echo.calls == 0
    finally:
        release.set()
        first.join(20)
    assert [line["input"] for line in read_output(tmp_path / "out.jsonl")] == records
    assert not (tmp_path / "out.jsonl.lock").exists()


LOCKER = """
import sys, time
sys.path.insert(0, {root!r})
import selfmoa_batch
selfmoa_batch._lock({output!r})
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_refuses_and_a_kill_9_leaves_no_stale_lock(capsys, monkeypatch,
                                                                                    tmp_path):
    jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    argv = ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl"]
    holder = subprocess.Popen([sys.executable, "-c", LOCKER.format(root=str(ROOT), output=str(tmp_path / "out.jsonl"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = cli(capsys, monkeypatch, argv)
        assert code == 2 and f"(pid {holder.pid})" in err and "out.jsonl.lock" in err
        assert not (tmp_path / "out.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (tmp_path / "out.jsonl.lock").read_text() == f"{holder.pid}\n"  # left behind by kill -9 ...
    code, _, err = cli(capsys, monkeypatch, argv)
    assert code == 0 and "1 answered" in err  # ... and no obstacle, however often
    for _ in range(2):
        holder = subprocess.Popen([sys.executable, "-c", LOCKER.format(root=str(ROOT),
                                                                       output=str(tmp_path / "out.jsonl"))],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert (tmp_path / "out.jsonl.lock").read_text() == f"{holder.pid}\n"
    code, _, err = cli(capsys, monkeypatch, argv)
    assert code == 0 and "1 already done" in err


def test_without_fcntl_a_lock_file_of_a_dead_process_is_taken_over_and_a_live_one_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(selfmoa_batch, "_fcntl", lambda: None)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "out.jsonl.lock"
    lock.write_text(gone.stdout)
    assert run([{"prompt": "a"}], tmp_path / "out.jsonl")["done"] == 1
    assert not lock.exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{alive.pid}\n")
        with pytest.raises(selfmoa.ConfigError, match=f"pid {alive.pid}; if no such run exists, delete the lock"):
            run([{"prompt": "b"}], tmp_path / "out.jsonl")
    finally:
        alive.kill()
        alive.wait(10)
    assert lock.read_text() == f"{alive.pid}\n"


def test_a_file_that_merely_has_the_lock_files_name_is_never_emptied_or_removed(tmp_path):
    (tmp_path / "out.jsonl.lock").write_text("my lock notes\n")
    with pytest.raises(selfmoa.ConfigError, match="is not a selfmoa lock file, so it was left untouched"):
        run([{"prompt": "a"}], tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl.lock").read_text() == "my lock notes\n" and not (tmp_path / "out.jsonl").exists()


def test_a_failed_read_is_one_line_and_exit_1_not_a_traceback(capsys, monkeypatch, tmp_path):
    jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    (tmp_path / "out.jsonl").write_bytes(b"")
    real_read = os.read

    def read(fd, size):
        if os.fstat(fd).st_ino == (tmp_path / "out.jsonl").stat().st_ino:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", read)
    code, _, err = cli(capsys, monkeypatch, ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl"])
    assert code == 1 and err.count("\n") == 1 and "Input/output error" in err and "Traceback" not in err


def test_the_final_rewrite_proves_it_still_owns_the_file_it_appended_to(tmp_path):
    """If another program replaces the output during a run, the run does not overwrite the newcomer: it
    stops with an error and saves its own lines beside it."""
    output = tmp_path / "out.jsonl"
    replaced = threading.Event()

    def replacing(request):
        if not replaced.is_set():
            replaced.set()
            (tmp_path / "theirs").write_text("their file\n")
            os.replace(tmp_path / "theirs", output)
        return Echo()(request)

    with pytest.raises(selfmoa.SelfMoAError, match="was moved or replaced by another program") as caught:
        run([{"id": i, "prompt": f"p{i}"} for i in range(3)], output, replacing)
    assert not isinstance(caught.value, selfmoa.ConfigError)
    assert output.read_text() == "their file\n"
    [rescue] = tmp_path.glob("out.recovered-*.jsonl")
    assert sorted(line["id"] for line in read_output(rescue)) == [0, 1, 2]


def test_bad_options_are_refused_before_any_call_and_leave_no_file(tmp_path):
    for options, why in (({"window": 3}, "self-moa takes no such parameter"), ({"n": 0}, "n=0"),
                         ({"seed": object()}, "must be JSON values")):
        echo = Echo()
        with pytest.raises(selfmoa.ConfigError, match=why):
            run([{"prompt": "a"}], tmp_path / "out.jsonl", echo, **options)
        assert echo.calls == 0 and sorted(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symbolic links")
def test_an_output_named_through_a_symlink_is_one_file_with_one_lock_and_stays_a_symlink(capsys, monkeypatch,
                                                                                         tmp_path):
    """`-o link.jsonl` where link.jsonl points at data/out.jsonl: a run on either name is refused while the
    other holds the file (one writer at a time), and the final rewrite, here and of `--format alpaca_eval`'s
    file, replaces the target, so the link still points at every answer."""
    (tmp_path / "data").mkdir()
    target, link = tmp_path / "data" / "out.jsonl", tmp_path / "link.jsonl"
    target.write_bytes(b"")
    link.symlink_to(target)
    release = selfmoa_batch._lock(str(link))
    try:
        with pytest.raises(selfmoa.ConfigError, match="is being written by another selfmoa run"):
            run([{"prompt": "a"}], target)
    finally:
        release()
    records = [{"id": i, "prompt": f"p{i}"} for i in range(3)]
    run(records, link)
    run(records[::-1], link)  # reordered: the file is rewritten
    assert link.is_symlink() and [line["id"] for line in read_output(target)] == [2, 1, 0]
    (tmp_path / "data" / "outputs.json").write_bytes(b"")
    (tmp_path / "outputs.json").symlink_to(tmp_path / "data" / "outputs.json")
    jsonl(tmp_path / "in.jsonl", [{"instruction": "q"}])
    code, _, _ = cli(capsys, monkeypatch, ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "outputs.json",
                                           "--format", "alpaca_eval"])
    assert code == 0 and (tmp_path / "outputs.json").is_symlink()
    assert [entry["instruction"] for entry in json.loads((tmp_path / "data" / "outputs.json").read_text())] == ["q"]


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symbolic links")
def test_a_symlink_to_an_output_not_written_yet_creates_its_target(tmp_path):
    """`ln -s data/out.jsonl out.jsonl` before the first run: the run creates data/out.jsonl through the link
    (it used to fail, saying the file exists); a run refused before any call leaves no target behind."""
    (tmp_path / "data").mkdir()
    target, link = tmp_path / "data" / "out.jsonl", tmp_path / "out.jsonl"
    link.symlink_to(target)
    (tmp_path / "out.removed.jsonl").write_text("my notes\n")  # a foreign sibling: refused before any call
    with pytest.raises(selfmoa.ConfigError, match="not a selfmoa output file"):
        run([{"prompt": "a"}], link)
    assert link.is_symlink() and not target.exists()
    (tmp_path / "out.removed.jsonl").unlink()
    assert run([{"prompt": "a"}], link)["done"] == 1
    assert link.is_symlink() and [line["id"] for line in read_output(target)] == [0]


# --- 5. and 8. Fingerprints, changed inputs, removed items ----------------------------------------------


def test_inserting_an_item_in_front_reruns_the_shifted_ones_and_never_mixes_answers(capsys, monkeypatch,
                                                                                     tmp_path):
    """The issue's case: answer [A, B], insert X in front (ids are positions), rerun: every answer belongs
    to its own prompt, the summary says why items ran again, and the replaced answers are kept aside."""
    jsonl(tmp_path / "in.jsonl", [{"prompt": "A"}, {"prompt": "B"}])
    argv = ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl"]
    assert cli(capsys, monkeypatch, argv)[0] == 0
    old = (tmp_path / "out.jsonl").read_bytes().split(b"\n")[:-1]
    jsonl(tmp_path / "in.jsonl", [{"prompt": "X"}, {"prompt": "A"}, {"prompt": "B"}])
    code, _, err = cli(capsys, monkeypatch, argv)
    lines = read_output(tmp_path / "out.jsonl")
    assert code == 0 and [line["input"]["prompt"] for line in lines] == ["X", "A", "B"]
    assert [line["answer"] for line in lines] == [answer_for(p, 2) for p in "XAB"]
    assert "ran 2 item(s) again" in err and "2 with a changed prompt" in err and "3 answered" in err
    assert "moved 2 line(s)" in err and "out.removed.jsonl" in err
    assert (tmp_path / "out.removed.jsonl").read_bytes().split(b"\n")[:-1] == old


def test_removed_items_move_to_the_sibling_file_and_the_output_keeps_one_line_per_item(capsys, monkeypatch,
                                                                                        tmp_path):
    jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": k} for k in "abcd"])
    argv = ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl"]
    cli(capsys, monkeypatch, argv)
    kept = {line["id"]: line for line in read_output(tmp_path / "out.jsonl")}
    jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": k} for k in "db"])
    code, _, err = cli(capsys, monkeypatch, argv)
    assert code == 0 and "2 already done" in err and "moved 2 line(s)" in err and "out.removed.jsonl" in err
    assert read_output(tmp_path / "out.jsonl") == [kept["d"], kept["b"]]
    assert read_output(tmp_path / "out.removed.jsonl") == [kept["a"], kept["c"]]
    code, _, err = cli(capsys, monkeypatch, argv)  # nothing more to move, and nothing moved twice
    assert code == 0 and "selfmoa: moved" not in err and len(read_output(tmp_path / "out.removed.jsonl")) == 2


def test_a_crash_between_moving_lines_and_the_rewrite_moves_nothing_twice(tmp_path, monkeypatch):
    """Moved lines are kept (synced) before the output is rewritten; if the rewrite fails, the output is as it
    was, and the next run moves the same lines again without duplicating them."""
    out = tmp_path / "out.jsonl"
    run([{"id": k, "prompt": k} for k in "abc"], out)
    before = out.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(selfmoa_batch, "_write_atomically", lambda path, data, **_: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        with pytest.raises(selfmoa.SelfMoAError, match="cannot rewrite it .No space left on device"):
            run([{"id": "b", "prompt": "b"}], out)
    assert out.read_bytes() == before and [r["id"] for r in read_output(tmp_path / "out.removed.jsonl")] == ["a", "c"]
    counts = run([{"id": "b", "prompt": "b"}], out)
    assert counts["moved"] == 2 and counts["skipped"] == 1
    assert [r["id"] for r in read_output(tmp_path / "out.removed.jsonl")] == ["a", "c"]
    assert [r["id"] for r in read_output(out)] == ["b"]


def test_crlf_line_ends_and_a_byte_order_mark_are_read(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"prompt": "b\xe2\x80\xa8c"}\r\n')
    assert [item.record["prompt"] for item in selfmoa_batch.read_items(str(tmp_path / "in.jsonl"))] == ["a", "b\u2028c"]


def test_a_line_is_reused_only_for_the_same_messages_method_and_parameters(tmp_path):
    """The fingerprint covers the messages, the method and its parameters (defaults filled in), not how
    samples are requested; a changed parameter reruns every item and says so."""
    records = [{"id": i, "prompt": f"p{i}"} for i in range(3)]
    out = tmp_path / "out.jsonl"
    run(records, out, n=2)
    fingerprints = [line["fingerprint"] for line in read_output(out)]
    assert len(set(fingerprints)) == 3 and all(len(f) == 64 for f in fingerprints)
    for same in ({"n": 2, "use_n": False}, {"n": 2, "proposing": {"temperature": 0.7}, "layers": 2},
                 {"n": 2, "aggregating": selfmoa.Sampling(fields={})}):
        echo = Echo()
        assert run(records, out, echo, **same)["skipped"] == 3 and echo.calls == 0
    for changed in ({"n": 3}, {"n": 3, "proposing": {"temperature": 0.2}}, {"n": 3, "seed": 1},
                    {"n": 3, "model": "other"}, {"n": 3, "aggregating": {"fields": {"reasoning_effort": "high"}}},
                    {"n": 3, "proposing": {"models": {"q": {"top_p": 0.5}}}}):
        counts = run(records, out, **changed)
        assert counts["changed_parameters"] == 3 and counts["done"] == 3 and counts["changed_prompt"] == 0
    assert [line["answer"] for line in read_output(out)] == [answer_for(f"p{i}", 3) for i in range(3)]
    counts = run(records, out, method="self-moa-seq", n=3)
    assert counts["changed_parameters"] == 3


@given(inputs=st.lists(st.tuples(st.lists(st.sampled_from("ABCDE"), max_size=5, unique=True),
                                 st.booleans(), st.sampled_from([1, 2])), min_size=1, max_size=4))
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_after_any_sequence_of_input_edits_every_answer_belongs_to_its_prompt_and_nothing_is_lost(
        tmp_path_factory, inputs):
    """Runs over edited inputs (items added, removed, reordered; ids given or positional) and changed n: the
    output holds one line per item, in input order, each answering its own prompt with the current n; every
    answered line that leaves the output is in the sibling file."""
    folder = tmp_path_factory.mktemp("edits")
    out, moved = folder / "out.jsonl", folder / "out.removed.jsonl"
    for prompts, with_ids, n in inputs:
        if not prompts:
            continue
        records = [{"id": p, "prompt": p} if with_ids else {"prompt": p} for p in prompts]
        before = set(out.read_bytes().split(b"\n")[:-1]) if out.exists() else set()
        run(records, out, n=n)
        lines = read_output(out)
        assert [line["input"] for line in lines] == records
        assert [line["answer"] for line in lines] == [answer_for(p, n) for p in prompts]
        after = set(out.read_bytes().split(b"\n")[:-1]) | (set(moved.read_bytes().split(b"\n")) if moved.exists()
                                                          else set())
        gone = {line for line in before - after if json.loads(line)["status"] == "ok"}
        # the only lines not kept verbatim are reused ones whose "input" took the current record
        assert all(any(json.loads(line)["fingerprint"] == kept["fingerprint"] for kept in lines) for line in gone)


# --- 6. AlpacaEval ------------------------------------------------------------------------------------


def alpaca(tmp_path, records):
    jsonl(tmp_path / "in.jsonl", records)
    return ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "outputs.json", "--format", "alpaca_eval"]


def test_alpaca_outputs_are_written_only_when_every_item_is_answered(capsys, monkeypatch, tmp_path):
    records = [{"id": "hi", "instruction": "Say hi", "answer": "gold"}, {"id": "bye", "instruction": "Say bye"}]
    argv = alpaca(tmp_path, records)
    code, _, err = cli(capsys, monkeypatch, argv, Echo(fail={"Say hi"}))
    assert code == 1 and not (tmp_path / "outputs.json").exists()
    assert "failed items" in err and ': "hi";' in err and "run the same command to retry them" in err
    assert "outputs.json was not written" in err
    code, _, err = cli(capsys, monkeypatch, argv)
    entries = json.loads((tmp_path / "outputs.json").read_text(encoding="utf-8"))
    assert code == 0 and [e["instruction"] for e in entries] == ["Say hi", "Say bye"]
    assert "wrote 2 AlpacaEval outputs to" in err and "'selfmoa-self-moa-m-n2'" in err
    assert [e["output"] for e in entries] == [answer_for("Say hi", 2), answer_for("Say bye", 2)]
    assert {e["generator"] for e in entries} == {"selfmoa-self-moa-m-n2"}


def test_an_alpaca_target_is_replaced_only_if_it_is_our_output_for_this_input(capsys, monkeypatch, tmp_path):
    records = [{"instruction": "Say hi"}, {"instruction": "Say bye"}]
    argv = alpaca(tmp_path, records)
    target = tmp_path / "outputs.json"
    theirs = json.dumps([{"instruction": r["instruction"], "output": "theirs", "generator": "gpt-4"}
                         for r in records]).encode()
    for content in (b'{"keep": "me"}', b"[1, 2]", theirs):
        target.write_bytes(content)
        code, _, err = cli(capsys, monkeypatch, argv)
        assert code == 2 and "is not a selfmoa AlpacaEval output of this input" in err
        assert target.read_bytes() == content and not (tmp_path / "outputs.json.jsonl").exists()
    target.unlink()
    assert cli(capsys, monkeypatch, argv)[0] == 0
    ours = target.read_bytes()
    assert cli(capsys, monkeypatch, [*argv, "-n", "3"])[0] == 0  # our own output: replaced
    assert target.read_bytes() != ours and "-n3" in target.read_text()
    jsonl(tmp_path / "in.jsonl", [{"instruction": "Something else"}])  # another input: not its output
    before = target.read_bytes()
    code, _, err = cli(capsys, monkeypatch, argv)
    assert code == 2 and target.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_where_a_file_is_read_is_refused_at_once_not_waited_on(capsys, monkeypatch, tmp_path):
    """A named pipe as the --format alpaca_eval target, or where moved lines would go, is not a file: the run
    exits 2 at once, before any call, naming it, instead of waiting forever for someone to write into it."""
    os.mkfifo(tmp_path / "outputs.json")
    os.mkfifo(tmp_path / "out.removed.jsonl")
    outcome: dict = {}

    def within_seconds(task):
        thread = threading.Thread(target=lambda: outcome.update(result=task()), daemon=True)
        thread.start()
        thread.join(3)
        if thread.is_alive():  # unblock the reader, then fail
            for pipe in ("outputs.json", "out.removed.jsonl"):
                with contextlib.suppress(OSError):
                    os.close(os.open(tmp_path / pipe, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(3)
            raise AssertionError("the run waited on a named pipe")
        return outcome.pop("result")

    code, _, err = within_seconds(lambda: cli(capsys, monkeypatch, alpaca(tmp_path, [{"instruction": "q"}])))
    assert code == 2 and "outputs.json: not a regular file" in err
    echo = Echo()

    def sibling():
        with pytest.raises(selfmoa.ConfigError, match="out.removed.jsonl: not a regular file"):
            run([{"prompt": "a"}], tmp_path / "out.jsonl", echo)
        return True

    assert within_seconds(sibling) and echo.calls == 0 and not (tmp_path / "out.jsonl").exists()


def test_a_rerun_with_new_parameters_that_first_fails_still_completes_the_alpaca_file(capsys, monkeypatch,
                                                                                        tmp_path):
    """The normal workflow: outputs.json exists; a rerun with another n fails an item, so outputs.json is left
    as it was; the next rerun may still replace it (its answers are kept in the sibling of moved lines)."""
    argv = alpaca(tmp_path, [{"instruction": "Say hi"}, {"instruction": "Say bye"}])
    assert cli(capsys, monkeypatch, argv)[0] == 0
    first = (tmp_path / "outputs.json").read_bytes()
    assert cli(capsys, monkeypatch, [*argv, "-n", "3"], Echo(fail={"Say bye"}))[0] == 1
    assert (tmp_path / "outputs.json").read_bytes() == first
    code, _, err = cli(capsys, monkeypatch, [*argv, "-n", "3"])
    entries = json.loads((tmp_path / "outputs.json").read_text(encoding="utf-8"))
    assert code == 0 and [e["output"] for e in entries] == [answer_for("Say hi", 3), answer_for("Say bye", 3)]


def test_the_generator_name_carries_the_configuration_unless_one_is_given(capsys, monkeypatch, tmp_path):
    names = {selfmoa_batch._generator_name(method, options) for method, options in [
        ("self-moa", {"model": "m", "n": 6}), ("self-moa", {"model": "m", "n": 4}),
        ("self-moa", {"model": "m", "n": 6, "aggregator": "z"}), ("self-moa", {"model": "q", "n": 6}),
        ("self-moa-seq", {"model": "m", "n": 6, "window": 6, "carry": 3}),
        ("self-moa-seq", {"model": "m", "n": 6, "window": 4, "carry": 3}),
        ("self-moa-seq", {"model": "m", "n": 6, "window": 6, "carry": 2}),
        ("moa", {"proposers": ["a", "b"], "aggregator": "a"}), ("moa", {"proposers": ["b", "a"], "aggregator": "a"}),
        ("moa", {"proposers": ["a", "b"], "aggregator": "b"}),
        ("moa", {"proposers": ["a", "b"], "aggregator": "a", "layers": 3})]}
    assert len(names) == 11
    argv = alpaca(tmp_path, [{"instruction": "Say hi"}])
    assert cli(capsys, monkeypatch, [*argv, "--generator", "my-run"])[0] == 0
    assert json.loads((tmp_path / "outputs.json").read_text())[0]["generator"] == "my-run"
    code, _, err = cli(capsys, monkeypatch, ["--generator", "x", "-i", tmp_path / "in.jsonl", "-o",
                                             tmp_path / "o.jsonl"])
    assert code == 2 and "--generator 'x'" in err and "--format alpaca_eval" in err


# --- 7. Write failures and bad input ------------------------------------------------------------------


def failing_write(monkeypatch, after: int, how: str):
    """Make the (after+1)-th write of an output line fail: an errno, a partial write then ENOSPC, or 0 bytes."""
    real_write, state = os.write, {"lines": 0}

    def write(fd, data):
        if bytes(data[:15]) != b'{"selfmoa_batch' or state["lines"] < after:
            if bytes(data[:15]) == b'{"selfmoa_batch':
                state["lines"] += 1
            return real_write(fd, data)
        if how == "partial":
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if how == "zero":
            return 0
        raise OSError(getattr(errno, how), os.strerror(getattr(errno, how)))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("how", ["ENOSPC", "EFBIG", "EIO", "partial", "zero"])
def test_a_failed_write_ends_the_run_with_one_line_and_exit_1_and_the_next_run_completes(capsys, monkeypatch,
                                                                                       tmp_path, how):
    jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(6)])
    argv = ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--concurrency", "1"]
    with monkeypatch.context() as patch:
        failing_write(patch, 2, how)
        if how == "partial":  # and the torn line cannot even be taken back
            real_truncate = os.ftruncate

            def ftruncate(fd, size):
                if size:  # the take-back of a torn line (a lock file is emptied, size 0, and works)
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                real_truncate(fd, size)

            patch.setattr(os, "ftruncate", ftruncate)
        code, out, err = cli(capsys, monkeypatch, argv)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("selfmoa: ") and "cannot write" in err and "run the same command again" in err
    data = (tmp_path / "out.jsonl").read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    assert [json.loads(line)["status"] for line in whole.split(b"\n")[:-1]] == ["ok", "ok"]
    assert (data == whole) == (how != "partial")
    code, _, err = cli(capsys, monkeypatch, argv)
    assert code == 0 and "4 answered" in err and "2 already done" in err
    assert [line["id"] for line in read_output(tmp_path / "out.jsonl")] == list(range(6))


def test_short_writes_are_completed_not_lost(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    run([{"id": i, "prompt": f"p{i}"} for i in range(3)], tmp_path / "out.jsonl")
    monkeypatch.undo()
    assert [line["answer"] for line in read_output(tmp_path / "out.jsonl")] == [answer_for(f"p{i}", 2)
                                                                               for i in range(3)]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_file_size_limit_efbig_stops_the_command_cleanly_and_a_rerun_finishes(capsys, tmp_path):
    import resource

    jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(12)])
    argv = [sys.executable, str(ROOT / "selfmoa.py"), "-m", "m", "-n", "1", "--concurrency", "1", "-i",
            str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2500, 2500))

    with ScriptedServer() as server:
        limited = subprocess.run([*argv, "--base-url", server.base_url], capture_output=True, text=True, timeout=60,
                                 preexec_fn=limit)
        assert limited.returncode == 1 and "File too large" in limited.stderr, limited.stderr
        assert len(limited.stderr.strip().splitlines()) == 1
        done = len(read_output(tmp_path / "out.jsonl"))
        assert 0 < done < 12
        code = selfmoa.main([*argv[2:], "--base-url", server.base_url], environ={})
    assert code == 0 and f"{done} already done" in capsys.readouterr().err
    assert [line["id"] for line in read_output(tmp_path / "out.jsonl")] == list(range(12))


def test_every_bad_input_line_is_listed_before_any_call_bombs_and_surrogates_included(capsys, monkeypatch,
                                                                                       tmp_path):
    lines = [
        b'{"prompt": "fine"}',
        b'{"prompt": "x", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # 2: json's recursion limit
        b'{"prompt": "\\ud83d"}',                                                 # 3: a lone surrogate
        b'{"prompt": "x", "deep": ' + b"[" * 80 + b"]" * 80 + b"}",              # 4: deeper than 64
        b'{"prompt": "x", "score": NaN}',                                        # 5: not JSON
        b'{"prompt": "caf\xe9"}',                                                # 6: Latin-1, not UTF-8
        b'{"prompt": "also fine", "sep": "\xe2\x80\xa8"}',                       # a raw U+2028 is fine
        b'{"prompt": "x", "key\\udc00": 1}',                                      # 8: a surrogate in a key
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    echo = Echo()
    code, _, err = cli(capsys, monkeypatch, ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl"], echo)
    assert code == 2 and echo.calls == 0 and not (tmp_path / "out.jsonl").exists() and "Traceback" not in err
    assert "6 bad line(s)" in err
    for number, why in ((2, "nested too deeply"), (3, "lone surrogate"), (4, "nested deeper than 64"),
                        (5, "NaN is not JSON"), (6, "not UTF-8"), (8, "lone surrogate")):
        assert f"line {number}: " in err and why in err.split(f"line {number}: ")[1].split("\n")[0]
    (tmp_path / "list.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(selfmoa.ConfigError, match="not valid JSON"):
        selfmoa_batch.read_items(str(tmp_path / "list.json"))


@pytest.mark.parametrize("record, why", [
    ({"prompt": "\udc80"}, "lone surrogate"), ({"prompt": "x", "t": (1, 2)}, "tuple"),
    ({"prompt": "x", "v": float("nan")}, "nan"), ({"prompt": "x", 3: "y"}, "key that is not a string"),
    ({"prompt": "x", "s": {1}}, "set"),
])
def test_check_items_refuses_records_that_would_not_be_written_back_unchanged(record, why):
    with pytest.raises(selfmoa.ConfigError, match="item 2: the record"):
        selfmoa_batch.check_items([{"prompt": "ok"}, record])
    with pytest.raises(selfmoa.ConfigError, match=why):
        selfmoa_batch.check_items([record])


def test_failed_ids_are_listed_as_json_so_types_differ_and_no_control_character_reaches_the_terminal(
        capsys, monkeypatch, tmp_path):
    """The summary names failed items by their ids written as JSON: 1 and "1" stay apart, and an id holding an
    escape sequence is shown escaped, never sent raw to the terminal."""
    records = [{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"}, {"id": "x\x1b[2J", "prompt": "c"}]
    jsonl(tmp_path / "in.jsonl", records)
    argv = ["-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl"]
    code, _, err = cli(capsys, monkeypatch, argv, Echo(fail={"a", "b", "c"}))
    assert code == 1 and '1, "1", "x\\u001b[2J"' in err and "\x1b" not in err
