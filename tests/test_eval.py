"""selfmoa eval (spec/eval.md): the graders against hostile answers, one pool of samples per run, resumable and
safe like batch, the report and results.json, the dry run, and the reference prompt layout."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import selfmoa
import selfmoa_eval as ev
from bench.reproduce import dataset, mock_complete
from mock_models import MockServer
from tests import test_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREE = ["-M", "i=generalist", "-M", "m=mathematician", "-M", "d=coder"]


# === Graders ===========================================================================================


@pytest.mark.parametrize("response, answer, extracted, correct", [
    ("B", "B", "B", True),
    ("(B)", "B", "B", True),
    ("B) Paris", "B", "B", True),
    ("b)", "(B)", "B", True),
    ("The answer is B.", "B", "B", True),
    ("The answer is (c)", "C", "C", True),
    ("**Answer:** D", "D", "D", True),
    (r"so \boxed{\text{A}}", "A", "A", True),
    ("Option (A) is tempting, but (C) is right.", "C", "C", True),
    ("The answer is a bit unclear; I pick (D).", "D", "D", True),
    ("A) 12\nB) 13\nThe answer is B", "A", "B", False),
    ("I cannot tell.", "A", None, False),
    ("", "A", None, False),
])
def test_choice_grader_reads_the_letter_a_response_chose(response, answer, extracted, correct):
    assert ev.grade(response, answer, "choice") == (extracted, correct)


@pytest.mark.parametrize("response, answer, extracted, correct", [
    ("The answer is 1,234.", "1234", "1,234", True),
    ("The answer is 1234.", "1,234", "1234", True),
    ("So x = -7.", "-7", "-7", True),
    ("The answer is \u22127", "-7", "\u22127", True),
    ("It is +3", "3", "+3", True),
    ("The answer is 2.50.", "2.5", "2.50", True),
    ("The answer is 0.5", "1/2", "0.5", True),
    (r"Hence \boxed{\frac{3}{4}}.", "0.75", "3/4", True),
    (r"\boxed{12} (not 13)", "12", "12", True),
    ("First 21, then 21 - 39; so the answer is -18. Check: 3 steps.", "-18", "-18", True),
    ("The answer is 1,23.", "123", "1", False),
    ("Costs $1,000,000 in total", "1000000", "1,000,000", True),
    ("The answer is 18.", "-18", "18", False),
    ("no number here", "5", None, False),
    ("The answer is 1/0", "1", "1/0", False),
])
def test_number_grader_compares_the_final_number_by_value(response, answer, extracted, correct):
    assert ev.grade(response, answer, "number") == (extracted, correct)


@pytest.mark.parametrize("response, answer, correct", [
    ("The answer is Paris.", "paris", True),
    ("The Eiffel Tower", "eiffel tower", True),
    ("Answer: the  United   States!", "United States", True),
    (r"\boxed{Blue whale}", "blue whale", True),
    ("Paris, I think", "Paris", False),
    ("", "x", False),
    ("...", "!!!", False),
])
def test_exact_grader_matches_after_normalisation(response, answer, correct):
    assert ev.grade(response, answer, "exact")[1] is correct


@pytest.mark.parametrize("response, answer, correct", [
    ("[ANSWER]assert f([1, 2]) == [2, 4][/ANSWER]", "[2,4]", True),
    ("[ANSWER]f('ab') == 'ba'[/ANSWER]", '"ba"', True),
    ("The output is 12.", "12", True),
    ("The answer is 'abc'.", "'abc'", True),
    ("assert f(3) == {'a': 1}", "{'a': 1}", True),
    ("```\n(1, 2)\n```", "(1, 2)", True),
    ("The output is [1, 2]", "(1, 2)", False),
    ("The output is True", "1", False),
    ("The output is 1", "True", False),
    ("The answer is " + "[" * 5000, "[]", False),
    ("The answer is " + "9" * 6000, "9", False),
])
def test_crux_grader_compares_outputs_as_python_values_without_running_them(response, answer, correct):
    assert ev.grade(response, answer, "crux")[1] is correct


def test_auto_grader_picks_by_the_reference_answer():
    assert ev.grade("The answer is (B).", "B")[1] and ev.grade("It is 1,000.", "1000")[1]
    assert ev.grade("The answer is Paris.", "Paris")[1]


hostile = st.one_of(
    st.text(),
    st.text(alphabet="0123456789,./-+\\{}()[]ABCDabcd boxed frac answer is: \n'\"", max_size=300),
    st.builds(lambda a, b: a * b, st.sampled_from(["[", "{", "\\boxed{", "(", "9", "1,", "answer is ", "[ANSWER]"]),
              st.integers(0, 3000)),
)


@settings(max_examples=150, deadline=None)
@given(response=hostile, answer=hostile.filter(lambda a: a.strip() != ""),
       grader=st.sampled_from(["choice", "number", "exact", "crux", "auto"]))
@example(response="\\boxed{" * 2000, answer="1", grader="number")
@example(response="[ANSWER]" + "(" * 10000 + "[/ANSWER]", answer="()", grader="crux")
@example(response="1e999999999", answer="1e999999999", grader="crux")
@example(response="The answer is " + "1" * 100000, answer="1", grader="number")
def test_graders_never_raise_on_any_text(response, answer, grader):
    """Whatever a model writes (and whatever a dataset's answer is), grading returns (extracted, bool)."""
    extracted, correct = ev.grade(response, answer, grader)
    assert extracted is None or isinstance(extracted, str)
    assert isinstance(correct, bool)


def test_the_math_grader_says_how_to_install_math_verify_when_it_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    path = tmp_path / "math.jsonl"
    path.write_text('{"prompt": "1/2 + 1/4?", "answer": "\\\\frac{3}{4}", "grader": "math"}\n')
    with pytest.raises(selfmoa.ConfigError, match="pip install math-verify"):
        ev.read_dataset(str(path))


@pytest.mark.parametrize("response, correct", [
    (r"The answer is $\frac{3}{4}$", True), (r"so \boxed{0.75}", True), (r"\boxed{\frac{6}{8}}", True),
    ("The answer is 3/5", False), ("garbage {{{", False), ("", False), ("\\boxed{" * 500, False),
])
def test_the_math_grader_uses_math_verify_where_installed(response, correct):
    pytest.importorskip("math_verify")
    assert ev.grade(response, r"\frac{3}{4}", "math")[1] is correct


# === The dataset =======================================================================================


def test_a_bad_dataset_is_refused_listing_every_bad_line_before_any_call(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": "no answer"}\n{"prompt": "x", "answer": true}\n'
                    '{"prompt": "y", "answer": "2", "grader": "regex"}\nnot json\n')
    with pytest.raises(selfmoa.ConfigError) as error:
        ev.read_dataset(str(path))
    assert "line 5" in str(error.value)  # the batch reader lists what is not JSON first
    path.write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": "no answer"}\n{"prompt": "x", "answer": true}\n'
                    '{"prompt": "y", "answer": "2", "grader": "regex"}\n')
    with pytest.raises(selfmoa.ConfigError) as error:
        ev.read_dataset(str(path))
    message = str(error.value)
    assert "3 bad item(s)" in message and "item 2" in message and "item 3" in message and "'regex'" in message


