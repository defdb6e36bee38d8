"""The README says what is true: its usage block is `selfmoa --help`, its first screen shows the two commands that
`.ci/run` runs verbatim, every shell command is spelled for a stock Debian/Ubuntu (`python3`), and it and `spec/`
cite no file outside the repository.

To refresh the README after changing a flag: python3 tests/test_readme.py --update
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
BLOCK = re.compile(r"(<!-- help:start -->\n```\n)(.*?)(```\n<!-- help:end -->)", re.DOTALL)
FIRST_SCREEN = 30  # lines; .ci/run reads its two commands from the same lines
DEMO = "python3 -m mock_models demo"
TESTS = "python3 -m venv .venv && .venv/bin/python -m pip install -e '.[test]' && .venv/bin/python -m pytest -q"


def current_help() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    sys.path.insert(0, str(README.parent))
    import selfmoa

    return selfmoa.build_parser().format_help()


# README shows the help as Python 3.10-3.12 print it; 3.13's argparse prints an option's metavar once
# ("-m, --model MODEL", not "-m MODEL, --model MODEL") and so wraps some lines differently.
HELP_FORMAT_CHANGED = (3, 13)


def metavar_once(text: str) -> str:
    """Help text as Python 3.13+ words it, whitespace aside: "-m MODEL, --model MODEL" becomes
    "-m, --model MODEL"."""
    return " ".join(re.sub(r"(-\w) (\S+), (--[\w-]+) \2\b", r"\1, \3 \2", text).split())


def test_readme_usage_matches_help(monkeypatch):
    """README's usage block is `selfmoa --help`: character for character on Python 3.10-3.12, and word for word
    on 3.13+, whose argparse words the options' metavars differently."""
    monkeypatch.setenv("COLUMNS", "100")
    found = BLOCK.search(README.read_text(encoding="utf-8"))
    assert found, "README.md lost its <!-- help:start --> ... <!-- help:end --> block"
    stale = "README.md's usage is stale: run python3 tests/test_readme.py --update (with Python 3.10-3.12)"
    if sys.version_info < HELP_FORMAT_CHANGED:
        assert found.group(2) == current_help(), stale
    else:
        assert metavar_once(found.group(2)) == metavar_once(current_help()), stale


@pytest.mark.parametrize("readme, help_313, same", [
    ("  -i FILE, --input FILE\n                        run FILE\n", "  -i, --input FILE      run FILE\n", True),
    ("  -i FILE, --input FILE\n                        run FILE\n", "  -i, --input FILE      run FILES\n", False),
    ("  -i FILE, --input FILE\n                        run FILE\n", "  -i, --output FILE     run FILE\n", False),
    ("  -i FILE, --input FILE  run FILE\n", "  -i, --input FILE  run FILE\n  --json  as JSON\n", False),
])
def test_usage_check_on_313_still_sees_every_changed_word(readme, help_313, same):
    """The looser comparison used on Python 3.13+ forgives only the metavar and the wrapping: a changed word, flag
    or option still makes the README stale."""
    assert (metavar_once(readme) == metavar_once(help_313)) is same


# --- the first screen's two commands, and .ci/run ------------------------------------------------------------

def first_screen_commands(text: str) -> list[str]:
    return [line[len("    $ "):] for line in text.splitlines()[:FIRST_SCREEN] if line.startswith("    $ ")]


def test_readme_first_screen_shows_exactly_the_demo_and_a_test_command_with_its_own_venv():
    """The first screen shows two commands, and they are ones a stock Debian/Ubuntu runs: `python3` (there is
    no `python`), and pip only inside a virtual environment the command line makes (PEP 668 refuses the rest)."""
    assert first_screen_commands(README.read_text(encoding="utf-8")) == [DEMO, TESTS]


