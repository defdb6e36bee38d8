"""Every program of the repository answers --help with its help and runs nothing.

The programs are found, not listed: every module with a ``__main__`` guard (``python3 -m NAME``), every package's
``__main__.py``, every script outside a package (``python3 PATH``), and every subcommand each of them dispatches
on (a word compared with its first argument in the source, or a "PROG WORD" its help names). tests/ holds helpers
of the tests, not programs, and is left out.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"tests", ".venv", ".ci-venv", "build", "dist", ".git"}
HELP_SECONDS = 15  # printing help takes well under a second; a program that starts running takes longer


def has_main_guard(path: pathlib.Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and "__main__" in ast.unparse(node.test):
            return True
    return False


def in_package(path: pathlib.Path) -> bool:
    return (path.parent / "__init__.py").exists() and path.parent != ROOT


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__main__" else parts)


def entry_points() -> dict[str, list[str]]:
    """How to run each program, by a name a user types: ``{"python3 -m bench": [sys.executable, "-m", "bench"]}``."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if set(relative.parts[:-1]) & SKIPPED_DIRS or relative.parts[0].startswith("."):
            continue
        if not (path.name == "__main__.py" or has_main_guard(path)):
            continue
        if path.parent == ROOT or in_package(path):
            name = module_name(path)
            found[f"python3 -m {name}"] = [sys.executable, "-m", name]
        else:
            found[f"python3 {relative.as_posix()}"] = [sys.executable, str(path)]
    return found


COMPARED = re.compile(r"""argv\[(?::1|0)\]\s*(?:==|in)\s*([^:\n]*)""")
WORD = re.compile(r"""["']([a-z][a-z0-9_-]*)["']""")


