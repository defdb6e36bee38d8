#!/usr/bin/env python3
"""selfmoa_batch: many prompts through MoA, Self-MoA or Self-MoA-Seq, written line by line, resumable.

This module runs the methods of ``selfmoa`` (the one file that implements them) over a whole input file:
every item concurrently on one shared call pool, one output line appended per finished item, so a crash
loses no finished item, and a rerun of the same command skips what is done and resumes the rest. It is the
``-i FILE -o FILE`` mode of the ``selfmoa`` command, and implements ``spec/batch.md``. It needs the Python
standard library and ``selfmoa.py`` beside it; nothing imports it but the command line (and ``selfmoa_eval``).

Public API
----------
========================  ===================================================================
``read_items``            read and check a batch input file (JSONL or a JSON list)
``check_items``           check batch items given as Python objects
``Item``                  one prompt of a batch: its id and its messages
``run_batch``             run every item, writing (and resuming) the output file
``alpaca_eval_outputs``   AlpacaEval's model-outputs entries from a finished output file
``BATCH_FORMAT``          the version of the output lines (1)
``batch_command``         the ``-i/-o`` command: ``selfmoa -m MODEL -i in.jsonl -o out.jsonl``
``shard_of``              the shard (0 to N-1) of an item id, a stable hash of the id alone
``shard_items``           the items of shard K of N (``--shard K/N``); ``parse_shard`` reads "K/N"
``merge_outputs``         join the shards' outputs: every item exactly once, in input order
``merge_command``         ``selfmoa merge -i in.jsonl -o all.jsonl out.0.jsonl out.1.jsonl ...``
``answer_item``           one item's output record, for engines that schedule items themselves
``output_line``           the output line of a record; ``fingerprint``, the fingerprint it carries
========================  ===================================================================

Usage, with a toy model (anything that takes a ``selfmoa.Request`` and returns text):

>>> import os, tempfile
>>> def toy(request):
...     return "an answer of " + request.model
>>> folder = tempfile.mkdtemp()
>>> items = check_items([{"id": 1, "prompt": "Name a prime."}, {"id": 2, "prompt": "Name a colour."}])
>>> run_batch(items, os.path.join(folder, "out.jsonl"), method="self-moa", model="a", n=2, complete=toy)["done"]
2
>>> run_batch(items, os.path.join(folder, "out.jsonl"), method="self-moa", model="a", n=2, complete=toy)["skipped"]
2

Each output line is one JSON object (``BATCH_FORMAT`` 1; ``spec/batch.md`` gives every field and rule)::

    {"selfmoa_batch": 1, "id": ..., "status": "ok" or "error", "answer" or "error": ..., "method": ...,
     "fingerprint": ..., "usage": ..., "calls": ..., "requests": ..., "retries": ..., "input": {the record}}

On the command line (``selfmoa --help`` lists every flag)::

    selfmoa -m qwen -i prompts.jsonl -o answers.jsonl                   # run; run again to resume
    selfmoa -m qwen -i prompts.jsonl -o outputs.json --format alpaca_eval

Licence: MIT. Copyright (c) 2026 the selfmoa authors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from selfmoa import (
    METHODS,
    ConfigError,
    HTTPClient,
    Message,
    ModelError,
    Reply,
    Request,
    SelfMoAError,
    _check,
    _on_shared_pool,
    _Pool,
    _reason,
    _sampling,
    _servers_of,
    _start,
    as_messages,
    key_report,
    missing_models_report,
)

__all__ = ["BATCH_FORMAT", "Item", "alpaca_eval_outputs", "answer_item", "batch_command", "check_items", "fingerprint",
           "merge_command", "merge_outputs", "output_line", "parse_shard", "read_items", "run_batch", "shard_items",
           "shard_of"]

# selfmoa_eval.py keeps its sample pool in this file's resumable output format, and so also uses these internal
# names (tests/test_smoke.py checks that it uses no others); they are no public API.
_FOR_EVAL = frozenset({"_dump_line", "_open_output", "_output_lock", "_parse_output", "_read_descriptor",
                       "_read_file", "_write_all", "_write_atomically"})


# ======================================================================================================
# Batch runs: many prompts, concurrently, one output line per finished item, resumable
# ======================================================================================================
#
# The output is JSONL in a versioned format of its own (spec/batch.md): each line holds selfmoa's result
# for one item (id, status, answer or error, fingerprint, counts) and, under "input", the input record
# exactly as given, so no input field can pass for a result. One whole line is appended per finished item:
# a crash loses no finished item and leaves at most a torn last line. Before a file is changed at all,
# every line of it must read as such a record, and a torn tail as the start of one; anything else is
# someone else's file and stays byte for byte as it was. A re-run skips the items whose line says "ok" for
# the same fingerprint (the item's messages, the method and its parameters) and runs the others; at the end
# the file is rewritten (atomically) with exactly one line per item, in input order, and lines that would be
# dropped (items gone from the input, answers to an older prompt or configuration) move to a sibling file.
# A lock beside the output lets one run at a time write it.


BATCH_FORMAT = 1  # the version of the output lines; a line of any other version is not read as ours
_LINE_START = b'{"selfmoa_batch": 1, "id": '  # how every output line begins (json.dumps keeps key order)
_SEEN, _CURRENT, _OK_NOW, _SAME_MESSAGES = 1, 2, 4, 8  # what a resume learns of an item from its lines
_MAX_NESTING = 64  # input records nested deeper are refused up front: JSON bombs never reach the encoder
# Characters that str.splitlines() and some JSONL readers take for line ends, and lone surrogates that UTF-8
# cannot encode: written as \uXXXX escapes, so a line ends only at "\n" whatever a reader splits on.
_UNSAFE_IN_LINE = re.compile("[\u2028\u2029\x85\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise turn "\n" into "\r\n"


@dataclasses.dataclass
class Item:
    """One batch item: its id, the input record as given, and its chat messages."""

    id: Any
    record: dict
    messages: list[Message]


def _item_messages(record: Any) -> tuple[list[Message] | None, str | None]:
    """The messages of an input record, or why there are none."""
    if not isinstance(record, dict):
        return None, f"an item is a JSON object, not {type(record).__name__}"
    fields = [field for field in ("prompt", "instruction", "messages") if field in record]
    if len(fields) != 1:
        return None, ("no 'prompt', 'instruction' or 'messages' field" if not fields else
                      f"give only one of 'prompt', 'instruction' or 'messages', not {' and '.join(fields)}")
    value = record[fields[0]]
    if fields[0] == "messages":
        try:
            return as_messages(value if isinstance(value, list) else ""), None
        except ConfigError:
            return None, "'messages' must be a non-empty list of {\"role\": str, \"content\": str}"
    if not isinstance(value, str) or not value.strip():
        return None, f"'{fields[0]}' must be a non-empty string"
    return [{"role": "user", "content": value}], None


def _json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be written into an output line and read back equal, or None if it can.

    >>> _json_problem({"prompt": "hi", "tags": ["a", 1, 2.5, None, True]}) is None
    True
    >>> _json_problem({"prompt": "\\ud83d"})
    "['prompt'] holds text that UTF-8 cannot encode (a lone surrogate such as \\\\ud83d)"
    """
    stack = [(value, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > _MAX_NESTING:
            return f"{where} is nested deeper than {_MAX_NESTING} levels"
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return f"{where} holds text that UTF-8 cannot encode (a lone surrogate such as \\ud83d)"
        elif isinstance(value, dict):
            for key, inner in value.items():
                if not isinstance(key, str):
                    return f"{where} has a key that is not a string ({key!r})"
                stack.append((key, depth, f"{where} key"))
                stack.append((inner, depth + 1, f"{where}[{key!r}]"))
        elif isinstance(value, list):
            stack.extend((inner, depth + 1, f"{where}[{index}]") for index, inner in enumerate(value))
        elif isinstance(value, float):
            if not math.isfinite(value):
                return f"{where} holds {value}, which JSON cannot represent"
        elif value is not None and not isinstance(value, (bool, int)):
            return f"{where} holds a {type(value).__name__}, which is not a JSON value"
    return None


def _loads(text: str) -> Any:
    """``json.loads``, strict: NaN and Infinity are not JSON, and a nesting bomb is bad JSON, not a crash."""
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _check_records(numbered: Sequence[tuple[int, Any]], source: str, unit: str,
                   problems: list[tuple[int, str]]) -> list[Item]:
    """Items from (number, record) pairs; raise one ConfigError listing every bad one, with ``problems``."""
    items: list[Item] = []
    seen: dict[Any, int] = {}
    for position, (number, record) in enumerate(numbered):
        messages, problem = _item_messages(record)
        item_id = record.get("id", position) if isinstance(record, dict) else None
        if problem is None and (isinstance(item_id, bool) or not isinstance(item_id, (str, int))):
            problem = f"'id' must be a string or an integer, not {type(item_id).__name__}"
        elif problem is None and item_id in seen:
            problem = f"duplicate id {item_id!r} (first at {unit} {seen[item_id]})"
        if problem is None:
            problem = _json_problem(record)
            problem = f"the record {problem.lstrip()}" if problem else None
        if problem or messages is None:
            problems.append((number, problem or "no messages"))
            continue
        seen[item_id] = number
        items.append(Item(item_id, record, messages))
    if problems:
        listed = "\n".join(f"  {unit} {number}: {problem}" for number, problem in sorted(problems))
        raise ConfigError(f"{source}: {len(problems)} bad {unit}(s); fix them and run again:\n{listed}")
    if not items:
        raise ConfigError(f"{source}: there are no items; give one JSON object per line, or a JSON list")
    return items


def check_items(records: Sequence[Any], source: str = "input") -> list[Item]:
    """Check every record before any call is made; raise one ConfigError listing every bad one.

    A record is a JSON object with ``prompt``, ``instruction`` or ``messages`` and an optional ``id`` (a
    string or an integer; without one, an item's id is its position). It must hold JSON values only, nested
    at most 64 levels, with text that UTF-8 can encode, so that it is written out and read back unchanged.
    """
    return _check_records(list(enumerate(records, 1)), source, "item", [])


def read_items(path: str) -> list[Item]:
    """Read a batch input file: JSONL (one object per line) or one JSON list of objects.

    Each object carries ``prompt`` (a string), ``instruction`` (AlpacaEval's field) or ``messages`` (chat
    messages), and optionally an ``id``; without one, an item's id is its position. Lines end at ``"\\n"``
    only (a U+2028 inside a string is text, not a line break). Every bad line is reported at once, by number,
    before anything runs: bad JSON, nesting bombs, text that is not UTF-8 or cannot be encoded.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass an existing file") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # the byte-order mark some editors put before UTF-8
    if data.lstrip().startswith(b"["):
        # One JSON list, unless this is JSONL whose first line happens to be an array.
        try:
            whole = _loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            try:
                _loads(data.lstrip().split(b"\n", 1)[0].decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(f"{path}: not valid JSON ({exc}); fix the file, or write one object per "
                                  f"line") from None
        else:
            if isinstance(whole, list):
                return check_items(whole, path)
    numbered, problems = [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip(b" \t\r"):
            continue
        try:
            numbered.append((number, _loads(line.decode("utf-8"))))
        except UnicodeDecodeError:
            problems.append((number, "not UTF-8 text; save the file as UTF-8"))
        except ValueError as exc:
            problems.append((number, f"not JSON ({exc})"))
    return _check_records(numbered, path, "line", problems)


def _record_problem(record: Any) -> str | None:
    """Why a parsed output line is not a selfmoa batch record, or None if it is one."""
    if not isinstance(record, dict) or "selfmoa_batch" not in record:
        if isinstance(record, dict) and "id" in record and "method" in record and ("answer" in record or "error"
                                                                                   in record):
            return ("it has no 'selfmoa_batch' field: selfmoa 0.1 wrote it, mixing input fields and results, "
                    "which cannot be told apart safely; move it away, and rerun to answer every item again")
        return "it has no 'selfmoa_batch' field"
    if record["selfmoa_batch"] != BATCH_FORMAT:
        return f"it is in batch format {record['selfmoa_batch']!r}; this selfmoa reads format {BATCH_FORMAT}"
    item_id, status = record.get("id"), record.get("status")
    wrong = [name for name, ok in (
        ("id", isinstance(item_id, (str, int)) and not isinstance(item_id, bool)),
        ("status", status in ("ok", "error")),
        ("answer" if status == "ok" else "error", isinstance(record.get("answer" if status == "ok" else "error"),
                                                             str)),
        ("method", isinstance(record.get("method"), str)),
        ("fingerprint", isinstance(record.get("fingerprint"), str)),
        ("input", isinstance(record.get("input"), dict))) if not ok]
    return f"its {', '.join(repr(name) for name in wrong)} missing or wrong" if wrong else None


def _is_torn_start(tail: bytes, after_records: bool) -> bool:
    """Whether bytes after the last newline are the unfinished start of a record line (a crash mid-write)."""
    if tail.startswith(_LINE_START):
        return True
    return _LINE_START.startswith(tail) and (after_records or len(tail) >= len(b'{"selfmoa_batch"'))


def _scan_output(pieces: Iterable[bytes], path: str, visit: Callable[[dict, int, bytes], None]) -> tuple[int, int]:
    """Read an output file piece by piece (never whole), calling ``visit(record, offset, line)`` for each
    record in file order (``line`` without its newline); return how many bytes the whole lines take
    (``keep``) and the size.

    Raises ConfigError, having changed nothing, unless every line is a record and a torn tail (bytes after
    the last newline) is the start of one. Lines end at b"\\n" only. A whole record after the last newline
    counts as a line (``keep`` is then the whole size, with no final newline: add one before appending).
    Memory: one piece and one line at a time.
    """
    pending, offset, number = b"", 0, 0
    for piece in pieces:
        pending += piece
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            number += 1
            line = pending[start:end]
            try:
                record = _loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                problem: str | None = "it is not UTF-8 JSON"
            else:
                problem = _record_problem(record)
            if problem:
                raise ConfigError(f"{path}: line {number} is not a selfmoa batch record ({problem}), so this is not "
                                  f"a selfmoa output file; it was left untouched: pass another output file, or move "
                                  f"this one away")
            visit(record, offset + start, line)
            start = end + 1
        pending, offset = pending[start:], offset + start
    keep, size = offset, offset + len(pending)
    try:
        last = _loads(pending.decode("utf-8")) if pending else None
    except (UnicodeDecodeError, ValueError):
        last = None
    if last is not None and _record_problem(last) is None:  # a whole record whose "\n" an editor dropped: kept
        visit(last, offset, pending)
        return size, size
    if pending and not _is_torn_start(pending, number > 0):
        raise ConfigError(f"{path}: its last line (with no newline at its end) is not the start of a selfmoa batch "
                          f"record, so this is not a selfmoa output file; it was left untouched: pass another "
                          f"output file, or move this one away")
    return keep, size


def _parse_output(data: bytes, path: str) -> tuple[list[tuple[dict, bytes]], int]:
    """Every record of an output file held in memory, with its line, and how many bytes the whole lines take
    (``_scan_output`` on one piece)."""
    records: list[tuple[dict, bytes]] = []
    keep, _ = _scan_output([data], path, lambda record, offset, line: records.append((record, line)))
    return records, keep


def _pieces(descriptor: int, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The bytes of an open file from ``start`` (to ``end``), a MiB at a time."""
    os.lseek(descriptor, start, os.SEEK_SET)
    left = None if end is None else end - start
    while left is None or left > 0:
        piece = os.read(descriptor, 1 << 20 if left is None else min(1 << 20, left))
        if not piece:
            return
        if left is not None:
            left -= len(piece)
        yield piece


def _check_removed_file(path: str) -> None:
    """Refuse (ConfigError) a sibling file of moved lines that is not a selfmoa output file, reading it piece
    by piece (a named pipe is opened without blocking and refused)."""
    import stat

    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _O_BINARY)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ConfigError(f"{path}: not a regular file; pass another output file, or move it away")
        _scan_output(_pieces(descriptor), path, lambda *line: None)
    finally:
        os.close(descriptor)


def _line_at(descriptor: int, offset: int, length: int) -> bytes:
    return b"".join(_pieces(descriptor, offset, offset + length))


def _escape_unsafe(text: str) -> str:
    r"""JSON text with U+2028, U+2029, U+0085 and lone surrogates written as \u escapes (same value).

    >>> _escape_unsafe(json.dumps(["a\u2028b", "\ud83d"], ensure_ascii=False))
    '["a\\u2028b", "\\ud83d"]'
    """
    return _UNSAFE_IN_LINE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def _dump_line(record: dict) -> bytes:
    return _escape_unsafe(json.dumps(record, ensure_ascii=False)).encode("utf-8") + b"\n"


def _batch_parameters(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's parameters as run, defaults filled in (so an explicit default changes no fingerprint).

    ``use_n`` is left out: it says how samples are requested, not what is asked.
    """
    import inspect

    signature = inspect.signature(METHODS[method])
    parameters = {name: parameter.default for name, parameter in signature.parameters.items()
                  if parameter.kind == parameter.KEYWORD_ONLY and parameter.default is not parameter.empty}
    for name, value in options.items():
        if name not in signature.parameters or name in ("complete", "stream", "samples"):
            known = ", ".join(p for p in signature.parameters if p not in ("prompt", "complete", "stream", "samples"))
            raise ConfigError(f"{name}={value!r}: {method} takes no such parameter in a batch; pass only {known}")
    parameters.update(options)
    for name in ("complete", "stream", "use_n", "concurrency", "samples"):
        parameters.pop(name, None)
    # A role's settings as flat keys: temperature and max_tokens (so fingerprints of runs without fields are
    # those of earlier versions), then fields and models when given.
    for name, prefix in (("proposing", ""), ("aggregating", "aggregator_")):
        parameters.update(_sampling(name, parameters.pop(name, None)).params(prefix))
    if parameters.get("layout") == "keyed":  # the default layout: fingerprints stay as before layouts existed
        del parameters["layout"]
    for name, value in parameters.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise ConfigError(f"{name}={value!r}: run_batch records the method's parameters in every output "
                              f"line's fingerprint, so they must be JSON values; pass strings, numbers and "
                              f"lists") from None
    return parameters


def _adapted(trace: Sequence[Any]) -> list[dict[str, Any]]:
    """How the client adapted this item's requests to its servers (what was sent instead), once per role and
    model: ``[{"role": "aggregator", "model": "o4-mini", "sent": {"temperature": None, ...}}]``."""
    seen: list[dict[str, Any]] = []
    for call in trace:
        entry = {"role": call.role, "model": call.model, "sent": call.adapted}
        if call.adapted and entry not in seen:
            seen.append(entry)
    return seen


def _fingerprint(messages: list[Message], method: str, parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what produces an item's answer: its messages, the method, parameters.

    >>> _fingerprint([{"role": "user", "content": "hi"}], "self-moa", {"n": 6})[:16]
    'f1247f2503992f70'
    """
    canonical = json.dumps({"messages": messages, "method": method, "parameters": parameters},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _sibling(path: str, word: str) -> str:
    """A file beside ``path`` named after it: ``_sibling("out.jsonl", "removed")`` is ``out.removed.jsonl``."""
    root, extension = os.path.splitext(path)
    return f"{root}.{word}{extension}"


def _removed_path(output: str) -> str:
    """Where a batch moves the lines it takes out of ``output`` (items gone from the input, replaced answers).

    >>> _removed_path("answers.jsonl")
    'answers.removed.jsonl'
    """
    return _sibling(output, "removed")


def _read_descriptor(descriptor: int) -> bytes:
    os.lseek(descriptor, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(descriptor, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_file(path: str) -> bytes:
    """The bytes of the regular file ``path``; ConfigError for anything else (reading a named pipe would wait
    for a writer forever, so it is opened without blocking and refused)."""
    import stat

    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _O_BINARY)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ConfigError(f"{path}: not a regular file; pass another output file, or move it away")
        return _read_descriptor(descriptor)
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    """Write all of ``data``. ``os.write`` may write less than asked (a short write): the rest follows, until
    the disk takes nothing more (an OSError then says why, as ENOSPC, EFBIG or EIO do)."""
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        if written <= 0:
            import errno

            raise OSError(errno.EIO, "the disk took no more bytes (a short write)")
        view = view[written:]


def _through_links(path: str) -> str:
    """The file a symbolic link ``path`` points at (``path`` itself if it is none): that file is locked and
    replaced, so a link keeps pointing at the answers, and a run on either name finds the other's lock."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _write_atomically(path: str, data: bytes | Iterable[bytes],
                      before_rename: Callable[[], None] | None = None) -> None:
    """Replace ``path`` by a file holding ``data`` (bytes, or pieces written as they come, so that memory
    does not grow with the file): a crash leaves the old file or the new one, never a mix."""
    path = _through_links(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY, 0o644)
    try:
        try:
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)  # keep the permissions of the file replaced
        except OSError:
            pass
        for piece in [data] if isinstance(data, bytes) else data:
            _write_all(descriptor, piece)
        os.fsync(descriptor)
        if before_rename is not None:
            before_rename()
    except BaseException:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    os.close(descriptor)
    os.replace(temporary, path)
    if os.name == "posix":  # the new name itself survives a power cut only once its folder is synced
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _move_lines(path: str, moving: Sequence[bytes] | Callable[[], Iterable[bytes]]) -> None:
    """Append to ``path`` (a selfmoa file) the lines it does not hold yet, and sync it to disk. ``moving`` is
    the lines to move, or a function giving them (called twice, so that they are never all held); the file
    is read piece by piece."""
    def lines() -> Iterable[bytes]:
        return moving() if callable(moving) else moving

    def digest(line: bytes) -> bytes:
        return hashlib.sha256(line).digest()

    wanted = {digest(line) for line in lines()}
    present: set[bytes] = set()

    def seen(record: dict, offset: int, line: bytes) -> None:
        if digest(line) in wanted:
            present.add(digest(line))

    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_BINARY, 0o644)
    try:
        keep, size = _scan_output(_pieces(descriptor), path, seen)
        if keep < size:
            os.ftruncate(descriptor, keep)
        ending = b"\n" if keep and _line_at(descriptor, keep - 1, 1) != b"\n" else b""
        for line in lines():
            if digest(line) not in present:
                present.add(digest(line))  # a line given twice is moved once
                _write_all(descriptor, ending + line + b"\n")
                ending = b""
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- One writer at a time -----------------------------------------------------------------------------

_HELD_OUTPUTS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("selfmoa_held_outputs",
                                                                          default=frozenset())


def _fcntl() -> Any:
    """The fcntl module where the system has one (POSIX), else None."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    return fcntl


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (the lock-file fallback's stale-lock test)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes

        kernel = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(output: str, lock_path: str, holder: str) -> ConfigError:
    return ConfigError(f"{output} is being written by another selfmoa run ({holder or 'pid unknown'}), which "
                       f"holds {lock_path}; wait for it to end, or pass another output file. Two runs on one file "
                       f"would lose each other's answers")


def _cannot_write(output: str, exc: OSError) -> ConfigError:
    return ConfigError(f"{output}: cannot write the output file ({exc.strerror or exc}); pass a path in an "
                       f"existing, writable folder")


def _lock(output: str) -> Callable[[], None]:
    """Take ``output``'s lock (``output + ".lock"``) or raise ConfigError at once; returns the release.

    With fcntl, an flock on the lock file: the system drops it when its holder dies, even by kill -9.
    Elsewhere the lock file is created exclusively and holds the owner's pid; a file whose pid is no
    longer running is a stale lock, and is taken over.
    """
    lock_path = _through_links(output) + ".lock"
    fcntl = _fcntl()
    if fcntl is None:
        return _lock_by_pid_file(output, lock_path)
    return _lock_by_flock(output, lock_path, fcntl)


def _lock_by_flock(output: str, lock_path: str, fcntl: Any) -> Callable[[], None]:
    """``_lock`` with fcntl: an flock held on the lock file, which also names the holder's pid."""
    for _ in range(10):  # bounded: only a holder removing the file between our open and flock repeats this
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
        except OSError as exc:
            raise _cannot_write(output, exc) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_descriptor(descriptor).decode("ascii", "replace").strip()
            os.close(descriptor)
            raise _busy(output, lock_path, f"pid {holder}" if holder.isdigit() else "") from None
        except OSError as exc:
            os.close(descriptor)
            raise ConfigError(f"{lock_path}: cannot lock it ({exc.strerror or exc}), so two runs could write "
                              f"{output} at once; pass an output file on a local disk") from None
        try:
            current = os.path.samestat(os.fstat(descriptor), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if not current:  # the previous holder removed it as we opened it: lock the file now at that path
            os.close(descriptor)
            continue
        if os.fstat(descriptor).st_size > 32 or not re.fullmatch(rb"\d*\n?", _read_descriptor(descriptor)):
            os.close(descriptor)  # someone's own file of that name: neither emptied nor removed
            raise ConfigError(f"{lock_path} exists and is not a selfmoa lock file, so it was left untouched; move it "
                              f"away, or pass another output file")
        with contextlib.suppress(OSError):  # the pid only informs whoever finds the lock taken
            os.ftruncate(descriptor, 0)
            os.lseek(descriptor, 0, os.SEEK_SET)  # the check above read to the end
            _write_all(descriptor, f"{os.getpid()}\n".encode())

        def release(held: int = descriptor) -> None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # removed while still held, so no one can lock a file about to vanish
            os.close(held)
        return release
    raise _busy(output, lock_path, "")


def _lock_by_pid_file(output: str, lock_path: str) -> Callable[[], None]:
    """``_lock`` without fcntl: the lock file created exclusively, holding the owner's pid; a file whose pid
    is no longer running is a stale lock, and is taken over."""
    for _ in range(10):  # bounded: only a stale lock removed, or a holder leaving meanwhile, repeats this
        try:
            descriptor = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
        except FileExistsError:
            try:
                with open(lock_path, encoding="ascii", errors="replace") as file:
                    pid_text = file.read().strip()
            except OSError:
                continue
            is_pid = re.fullmatch(r"[0-9]{1,10}", pid_text) is not None  # not "²", not 5000 digits
            if not is_pid or _pid_alive(int(pid_text)):
                raise _busy(output, lock_path, f"pid {pid_text}; if no such run exists, delete the lock file"
                            if is_pid else "") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)  # its owner died without removing it: a stale lock
            continue
        except OSError as exc:
            raise _cannot_write(output, exc) from None
        with contextlib.suppress(OSError):  # without it, others see "pid unknown" and wait
            _write_all(descriptor, f"{os.getpid()}\n".encode())
        os.close(descriptor)

        def release() -> None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
        return release
    raise _busy(output, lock_path, "")


@contextlib.contextmanager
def _output_lock(output: str) -> Iterator[None]:
    """Hold ``output``'s lock for the block (re-entrant within one thread of this process)."""
    key = os.path.realpath(output)
    if key in _HELD_OUTPUTS.get():
        yield
        return
    release = _lock(output)
    token = _HELD_OUTPUTS.set(_HELD_OUTPUTS.get() | {key})
    try:
        yield
    finally:
        _HELD_OUTPUTS.reset(token)
        release()


# --- The run --------------------------------------------------------------------------------------------


def _id_key(item_id: Any) -> tuple:
    return (type(item_id).__name__, item_id)


def run_batch(items: Sequence[Item], output: str, *, method: str = "self-moa",
              complete: Callable[[Request], Any], concurrency: int = 8, trace: bool = False,
              progress: Callable[[int, int, int, float], None] | None = None, diversity: bool = False,
              **options: Any) -> dict[str, Any]:
    """Run ``method`` on every item, ``concurrency`` calls at a time, appending one JSONL line per item.

    ``options`` go to the method (``model``, ``n``, ``proposers``...). Each line is a record of format
    ``BATCH_FORMAT`` (spec/batch.md): ``selfmoa_batch``, ``id``, ``status`` (``"ok"`` with ``answer``, or
    ``"error"`` with ``error``), ``method``, ``fingerprint``, ``usage``, ``calls``, ``requests``, ``retries``,
    ``trace`` and ``diversity`` (the Vendi score of each proposer layer) when asked, and ``input``: the input
    record, unchanged. A re-run on the same ``output`` skips the items whose line is ``"ok"`` with the same
    fingerprint and runs the rest; at the end ``output`` holds one line per item, in input order, and lines
    taken out of it are appended to the sibling file named ``.removed`` (``out.jsonl``: ``out.removed.jsonl``).

    Raises ConfigError, before any call and with every file left as it was, when ``output`` is not a selfmoa
    output file or another run holds its lock; SelfMoAError when a write fails (the lines finished before
    are kept; the next run does the rest), or when another program replaced, emptied or cut ``output``
    during the run (nothing more is written to it; the next run does what was lost). The output is read back
    and rewritten line by line: memory does not grow with its size. Returns the counts ``total``,
    ``skipped`` (answered before), ``done``, ``failed``, ``changed_prompt`` and ``changed_parameters`` (run
    again because their line's fingerprint no longer matched), ``moved`` (lines moved out) and
    ``torn_bytes`` (a torn tail cut off), and
    ``failed_ids``: the ids of the items whose line is an error, in input order (a rerun retries them).
    """
    _check(method in METHODS, "method", method, "unknown method", f"pass one of {', '.join(METHODS)}")
    items = list(items)
    _check(all(isinstance(item, Item) for item in items), "items", "...", "run_batch takes Item objects",
           "pass check_items(records) or read_items(path)")
    _check(len({_id_key(item.id) for item in items}) == len(items), "items", "...", "two items share an id",
           "give every item its own id (check_items finds the duplicates)")
    parameters = _batch_parameters(method, options)
    prints = {_id_key(item.id): _fingerprint(item.messages, method, parameters) for item in items}
    pool, _, _, _ = _start(complete, concurrency)
    try:
        with _output_lock(output):
            job = _BatchJob(method=method, complete=complete, concurrency=concurrency, trace=trace,
                            diversity=diversity, progress=progress, options=options, prints=prints, pool=pool)
            return _run_locked(items, output, job)
    except OSError as exc:  # reading the output, or cutting a torn line off it (writes report themselves)
        raise SelfMoAError(f"{output}: {exc.strerror or exc}; every finished line is kept in it; fix that, then "
                           f"run the same command again") from exc
    finally:
        pool.shutdown()


def _open_output(output: str) -> tuple[int, bool]:
    """A descriptor of ``output`` for reading and appending, and whether this call created the file."""
    import stat

    path = _through_links(output)  # a link to a file not written yet: create that file
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | _O_BINARY)
        created = False
    except FileNotFoundError:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
        except OSError as exc:
            raise _cannot_write(output, exc) from None
        created = True
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ConfigError(f"{output}: not a regular file; pass the path of a file to write")
    return descriptor, created


@dataclasses.dataclass(frozen=True)
class _BatchJob:
    """What every item of one batch run shares: the method and its options, how calls run, what a line holds."""

    method: str
    complete: Callable[[Request], Any]
    concurrency: int
    trace: bool
    diversity: bool
    progress: Callable[[int, int, int, float], None] | None
    options: dict[str, Any]
    prints: dict[tuple, str]  # each item's fingerprint, by id key
    pool: _Pool


def _run_locked(items: list[Item], output: str, job: _BatchJob) -> dict[str, Any]:
    """run_batch, holding the output's lock."""
    descriptor, created = _open_output(output)
    try:
        # What the output says of each current item, read line by line: whether it holds an "ok" line with
        # the current fingerprint, whether any with it, and whether its last line asked the same messages.
        # One byte of flags per item (memory must not grow much with the number of items or lines).
        positions = {key: position for position, key in enumerate(job.prints)}  # job.prints is in input order
        seen = bytearray(len(items))

        def note(record: dict, offset: int, line: bytes) -> None:
            position = positions.get(_id_key(record["id"]))
            if position is None:
                return
            flags = seen[position] & _OK_NOW | _SEEN
            if record["fingerprint"] == job.prints[_id_key(record["id"])]:
                flags |= _CURRENT | (_OK_NOW if record["status"] == "ok" else 0)
            else:
                flags |= seen[position] & _CURRENT
            if _item_messages(record["input"])[0] == items[position].messages:
                flags |= _SAME_MESSAGES  # of the last line: it says whether the prompt changed
            seen[position] = flags

        scan = None  # a failure to read the output itself is no ConfigError: it is raised as it is
        try:
            keep, size = scan = _scan_output(_pieces(descriptor), output, note)
            moved_to = _removed_path(output)
            if os.path.exists(moved_to):  # lines are moved there later: refuse it now if foreign
                _check_removed_file(moved_to)
        except (ConfigError, OSError) as exc:
            if isinstance(exc, OSError) and scan is None:
                raise
            if created:  # leave no trace of a run that never started
                os.close(descriptor)
                descriptor = -1
                with contextlib.suppress(OSError):
                    os.unlink(_through_links(output))
            if isinstance(exc, OSError):
                raise _cannot_write(_removed_path(output), exc) from None
            raise
        # Decide per item, on the explicit status and the fingerprint, never on which keys a line holds.
        counts: dict[str, Any] = {"total": len(items), "skipped": 0, "done": 0, "failed": 0, "changed_prompt": 0,
                                  "changed_parameters": 0, "moved": 0, "torn_bytes": size - keep,
                                  "failed_at": []}  # the positions of the items that failed
        todo = []
        for position, item in enumerate(items):
            flags = seen[position]
            if flags & _OK_NOW:
                counts["skipped"] += 1
                continue
            if flags & _SEEN and not flags & _CURRENT:
                counts["changed_parameters" if flags & _SAME_MESSAGES else "changed_prompt"] += 1
            todo.append((position, item))
        seen = bytearray()  # no longer needed
        if keep < size:
            os.ftruncate(descriptor, keep)  # a torn line left by a crash: its item runs again
        elif size and _line_at(descriptor, size - 1, 1) != b"\n":
            _write_all(descriptor, b"\n")  # a whole last record without its newline: end it before appending
            keep += 1
        try:
            keep = _append_results(todo, descriptor=descriptor, size=keep, output=output, job=job, counts=counts)
        except ConfigError:  # a bad option, found by the method before any call: leave no empty file behind
            if created and os.fstat(descriptor).st_size == 0:
                with contextlib.suppress(OSError):
                    os.unlink(_through_links(output))
            raise
        chosen, to_move, unchanged = _final_lines(items, descriptor, output, job.prints, keep, positions)

        def moving() -> Iterator[bytes]:
            return (_line_at(descriptor, offset, length) for offset, length in to_move)

        def final() -> Iterator[bytes]:  # one line per item, in input order, read back one at a time
            for item, offset, length in zip(items, *chosen):
                record = _loads(_line_at(descriptor, offset, length).decode("utf-8"))
                record["input"] = item.record  # the same messages; the other input fields as given now
                yield _dump_line(record)

        def close() -> None:
            nonlocal descriptor
            os.close(descriptor)  # before the rename, which Windows refuses over an open file
            descriptor = -1

        try:
            if to_move:
                _move_lines(_removed_path(output), moving)  # first, and synced: nothing is gone before it is kept
            if not unchanged:
                _write_atomically(output, final(), before_rename=close)
        except OSError as exc:
            raise SelfMoAError(f"{output}: cannot rewrite it ({exc.strerror or exc}); every finished line is kept "
                               f"in it; fix that, then run the same command again") from exc
        failed = sorted(counts.pop("failed_at"))
        return {**counts, "moved": len(to_move), "failed_ids": [items[position].id for position in failed]}
    finally:
        if descriptor >= 0:
            os.close(descriptor)


def _append_results(todo: list[tuple[int, Item]], *, descriptor: int, size: int, output: str, job: _BatchJob,
                    counts: dict[str, Any]) -> int:
    """Run the items to do, appending each one's line as it finishes; return the file's size. A failed
    write stops the run, and so does a file that another program cut or emptied meanwhile."""
    lock = threading.Lock()
    started = time.monotonic()
    state: dict[str, Any] = {"size": size, "broken": None, "closed": False, "cut": None}

    def solve(position: int, item: Item) -> None:
        with _on_shared_pool(job.pool, (position,)):
            record = _answer(item, job.method, job.complete, job.options, job.prints[_id_key(item.id)],
                             trace=job.trace, diversity=job.diversity)
        line = _dump_line(record)
        with lock:
            if state["broken"] is not None or state["cut"] is not None or state["closed"]:
                return  # after a failed write nothing more is written: no line may follow a torn one
            try:
                now = os.fstat(descriptor).st_size
                if now != state["size"]:  # another program cut or emptied the file: append nothing after that
                    state["cut"] = _after_a_cut(descriptor, now)
                    return
                _write_all(descriptor, line)  # one whole line per item, appended
                now = os.fstat(descriptor).st_size
                if now != state["size"] + len(line):  # cut just before this write: take this line back off
                    os.ftruncate(descriptor, max(0, now - len(line)))
                    state["cut"] = _after_a_cut(descriptor, max(0, now - len(line)))
                    return
            except OSError as exc:
                state["broken"] = exc
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, state["size"])  # take back a partly written line, if we can
                return
            state["size"] += len(line)
            counts["done" if record["status"] == "ok" else "failed"] += 1
            if record["status"] != "ok":
                counts["failed_at"].append(position)
            if job.progress is not None:
                job.progress(counts["done"] + counts["failed"], counts["failed"], len(todo),
                             time.monotonic() - started)

    # Item orchestrators only wait on calls; the pool bounds the calls. Twice as many orchestrators as
    # call slots keep the pool fed while items start and finish; at most 4 x concurrency items are queued
    # ahead, so memory stays flat on huge inputs.
    runners = concurrent.futures.ThreadPoolExecutor(max_workers=2 * job.concurrency, thread_name_prefix="item")
    ahead = threading.Semaphore(4 * job.concurrency)
    bugs: list[BaseException] = []

    def finished(future: concurrent.futures.Future) -> None:
        ahead.release()
        bug = None if future.cancelled() else future.exception()
        if bug is not None:
            bugs.append(bug)  # not a model failure (those are recorded): a bug, re-raised

    try:
        for position, item in todo:
            ahead.acquire()
            if bugs or state["broken"] is not None:
                break
            runners.submit(solve, position, item).add_done_callback(finished)
        runners.shutdown(wait=True, cancel_futures=bool(bugs or state["broken"]))
        if bugs:
            raise bugs[0]
    finally:
        runners.shutdown(wait=False, cancel_futures=True)
        with lock:
            state["closed"] = True  # an item still running after an interrupt never writes
    broken = state["broken"]
    if broken is not None:
        kept = counts["skipped"] + counts["done"] + counts["failed"]
        raise SelfMoAError(f"{output}: cannot write ({broken.strerror or broken}); stopped with {kept} of "
                           f"{counts['total']} items in the file, every finished line kept; fix that, then run "
                           f"the same command again to do the rest") from broken
    if state["cut"] is not None:
        raise _cut_error(output, state["size"], state["cut"])
    return int(state["size"])


def _after_a_cut(descriptor: int, size: int) -> int:
    """The file shrank under this run (another program emptied or cut it): the unfinished start of a line
    that the cut left at its end is taken off, as the next run would take it off, so that the file stays
    one that every later run reads (whole lines, the cut items run again). Returns the size left."""
    start = size
    while start > 0:  # back to the last newline, a piece at a time
        piece = _line_at(descriptor, max(0, start - 65536), min(65536, start))
        newline = piece.rfind(b"\n")
        if newline >= 0:
            start = start - len(piece) + newline + 1
            break
        start -= len(piece)
    tail = _line_at(descriptor, start, min(size - start, len(_LINE_START)))
    if start < size and (tail.startswith(_LINE_START) or _LINE_START.startswith(tail)):
        os.ftruncate(descriptor, start)
        return start
    return size


def _answer(item: Item, method: str, complete: Callable[[Request], Any], options: Mapping[str, Any],
            fingerprint: str, *, trace: bool, diversity: bool) -> dict[str, Any]:
    """Run ``method`` on one item: its output record (status "ok" or "error"). A ConfigError propagates."""
    record: dict[str, Any] = {"selfmoa_batch": BATCH_FORMAT, "id": item.id}
    try:
        result = METHODS[method](item.messages, complete=complete, **options)
    except ConfigError:
        raise  # a bad option fails every item alike: the run stops, as for a bug
    except SelfMoAError as exc:
        record.update(status="error", error=str(exc))
        done_so_far = exc.partial
    else:
        record.update(status="ok", answer=result.answer)
        done_so_far = result
    record.update(method=method, fingerprint=fingerprint)
    if done_so_far is not None:
        summary = done_so_far.to_dict(trace=trace, diversity=diversity)
        record.update({key: summary[key] for key in ("usage", "calls", "requests", "retries", "diversity")
                       if key in summary})
        adapted = _adapted(done_so_far.trace)
        if adapted:
            record["adapted"] = adapted
        if trace:
            record["trace"] = summary["trace"]
    record["input"] = item.record
    return record


def answer_item(item: Item, *, method: str = "self-moa", complete: Callable[[Request], Any], trace: bool = False,
                diversity: bool = False, **options: Any) -> dict[str, Any]:
    """The output record of one item, exactly as ``run_batch`` writes it (a dict; ``output_line`` makes the line).

    For engines that schedule the items themselves (a Ray Data pipeline, a queue worker): each runs items
    one by one, and ``merge_outputs`` then checks and joins what they wrote. ``options`` are the method's.

    >>> def toy(request):
    ...     return "an answer of " + request.model
    >>> record = answer_item(check_items([{"id": "q1", "prompt": "Name a prime."}])[0], model="a", n=2, complete=toy)
    >>> record["id"], record["status"], record["answer"], record["input"]
    ('q1', 'ok', 'an answer of a', {'id': 'q1', 'prompt': 'Name a prime.'})
    """
    _check(method in METHODS, "method", method, "unknown method", f"pass one of {', '.join(METHODS)}")
    _check(isinstance(item, Item), "item", "...", "answer_item takes an Item", "pass check_items([record])[0]")
    fingerprint = _fingerprint(item.messages, method, _batch_parameters(method, options))
    return _answer(item, method, complete, options, fingerprint, trace=trace, diversity=diversity)


def fingerprint(item: Item, *, method: str = "self-moa", **options: Any) -> str:
    """The fingerprint of an item's output line under ``method`` and ``options`` (spec/batch.md, section 4).

    Options that only say how calls run (``concurrency``, ``use_n``) may be given; they change nothing.
    """
    _check(method in METHODS, "method", method, "unknown method", f"pass one of {', '.join(METHODS)}")
    options = {name: value for name, value in options.items() if name not in ("concurrency", "use_n")}
    return _fingerprint(item.messages, method, _batch_parameters(method, options))


def output_line(record: Mapping[str, Any]) -> bytes:
    """The output line of a record (UTF-8 JSON ending in ``\\n``), as ``run_batch`` writes it."""
    return _dump_line(dict(record))


def _cut_error(output: str, expected: int, size: int) -> SelfMoAError:
    return SelfMoAError(f"{output} was cut from {expected} to {size} bytes by another program while this run "
                        f"wrote to it; the run stopped and wrote nothing after the cut; run the same command again "
                        f"to redo the items whose lines were lost")


def _final_lines(items: list[Item], descriptor: int, output: str, prints: dict[tuple, str], size: int,
                 positions: dict[tuple, int]) -> tuple[tuple[Sequence[int], Sequence[int]], list[tuple[int, int]],
                                                       bool]:
    """Where each item's final line is in the file (offsets and lengths, in input order), where the lines to
    move out of it are, and whether the file already holds exactly the rewritten output. The file is read
    line by line; only positions are kept.

    First proves that ``output`` still names the file this run appended to (``descriptor``), and that no
    other program cut it since (its ``size`` is what this run left).
    """
    try:
        ours = os.path.samestat(os.fstat(descriptor), os.stat(output))
    except OSError:
        ours = False
    if not ours:
        rescue = _sibling(output, f"recovered-{os.getpid()}")
        keep, _ = _scan_output(_pieces(descriptor), output, lambda *line: None)
        _write_atomically(rescue, _pieces(descriptor, 0, keep))  # what this run appended to, piece by piece
        raise SelfMoAError(f"{output} was moved or replaced by another program while this run wrote to it, so it "
                           f"was not rewritten; this run's lines are saved in {rescue}")
    now = os.fstat(descriptor).st_size
    if now != size:
        raise _cut_error(output, size, _after_a_cut(descriptor, now) if now < size else now)
    import array

    offsets, lengths = array.array("q", [-1]) * len(items), array.array("q", [0]) * len(items)
    ok = bytearray(len(items))
    to_move = []
    state = {"lines": 0, "in_order": True}

    def choose(record: dict, offset: int, line: bytes) -> None:
        key = _id_key(record["id"])
        position = positions.get(key)
        number, state["lines"] = state["lines"], state["lines"] + 1
        if position is None:
            to_move.append((offset, len(line)))  # an item no longer in the input
            state["in_order"] = False
        elif record["fingerprint"] != prints[key]:
            if record["status"] == "ok":
                to_move.append((offset, len(line)))  # an answer to an older prompt or configuration
            state["in_order"] = False
        else:
            if record["status"] == "ok" or not ok[position]:  # the last "ok" line wins, else the last "error"
                offsets[position], lengths[position] = offset, len(line)
                ok[position] = record["status"] == "ok"
            rewritten = number == position and _dump_line({**record, "input": items[position].record})
            if state["in_order"] and rewritten != line + b"\n":  # not already the line the rewrite would write
                state["in_order"] = False

    keep, end = _scan_output(_pieces(descriptor), output, choose)
    missing = [items[i].id for i, offset in enumerate(offsets) if offset < 0]
    if missing:  # every item has a line once every item has run, unless another program took some out
        raise SelfMoAError(f"{output} lost the lines of {len(missing)} items (the first: {missing[0]!r}) while this "
                           f"run wrote to it; another program must have changed it; run the same command again to "
                           f"redo them")
    unchanged = bool(state["in_order"]) and state["lines"] == len(items) and keep == end
    return (offsets, lengths), to_move, unchanged


# --- AlpacaEval -----------------------------------------------------------------------------------------


def _instruction(record: dict) -> str:
    """The instruction of an input record, as AlpacaEval shows it: its text, or its last user message."""
    if "instruction" in record or "prompt" in record:
        return str(record.get("instruction", record.get("prompt")))
    users = [message["content"] for message in record.get("messages", []) if message.get("role") == "user"]
    return users[-1] if users else ""


def alpaca_eval_outputs(records: Iterable[dict], generator: str) -> list[dict]:
    """AlpacaEval's model-outputs records (``instruction``, ``output``, ``generator``) of the answered items
    among output lines (``dataset`` is copied from the input when it has one)."""
    out = []
    for record in records:
        if record.get("status") != "ok":
            continue
        given = record["input"]
        entry = {"instruction": _instruction(given), "output": record["answer"], "generator": generator}
        if "dataset" in given:
            entry["dataset"] = given["dataset"]
        out.append(entry)
    return out


def _write_alpaca_eval(records_path: str, path: str, generator: str) -> int:
    """Write AlpacaEval's model-outputs JSON to ``path`` (atomically) from the finished output file
    ``records_path``; returns how many entries it holds."""
    records, _ = _parse_output(_read_file(records_path), records_path)
    entries = alpaca_eval_outputs((record for record, _ in records), generator)
    try:
        _write_atomically(path, _escape_unsafe(json.dumps(entries, indent=2, ensure_ascii=False)).encode("utf-8")
                          + b"\n")
    except OSError as exc:
        raise SelfMoAError(f"{path}: cannot write it ({exc.strerror or exc}); the answers are kept in "
                           f"{records_path}; fix that, then run the same command again") from exc
    return len(entries)


def _generator_name(method: str, options: Mapping[str, Any]) -> str:
    """The AlpacaEval generator name of a configuration: method, models, n, window and carry, so that two
    configurations never share a leaderboard row (characters other than letters, digits, ``.+-`` become ``_``).

    >>> _generator_name("self-moa-seq", {"model": "Qwen/Qwen2-7B", "n": 30, "window": 6, "carry": 3})
    'selfmoa-self-moa-seq-Qwen_Qwen2-7B-n30-w6-r3'
    >>> _generator_name("moa", {"proposers": ["a", "b"], "aggregator": "z", "layers": 3})
    'selfmoa-moa-a+b-agg-z-L3'
    """
    def name(model: Any) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]", "_", str(model))

    layers = options.get("layers", 2)
    if method == "moa":
        proposers = list(options.get("proposers") or [])
        nested = bool(proposers) and not isinstance(proposers[0], str)
        layered = proposers if nested else [proposers]
        shown = "__".join("+".join(map(name, layer)) for layer in layered)
        parts = ["moa", shown, f"agg-{name(options.get('aggregator'))}"]
        if layers != 2 and not nested:
            parts.append(f"L{layers}")
        return "selfmoa-" + "-".join(parts)
    model = options.get("model")
    parts = [method, name(model), f"n{options.get('n', 6)}"]
    if method == "self-moa-seq":
        parts += [f"w{options.get('window', 6)}", f"r{options.get('carry', 3)}"]
    if options.get("aggregator") not in (None, model):
        parts.append(f"agg-{name(options['aggregator'])}")
    if method == "self-moa" and layers != 2:
        parts.append(f"L{layers}")
    return "selfmoa-" + "-".join(parts)


def _check_alpaca_target(path: str, records_path: str, items: Sequence[Item]) -> None:
    """Refuse (ConfigError) to replace ``path`` unless it is absent, empty, or a selfmoa AlpacaEval output of
    this input: every entry's instruction is one of these items', and its output is an answer recorded in the
    selfmoa records beside it (``records_path`` or the lines moved out of it)."""
    try:
        data = _read_file(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass another --output") from None
    if not data.strip():
        return
    try:
        entries = _loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        entries = None
    answered: set[tuple[str, Any]] = set()
    for source in (records_path, _removed_path(records_path)):
        try:
            records, _ = _parse_output(_read_file(source), source)
        except (OSError, ConfigError):
            continue
        answered.update((_instruction(record["input"]), record["answer"]) for record, _ in records
                        if record["status"] == "ok")
    instructions = {_instruction(item.record) for item in items}
    ours = isinstance(entries, list) and all(
        isinstance(entry, dict) and {"instruction", "output", "generator"} <= entry.keys()
        <= {"instruction", "output", "generator", "dataset"}
        and isinstance(entry["instruction"], str) and isinstance(entry["output"], str)
        and entry["instruction"] in instructions and (entry["instruction"], entry["output"]) in answered
        for entry in entries)
    if not ours:
        raise ConfigError(f"{path} is not a selfmoa AlpacaEval output of this input (each of its outputs must be "
                          f"an answer recorded in {records_path}, to an instruction of this input), so it was "
                          f"left untouched; pass another --output, or move this file away")


def batch_command(args: argparse.Namespace, options: dict[str, Any], client: HTTPClient,
                  environ: Mapping[str, str] | None = None) -> int:
    """The ``-i FILE -o FILE`` command of ``selfmoa``: run the batch the flags describe, print a summary on stderr;
    returns the exit status. ``selfmoa.main`` parses and checks the flags and builds ``options`` and ``client``;
    ``environ`` (the environment the keys came from) lets the summary explain a key that was held back."""
    if args.generator is not None and (args.format != "alpaca_eval" or not args.generator.strip()):
        raise ConfigError(f"--generator {args.generator!r}: names the AlpacaEval generator, so it goes with "
                          f"--format alpaca_eval and is not empty; add --format alpaca_eval, or drop --generator")
    shard = None
    if args.shard is not None:
        shard = parse_shard(args.shard)
        if args.format == "alpaca_eval":
            raise ConfigError("--format alpaca_eval: a shard answers only part of the input, and AlpacaEval needs "
                              "every instruction; drop it here, and pass it to selfmoa merge, which joins the shards")
    items = read_items(args.input)
    if shard is not None:
        every = len(items)
        items = shard_items(items, *shard)
        print(f"selfmoa: shard {shard[0]}/{shard[1]}: {len(items)} of the {every} items of {args.input}",
              file=sys.stderr)
    records_path = args.output + ".jsonl" if args.format == "alpaca_eval" else args.output
    try:
        with _output_lock(records_path):  # held until outputs.json is written, too
            if args.format == "alpaca_eval":
                _check_alpaca_target(args.output, records_path, items)
            return _run_batch_command(args, options, client, items, records_path, environ or {})
    except ConfigError:
        raise
    except (SelfMoAError, OSError) as exc:  # a failed read or write: what was finished is kept
        print(f"selfmoa: {exc}", file=sys.stderr)
        return 1


class _FailedCalls:
    """A batch command's completion function: the client, counting the calls that failed for good by cause (the
    model and the reason), so that the summary names each cause once, however many items it hit."""

    def __init__(self, client: HTTPClient):
        self.client = client
        self.causes: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Reply:
        try:
            return self.client(request)
        except ModelError as exc:
            with self._lock:
                cause = (exc.model, _reason(str(exc)))
                self.causes[cause] = self.causes.get(cause, 0) + 1
            raise

    def report(self, args: argparse.Namespace, environ: Mapping[str, str]) -> list[str]:
        lines = [f"{count} call{'s' if count != 1 else ''} failed for good: {reason}"
                 for (_, reason), count in sorted(self.causes.items(), key=lambda item: -item[1])]
        if lines:
            lines.append("(an item goes on without a failed proposer or sample while at least --min-ok of its layer "
                         "succeed, and fails otherwise; --trace records every call in the item's line)")
        return lines + missing_models_report(self.causes, self.client) + key_report(self.causes, args, environ)


def _run_batch_command(args: argparse.Namespace, options: dict[str, Any], client: HTTPClient, items: list[Item],
                       records_path: str, environ: Mapping[str, str]) -> int:
    show_progress = sys.stderr.isatty()

    def progress(finished: int, failed: int, total: int, elapsed: float) -> None:
        rate = finished / elapsed if elapsed > 0 else 0.0
        eta = f"{(total - finished) / rate:.0f}s" if rate > 0 else "?"
        sys.stderr.write(f"\r{finished}/{total} done, {failed} failed, {rate:.2f} items/s, ETA {eta}   ")
        sys.stderr.flush()

    failures = _FailedCalls(client)
    try:
        with client:
            counts = run_batch(items, records_path, method=args.method, complete=failures, trace=args.trace,
                               diversity=args.diversity, progress=progress if show_progress else None, **options)
    except KeyboardInterrupt:
        client.abort()  # calls still in flight end now, so that the process can exit at once
        print(f"\nselfmoa: interrupted; finished items are in {records_path}; run the same command to resume",
              file=sys.stderr)
        return 130
    if show_progress:
        sys.stderr.write("\n")

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    if counts["torn_bytes"]:
        say(f"selfmoa: {records_path}: cut off a torn last line left by an interrupted run "
            f"({counts['torn_bytes']} bytes); its item ran again")
    if counts["changed_prompt"] or counts["changed_parameters"]:
        say(f"selfmoa: ran {counts['changed_prompt'] + counts['changed_parameters']} item(s) again because their "
            f"line no longer matched: {counts['changed_prompt']} with a changed prompt, "
            f"{counts['changed_parameters']} with a changed method or parameters")
    if counts["moved"]:
        say(f"selfmoa: moved {counts['moved']} line(s) of items no longer in the input, or of answers replaced "
            f"by a rerun, to {_removed_path(records_path)}")
    for line in failures.report(args, environ):
        say(f"selfmoa: {line}")
    say(f"selfmoa: {counts['done']} answered, {counts['failed']} failed, {counts['skipped']} already done "
        f"(of {counts['total']}); results in {records_path}")
    servers = _servers_of(client).get("servers", {})
    if len(servers) > 1:
        say("selfmoa: requests per server: " + ", ".join(f"{url} {count['requests']} ({count['failed']} failed)"
                                                         for url, count in servers.items()))
    if counts["failed_ids"]:
        failed = [json.dumps(item_id) for item_id in counts["failed_ids"]]  # 1 vs "1"; and an id's control
        # characters are escaped, never sent to the terminal
        shown = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
        say(f"selfmoa: failed items (status \"error\" in {records_path}): {shown}; run the same command to "
            f"retry them" + (f" and to write {args.output}" if args.format == "alpaca_eval" else ""))
        if args.format == "alpaca_eval":
            say(f"selfmoa: {args.output} was not written: AlpacaEval needs an answer to every instruction")
        return 1
    if args.format == "alpaca_eval":
        generator = args.generator or _generator_name(args.method, options)
        written = _write_alpaca_eval(records_path, args.output, generator)
        say(f"selfmoa: wrote {written} AlpacaEval outputs to {args.output} (generator {generator!r})")
    return 0




# ======================================================================================================
# Shards: one input run as N independent batches, then merged
# ======================================================================================================
#
# `--shard K/N` runs only the items whose id hashes to K (spec/batch.md, section 7): the hash depends on
# the id alone, so an item's shard does not move when the input grows or is reordered, and any scheduler
# (a Slurm array, a Kubernetes indexed Job, GNU parallel) can run the N shards as N ordinary batch runs,
# each with its own output file, lock and resume. `merge_outputs` then checks that the shards answer every
# input item exactly once, for the input's fingerprints, and writes one output in input order.


def shard_of(item_id: str | int, shards: int) -> int:
    """The shard (0 to ``shards`` - 1) of an item id: the first 8 bytes of the sha256 of ``"int:"`` and the
    decimal integer, or ``"str:"`` and the UTF-8 string, read as a big-endian number, modulo ``shards``.

    >>> [shard_of(item_id, 3) for item_id in (0, 3, "0", "alpaca-17")]
    [1, 2, 1, 0]
    """
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise ConfigError(f"id={item_id!r}: an item id is a string or an integer; pass one")
    _check(_is_positive_int(shards), "shards", shards, "the number of shards is an integer >= 1", "pass N >= 1")
    key = f"int:{item_id}" if isinstance(item_id, int) else f"str:{item_id}"
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % shards


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as (K, N), with 0 <= K < N; ConfigError naming --shard otherwise.

    >>> parse_shard("2/3")
    (2, 3)
    """
    found = re.fullmatch(r"([0-9]{1,9})/([0-9]{1,9})", text.strip())
    if not found:
        raise ConfigError(f"--shard {text!r}: expected K/N, two whole numbers, e.g. --shard 0/4 for the first of "
                          f"four shards")
    index, count = int(found[1]), int(found[2])
    if count < 1 or index >= count:
        raise ConfigError(f"--shard {text!r}: K counts from 0 to N-1 (N >= 1), like a Kubernetes Job's "
                          f"$JOB_COMPLETION_INDEX and a Slurm array --array=0-{max(count, 1) - 1}; pass "
                          f"--shard {max(count, 1) - 1 if count else 0}/{max(count, 1)} for the last shard")
    return index, count


def shard_items(items: Iterable[Item], index: int, count: int) -> list[Item]:
    """The items of shard ``index`` of ``count``, in input order."""
    _check(_is_positive_int(count), "count", count, "the number of shards is an integer >= 1", "pass N >= 1")
    _check(isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count, "index", index,
           f"a shard index counts from 0 to {count - 1}", "pass 0 <= index < count")
    return [item for item in items if shard_of(item.id, count) == index]


@dataclasses.dataclass(frozen=True)
class _Located:
    """Where one output line of a source file is, and what it says."""

    source: int  # index into the sources
    number: int  # line number, from 1
    offset: int
    length: int
    status: str
    current: bool  # its fingerprint is the input's


def _scan_source(path: str, source: int, prints: Mapping[tuple, str],
                 found: dict[tuple, list[_Located]], foreign: list[str]) -> int:
    """Index every line of one shard output (without holding the file in memory); returns its line count.

    ConfigError, naming the file and line, when it is not a selfmoa output file or ends in a cut-off line.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}); pass the output file of each shard "
                          f"run") from None
    with file:
        import stat

        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ConfigError(f"{path}: not a regular file; pass the output file of each shard run")
        offset, number = 0, 0
        for line in file:
            number += 1
            problem: str | None
            try:
                record = _loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                record, problem = None, "it is not UTF-8 JSON"
            else:
                problem = _record_problem(record)
            if problem is not None:
                if not line.endswith(b"\n"):
                    raise ConfigError(f"{path}: its last line is cut off (its run was interrupted while writing "
                                      f"it), so that shard is not finished; run that shard's command again, "
                                      f"then merge")
                raise ConfigError(f"{path}: line {number} is not a selfmoa batch record ({problem}); pass only "
                                  f"the output files of the shard runs")
            assert isinstance(record, dict)
            key = _id_key(record["id"])
            if key not in prints:
                foreign.append(f"{path} line {number} (id {json.dumps(record['id'])})")
            else:
                found.setdefault(key, []).append(_Located(source, number, offset, len(line), record["status"],
                                                          record["fingerprint"] == prints[key]))
            offset += len(line)
    return number


