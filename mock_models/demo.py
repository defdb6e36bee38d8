"""`python3 -m mock_models demo`: selfmoa's three methods against the mock server, as a user runs them.

It starts the mock server on a free port, runs the selfmoa command line (MoA, Self-MoA, Self-MoA-Seq) on
one task of each domain, printing every command it runs, and compares the answers with the ground truth.
Nothing needs installing: selfmoa.py is run from the folder above this package. This module does not
import selfmoa; it drives it through its command line, exactly as a reader would.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

from mock_models import MockServer
from mock_models.tasks import extract_answer, is_correct, make_tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEST = {"MATH": "mathematician", "CRUX": "coder", "MMLU": "generalist"}


def selfmoa_command() -> list[str]:
    """How to run selfmoa here: the file next to this package, else the installed console script."""
    if (ROOT / "selfmoa.py").exists():
        return [sys.executable, str(ROOT / "selfmoa.py")]
    return ["selfmoa"]


def demo(out=sys.stdout) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    started = time.monotonic()
    with MockServer() as server:
        say(f"Mock models serving at {server.base_url} (generalist, coder, mathematician, generalist-2, echo).")
        say("Each command below is run exactly as shown, with PROMPT set to the task's text.\n")
        rows = []
        for domain in ("MATH", "CRUX", "MMLU"):
            task = make_tasks(domain, 1, seed=3)[0]
            best = BEST[domain]
            say(f"--- {domain} task {task.id} (ground truth: {task.answer}) ---")
            say("PROMPT=" + shlex.quote(task.prompt))
            runs = [
                ("MoA", ["--method", "moa", "-p", "generalist", "-p", "coder", "-p", "mathematician",
                         "-a", "generalist"]),
                ("Self-MoA", ["--method", "self-moa", "-m", best, "-n", "6"]),
                ("Self-MoA-Seq", ["--method", "self-moa-seq", "-m", best, "-n", "12", "--window", "6",
                                  "--carry", "3"]),
            ]
            for label, flags in runs:
                argv = ["--base-url", server.base_url, *flags, "--seed", "0", "--json"]
                shown = "python3 selfmoa.py " + " ".join(shlex.quote(a) for a in argv) + ' "$PROMPT"'
                say(f"$ {shown}")
                done = subprocess.run(selfmoa_command() + argv + [task.prompt], capture_output=True, text=True,
                                      timeout=60, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
                if done.returncode != 0:
                    say(f"  failed with exit status {done.returncode}: {done.stderr.strip()}")
                    return 1
                result = json.loads(done.stdout)
                answer = result["answer"]
                say(f"  -> {answer.strip().splitlines()[-1] if answer.strip() else '(empty)'}")
                rows.append((domain, label, extract_answer(answer), task.answer, is_correct(answer, task),
                             result["calls"], result["requests"]))
            say()
    say("| domain | method | answer | truth | correct | calls | requests |")
    say("|---|---|---|---|---|---|---|")
    for domain, label, answer, truth, correct, calls, requests in rows:
        say(f"| {domain} | {label} | {answer} | {truth} | {'yes' if correct else 'no'} | {calls} | {requests} |")
    say(f"\nDone in {time.monotonic() - started:.1f} s. Without --json, selfmoa prints only the answer; "
        f"see python3 selfmoa.py --help.")
    return 0