# === One pool of samples ===============================================================================


def write_dataset(tmp_path, domains=("MATH", "MMLU"), count=3, seed=0):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for domain in domains
                            for record in dataset(domain, count, seed)), encoding="utf-8")
    return str(path)


def sample_requests(server):
    return [entry["body"] for entry in server.requests
            if entry["body"] and entry["body"]["messages"][0]["role"] != "system"]


def aggregation_requests(server):
    return [entry["body"] for entry in server.requests
            if entry["body"] and entry["body"]["messages"][0]["role"] == "system"]


def test_three_models_and_the_papers_compositions_cost_one_pool_plus_one_call_per_aggregation(tmp_path, capsys):
    """The recording server sees each model asked for n samples per item, each sample once, plus one request per
    aggregation (and one per Seq round): not one full run per composition."""
    data = write_dataset(tmp_path)
    out = tmp_path / "out"
    with MockServer() as server:
        code = ev.main([data, "--out", str(out), "--base-url", server.base_url, *THREE, "--seed", "1",
                        "--seq", "6,12", "--no-figures"], environ={})
    assert code == 0, capsys.readouterr().err
    items, n = 6, 6
    samples = sample_requests(server)
    drawn = [(body["model"], body["messages"][0]["content"], body["seed"] + j)
             for body in samples for j in range(body["n"])]
    assert len(drawn) == len(set(drawn)), "a sample was asked for twice"
    # i (the first model, the Seq model) needs 12 samples; m and d need 6.
    assert len(drawn) == items * (12 + n + n)
    # 7 compositions (3 Self-MoA, 4 mixes) + one-shot 12 (one-shot 6 is the Self-MoA iiiiii aggregation, run once)
    # + Seq 6 (1 round) + Seq 12 (3 rounds), per item.
    assert len(aggregation_requests(server)) == items * (7 + 1 + 1 + 3)
    results = json.loads((out / "results.json").read_text())
    compositions = [row["composition"] for row in results["cells"] if row["kind"] == "composition"]
    assert compositions == ["iiiiii", "mmmmmm", "dddddd", "iimmdd", "mmmddd", "iiiimd", "iiiddd"]
    assert {row["model"] for row in results["cells"] if row["kind"] == "alone"} == {"i", "m", "d"}
    assert all(row["items"] == items for row in results["cells"])
    assert results["manifest"]["models"]["m"] == {"name": "mathematician", "reported": ["mathematician"]}
    assert results["manifest"]["spent"]["calls"] == len(drawn) + items * (7 + 1 + 1 + 3)
    assert "error" not in results["fit"] and results["fit"]["n"] == 7
    assert [row["n"] for row in results["seq"]] == [6, 12]
    report = (out / "report.md").read_text()
    assert report.startswith(ev.REPORT_TITLE + "\n") and "| iimmdd | moa |" in report and "Table 4" in report
    item = results["items"][0]
    assert set(item["cells"]) == {"composition " + c for c in compositions} | {
        "one-shot 6", "seq 6", "one-shot 12", "seq 12"}
    assert len(item["samples"]["i"]) == n and all(set(s) == {"extracted", "correct"} for s in item["samples"]["i"])

    # A rerun asks for nothing and reports the same numbers.
    before = len(server.requests)
    with MockServer() as again:
        assert ev.main([data, "--out", str(out), "--base-url", again.base_url, *THREE, "--seed", "1",
                        "--seq", "6,12", "--no-figures"], environ={}) == 0
        assert again.requests == []
    assert len(server.requests) == before
    rerun = json.loads((out / "results.json").read_text())
    assert {k: rerun[k] for k in ("cells", "fit", "seq", "items")} == \
        {k: results[k] for k in ("cells", "fit", "seq", "items")}