def source_of(command: list[str]) -> str:
    if command[1] == "-m":
        name = command[2]
        candidates = [ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__main__.py"]
        return "\n".join(p.read_text(encoding="utf-8") for p in candidates if p.exists())
    return pathlib.Path(command[1]).read_text(encoding="utf-8") if command[1] != "-c" else command[2]


def usage_prog(help_text: str) -> str | None:
    """The program's name as its usage line spells it: "selfmoa", "selfmoa serve", "python3 -m bench"."""
    found = re.match(r"usage: ((?:python3 -m \S+|python3 \S+|\S+)(?: [a-z][\w-]*)*?)(?= \[| -| [A-Z]|\n|$)", help_text)
    return found.group(1) if found else None


def subcommands(prog: str, command: list[str], help_text: str) -> set[str]:
    """The words a program takes as a subcommand: compared with its first argument in its source, or shown by its
    help as "PROG WORD" in quotes, before --help, or as a usage line of its own (PROG being the program's own name
    in its usage line)."""
    words = {word for match in COMPARED.finditer(source_of(command)) for word in WORD.findall(match.group(1))}
    usage = usage_prog(help_text)
    if usage:
        named = re.escape(usage) + r" ([a-z][a-z0-9_-]+)"
        words |= set(re.findall(named + r'(?= --help|")', help_text))  # "selfmoa serve" ... selfmoa serve --help
        words |= set(re.findall(r"(?m)^(?:usage:| +)\s*" + named + r"\b", help_text))  # a usage line of its own
    return words - {"help", "h"}


class Listener:
    """A loopback port that counts the connections made to it: any model call a --help makes lands here."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.connections = 0
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() now, not at its 0.2 s timeout
        self.thread.join(timeout=5)
        self.sock.close()


def run_help(argv: list[str], environ: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, env=environ,
                          stdin=subprocess.DEVNULL)
    return done, time.monotonic() - started


def assert_help_only(label: str, done: subprocess.CompletedProcess, seconds: float) -> None:
    assert done.returncode == 0, f"{label}: exit status {done.returncode}\n{done.stderr[-2000:]}"
    assert done.stdout.startswith("usage: "), f"{label} printed:\n{done.stdout[:500]}"
    assert "-h, --help" in done.stdout, label
    assert done.stderr == "", f"{label} wrote to stderr:\n{done.stderr[:500]}"
    assert "|---" not in done.stdout, f"{label} printed a benchmark's table: it ran"
    assert seconds < HELP_SECONDS, f"{label} took {seconds:.1f} s: it ran something"


def test_the_walk_finds_the_programs_and_subcommands_the_readme_names():
    """The discovery below is checked against what is known to exist, so that it cannot pass by finding nothing."""
    found = entry_points()
    for name in ("python3 -m selfmoa", "python3 -m mock_models", "python3 -m bench", "python3 -m bench.serve",
                 "python3 -m bench.reproduce", "python3 -m bench.replicas", "python3 spec/vectors/make_vectors.py"):
        assert name in found, sorted(found)
    assert not any("tests" in name for name in found)
    selfmoa_help = subprocess.run(found["python3 -m selfmoa"] + ["--help"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=60).stdout
    assert "serve" in subcommands("selfmoa", found["python3 -m selfmoa"], selfmoa_help)
    mock_help = subprocess.run(found["python3 -m mock_models"] + ["--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60).stdout
    assert {"serve", "demo"} <= subcommands("mock_models", found["python3 -m mock_models"], mock_help)


def test_help_of_every_program_and_subcommand_prints_help_and_runs_nothing():
    """`--help` of every entry point and of every subcommand exits 0 at once with its usage on stdout, starts no
    benchmark, demo or server, and calls no model (a listener given as $OPENAI_BASE_URL counts connections)."""
    listener = Listener()
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
    environ.update(OPENAI_BASE_URL=listener.url, COLUMNS="100", PYTHONIOENCODING="utf-8")
    try:
        programs = entry_points()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            helps = dict(zip(programs, pool.map(lambda argv: run_help(argv + ["--help"], environ),
                                                programs.values())))
            checked = []
            for label, (done, seconds) in helps.items():
                assert_help_only(f"{label} --help", done, seconds)
                for word in sorted(subcommands(label, programs[label], done.stdout)):
                    checked.append((f"{label} {word} --help", word,
                                    pool.submit(run_help, programs[label] + [word, "--help"], environ)))
            for label, word, future in checked:
                done, seconds = future.result()
                assert_help_only(label, done, seconds)
                assert re.search(rf"\b{re.escape(word)}\b", done.stdout.splitlines()[0]), done.stdout[:300]
        assert len(checked) >= 3, [label for label, _, _ in checked]
    finally:
        listener.close()
    assert listener.connections == 0, "a --help called a model server"


@pytest.mark.parametrize("source, words", [
    ('if argv[:1] == ["serve"]:\n', {"serve"}),
    ('if argv[:1] in (["eval"], ["merge"]):\n', {"eval", "merge"}),
    ("if argv[0] == 'demo':\n", {"demo"}),
    ('if argv and argv[0] in ("run", "list"):\n', {"run", "list"}),
    ('args = parser.parse_args(argv)\n', set()),
])
def test_subcommands_are_found_in_the_source(tmp_path, source, words):
    script = tmp_path / "prog.py"
    script.write_text(source, encoding="utf-8")
    assert subcommands("prog", [sys.executable, str(script)], "usage: prog [-h]\n") == words


def test_subcommands_are_found_in_the_help():
    help_text = ('usage: selfmoa [-h] PROMPT\n       selfmoa merge [-h] FILE\n\n"selfmoa serve" serves; selfmoa eval '
                 '--help evaluates; selfmoa -m x; not a selfmoa output file\n')
    assert usage_prog(help_text) == "selfmoa"
    assert usage_prog("usage: selfmoa serve [-h] [--host HOST]\n") == "selfmoa serve"
    assert usage_prog("usage: python3 -m bench [-h] [NAME ...]\n") == "python3 -m bench"
    assert subcommands("selfmoa", [sys.executable, "-c", ""], help_text) == {"serve", "eval", "merge"}