def _listed(entries: Sequence[str], separator: str, limit: int = 10) -> str:
    shown = separator.join(entries[:limit])
    return shown + (f"; and {len(entries) - limit} more" if len(entries) > limit else "")


def merge_outputs(items: Sequence[Item], sources: Sequence[str], output: str, *, method: str = "self-moa",
                  keep_failed: bool = False, **options: Any) -> dict[str, int]:
    """Join the outputs of a run in shards (``sources``) into ``output``: one line per item, in input order.

    ``method`` and ``options`` are the method's, as the shards ran with (they make the fingerprints; the
    options that only say how calls run, such as ``concurrency`` and ``use_n``, may be left out). Every item
    must have exactly one line across the sources, status "ok", for its current fingerprint. Otherwise
    SelfMoAError names every missing, duplicated, failed, stale and foreign line, and nothing is written.
    ``keep_failed=True`` accepts an item's one "error" line and writes it, as a batch run does (a batch rerun
    on ``output`` then retries only those items).
    ConfigError when a source is not a selfmoa output file (or ends in a cut-off line), or ``output`` is a
    source, the input, or a file that is not a selfmoa output file. Lines of an existing ``output`` that the
    merge replaces are kept in its ``.removed`` sibling, as a batch run keeps them. Returns the counts
    ``total`` (items written), ``sources`` and ``moved``.
    """
    _check(method in METHODS, "method", method, "unknown method", f"pass one of {', '.join(METHODS)}")
    items = list(items)
    _check(bool(items) and all(isinstance(item, Item) for item in items), "items", "...",
           "merge_outputs takes the input's Item objects", "pass read_items(path)")
    _check(len({_id_key(item.id) for item in items}) == len(items), "items", "...", "two items share an id",
           "give every item its own id (check_items finds the duplicates)")
    sources = list(sources)
    _check(bool(sources) and all(isinstance(source, str) for source in sources), "sources", sources,
           "the shard outputs are a non-empty list of paths", "pass the output file of every shard run")
    parameters = _batch_parameters(method, {k: v for k, v in options.items() if k not in ("concurrency", "use_n")})
    prints = {_id_key(item.id): _fingerprint(item.messages, method, parameters) for item in items}
    target = os.path.realpath(output)
    for source in sources:
        if os.path.realpath(source) == target:
            raise ConfigError(f"{output}: it is also one of the shard outputs to merge; pass another -o file")
    if len({os.path.realpath(source) for source in sources}) < len(sources):
        twice = [source for number, source in enumerate(sources)
                 if os.path.realpath(source) in {os.path.realpath(other) for other in sources[:number]}]
        raise ConfigError(f"{twice[0]}: given twice; pass each shard's output once")
    found: dict[tuple, list[_Located]] = {}
    foreign: list[str] = []
    for number, source in enumerate(sources):
        _scan_source(source, number, prints, found, foreign)
    missing, duplicated, failed, stale = [], [], [], []
    for item in items:
        lines = found.get(_id_key(item.id), [])
        shown = json.dumps(item.id)
        where = ", ".join(f"{sources[line.source]} line {line.number}" for line in lines)
        if not lines:
            missing.append(shown)
        elif len(lines) > 1:
            duplicated.append(f"id {shown} in {where}")
        elif not lines[0].current:
            stale.append(f"id {shown} in {where}")
        elif lines[0].status != "ok" and not keep_failed:
            failed.append(f"id {shown} in {where}")
    problems = [
        (missing, "item(s) of the input have no line in any shard output (is a shard's output missing, or "
                  "was it run with another N?)", "ids "),
        (duplicated, "item(s) have more than one line (were shards run with different N, or one output "
                     "given under two names?)", ""),
        (failed, "item(s) failed (status \"error\"); run their shard's command again to retry them", ""),
        (stale, "line(s) answer another prompt or configuration than this input with these flags (their "
                "fingerprint differs); give merge the method flags the shards ran with, or run the shard "
                "again", ""),
        (foreign, "line(s) answer an id that is not in this input (an output of another input?)", ""),
    ]
    if any(entries for entries, _, _ in problems):
        listed = "\n".join(f"  {len(entries)} {what}: {prefix}{_listed(entries, ', ' if prefix else '; ')}"
                           for entries, what, prefix in problems if entries)
        raise SelfMoAError(f"merge: the shard outputs do not answer each of the {len(items)} input items exactly "
                           f"once, so nothing was written:\n{listed}")
    with _output_lock(output):
        moved = _write_merged(items, sources, found, output)
    return {"total": len(items), "sources": len(sources), "moved": moved}