def test_the_pool_equals_what_the_methods_draw_themselves():
    """Self-MoA of model M from the pool (sample k with seed S + k) is exactly self_moa(prompt, M, seed=S)."""
    questions = ev.questions_from(dataset("MATH", 4, 0))
    experiment = ev.Experiment(models={"m": "mathematician"}, compositions=["mmmmmm"], aggregator="m", seed=7)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        results = ev.evaluate(questions, experiment, complete=mock_complete, out=out, figures=False)
        for question, item in zip(questions, results["items"]):
            direct = selfmoa.self_moa(question.messages, "mathematician", n=6, seed=7, complete=mock_complete)
            assert item["cells"]["composition mmmmmm"]["extracted"] == ev.grade(direct.answer, question.answer)[0]


def test_the_methods_take_given_samples_and_make_no_call_for_them():
    seen = []

    def model(request):
        seen.append(request)
        return "synthesis"

    result = selfmoa.moa("Q", ["a", "b", "c"], "z", samples=["1", "2", "3"], complete=model)
    assert [r.model for r in seen] == ["z"] and selfmoa.read_references(seen[0].messages) == ["1", "2", "3"]
    assert result.calls == 1 and result.params["samples_given"] == 3
    seen.clear()
    result = selfmoa.self_moa("Q", "a", samples=["1", "2"], aggregator="z", complete=model)
    assert [r.model for r in seen] == ["z"] and result.calls == 1
    with pytest.raises(selfmoa.ConfigError, match="samples="):
        selfmoa.moa("Q", ["a", "b"], "z", samples=["1"], complete=model)
    with pytest.raises(selfmoa.ConfigError, match=r"samples\[1\]"):
        selfmoa.self_moa("Q", "a", samples=["1", 2], complete=model)


