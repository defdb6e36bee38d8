"""selfmoa behind spec/protocol.md: the implementation side of the protocol, for selfmoa.py itself.

    python3 tests/selfmoa_adapter.py                 # selfmoa, imported from the project folder
    python3 tests/selfmoa_adapter.py --module PATH   # the module in the file PATH (a mutant, say), as selfmoa

It reads the harness's lines on stdin and writes its own on stdout (one JSON object per line), and runs each
run on a thread of its own, so that the reader can hand each reply to the pool worker waiting for it: the
completion function it gives selfmoa sends a ``complete`` line and waits for the ``reply`` with its id, so
several requests are open at once, as selfmoa's pool sends them. The protocol's params are the spec's
snake_case names (spec/vectors.md); each is passed to the method under the name its signature has today,
and one the method does not take is refused loudly (an ``unsupported`` error), never dropped.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import itertools
import json
import pathlib
import sys
import threading
import traceback
from typing import Any

PROTOCOL = 1
METHODS = ("moa", "self_moa", "self_moa_seq")


def load_module(argv: list[str]) -> Any:
    if argv[:1] == ["--module"] and len(argv) == 2:
        path = pathlib.Path(argv[1]).resolve()
        spec = importlib.util.spec_from_file_location("selfmoa", path)
        assert spec is not None and spec.loader is not None, f"cannot load {path}"
        module = importlib.util.module_from_spec(spec)
        sys.modules["selfmoa"] = module  # dataclasses and doctests look the module up by name
        spec.loader.exec_module(module)
        return module
    if argv:
        raise SystemExit("usage: selfmoa_adapter.py [--module PATH]")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    return importlib.import_module("selfmoa")


class Unsupported(Exception):
    """A param (or method) this adapter cannot pass on: reported as kind "unsupported"."""


class Adapter:
    def __init__(self, module: Any):
        self.module = module
        self.write_lock = threading.Lock()
        self.ids = itertools.count(1)
        self.waiting: dict[int, list] = {}  # request id -> [event, reply line]
        self.samples: dict[int, list] = {}  # run -> [event, sample line]
        self.bug_types: dict[str, type] = {}
        self.runs: list[threading.Thread] = []

    def send(self, message: dict) -> None:
        line = json.dumps(message, ensure_ascii=True) + "\n"
        with self.write_lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    def serve(self) -> None:
        version = getattr(self.module, "__version__", "?")
        self.send({"type": "ready", "protocol": PROTOCOL, "implementation": f"selfmoa {version} (adapter)"})
        for line in sys.stdin:
            message = json.loads(line)
            kind = message.get("type")
            if kind == "run":
                thread = threading.Thread(target=self.run, args=(message,), daemon=True)
                self.runs.append(thread)
                thread.start()
            elif kind == "reply":
                self.deliver(self.waiting.pop(message["id"]), message)
            elif kind == "sample":
                self.deliver(self.samples.pop(message["run"]), message)
            elif kind == "quit":
                break
            else:
                raise SystemExit(f"selfmoa_adapter: unknown line type {kind!r}")
        for thread in self.runs:
            thread.join(timeout=5)

    @staticmethod
    def deliver(slot: list, message: dict) -> None:
        slot[1] = message
        slot[0].set()

    def ask(self, table: dict, key: int, message: dict) -> dict:
        slot: list = [threading.Event(), None]
        table[key] = slot
        self.send(message)
        slot[0].wait()
        return slot[1]

    def bug(self, bug: dict) -> BaseException:
        """An exception of the type name the harness gave, carrying its message (a bug of the caller's)."""
        name = str(bug.get("type", "Exception"))
        if name not in self.bug_types:
            self.bug_types[name] = type(name, (Exception,), {"harness_bug": True})
        return self.bug_types[name](bug.get("message", ""))

    # --- one run --------------------------------------------------------------------------------------

    def run(self, message: dict) -> None:
        number = message["run"]
        try:
            method, kwargs = self.prepare(message)
            result = method(message["prompt"], **kwargs)
        except Unsupported as exc:
            self.send({"type": "error", "run": number, "kind": "unsupported", "message": str(exc)})
            return
        except Exception as exc:
            self.send({"type": "error", "run": number, **self.error(exc)})
            return
        self.send({"type": "result", "run": number, **self.result(result)})

    def prepare(self, message: dict) -> tuple[Any, dict]:
        name, number = message.get("method"), message["run"]
        if name not in METHODS:
            raise Unsupported(f"unknown method {name!r}; the methods are {', '.join(METHODS)}")
        method = getattr(self.module, name)
        kwargs = self.params(method, name, message.get("params", {}))
        kwargs["complete"] = self.completion(number)
        if message.get("stream"):
            kwargs["stream"] = lambda piece: self.send({"type": "piece", "run": number, "text": piece})
        if message.get("lazy_samples"):
            kwargs["samples"] = self.lazy_samples(number)
        return method, kwargs

    def params(self, method: Any, name: str, params: dict) -> dict:
        """The protocol's params (the spec's names, spec/protocol.md section 4) as keyword arguments of the
        method: each under the name the method's signature has for it; one it does not take is refused
        loudly, never dropped."""
        accepted = inspect.signature(method).parameters
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            if key in ("complete", "stream", "prompt") or key not in accepted:
                raise Unsupported(f"{name} takes no param {key!r} (selfmoa's {name} accepts "
                                  f"{', '.join(p for p in accepted if p not in ('prompt', 'complete', 'stream'))})")
            kwargs[key] = value
        return kwargs

    def completion(self, number: int):
        module = self

        def complete(request: Any) -> list:
            ident = next(module.ids)
            line = module.ask(module.waiting, ident, {
                "type": "complete", "run": number, "id": ident, "model": request.model,
                "messages": [dict(m) for m in request.messages], "temperature": request.temperature,
                "max_tokens": request.max_tokens, "n": request.n, "seed": request.seed,
                "stream": request.stream is not None,
                "stop": None if request.stop is None else list(request.stop),
                "fields": dict(getattr(request, "fields", None) or {})})
            if "error" in line:
                error = line["error"]
                raise module.module.ModelError(error.get("message", ""), model=request.model,
                                               status=error.get("status"))
            if "bug" in line:
                raise module.bug(line["bug"])
            if request.stream is not None:
                for piece in line.get("pieces", []):
                    request.stream(piece)
            return list(line["texts"])

        return complete

    def lazy_samples(self, number: int):
        while True:
            line = self.ask(self.samples, number, {"type": "sample", "run": number})
            if "bug" in line:
                raise self.bug(line["bug"])
            if line.get("end"):
                return
            yield line["text"]

    # --- what a run ends with ---------------------------------------------------------------------------

    def trace(self, result: Any) -> dict:
        return {"calls": result.calls, "requests": result.requests,
                "trace": [{field.name: getattr(call, field.name) for field in dataclasses.fields(call)}
                          for call in result.trace]}

    def result(self, result: Any) -> dict:
        return {"answer": result.answer, "rounds": result.params.get("rounds"), **self.trace(result)}

    def failure(self, error: Any) -> dict:
        return {"model": error.model, "status": error.status, "message": error.message, "text": str(error)}

    def error(self, exc: Exception) -> dict:
        module = self.module
        partial = getattr(exc, "partial", None)
        out: dict[str, Any] = {"message": str(exc), "partial": None if partial is None else self.trace(partial)}
        if isinstance(exc, module.ConfigError):
            out["kind"] = "ConfigError"
        elif isinstance(exc, module.NotEnoughProposals):
            out["kind"], out["failures"] = "NotEnoughProposals", [self.failure(f) for f in exc.failures]
        elif isinstance(exc, module.ModelError):
            out.update(kind="ModelError", model=exc.model, status=exc.status)
        elif getattr(type(exc), "harness_bug", False):
            out.update(kind="bug", bug={"type": type(exc).__name__, "message": str(exc)})
        else:  # a bug of selfmoa's (or of this adapter): the harness fails the test and shows it
            out.update(kind="internal", message="".join(traceback.format_exception(exc)))
        return out


def main() -> None:
    Adapter(load_module(sys.argv[1:])).serve()


if __name__ == "__main__":
    main()
