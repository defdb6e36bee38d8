"""The command line: every flag reaches the wire, every exit status, stdin, streaming, JSON and batch."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import selfmoa
from tests.scripted_server import ScriptedServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OK = [("choices", None)]


def run(capsys, argv, environ=None):
    code = selfmoa.main(argv, environ=environ if environ is not None else {})
    out, err = capsys.readouterr()
    return code, out, err


def bodies(server):
    return [entry["body"] for entry in server.log]


def aggregations(server):
    return [b for b in bodies(server) if selfmoa.read_references(b["messages"])]


def test_prompt_argument_answer_on_stdout_only(capsys):
    with ScriptedServer() as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "q", "--seed", "5", "hello"])
    assert (code, out, err) == (0, "text 5 0\n", "")


def test_defaults_are_self_moa_with_six_samples(capsys):
    with ScriptedServer() as server:
        run(capsys, ["--base-url", server.base_url, "-m", "q", "hi"])
    first, last = bodies(server)
    assert first["n"] == 6 and first["temperature"] == 0.7 and first["model"] == "q"
    assert len(selfmoa.read_references(last["messages"])) == 6 and "seed" not in first


def test_sampling_flags_reach_proposers_and_aggregator_separately(capsys):
    with ScriptedServer() as server:
        code, _, _ = run(capsys, ["--base-url", server.base_url, "-m", "q", "-a", "agg", "-n", "3", "--seed", "9",
                                  "--temperature", "1.1", "--max-tokens", "50", "--aggregator-temperature", "0.2",
                                  "--aggregator-max-tokens", "80", "hi"])
    proposal, aggregation = bodies(server)
    assert code == 0
    assert (proposal["model"], proposal["n"], proposal["seed"], proposal["temperature"], proposal["max_tokens"]) \
        == ("q", 3, 9, 1.1, 50)
    assert (aggregation["model"], aggregation["seed"], aggregation["temperature"], aggregation["max_tokens"]) \
        == ("agg", 9, 0.2, 80)


def test_moa_proposers_in_order_and_layers_counted_with_the_aggregator(capsys):
    with ScriptedServer() as server:
        code, _, _ = run(capsys, ["--base-url", server.base_url, "--method", "moa", "-p", "x", "-p", "y", "-p", "x",
                                  "-a", "z", "--layers", "3", "--no-n", "--seed", "0", "hi"])
    assert code == 0
    models = [(b["model"], len(selfmoa.read_references(b["messages"]))) for b in bodies(server)]
    assert sorted(models[:3]) == [("x", 0), ("x", 0), ("y", 0)]
    assert sorted(models[3:6]) == [("x", 3), ("x", 3), ("y", 3)] and models[6] == ("z", 3)
    refs = selfmoa.read_references(bodies(server)[-1]["messages"])
    assert [r.split()[1] for r in refs] == ["0", "1", "2"]  # proposer j's seed is 0 + j: configuration order


def test_self_moa_seq_window_and_carry(capsys):
    with ScriptedServer() as server:
        code, out, _ = run(capsys, ["--base-url", server.base_url, "-m", "q", "--method", "self-moa-seq", "-n", "10",
                                    "--window", "4", "--carry", "2", "--json", "hi"])
    result = json.loads(out)
    rounds = [c for c in result["trace"] if c["role"] == "aggregator"]
    assert code == 0 and [c["references"] for c in rounds] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert [len(selfmoa.read_references(b["messages"])) for b in aggregations(server)] == [4, 4, 4, 4]
    assert result["params"]["rounds"] == 4 == selfmoa.seq_rounds(10, 4, 2)


def test_json_has_answer_trace_and_usage(capsys):
    with ScriptedServer() as server:
        code, out, _ = run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--json", "hi"])
    result = json.loads(out)
    assert code == 0 and result["method"] == "self-moa" and result["calls"] == 3 and result["requests"] == 2
    assert result["usage"] == {"prompt_tokens": 14, "completion_tokens": 10, "total_tokens": 24, "unreported": 0}
    assert [c["role"] for c in result["trace"]] == ["proposer", "aggregator"]


def test_stream_prints_pieces_then_a_newline(capsys):
    events = [{"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
              {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}, b"[DONE]"]
    with ScriptedServer(("choices", None), ("sse", events)) as server:
        code, out, _ = run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--stream", "hi"])
    assert (code, out) == (0, "Hello\n")
    assert bodies(server)[-1]["stream"] is True and "stream" not in bodies(server)[0]


def test_no_stream_is_the_default_when_stdout_is_not_a_terminal(capsys):
    with ScriptedServer() as server:
        run(capsys, ["--base-url", server.base_url, "-m", "q", "hi"])
    assert all("stream" not in b for b in bodies(server))


def test_min_ok_and_retries_and_exit_status_1_on_model_failure(capsys, retries_at_once):
    error = {"error": {"message": "overloaded", "type": "server_error"}}
    with ScriptedServer(("json", 500, error, {})) as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--retries", "1",
                                      "--no-n", "--min-ok", "2", "--seed", "0", "hi"])
    assert code == 1 and out == ""
    assert "fewer than --min-ok 2" in err and "overloaded" in err and server.base_url in err
    assert len(server.log) == 4  # 2 samples x (1 try + 1 retry); no aggregation
    assert "Traceback" not in err


def test_json_on_failure_prints_the_work_done(capsys):
    bad = {"error": {"message": "no such model", "type": "invalid_request_error"}}
    with ScriptedServer(("choices", None), ("json", 404, bad, {})) as server:
        code, out, err = run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--json", "hi"])
    partial = json.loads(out)
    assert code == 1 and "no such model" in partial["error"] and partial["calls"] == 2
    assert len(server.log) == 2


def test_timeout_flag(capsys):
    with ScriptedServer(("stall", 2.0), ("choices", None)) as server:
        started = time.monotonic()
        code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "1", "--timeout", "0.3",
                                    "--retries", "0", "hi"])
    assert code == 1 and "timeout=0.3" in err and time.monotonic() - started < 1.8


def test_instruction_file_replaces_the_instruction(capsys, tmp_path):
    (tmp_path / "inst.txt").write_text("Pick the most common answer.\n")
    with ScriptedServer() as server:
        run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--instruction-file",
                     str(tmp_path / "inst.txt"), "hi"])
    assert aggregations(server)[0]["messages"][0]["content"].startswith("Pick the most common answer.\n\n")


@pytest.mark.parametrize("argv, flag", [
    (["-m", "q", "--window", "1", "--method", "self-moa-seq"], "--window 1"),
    (["-m", "q", "--carry", "6", "--method", "self-moa-seq"], "--carry 6"),
    (["-m", "q", "-n", "0"], "--samples 0"),
    (["-m", "q", "--temperature", "0"], "--temperature 0"),
    (["-m", "q", "--temperature", "3"], "--temperature 3"),
    (["-m", "q", "--min-ok", "7"], "--min-ok 7"),
    (["-m", "q", "--layers", "1"], "--layers 1"),
    (["-m", "q", "--concurrency", "0"], "--concurrency 0"),
    (["--method", "moa", "-a", "z"], "--proposer"),
    (["--method", "moa", "-p", "x"], "--aggregator"),
    ([], "--model"),
    (["-m", "q", "-p", "x"], "--proposer"),
    (["-m", "q", "--endpoint", "nourl"], "--endpoint"),
    (["-m", "q", "--base-url", "ftp://x"], "--base-url 'ftp://x'"),
    (["-m", "q", "-i", "in.jsonl"], "--input and --output"),
    (["-m", "q", "--method", "nope"], "--method"),
    (["-m", "q", "--samples", "many"], "--samples"),
])
def test_usage_errors_exit_2_naming_the_flag(capsys, argv, flag):
    try:
        code = selfmoa.main(argv + ["hi"], environ={})
    except SystemExit as exit_:  # argparse's own checks (types, choices) exit directly
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert flag in err and "Traceback" not in err


def test_prompt_from_stdin_and_empty_prompt(tmp_path):
    with ScriptedServer() as server:
        piped = subprocess.run([sys.executable, str(ROOT / "selfmoa.py"), "--base-url", server.base_url, "-m", "q",
                                "--seed", "1"], input="from stdin", capture_output=True, text=True, timeout=30)
        empty = subprocess.run([sys.executable, str(ROOT / "selfmoa.py"), "--base-url", server.base_url, "-m", "q"],
                               input="  \n", capture_output=True, text=True, timeout=30)
    assert piped.returncode == 0 and piped.stdout == "text 1 0\n"
    assert server.log[0]["body"]["messages"] == [{"role": "user", "content": "from stdin"}]
    assert empty.returncode == 2 and "PROMPT" in empty.stderr


def test_installed_console_script_runs():
    script = shutil.which("selfmoa", path=os.path.dirname(sys.executable)) or shutil.which("selfmoa")
    if script is None:
        pytest.skip("the selfmoa console script is not installed here (CI installs it)")
    with ScriptedServer() as server:
        done = subprocess.run([script, "--base-url", server.base_url, "-m", "q", "--seed", "2", "hi"],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "text 2 0\n"


# --- Keys ---------------------------------------------------------------------------------------------


def test_key_order_and_no_key_to_a_foreign_endpoint(capsys):
    canary = "sk-canary-cli-42"
    with ScriptedServer() as server, ScriptedServer() as other:
        # $OPENAI_API_KEY does not follow a --base-url that is not the OpenAI API
        run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "1", "hi"], {"OPENAI_API_KEY": canary})
        assert all("Authorization" not in e["headers"] for e in server.log)
        # ... but does go with an $OPENAI_BASE_URL set beside it
        run(capsys, ["-m", "q", "-n", "1", "hi"], {"OPENAI_API_KEY": canary, "OPENAI_BASE_URL": server.base_url})
        assert server.log[-1]["headers"]["Authorization"] == f"Bearer {canary}"
        # --api-key wins; an --endpoint model gets only its own key
        server.log.clear()
        code, out, err = run(capsys, ["--base-url", server.base_url, "--api-key", "sk-default", "--method", "moa",
                                      "-p", "local", "-p", "remote", "-a", "local",
                                      "--endpoint", f"remote={other.base_url}", "--json", "hi"],
                             {"OPENAI_API_KEY": canary, "SELFMOA_API_KEY_REMOTE": "sk-remote"})
    assert code == 0
    assert {e["headers"].get("Authorization") for e in server.log} == {"Bearer sk-default"}
    assert {e["headers"].get("Authorization") for e in other.log} == {"Bearer sk-remote"}
    assert {e["body"]["model"] for e in other.log} == {"remote"}
    assert canary not in out + err and "sk-default" not in out + err and "sk-remote" not in out + err


# --- Batch --------------------------------------------------------------------------------------------


def write_items(path, count):
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(count)))


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_writes_one_line_per_item_and_resume_skips_answered(capsys, tmp_path):
    write_items(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out.jsonl"
    with ScriptedServer() as server:
        argv = ["--base-url", server.base_url, "-m", "q", "-n", "2", "-i", str(tmp_path / "in.jsonl"), "-o", str(out)]
        code, stdout, err = run(capsys, argv)
        assert code == 0 and stdout == "" and "5 answered" in err
        lines = read_lines(out)
        assert [line["id"] for line in lines] == [f"q{i}" for i in range(5)]
        assert all(line["method"] == "self-moa" and line["calls"] == 3 and line["status"] == "ok" for line in lines)
        assert [line["input"] for line in lines] == [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(5)]
        requests = len(server.log)
        code, _, err = run(capsys, argv)
        assert code == 0 and "5 already done" in err and len(server.log) == requests


def test_batch_failed_items_are_recorded_then_retried(capsys, tmp_path):
    write_items(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.jsonl"
    bad = {"error": {"message": "bad request", "type": "invalid_request_error"}}
    with ScriptedServer(("json", 400, bad, {})) as broken:
        code, _, err = run(capsys, ["--base-url", broken.base_url, "-m", "q", "-n", "1", "-i",
                                    str(tmp_path / "in.jsonl"), "-o", str(out)])
    assert code == 1 and "2 failed" in err
    assert all("bad request" in line["error"] and "answer" not in line for line in read_lines(out))
    with ScriptedServer() as fixed:
        code, _, err = run(capsys, ["--base-url", fixed.base_url, "-m", "q", "-n", "1", "-i",
                                    str(tmp_path / "in.jsonl"), "-o", str(out)])
    assert code == 0 and "2 answered" in err
    assert [("answer" in line, "error" in line) for line in read_lines(out)] == [(True, False)] * 2


def test_batch_bad_input_is_refused_before_any_call(capsys, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "ok"}\n{oops\n{"prompt": 3}\n\n{"id": 1, "messages": []}\n')
    with ScriptedServer() as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, "-m", "q", "-i", str(tmp_path / "in.jsonl"),
                                    "-o", str(tmp_path / "out.jsonl")])
    assert code == 2 and server.log == []
    assert "line 2: not JSON" in err and "line 3: 'prompt' must be" in err and "line 5: 'messages'" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_batch_alpaca_eval_format(capsys, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps([{"instruction": "Say hi", "dataset": "helpful_base"},
                                                  {"instruction": "Say bye"}]))
    with ScriptedServer() as server:
        code, _, _ = run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--seed", "4", "-i",
                                  str(tmp_path / "in.json"), "-o", str(tmp_path / "out.json"),
                                  "--format", "alpaca_eval"])
    outputs = json.loads((tmp_path / "out.json").read_text())
    assert code == 0 and [o["instruction"] for o in outputs] == ["Say hi", "Say bye"]
    assert outputs[0] == {"instruction": "Say hi", "output": "text 4 0", "generator": "selfmoa-self-moa-q-n2",
                          "dataset": "helpful_base"}
    assert len(read_lines(tmp_path / "out.json.jsonl")) == 2


def test_batch_trace_flag_puts_the_trace_in_each_line(capsys, tmp_path):
    write_items(tmp_path / "in.jsonl", 1)
    with ScriptedServer() as server:
        run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--trace", "-i", str(tmp_path / "in.jsonl"),
                     "-o", str(tmp_path / "out.jsonl")])
    assert [c["role"] for c in read_lines(tmp_path / "out.jsonl")[0]["trace"]] == ["proposer", "aggregator"]


def test_batch_torn_last_line_is_repaired_on_resume(capsys, tmp_path):
    write_items(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    argv = ["-m", "q", "-n", "1", "-i", str(tmp_path / "in.jsonl"), "-o", str(out)]
    with ScriptedServer() as server:
        run(capsys, ["--base-url", server.base_url, *argv])
    first, second = out.read_text().splitlines(keepends=True)[:2]
    kept = json.loads(first)
    kept["answer"] = "kept"
    out.write_text(json.dumps(kept) + "\n" + second[:len(second) // 2])
    with ScriptedServer() as server:
        code, _, err = run(capsys, ["--base-url", server.base_url, *argv])
    lines = read_lines(out)
    assert code == 0 and "torn last line" in err and "2 answered" in err
    assert [line["id"] for line in lines] == ["q0", "q1", "q2"] and lines[0]["answer"] == "kept"


def test_batch_killed_with_sigkill_then_resumed_has_every_item_exactly_once(tmp_path):
    """kill -9 at random moments, three times, then resume: each item once, and the file stays valid JSONL."""
    count = 40
    write_items(tmp_path / "in.jsonl", count)
    out = tmp_path / "out.jsonl"
    with ScriptedServer(latency=0.02) as server:
        argv = [sys.executable, str(ROOT / "selfmoa.py"), "--base-url", server.base_url, "-m", "q", "-n", "2",
                "--concurrency", "2", "-i", str(tmp_path / "in.jsonl"), "-o", str(out)]
        rng = random.Random(1234)
        seen = []
        for _ in range(3):
            before = len(out.read_text().splitlines()) if out.exists() else 0
            child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30  # however slow the machine: kill only after some progress
            while time.monotonic() < deadline and child.poll() is None:
                if out.exists() and len(out.read_text().splitlines()) > before:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.15))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            lines = out.read_text().splitlines() if out.exists() else []
            for line in lines[:-1]:
                json.loads(line)  # every line but a possibly torn last one is whole
            seen.append(len(lines))
        finished = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert any(0 < n < count for n in seen), f"no kill landed mid-batch (lines after each kill: {seen})"
    lines = read_lines(out)
    assert sorted(line["id"] for line in lines) == sorted(f"q{i}" for i in range(count))
    assert [line["id"] for line in lines] == [f"q{i}" for i in range(count)]
    assert all(line["answer"] for line in lines)


def test_model_falls_back_to_the_selfmoa_model_environment_variable(capsys):
    with ScriptedServer() as server:
        code, out, _ = run(capsys, ["--base-url", server.base_url, "-n", "2", "hi"], {"SELFMOA_MODEL": "envmodel"})
    assert code == 0 and {b["model"] for b in bodies(server)} == {"envmodel"}


def test_no_stream_flag_turns_streaming_off(capsys):
    with ScriptedServer() as server:
        code, out, _ = run(capsys, ["--base-url", server.base_url, "-m", "q", "-n", "2", "--no-stream", "--seed", "1",
                                    "hi"])
    assert code == 0 and out == "text 1 0\n" and all("stream" not in b for b in bodies(server))


def test_batch_shows_a_progress_line_when_stderr_is_a_terminal(tmp_path):
    import pty

    write_items(tmp_path / "in.jsonl", 3)
    primary, secondary = pty.openpty()
    with ScriptedServer() as server:
        child = subprocess.Popen([sys.executable, str(ROOT / "selfmoa.py"), "--base-url", server.base_url, "-m", "q",
                                  "-n", "1", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")],
                                 stdout=subprocess.DEVNULL, stderr=secondary, stdin=subprocess.DEVNULL)
        os.close(secondary)
        seen = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        child.wait(timeout=30)
    os.close(primary)
    text = seen.decode(errors="replace")
    assert child.returncode == 0 and "3/3 done, 0 failed" in text and "items/s" in text and "ETA" in text


def test_batch_output_problems_are_usage_errors_not_tracebacks(capsys, tmp_path):
    write_items(tmp_path / "in.jsonl", 1)
    before = (tmp_path / "in.jsonl").read_text()
    code, _, err = run(capsys, ["-m", "q", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "in.jsonl")])
    assert code == 2 and "--output is the --input file" in err and (tmp_path / "in.jsonl").read_text() == before
    code, _, err = run(capsys, ["--base-url", "http://127.0.0.1:9/v1", "-m", "q", "-i", str(tmp_path / "in.jsonl"),
                                "-o", str(tmp_path / "missing" / "out.jsonl")])
    assert code == 2 and "cannot write the output file" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [None, b"", b"  \n", b"\xff\xfe not UTF-8"], ids=["missing", "empty", "blank",
                                                                                       "binary"])
@pytest.mark.parametrize("command", [[], ["serve", "--port", "0"]], ids=["one-shot", "serve"])
def test_a_bad_instruction_file_is_a_usage_error_naming_the_flag(tmp_path, capsys, content, command):
    """--instruction-file that is missing, empty or not UTF-8 exits 2 naming the flag, before any call and
    without a traceback, for the one-shot command and for serve alike."""
    path = tmp_path / "instruction.txt"
    if content is not None:
        path.write_bytes(content)
    argv = command + ["--base-url", "http://127.0.0.1:9/v1", "--instruction-file", str(path)]
    code = selfmoa.main(argv + ([] if command else ["-m", "x", "hi"]), environ={})
    err = capsys.readouterr().err
    assert code == 2 and "--instruction-file" in err and "Traceback" not in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("command, flag", [([], "--temperature"), ([], "--aggregator-temperature"),
                                           ([], "--timeout"), ([], "--deadline"),
                                           (["serve"], "--drain-timeout"), (["serve"], "--temperature")])
def test_a_number_flag_that_is_not_finite_is_a_usage_error_naming_it(capsys, command, flag, value):
    """NaN and infinities never reach a method, a fingerprint or a timer: argparse refuses them, naming the flag."""
    with pytest.raises(SystemExit) as exited:
        selfmoa.main(command + ["--base-url", "http://127.0.0.1:9/v1", f"{flag}={value}"]
                     + ([] if command else ["-m", "x", "hi"]), environ={})
    assert exited.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