# === Resumable and safe ==============================================================================


def pool_ids(out):
    path = os.path.join(out, ev.POOL_FILE)
    if not os.path.exists(path):
        return set()
    ok = set()
    for line in open(path, "rb").read().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("status") == "ok":
            ok.add(record["id"])
    return ok


def test_killed_at_random_moments_and_rerun_it_repeats_no_recorded_call_and_gives_the_same_results(tmp_path, capsys):
    """SIGKILL at (seeded) random moments of the work, then the same command until it finishes: no sample recorded
    before a run is asked for in it, the last run makes exactly the calls the dry run announced, and the results
    are those of an uninterrupted run. A moment is when the pool has grown to a random line count between what
    the run found and three quarters of the whole run's lines, so every kill lands in the middle of the work
    however fast the machine is. Bounded: at most 4 kills, each waited for at most 60 s, every run within 120 s.
    The runs that are killed are processes; the uninterrupted run and the dry runs need none and run in this
    one."""
    data = write_dataset(tmp_path, domains=("MATH",), count=4)
    argv = [data, *THREE, "--seed", "2", "--seq", "6,9", "--concurrency", "4", "--no-figures"]
    rng = random.Random(23)
    with MockServer(latency=0.02, max_concurrency=4) as server:
        clean = tmp_path / "clean"
        assert ev.main([*argv, "--out", str(clean), "--base-url", server.base_url], environ={}) == 0, \
            capsys.readouterr().err
        lines = len(pool_ids(str(clean)))  # the pool lines of a whole run
        killed = tmp_path / "killed"
        kills = 0
        for _ in range(8):
            recorded = pool_ids(str(killed))
            capsys.readouterr()
            assert ev.main([*argv, "--out", str(killed), "--dry-run"], environ={}) == 0, capsys.readouterr().err
            announced = int(capsys.readouterr().out.split(" calls still")[0].rsplit(" ", 1)[-1])
            start = len(server.requests)
            process = subprocess.Popen([sys.executable, "-m", "selfmoa_eval", *argv, "--out", str(killed),
                                        "--base-url", server.base_url], cwd=ROOT, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
            if kills < 4 and len(recorded) < lines * 3 // 4:
                moment = rng.randint(len(recorded) + 1, lines * 3 // 4)
                deadline = time.monotonic() + 60
                while process.poll() is None and len(pool_ids(str(killed))) < moment and time.monotonic() < deadline:
                    time.sleep(0.002)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    kills += 1
            _, stderr = process.communicate(timeout=120)
            made = [entry["body"] for entry in server.requests[start:] if entry["body"]]
            for body in made:
                if body["messages"][0]["role"] != "system":
                    for j in range(body.get("n", 1)):
                        assert json.dumps(["sample", _item_of(data, body), body["model"], body["seed"] - 2 + j],
                                          ensure_ascii=False) not in recorded, "a recorded sample was asked again"
            if process.returncode == 0:
                assert sum(body.get("n", 1) if body["messages"][0]["role"] != "system" else 1
                           for body in made) == announced
                break
            assert process.returncode == -signal.SIGKILL, stderr
        else:
            pytest.fail("the killed run never finished")
    assert kills >= 2, f"only {kills} kill(s) landed before a run finished"
    first, second = (json.loads((folder / "results.json").read_text()) for folder in (clean, killed))
    # What each cell costs is the same (only this run's spend differs), unless a kill split the lines of one
    # request's samples (the kernel may cut a write between pages): the rest were then asked for in a request of
    # their own, whose prompt tokens count too (spec/eval.md section 5). Everything else is always the same.
    split = request_openers(str(clean)) != request_openers(str(killed))
    for part in ("cells", "fit", "seq", "items"):
        assert (without_tokens(first[part]) if split else first[part]) == \
            (without_tokens(second[part]) if split else second[part]), part


def request_openers(out):
    """The samples whose line opens a request's lines: it carries the request's prompt tokens."""
    latest = {}
    for line in open(os.path.join(out, ev.POOL_FILE), "rb").read().split(b"\n"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("method") == "sample" and record.get("status") == "ok":
                latest[record["id"]] = record
    return {key for key, record in latest.items() if record["usage"]["prompt_tokens"]}


def without_tokens(value):
    if isinstance(value, dict):
        return {k: without_tokens(v) for k, v in value.items() if k not in ("tokens", "prompt_tokens",
                                                                             "completion_tokens")}
    return [without_tokens(v) for v in value] if isinstance(value, list) else value


def _item_of(data, body):
    prompt = body["messages"][-1]["content"]
    for line in open(data, encoding="utf-8"):
        record = json.loads(line)
        if record["prompt"] == prompt:
            return record["id"]
    raise AssertionError("a request for no item of the dataset")


def test_a_pool_file_that_is_not_ours_is_left_untouched(tmp_path, capsys):
    data = write_dataset(tmp_path, count=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pool.jsonl").write_text('{"name": "my notes"}\n')
    assert ev.main([data, "--out", str(out), *THREE, "--base-url", "http://127.0.0.1:9/v1"], environ={}) == 2
    assert "not a selfmoa" in capsys.readouterr().err
    assert (out / "pool.jsonl").read_text() == '{"name": "my notes"}\n'
    (out / "pool.jsonl").unlink()
    (out / "report.md").write_text("# My own report\n")
    assert ev.main([data, "--out", str(out), *THREE, "--base-url", "http://127.0.0.1:9/v1"], environ={}) == 2
    assert "was not written by selfmoa eval" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "# My own report\n" and not (out / "pool.jsonl").exists()


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_the_lock(tmp_path, capsys):
    import selfmoa_batch

    data = write_dataset(tmp_path, count=1)
    out = tmp_path / "out"
    out.mkdir()
    with selfmoa_batch._output_lock(str(out / "pool.jsonl")):
        code = subprocess.run([sys.executable, "-m", "selfmoa_eval", data, "--out", str(out), *THREE, "--base-url",
                               "http://127.0.0.1:9/v1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert code.returncode == 2 and "being written by another selfmoa run" in code.stderr


# === Dry run, usage errors, the command ================================================================


def test_dry_run_prints_calls_tokens_and_cost_and_sends_nothing(tmp_path, capsys):
    data = write_dataset(tmp_path, count=2)
    with MockServer() as server:
        code = ev.main([data, "--out", str(tmp_path / "out"), "--base-url", server.base_url, *THREE, "--dry-run",
                        "--price", "i=1,2", "--price", "mathematician=0.5,0.5", "--price", "d=0,0", "--max-tokens",
                        "100"], environ={})
        assert server.requests == []
    printed = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "out").exists()
    # 3 models x 6 samples x 4 items + 7 compositions x 4 items
    assert printed.startswith("selfmoa eval --dry-run: 100 calls still to make for 4 items (nothing was sent)")
    assert "\ngeneralist\t52\t" in printed and "$" in printed.splitlines()[-1]


@pytest.mark.parametrize("argv, flag", [
    (["-M", "ii=x"], "--model"), (["-M", "i=x", "-M", "i=y"], "--model"), ([], "--model"),
    (["-M", "i=x", "--compositions", "iz"], "--compositions"), (["-M", "i=x", "-n", "0"], "--samples"),
    (["-M", "i=x", "--seq-model", "q", "--seq", "6"], "--seq-model"), (["-M", "i=x", "--carry", "6"], "--carry"),
    (["-M", "i=x", "--price", "i=1"], "--price"), (["-M", "i=x", "--dry-run", "--price", "i=a,b"], "--price"),
    (["-M", "i=x", "--temperature", "0"], "--temperature"),
])
def test_usage_errors_exit_2_naming_the_flag_before_any_call(tmp_path, capsys, argv, flag):
    data = write_dataset(tmp_path, count=1)
    assert ev.main([data, "--out", str(tmp_path / "out"), *argv], environ={}) == 2
    assert flag in capsys.readouterr().err


def test_selfmoa_eval_is_a_subcommand_and_a_lone_copy_names_the_file_to_add(tmp_path):
    helped = subprocess.run([sys.executable, "selfmoa.py", "eval", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "usage: selfmoa eval" in helped.stdout
    shutil.copy(os.path.join(ROOT, "selfmoa.py"), tmp_path / "selfmoa.py")
    done = subprocess.run([sys.executable, "-I", "-S", "selfmoa.py", "eval", "data.jsonl"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "selfmoa eval needs selfmoa_batch.py and selfmoa_eval.py" in done.stderr
    shutil.copy(os.path.join(ROOT, "selfmoa_batch.py"), tmp_path / "selfmoa_batch.py")
    done = subprocess.run([sys.executable, "-I", "-S", "selfmoa.py", "eval", "data.jsonl"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "selfmoa eval needs selfmoa_eval.py, not beside" in done.stderr


def test_importing_selfmoa_eval_imports_no_optional_package():
    code = "import sys, selfmoa_eval; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('matplotlib', 'math_verify', 'selfmoa_serve')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_without_matplotlib_the_report_is_written_and_one_line_says_how_to_get_figures(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines = []
    questions = ev.questions_from(dataset("MATH", 2, 0))
    results = ev.evaluate(questions, ev.Experiment(models={"i": "generalist"}, seed=0), complete=mock_complete,
                          out=str(tmp_path), progress=lines.append)
    assert results["figures"] == [] and [line for line in lines if "matplotlib" in line] == [ev.FIGURES_HINT]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.jsonl", "report.md", "results.json"]


def test_figures_are_drawn_where_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    questions = ev.questions_from(dataset("MATH", 3, 0))
    experiment = ev.Experiment(models={"i": "generalist", "m": "mathematician", "d": "coder"}, seed=0, seq=[6, 9])
    results = ev.evaluate(questions, experiment, complete=mock_complete, out=str(tmp_path))
    assert sorted(results["figures"]) == sorted(f"{stem}.{kind}" for stem in
                                                ("accuracy", "quality_vs_diversity", "accuracy_vs_samples")
                                                for kind in ("png", "svg"))
    assert (tmp_path / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_no_figures_draws_none_and_says_nothing_of_them(tmp_path, capsys):
    """--no-figures: no figure files, even where matplotlib is installed, and no line about figures (nor the
    hint of where it is not); the report and results.json are written as always."""
    data = write_dataset(tmp_path, domains=("MATH",), count=1)
    out = tmp_path / "out"
    with MockServer() as server:
        assert ev.main([data, "--out", str(out), "-M", "i=generalist", "--base-url", server.base_url, "--seed", "0",
                        "--no-figures"], environ={}) == 0
    assert sorted(p.name for p in out.iterdir()) == ["pool.jsonl", "report.md", "results.json"]
    assert "figure" not in capsys.readouterr().err.replace(str(tmp_path), "")


# === The reference layout ==============================================================================


def test_the_reference_layout_is_the_original_moa_prompt_byte_for_byte():
    """The original code's system message: its instruction, "\\n\\nResponses from models:", then "\\n{i}. {text}"
    per response; appended to an existing system message after "\\n\\n"."""
    built = selfmoa.inject_references([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
                                      ["one\n2. two", "three"], layout="reference")
    assert built[0]["content"] == ("Be brief.\n\n" + selfmoa.REFERENCE_INSTRUCTION
                                   + "\n\nResponses from models:\n1. one\n2. two\n2. three")
    assert selfmoa.REFERENCE_INSTRUCTION.startswith("You have been provided with a set of responses from various "
                                                    "open-source models to the latest user query.")
    assert selfmoa.REFERENCE_INSTRUCTION.endswith("adheres to the highest standards of accuracy and reliability.")
    assert built[1] == {"role": "user", "content": "Q"}


def test_the_layout_reaches_the_aggregator_of_every_method_and_the_command_line():
    seen = []

    def model(request):
        seen.append(request.messages[0]["content"] if request.messages[0]["role"] == "system" else None)
        return "x"

    selfmoa.self_moa("Q", "a", n=2, complete=model, layout="reference")
    selfmoa.moa("Q", ["a", "b"], "c", complete=model, layout="reference")
    selfmoa.self_moa_seq("Q", "a", n=3, window=2, carry=1, complete=model, layout="reference")
    aggregations = [text for text in seen if text is not None]
    assert len(aggregations) == 4 and all(text.startswith(selfmoa.REFERENCE_INSTRUCTION) for text in aggregations)
    assert aggregations[-1].endswith("\n1. x\n2. x")
    with pytest.raises(selfmoa.ConfigError, match="layout"):
        selfmoa.self_moa("Q", "a", complete=model, layout="numbered")
    with MockServer() as server:
        done = subprocess.run([sys.executable, "selfmoa.py", "--base-url", server.base_url, "-m", "generalist",
                               "-n", "2", "--layout", "reference", "Q?"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        system = server.requests[-1]["body"]["messages"][0]["content"]
    assert system.startswith(selfmoa.REFERENCE_INSTRUCTION) and "\n1. " in system and "<<<" not in system


def test_eval_records_the_layout_in_its_manifest(tmp_path):
    questions = ev.questions_from(dataset("MATH", 2, 0))
    results = ev.evaluate(questions, ev.Experiment(models={"i": "generalist"}, seed=0, layout="reference"),
                          complete=mock_complete, out=str(tmp_path), figures=False)
    manifest = results["manifest"]
    assert manifest["layout"] == "reference"
    assert manifest["instruction_sha256"] == __import__("hashlib").sha256(
        selfmoa.REFERENCE_INSTRUCTION.encode()).hexdigest()


def test_progress_reports_calls_and_tokens_on_stderr(tmp_path, capsys):
    data = write_dataset(tmp_path, count=1)
    with MockServer() as server:
        code = ev.main([data, "--out", str(tmp_path / "o"), *THREE, "--base-url", server.base_url, "--seed", "0",
                        "--no-figures"], environ={})
    done = capsys.readouterr()
    assert code == 0, done.err
    assert "samples: 36/36, items 2/2 done; 36 calls, " in done.err
    assert "aggregations: 14/14, items 2/2 done; 50 calls, " in done.err and " tokens, " in done.err
    assert done.out == ""


def test_serve_sends_the_layout_a_request_or_its_flags_ask_for():
    import requests

    import selfmoa_serve

    with MockServer() as upstream:
        client = selfmoa.HTTPClient(upstream.base_url)
        with selfmoa_serve.ModelServer(client, port=0) as server:
            for selfmoa_object, layout in (({"n": 2, "layout": "reference"}, "reference"), ({"n": 2}, "keyed")):
                reply = requests.post(f"{server.base_url}/chat/completions", timeout=60, json={
                    "model": "self-moa/generalist", "messages": [{"role": "user", "content": "Q?"}],
                    "selfmoa": selfmoa_object})
                assert reply.status_code == 200, reply.text
                system = upstream.requests[-1]["body"]["messages"][0]["content"]
                assert system.startswith(selfmoa.REFERENCE_INSTRUCTION) is (layout == "reference")
                assert ("<<<response 1 of 2, key" in system) is (layout == "keyed")
        with selfmoa_serve.ModelServer(client, port=0, defaults={"layout": "reference",
                                                                  "instruction": selfmoa.REFERENCE_INSTRUCTION}) \
                as server:
            reply = requests.post(f"{server.base_url}/chat/completions", timeout=60, json={
                "model": "self-moa/generalist", "messages": [{"role": "user", "content": "Q?"}],
                "selfmoa": {"n": 2}})
            assert reply.status_code == 200, reply.text
            system = upstream.requests[-1]["body"]["messages"][0]["content"]
            assert system.startswith(selfmoa.REFERENCE_INSTRUCTION + "\n\nResponses from models:\n1. ")
            assert "\n2. " in system and "<<<" not in system


EVAL_HELP = re.compile(r"(<!-- eval-help:start -->\n```\n)(.*?)(```\n<!-- eval-help:end -->)", re.DOTALL)


def eval_help() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    return ev.build_parser().format_help()


def test_readme_shows_exactly_eval_help(monkeypatch):
    """The README's `selfmoa eval --help` block is the parser's help: character for character on Python
    3.10-3.12, word for word on 3.13+ (whose argparse words the options' metavars differently)."""
    monkeypatch.setenv("COLUMNS", "100")
    found = EVAL_HELP.search(test_readme.README.read_text(encoding="utf-8"))
    assert found, "README.md lost its <!-- eval-help:start --> ... <!-- eval-help:end --> block"
    stale = "README.md's eval help is stale: run python3 -m tests.test_eval --update (with Python 3.10-3.12)"
    if sys.version_info < test_readme.HELP_FORMAT_CHANGED:
        assert found.group(2) == eval_help(), stale
    else:
        assert test_readme.metavar_once(found.group(2)) == test_readme.metavar_once(eval_help()), stale


def test_failed_calls_leave_a_complete_report_exit_1_and_are_retried_by_a_rerun(tmp_path, capsys):
    """A model no server has: its samples fail, the cells that need them are reported unanswered, the other
    cells are complete, the exit status is 1; a rerun asks for the failed samples again (and only them)."""
    data = write_dataset(tmp_path, count=1)
    out = tmp_path / "out"
    argv = [data, "--out", str(out), "-M", "i=generalist", "-M", "x=no-such-model", "--compositions", "iiiiii,iixx",
            "--seed", "0", "--retries", "0"]
    with MockServer() as server:
        assert ev.main([*argv, "--base-url", server.base_url], environ={}) == 1
        first = len(server.requests)
    err = capsys.readouterr().err
    assert "failed; run the same command again to retry them" in err
    results = json.loads((out / "results.json").read_text())
    rows = {row.get("composition") or f"{row['model']} alone": row for row in results["cells"]}
    assert rows["iiiiii"]["items"] == 2 and rows["iiiiii"]["unanswered"] == 0
    assert rows["x alone"]["items"] == 0 and rows["x alone"]["accuracy"] is None
    assert rows["iixx"]["items"] == 2  # the x samples failed: aggregated from the two of i
    assert "| x alone | single sample | - |" in (out / "report.md").read_text()
    with MockServer() as server:  # the first run drew the figures, where matplotlib is installed
        assert ev.main([*argv, "--base-url", server.base_url, "--no-figures"], environ={}) == 1
        asked = {entry["body"]["model"] for entry in server.requests}
    assert asked == {"no-such-model"} and first > 0


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    if sys.version_info >= test_readme.HELP_FORMAT_CHANGED:
        sys.exit("update the README with Python 3.10-3.12: their argparse prints the help the README shows")
    text = test_readme.README.read_text(encoding="utf-8")
    test_readme.README.write_text(EVAL_HELP.sub(lambda m: m.group(1) + eval_help() + m.group(3), text),
                                  encoding="utf-8")
    print("README.md updated")


def test_all_is_sorted_and_the_manual_names_every_public_name():
    assert ev.__all__ == sorted(ev.__all__) and all(hasattr(ev, name) for name in ev.__all__)
    assert [name for name in ev.__all__ if f"``{name}``" not in ev.__doc__] == []