def _write_merged(items: list[Item], sources: list[str], found: Mapping[tuple, list[_Located]], output: str) -> int:
    """Write the merged output atomically, streaming it line by line; returns the lines moved out of the old one."""
    try:
        existing, _ = _parse_output(_read_file(output), output)
    except FileNotFoundError:
        existing = []
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    path = _through_links(output)
    temporary = f"{path}.tmp-{os.getpid()}"
    files: dict[int, Any] = {}
    written: set[bytes] = set()
    try:
        with open(temporary, "wb") as out:
            for item in items:
                (line,) = found[_id_key(item.id)]
                if line.source not in files:
                    files[line.source] = open(sources[line.source], "rb")  # noqa: SIM115 (closed below)
                file = files[line.source]
                file.seek(line.offset)
                record = _loads(file.read(line.length).decode("utf-8"))
                record["input"] = item.record  # the same messages; the other input fields as given now
                data = _dump_line(record)
                out.write(data)
                if existing:
                    written.add(data.rstrip(b"\n"))
            out.flush()
            os.fsync(out.fileno())
        to_move = [line.rstrip(b"\n") for record, line in existing
                   if record["status"] == "ok" and line.rstrip(b"\n") not in written]
        if to_move:
            _move_lines(_removed_path(output), to_move)  # kept before the old file is replaced
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    finally:
        for file in files.values():
            file.close()
    return len(to_move)


