"""The harness side of spec/protocol.md: an implementation in any language, driven over JSON lines.

``SELFMOA_IMPL='cmd:COMMAND'`` makes the vector replay and the property tests run against the program
COMMAND starts (one process for the whole test session, one run after another over it). ``load(name)``
returns an object that looks to the tests like a module with selfmoa's functions: ``moa``, ``self_moa`` and
``self_moa_seq`` send a run, answer each completion request the program sends by calling the test's own
completion function (the fake model), pass the pieces it streams to the caller's ``stream``, hand out the
caller's samples one by one when they come from an iterator, and return a result (or raise an error) built
from the program's last line. Requests are collected while they keep coming and answered newest first, so an
implementation that sends several at once sees its answers out of order.

Nothing here imports the implementation under test; ``selfmoa`` is imported only for its ``Request``, ``Reply``
and ``ModelError`` classes, which the fakes and ``HTTPClient`` speak.
"""

from __future__ import annotations

import atexit
import collections.abc
import dataclasses
import itertools
import json
import os
import pathlib
import queue
import shlex
import subprocess
import threading
from typing import Any

import selfmoa

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOCOL = 1
SETTLE = float(os.environ.get("SELFMOA_PROTOCOL_SETTLE", "0.001"))  # seconds without a new request: answer
LIMIT = float(os.environ.get("SELFMOA_PROTOCOL_TIMEOUT", "60"))  # seconds without any line: the run hangs
FIELDS = ("role", "layer", "round", "model", "indices", "references", "carried", "n", "seed", "temperature",
          "max_tokens", "outputs", "error")  # spec/protocol.md, "Traces": what every trace entry holds


REQUEST_FIELDS = {field.name for field in dataclasses.fields(selfmoa.Request)}


class ProtocolError(AssertionError):
    """The implementation broke spec/protocol.md (or refused a param): the test fails, saying how."""


# --- What the tests see: selfmoa's error kinds and results, rebuilt from the program's lines ------------


class SelfMoAError(Exception):
    partial: Any = None


class ConfigError(SelfMoAError, ValueError):
    """kind "ConfigError": a bad argument, refused before any request."""


class ModelError(SelfMoAError):
    """kind "ModelError", and what a fake raises for a call that fails for good (sent as an ``error`` reply)."""

    def __init__(self, message: str, *, model: str = "", status: int | None = None, url: str = "",
                 text: str | None = None):
        self.message, self.model, self.status, self.url = message, model, status, url
        self.text = text if text is not None else selfmoa.ModelError(message, model=model, status=status).__str__()
        super().__init__(self.text)

    def __str__(self) -> str:
        return self.text


class NotEnoughProposals(SelfMoAError):
    """kind "NotEnoughProposals", with ``failures`` (one ModelError per failed position reached)."""

    def __init__(self, message: str, failures: list[ModelError]):
        self.failures = failures
        super().__init__(message)


@dataclasses.dataclass
class Call:
    """One trace entry (spec/protocol.md, "Traces"); the fields beyond FIELDS are the implementation's own."""

    role: str
    layer: int
    round: int | None
    model: str
    indices: list[int]
    references: list[int]
    carried: int
    n: int
    seed: int | None
    temperature: float
    max_tokens: int | None
    outputs: list[str | None]
    error: str | None
    latency: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)


class Result:
    """A run's outcome: ``answer``, ``calls``, ``requests``, ``params`` (``rounds`` for Self-MoA-Seq) and
    ``trace`` (present only when the implementation keeps one)."""

    def __init__(self, data: dict, *, answer: str | None = None):
        self.answer = data["answer"] if answer is None else answer
        self.calls, self.requests = data["calls"], data["requests"]
        self.params = {"rounds": data["rounds"]} if data.get("rounds") is not None else {}
        if data.get("trace") is not None:
            self.trace = [call_of(entry) for entry in data["trace"]]


