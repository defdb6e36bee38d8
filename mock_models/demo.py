"""`python3 -m mock_models demo`: selfmoa's three methods against the mock server, as a user runs them.

It starts the mock server on a free port, runs the selfmoa command line (MoA, Self-MoA, Self-MoA-Seq) on
one task of each domain, printing every command it runs, and compares the answers with the ground truth.
Nothing needs installing: selfmoa.py is run from the folder above this package. This module does not
import selfmoa; it drives it through its command line, exactly as a reader would.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
import time

from mock_models import MockServer
from mock_models.models import MODELS
from mock_models.tasks import extract_answer, is_correct, make_tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEST = {"MATH": "mathematician", "CRUX": "coder", "MMLU": "generalist"}


def selfmoa_command() -> list[str]:
    """How to run selfmoa here: the file next to this package, else the installed console script."""
    if (ROOT / "selfmoa.py").exists():
        return [sys.executable, str(ROOT / "selfmoa.py")]
    return ["selfmoa"]


RERUN_PORT = 8000  # the port of `python3 -m mock_models` without --port


def demo(out=sys.stdout) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    started = time.monotonic()
    with MockServer() as server:
        say(f"Mock models serving at {server.base_url} ({', '.join(MODELS)}).")
        say("Each command below is run exactly as shown, with these two variables set; its output (the answer) "
            "follows it.")
        say(f"$ export OPENAI_BASE_URL={server.base_url}\n")
        environ = {**os.environ, "PYTHONIOENCODING": "utf-8", "OPENAI_BASE_URL": server.base_url}
        for name in [n for n in environ if n.startswith("SELFMOA_") or n == "OPENAI_API_KEY"]:
            del environ[name]  # no key or default model of the user's reaches the mock
        rows = []
        for domain in ("MATH", "CRUX", "MMLU"):
            task = make_tasks(domain, 1, seed=3)[0]
            best = BEST[domain]
            say(f"--- {domain} task {task.id} (ground truth: {task.answer}) ---")
            say("$ PROMPT=" + shlex.quote(task.prompt))
            runs = [
                ("MoA", ["--method", "moa", "-p", "generalist", "-p", "coder", "-p", "mathematician",
                         "-a", "generalist"]),
                ("Self-MoA", ["--method", "self-moa", "-m", best, "-n", "6"]),
                ("Self-MoA-Seq", ["--method", "self-moa-seq", "-m", best, "-n", "12", "--window", "6",
                                  "--carry", "3"]),
            ]
            for label, flags in runs:
                argv = [*flags, "--seed", "0"]
                say("$ python3 selfmoa.py " + " ".join(shlex.quote(a) for a in argv) + ' "$PROMPT"')
                before = len(server.requests)
                done = subprocess.run(selfmoa_command() + argv + [task.prompt], capture_output=True, text=True,
                                      timeout=60, env=environ, stdin=subprocess.DEVNULL)
                if done.returncode != 0:
                    say(f"  failed with exit status {done.returncode}: {done.stderr.strip()}")
                    return 1
                answer = done.stdout.strip()
                for line in answer.splitlines() or ["(empty)"]:
                    say(f"  {line}")
                made = server.requests[before:]  # what the server saw: requests, and generations (n each)
                calls = sum((entry["body"] or {}).get("n", 1) for entry in made if entry["status"] == 200)
                rows.append((domain, label, extract_answer(answer), task.answer, is_correct(answer, task),
                             calls, len(made)))
            say()
    say("| domain | method | answer | truth | correct | calls | requests |")
    say("|---|---|---|---|---|---|---|")
    for domain, label, given, truth, correct, calls, requests in rows:
        say(f"| {domain} | {label} | {given} | {truth} | {'yes' if correct else 'no'} | {calls} | {requests} |")
    say(f"\nDone in {time.monotonic() - started:.1f} s. The demo's server has stopped. To rerun a command above, "
        f"start a mock server of your own in another terminal,\n\n    python3 -m mock_models\n\n"
        f"(it serves at http://127.0.0.1:{RERUN_PORT}/v1 until Ctrl-C), then, here:\n\n"
        f"    export OPENAI_BASE_URL=http://127.0.0.1:{RERUN_PORT}/v1\n\n"
        f"and set PROMPT as shown. --json prints the whole result (trace, usage); python3 selfmoa.py --help "
        f"has the rest.")
    return 0