def ci_readme_commands(folder: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(folder / ".ci" / "run"), "--print-readme-commands"], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@needs_bash
def test_ci_runs_the_two_commands_the_readme_shows():
    """.ci/run takes its commands from the README's first screen, so the two cannot drift apart."""
    done = ci_readme_commands(ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == first_screen_commands(README.read_text(encoding="utf-8")) == [DEMO, TESTS]


def fake_checkout(tmp_path: pathlib.Path, readme: str) -> pathlib.Path:
    (tmp_path / ".ci").mkdir()
    shutil.copy(CI, tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    return tmp_path


@needs_bash
@settings(max_examples=20)
@given(demo_flags=st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x00"), max_size=30),
       test_line=st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x00"), max_size=60),
       lines_before=st.integers(0, FIRST_SCREEN - 7))
def test_ci_reads_the_readme_commands_byte_for_byte(tmp_path_factory, demo_flags, test_line, lines_before):
    """Whatever characters the two commands hold (quotes, $, &&, backslashes, non-ASCII), .ci/run reads back
    exactly the text the README shows, so what it runs is the README's command verbatim."""
    demo = f"python3 -m mock_models demo{demo_flags}"
    tests = f"x -m pytest {test_line}"
    readme = "# t\n" + "text\n" * lines_before + f"\n    $ {demo}\n\nprose\n\n    $ {tests}\n"
    done = ci_readme_commands(fake_checkout(tmp_path_factory.mktemp("checkout"), readme))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [demo, tests]


@needs_bash
@pytest.mark.parametrize("readme, complaint", [
    ("# t\n\nNo commands at all.\n", "found 0"),
    (f"# t\n\n    $ {DEMO}\n", "found 1"),
    (f"# t\n\n    $ {DEMO}\n\n    $ {TESTS}\n\n    $ python3 -m bench\n", "found 3"),
    ("# t\n" + "filler\n" * FIRST_SCREEN + f"\n    $ {DEMO}\n\n    $ {TESTS}\n", "found 0"),
    (f"# t\n\n    $ {TESTS}\n\n    $ {DEMO}\n", "first command is not the demo"),
    (f"# t\n\n    $ {DEMO}\n\n    $ python3 -m venv .venv\n", "does not run pytest"),
])
def test_ci_refuses_a_readme_whose_first_screen_lacks_the_two_commands(tmp_path, readme, complaint):
    """A README that moves, drops, reorders or adds first-screen commands stops CI with a message saying so,
    instead of CI running something else."""
    done = ci_readme_commands(fake_checkout(tmp_path, readme))
    assert done.returncode != 0 and done.stdout == ""
    assert complaint in done.stderr


@needs_bash
@pytest.mark.parametrize("exit_code, complaint", [
    (5, "README test command: pytest collected no tests (exit code 5)"),
    (1, "README test command: failed with exit code 1"),
])
def test_ci_fails_when_the_readme_test_command_collects_no_tests_or_fails(tmp_path, exit_code, complaint):
    """pytest's exit code 5 (no tests collected) fails CI like any failure, with a line naming it."""
    readme = f"# t\n\n    $ echo -m mock_models demo\n\n    $ sh -c 'exit {exit_code}' -m pytest -q\n"
    done = subprocess.run(["bash", str(fake_checkout(tmp_path, readme) / ".ci" / "run")], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert done.returncode != 0
    assert complaint in done.stderr


def test_ci_runs_the_readme_test_command_before_making_any_venv_of_its_own():
    """.ci/run activates no virtual environment and makes its own ones only after the README's test command
    ran, so that command meets the machine's own python3 as a user's shell does."""
    lines = CI.read_text(encoding="utf-8").splitlines()
    code = [line.split("#", 1)[0] for line in lines]
    assert not any(re.search(r"\bactivate\b", line) for line in code)
    runs_readme = next(i for i, line in enumerate(code) if 'run_tests "README test command" "$tests"' in line)
    makes_venv = [i for i, line in enumerate(code) if re.search(r"-m venv|virtualenv|\bpython\b", line)]
    assert makes_venv and min(makes_venv) > runs_readme, [lines[i] for i in makes_venv if i < runs_readme]


# --- python3 throughout ---------------------------------------------------------------------------------------

BARE_PYTHON = re.compile(r"(?<![\w./-])python(?![\w.-])")


def shell_commands(text: str) -> list[str]:
    """Shell commands a reader copies: `    $ ` lines, lines of ```sh blocks, and inline code naming python."""
    found, fence = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence in ("sh", "bash", "console", "shell", ""):
            found.append(line)
        elif fence is None and re.match(r"\s*\$ ", line):
            found.append(line)
    found += re.findall(r"(?<!`)`([^`\n]*\bpython[^`\n]*)`(?!`)", text)
    return found


def bare_python(text: str) -> list[str]:
    return [command for command in shell_commands(text) if BARE_PYTHON.search(command.split("#", 1)[0])]


@given(st.sampled_from(["python", "python3", ".venv/bin/python", "python3.10", "/usr/bin/python"]),
       st.sampled_from(["-m pytest -q", "-c 'import selfmoa'", "selfmoa.py --help", "-m bench"]),
       st.sampled_from(["indented", "sh", "inline"]))
def test_bare_python_is_found_in_every_place_a_command_can_stand(interpreter, rest, where):
    """The checker below flags `python` as a command wherever README shows a command, and only that word."""
    command = f"{interpreter} {rest}"
    text = {"indented": f"Intro.\n\n    $ {command}\n",
            "sh": f"Intro.\n\n```sh\n{command}\n```\n",
            "inline": f"Run `{command}` to see.\n"}[where]
    assert bool(bare_python(text)) == (interpreter == "python")


def test_readme_spells_every_shell_command_python3():
    """A stock Debian/Ubuntu has no `python` command: every command README shows says `python3` (or a venv's
    own `.venv/bin/python`); Python code blocks are not commands."""
    assert bare_python(README.read_text(encoding="utf-8")) == []


# --- self-contained -------------------------------------------------------------------------------------------

DOCS = [README, *sorted((ROOT / "spec").glob("*.md"))]
NOTE_NAME = re.compile(r"\b[A-Z]{2,}(?:-[A-Z]{2,})+\b")  # a notes file's name, e.g. "SOME-NOTES"
MD_NAME = re.compile(r"[\w./-]*\w\.md\b")


WRITTEN = {"report.md", "tables.md"}  # files the programs write (selfmoa eval, bench.reproduce): named, not cited


def outside_references(page: pathlib.Path, text: str) -> list[str]:
    missing = NOTE_NAME.findall(text)
    for name in MD_NAME.findall(text):
        if name not in WRITTEN and not any((base / name).exists() for base in (page.parent, ROOT)):
            missing.append(name)
    return missing


@pytest.mark.parametrize("text, bad", [
    ("as the NOTES-FILE section 2 says", ["NOTES-FILE"]),
    ("see [the notes](../shared/NOTES.md)", ["../shared/NOTES.md"]),
    ("see methods.md and OTHER.md", ["OTHER.md"]),
    ("see methods.md, spec/wire.md and README.md; MoA, Self-MoA, UTF-8", []),
])
def test_outside_references_are_found(text, bad):
    """The checker below flags capitalised note names and .md files that exist neither beside the page nor at the
    repository's root."""
    assert outside_references(ROOT / "spec" / "methods.md", text) == bad


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_readme_and_spec_cite_no_file_outside_the_repository(page):
    """README and spec/ are self-contained: a reader with only the repository can follow every reference."""
    assert outside_references(page, page.read_text(encoding="utf-8")) == []


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    if sys.version_info >= HELP_FORMAT_CHANGED:
        sys.exit("README shows the help as Python 3.10-3.12 print it: run this with one of those")
    text = README.read_text(encoding="utf-8")
    README.write_text(BLOCK.sub(lambda m: m.group(1) + current_help() + m.group(3), text), encoding="utf-8")
    print("README.md updated")