def call_of(entry: dict) -> Call:
    missing = [name for name in FIELDS if name not in entry]
    if missing:
        raise ProtocolError(f"a trace entry lacks {missing} (spec/protocol.md, Traces): {entry}")
    extra = {k: v for k, v in entry.items() if k not in FIELDS and k != "latency"}
    return Call(**{name: entry[name] for name in FIELDS}, latency=entry.get("latency", 0.0), extra=extra)


# --- The program, and the runs over it -----------------------------------------------------------------


class Program:
    """One implementation process, started once and reused by every run of the session."""

    def __init__(self, command: str, *, settle: float = SETTLE, limit: float = LIMIT):
        self.command, self.settle, self.limit = command, settle, limit
        self.process = subprocess.Popen(shlex.split(command), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        encoding="utf-8", errors="strict", bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.write_lock = threading.Lock()
        self.runs = itertools.count(1)
        self.ids: set[int] = set()  # every request id the program has used
        threading.Thread(target=self._read, daemon=True).start()
        hello = self.next(limit)
        if not isinstance(hello, dict) or hello.get("type") != "ready" or hello.get("protocol") != PROTOCOL:
            raise ProtocolError(f"{command!r} must first say {{\"type\": \"ready\", \"protocol\": {PROTOCOL}}}, "
                                f"not {hello!r}")
        self.name = str(hello.get("implementation", command))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put(ProtocolError(f"not a JSON line: {line[:300]!r}"))
        self.lines.put(None)

    def send(self, message: dict) -> None:
        line = json.dumps(message, ensure_ascii=True) + "\n"  # lone surrogates travel as \udXXX escapes
        with self.write_lock:
            assert self.process.stdin is not None
            try:
                self.process.stdin.write(line)
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise ProtocolError(f"{self.command!r} stopped reading: {exc}") from None

    def next(self, timeout: float) -> Any:
        try:
            message = self.lines.get(timeout=timeout)
        except queue.Empty:
            return queue.Empty
        if message is None:
            self.lines.put(None)
            raise ProtocolError(f"{self.command!r} exited (code {self.process.poll()}) in the middle of a run")
        if isinstance(message, ProtocolError):
            raise message
        return message

    def kill(self) -> None:
        """End the program at once: a run broke off in the middle, so its lines must not reach the next."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"type": "quit"})
                self.process.wait(timeout=5)
            except (ProtocolError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


class _Run:
    """One method call over the protocol, from the run line to the result or error line."""

    def __init__(self, program: Program, complete: Any, stream: Any, samples: Any):
        self.program, self.complete, self.stream = program, complete, stream
        self.number = next(program.runs)
        self.bugs: list[BaseException] = []  # exceptions of the fake or of the samples, sent as bugs
        self.samples = samples
        self.sample_requests: queue.Queue = queue.Queue()
        self.sample_thread: threading.Thread | None = None
        self.finished = False  # the program ended the run with its result or error line

    def go(self, method: str, prompt: Any, params: dict) -> Result:
        message = {"type": "run", "run": self.number, "method": method, "prompt": prompt, "params": params,
                   "stream": self.stream is not None, "lazy_samples": self.samples is not None}
        self.program.send(message)
        pending: list[dict] = []
        try:
            while True:
                line = self.program.next(self.program.settle if pending else self.program.limit)
                if line is queue.Empty:
                    if not pending:
                        raise ProtocolError(f"run {self.number}: nothing for {self.program.limit} s, "
                                            "and no request open")
                    for request in reversed(pending):  # newest first: out of order when several are open
                        self.answer(request)
                    pending = []
                    continue
                if not isinstance(line, dict) or line.get("run") != self.number:
                    raise ProtocolError(f"run {self.number}: a line not of this run: {line!r}")
                kind = line.get("type")
                if kind == "complete":
                    ident = line.get("id")
                    if not isinstance(ident, int) or isinstance(ident, bool) or ident in self.program.ids:
                        raise ProtocolError(f"run {self.number}: a request's id must be an integer unique in the "
                                            f"session (spec/protocol.md section 5): {line}")
                    self.program.ids.add(ident)
                    pending.append(line)
                elif kind == "piece":
                    if self.stream is None or not isinstance(line.get("text"), str):
                        raise ProtocolError(f"run {self.number}: a piece without a stream, or not a text: {line}")
                    self.stream(line["text"])
                elif kind == "sample":
                    self.next_sample()
                elif kind in ("result", "error"):
                    if pending:
                        raise ProtocolError(f"run {self.number} ended with {len(pending)} requests unanswered; "
                                            "a run waits for every request it sent (methods.md section 6)")
                    self.finished = True
                    return self.outcome(line)
                else:
                    raise ProtocolError(f"run {self.number}: unknown line type {kind!r}: {line}")
        finally:
            if self.sample_thread is not None:
                self.sample_requests.put(None)
                self.sample_thread.join(timeout=self.program.limit)

    def answer(self, line: dict) -> None:
        pieces: list[str] = []
        try:
            stop, extra = line.get("stop"), dict[str, Any]()
            if line.get("fields") and "fields" in REQUEST_FIELDS:
                extra["fields"] = dict(line["fields"])
            request = selfmoa.Request(model=line["model"], messages=tuple(line["messages"]),
                                      temperature=line["temperature"], max_tokens=line["max_tokens"], n=line["n"],
                                      seed=line["seed"], stream=pieces.append if line.get("stream") else None,
                                      stop=None if stop is None else tuple(stop), **extra)
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"run {self.number}: a malformed completion request ({exc!r}): {line}") from None
        reply: dict[str, Any] = {"type": "reply", "id": line.get("id")}
        try:
            value = self.complete(request)
        except (ModelError, selfmoa.ModelError) as exc:
            reply["error"] = {"status": exc.status, "message": exc.message}
        except Exception as exc:
            self.bugs.append(exc)
            reply["bug"] = {"type": type(exc).__name__, "message": str(exc)}
        else:
            if isinstance(value, selfmoa.Reply):
                value = value.texts
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(t is None or isinstance(t, str) for t in value):
                wrong = TypeError(f"a completion function must return a Reply, a str or a list of str, "
                                  f"not {type(value).__name__}")
                self.bugs.append(wrong)
                reply["bug"] = {"type": "TypeError", "message": str(wrong)}
            else:
                reply["texts"] = value
        if pieces:
            reply["pieces"] = pieces
        self.program.send(reply)

    def next_sample(self) -> None:
        """The program asks for the caller's next sample: pulled on a thread of its own, since the caller's
        iterator may wait for a completion request (Q8) that this thread must answer meanwhile."""
        if self.samples is None:
            raise ProtocolError(f"run {self.number}: asked for a sample, but its samples were not lazy")
        if self.sample_thread is None:
            self.sample_thread = threading.Thread(target=self._pull, daemon=True)
            self.sample_thread.start()
        self.sample_requests.put(True)

    def _pull(self) -> None:
        done = False
        while self.sample_requests.get() is not None:
            message: dict[str, Any] = {"type": "sample", "run": self.number}
            if done:
                message["end"] = True
            else:
                try:
                    message["text"] = next(self.samples)
                    json.dumps(message)
                except StopIteration:
                    message["end"], done = True, True
                except Exception as exc:
                    self.bugs.append(exc)
                    message.pop("text", None)
                    message["bug"] = {"type": type(exc).__name__, "message": str(exc)}
                    done = True
            self.program.send(message)

    def outcome(self, line: dict) -> Result:
        if line["type"] == "result":
            try:
                return Result(line)
            except KeyError as exc:
                raise ProtocolError(f"run {self.number}: a result without {exc}: {line}") from None
        kind, message = line.get("kind"), line.get("message", "")
        if kind == "internal":
            raise ProtocolError(f"{self.program.name} failed inside (not an error the spec knows): {message}")
        if kind == "unsupported":
            raise ProtocolError(f"{self.program.name} refused the run: {message}")
        error: BaseException
        if kind == "ConfigError":
            error = ConfigError(message)
        elif kind == "ModelError":
            error = ModelError(message, model=line.get("model", ""), status=line.get("status"), text=message)
        elif kind == "NotEnoughProposals":
            failures = [ModelError(f.get("message", ""), model=f.get("model", ""), status=f.get("status"),
                                   text=f.get("text")) for f in line.get("failures", [])]
            error = NotEnoughProposals(message, failures)
        elif kind == "bug":
            bug = line.get("bug") or {}
            found = [e for e in self.bugs if type(e).__name__ == bug.get("type") and str(e) == bug.get("message")]
            if not found:
                raise ProtocolError(f"run {self.number}: raised a bug the harness never sent: {line}")
            error = found[0]
        else:
            raise ProtocolError(f"run {self.number}: an error of unknown kind {kind!r}: {line}")
        partial = line.get("partial")
        if partial is not None:
            try:
                error.partial = Result(partial, answer="")  # type: ignore[attr-defined]
            except KeyError as exc:
                raise ProtocolError(f"run {self.number}: a partial without {exc}: {line}") from None
        raise error


class Implementation:
    """A program speaking spec/protocol.md, shaped like a module with selfmoa's three methods."""

    ConfigError, ModelError = ConfigError, ModelError
    NotEnoughProposals, SelfMoAError = NotEnoughProposals, SelfMoAError

    def __init__(self, command: str, *, settle: float = SETTLE, limit: float = LIMIT):
        self.command, self.settle, self.limit = command, settle, limit
        self.__name__ = f"cmd:{command}"
        self._program: Program | None = None
        self._lock = threading.Lock()

    @property
    def program(self) -> Program:
        if self._program is None or self._program.process.poll() is not None:
            self._program = Program(self.command, settle=self.settle, limit=self.limit)
        return self._program

    def close(self) -> None:
        if self._program is not None:
            self._program.close()

    def moa(self, prompt: Any, proposers: Any, aggregator: Any, **params: Any) -> Result:
        return self._run("moa", prompt, {"proposers": proposers, "aggregator": aggregator, **params})

    def self_moa(self, prompt: Any, model: Any, **params: Any) -> Result:
        return self._run("self_moa", prompt, {"model": model, **params})

    def self_moa_seq(self, prompt: Any, model: Any = None, **params: Any) -> Result:
        return self._run("self_moa_seq", prompt, {"model": model, **params})

    def _run(self, method: str, prompt: Any, params: dict) -> Result:
        import pytest  # only the tests use this module

        complete = params.pop("complete", None)
        stream = params.pop("stream", None)
        if not callable(complete) or (stream is not None and not callable(stream)):
            pytest.skip("a completion function or stream that is not a function cannot be sent over the protocol: "
                        "this check is Python-only (spec/invariants.md)")
        samples = params.get("samples")
        lazy = None
        if samples is not None and not isinstance(samples, (str, list, tuple)):
            if not isinstance(samples, collections.abc.Iterable):
                pytest.skip("samples that are not iterable cannot be sent over the protocol (Python-only)")
            lazy = iter(samples)
            del params["samples"]
        elif isinstance(samples, tuple):
            params["samples"] = list(samples)
        params = {name: value for name, value in params.items() if value is not None}
        with self._lock:  # one run at a time over the one process
            run = _Run(self.program, complete, stream, lazy)
            try:
                return run.go(method, prompt, params)
            finally:
                if not run.finished:  # the next run starts a fresh program, not one still in this run
                    run.program.kill()
                    self._program = None


_LOADED: dict[str, Implementation] = {}


def load(name: str) -> Any:
    """The implementation SELFMOA_IMPL names: ``cmd:COMMAND`` (a program speaking spec/protocol.md, started
    once), or the name of a Python module with selfmoa's functions."""
    if name.startswith("cmd:"):
        command = name[4:].strip()
        if not command:
            raise SystemExit("SELFMOA_IMPL=cmd: needs a command after the colon, e.g. "
                             "SELFMOA_IMPL='cmd:node mymoa.js'")
        if command not in _LOADED:
            _LOADED[command] = Implementation(command)
            atexit.register(_LOADED[command].close)
        return _LOADED[command]
    import importlib

    return importlib.import_module(name)
