"""Servers the benchmarks measure against, each in a process of its own (so it never competes with the
client being measured for the GIL)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def server_process(*argv: str) -> Iterator[str]:
    """``python3 ARGV...`` as a server; yields the base URL it prints as its first line. The environment's
    OPENAI_* and SELFMOA_* variables are left out, so that no key of the user's reaches a benchmark."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "SELFMOA_"))}
    child = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout is not None
        base_url = child.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"{' '.join(argv[:3])} did not start (first line: {base_url!r})")
        yield base_url
    finally:
        child.terminate()
        child.wait(timeout=30)
        child.stdout.close()


def mock_server(*flags: str) -> contextlib.AbstractContextManager[str]:
    """``python3 -m mock_models --port 0 FLAGS...``; yields its base URL."""
    return server_process("-m", "mock_models", "--port", "0", *flags)