MERGE_DESCRIPTION = """\
Join the outputs of a batch run in shards (selfmoa -i FILE -o OUT.K --shard K/N) into one
output with one line per input item, in input order, as a single batch run writes it.
Every item of FILE must have exactly one line across the shard outputs, answered ("ok"),
for the same prompt and method flags: give merge the method flags the shards ran with
(flags that only say how calls run, such as --concurrency, may be given and do nothing).
Otherwise merge names every missing, duplicated, failed, stale or foreign line and writes
nothing."""

MERGE_EPILOG = """\
example (three shards, then the merge):
  for k in 0 1 2; do selfmoa -m qwen -i in.jsonl -o out.$k.jsonl --shard $k/3 & done; wait
  selfmoa merge -m qwen -i in.jsonl -o all.jsonl out.0.jsonl out.1.jsonl out.2.jsonl

exit status:
  0 merged, 1 the shard outputs do not answer every item exactly once (nothing written),
  2 a usage error or a file that is not a selfmoa output (the message names it)."""


def build_merge_parser() -> argparse.ArgumentParser:
    """The parser of ``selfmoa merge``."""
    from selfmoa import _method_arguments

    parser = argparse.ArgumentParser(prog="selfmoa merge", description=MERGE_DESCRIPTION, epilog=MERGE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("outputs", nargs="+", metavar="SHARD_OUTPUT", help="the output file of each shard run")
    add("-i", "--input", metavar="FILE", required=True, help="the input file the shards ran on")
    add("-o", "--output", metavar="FILE", required=True, help="the merged output file")
    add("--format", choices=["jsonl", "alpaca_eval"],
        help="alpaca_eval writes AlpacaEval's model-outputs JSON to --output, keeping the JSONL in FILE.jsonl "
             "(default: jsonl)")
    add("--generator", metavar="NAME", help="alpaca_eval: the generator name (default: selfmoa- followed by "
        "the method, models, n, window and carry)")
    _method_arguments(parser)
    parser.set_defaults(json=False, stream=None, trace=False, diversity=False, shard=None, prompt=None)
    return parser


def merge_command(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """``selfmoa merge``: returns the exit status."""
    from selfmoa import _method_options, _refuse

    parser = build_merge_parser()
    args = parser.parse_args(argv)
    try:
        options = _method_options(args, environ)
        if args.generator is not None and (args.format != "alpaca_eval" or not args.generator.strip()):
            raise ConfigError(f"--generator {args.generator!r}: names the AlpacaEval generator, so it goes with "
                              f"--format alpaca_eval and is not empty; add --format alpaca_eval, or drop --generator")
        if os.path.abspath(args.input) == os.path.abspath(args.output):
            raise ConfigError("--output is the --input file; pass another path, so that the input is kept")
        items = read_items(args.input)
        records_path = args.output + ".jsonl" if args.format == "alpaca_eval" else args.output
        with _output_lock(records_path):
            if args.format == "alpaca_eval":
                if any(os.path.realpath(source) == os.path.realpath(args.output) for source in args.outputs):
                    raise ConfigError(f"{args.output}: it is also one of the shard outputs to merge; pass another "
                                      f"-o file")
                _check_alpaca_target(args.output, records_path, items)
            counts = merge_outputs(items, args.outputs, records_path, method=args.method, **options)
            say = f"selfmoa: merged {counts['total']} items from {counts['sources']} shard outputs into {records_path}"
            if counts["moved"]:
                say += f"; moved {counts['moved']} replaced line(s) to {_removed_path(records_path)}"
            print(say, file=sys.stderr)
            if args.format == "alpaca_eval":
                generator = args.generator or _generator_name(args.method, options)
                written = _write_alpaca_eval(records_path, args.output, generator)
                print(f"selfmoa: wrote {written} AlpacaEval outputs to {args.output} (generator {generator!r})",
                      file=sys.stderr)
    except ConfigError as exc:
        return _refuse(parser, exc)
    except (SelfMoAError, OSError) as exc:
        print(f"selfmoa: {exc}", file=sys.stderr)
        return 1
    return 0
