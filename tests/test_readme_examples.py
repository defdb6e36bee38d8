"""The README's examples after "Try every example offline" run, pasted as they are, against the mock models.

The test does what that section tells a reader to do, on free ports instead of the fixed ones: a mock server
where the README has vLLM's port 8000 (also exported as $OPENAI_BASE_URL), two llama.cpp-like ones (one request
at a time, n ignored) for 8080 and 8081, and `selfmoa serve` for 8100 when a block starts it. Then every shell
line (`selfmoa`, `curl`, `printf`) of every ```sh block, and every ```python block that uses selfmoa (or the
OpenAI SDK, where installed), runs in one scratch folder, in order, and must exit 0; a Python block may build a
client for another host but never reach one. Left out: a shell line that names a host other than this machine
(gpu0, api.openai.com), that runs another program (vllm, lm_eval), or whose comment says what it needs beyond
the mock ("needs: ...").
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from mock_models import MODELS, MockServer

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STEP = "## Try every example offline"
RUNS = ("selfmoa", "curl", "printf")  # the shell lines that run against the mock (or prepare its input)
LOOPBACK = {"localhost", "127.0.0.1", "[::1]"}
HOST = re.compile(r"https?://(\[[^\]]*\]|[^/:\s'\"]+)")


# Run before a Python block: it may build clients for other hosts (gpu0, api.openai.com), never reach them.
LOOPBACK_ONLY = """\
import socket as _socket
_lookup, _connect = _socket.getaddrinfo, _socket.socket.connect
def _check(host):
    if host not in ("localhost", "127.0.0.1", "::1"):
        raise OSError(f"the README example tried to reach {host}: examples run against the mock alone")
def _only_here(host, *args, **kwargs):
    _check(host)
    return _lookup(host, *args, **kwargs)
def _connect_here(sock, address):
    _check(address[0] if isinstance(address, tuple) else "localhost")
    return _connect(sock, address)
_socket.getaddrinfo, _socket.socket.connect = _only_here, _connect_here
"""


def after_step(text: str) -> str:
    assert STEP in text, f"README.md lost its {STEP!r} section"
    return text[text.index(STEP):]


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of ``text``: (language, body)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)]


def shell_lines(body: str) -> list[tuple[str, str]]:
    """A sh block's commands, continuation lines (and lines inside a quoted string) joined, each with the comment
    lines just above it."""
    found, comment, pending = [], "", ""
    for line in body.splitlines():
        if pending:
            pending += "\n" + line
        elif line.startswith("#"):
            comment += line + "\n"
            continue
        elif not line.strip():
            comment = ""
            continue
        else:
            pending = line
        if pending.endswith("\\") or pending.count("'") % 2:  # a continued line, or a quote left open
            continue
        found.append((pending, comment))
        pending, comment = "", ""
    return found


def offline(code: str, comment: str = "") -> bool:
    """Whether a command or block can run against the mock alone: no other host, no "needs:" comment."""
    hosts = {host for host in HOST.findall(code)}
    return hosts <= LOOPBACK and "needs:" not in comment and "needs:" not in code


def test_the_step_says_what_the_test_does():
    """The section starts the mock as the test does (port 8000), exports its URL and names every mock model."""
    step = after_step(README.read_text(encoding="utf-8")).split("\n## ")[0]
    assert "    $ python3 -m mock_models\n    http://127.0.0.1:8000/v1\n" in step
    assert "    $ export OPENAI_BASE_URL=http://127.0.0.1:8000/v1\n" in step
    assert all(f"`{name}`" in step for name in MODELS)
    assert "python3 -m mock_models --port 8080 --ignore-n --max-concurrency 1" in step


@pytest.mark.skipif(shutil.which("bash") is None, reason="the README's shell lines need bash")
def test_every_example_after_the_step_runs_against_the_mock(tmp_path):
    text = after_step(README.read_text(encoding="utf-8"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "selfmoa").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                                     f"{shlex.quote(str(ROOT / 'selfmoa.py'))} \"$@\"\n")
    (bin_dir / "selfmoa").chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    work = tmp_path / "work"
    work.mkdir()
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
    environ.update(PATH=f"{bin_dir}{os.pathsep}{environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
                   PYTHONIOENCODING="utf-8")
    ran, left_out, serve = [], [], None
    with MockServer() as vllm, MockServer(honour_n=False, max_concurrency=1) as llama1, \
            MockServer(honour_n=False, max_concurrency=1) as llama2:
        ports = {"8000": vllm, "8080": llama1, "8081": llama2}
        environ["OPENAI_BASE_URL"] = vllm.base_url

        def here(code: str) -> str:
            for port, server in ports.items():
                code = re.sub(rf"(localhost|127\.0\.0\.1):{port}\b", f"{server.host}:{server.port}", code)
            return code.replace(":8100/", f":{serve_port}/") if serve is not None else code

        serve_port = None
        try:
            for language, body in blocks(text):
                if language == "sh":
                    for command, comment in shell_lines(body):
                        words = command.split()
                        if words[0] not in RUNS or not offline(command, comment):
                            left_out.append(command)
                            continue
                        if words[:2] == ["selfmoa", "serve"]:
                            assert serve is None, "one serve at a time"
                            # On a free port: "--port 0" goes first, as the command may end in a comment.
                            free = here(command).replace("selfmoa serve", "selfmoa serve --port 0", 1)
                            assert "--port" not in command, "a later --port would override the free one"
                            serve = subprocess.Popen(["bash", "-c", free], cwd=work,
                                                     env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                     text=True, stdin=subprocess.DEVNULL)
                            url = serve.stdout.readline().strip()
                            assert url.startswith("http://127.0.0.1:"), (url, serve.stderr.read())
                            serve_port = url.split(":")[2].split("/")[0]
                            ran.append(command)
                            continue
                        done = subprocess.run(["bash", "-c", here(command)], cwd=work, env=environ,
                                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
                        assert done.returncode == 0, (f"README example fails against the mock models:\n{command}\n"
                                                      f"{done.stderr[-3000:]}")
                        assert "does not exist" not in done.stderr, (command, done.stderr)
                        ran.append(command)
                elif language == "python" and ("import selfmoa" in body or "from openai" in body):
                    if "from openai" in body and not _has("openai"):
                        left_out.append(body.splitlines()[0])
                        continue
                    done = subprocess.run([sys.executable, "-c", LOOPBACK_ONLY + here(body)], cwd=work, env=environ,
                                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
                    assert done.returncode == 0, f"README example fails against the mock models:\n{body}\n" \
                                                 f"{done.stderr[-3000:]}"
                    ran.append(body.splitlines()[0])
        finally:
            if serve is not None:
                serve.terminate()
                serve.wait(timeout=30)
                serve.stdout.close()
                serve.stderr.close()
    # The sections the step promises: the library, batch runs, serve (with curl where installed), replicas.
    assert sum(command.startswith("selfmoa") for command in ran) >= 4, ran
    assert sum(command.startswith("import") for command in ran) >= 2, ran  # the library, the replicas
    assert any(command.startswith("selfmoa serve") for command in ran), ran
    assert any("-o outputs.json --format alpaca_eval" in command for command in ran), ran
    assert (work / "answers.jsonl").read_text(encoding="utf-8").count('"status": "ok"') == 2
    assert all(not command.startswith("selfmoa") or not offline(command) or "needs:" in command
               for command in left_out), left_out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
