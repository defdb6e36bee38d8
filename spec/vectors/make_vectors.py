"""Write the conformance vectors of spec/vectors/ from the rules of spec/methods.md and spec/wire.md.

This script is a second, deliberately plain statement of the methods: loops over the rules, no threads, no
selfmoa import. The prompt format of wire.md section 6 is written again here, and the default instruction
is read from wire.md itself, so the vectors, the spec and selfmoa cannot drift apart unnoticed
(tests/test_vectors.py checks that running this script would change no file). spec/vectors.md describes
the schema. Regenerate with:

    python3 spec/vectors/make_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
WIRE = HERE.parent / "wire.md"
MAX_N = 16  # the most samples asked for in one request (methods.md, "Sampling, seeds and n")


# --- The aggregator prompt, from wire.md section 6 -------------------------------------------------------


def default_instruction() -> str:
    """The default instruction: the block quote that follows 'The default instruction' in wire.md."""
    text = WIRE.read_text(encoding="utf-8")
    quote = []
    for line in text[text.index("The default instruction"):].splitlines()[1:]:
        if line.startswith(">"):
            quote.append(line[1:].strip())
        elif quote:
            break
    return " ".join(quote)


def key_for(texts: list[str]) -> str:
    """The first 8 hex digits of sha256(t1 NUL t2 ... NUL tN NUL c) for the first c found in no text."""
    counter = 0
    while True:
        key = hashlib.sha256(("\0".join(texts) + "\0" + str(counter)).encode("utf-8")).hexdigest()[:8]
        if all(key not in text for text in texts):
            return key
        counter += 1


def block(references: list[str], instruction: str) -> str:
    count, key = len(references), key_for(references)
    parts = [f"<<<response {i} of {count}, key {key}>>>\n{text}\n<<<end of response {i}, key {key}>>>"
             for i, text in enumerate(references, 1)]
    return instruction + "\n\nResponses from models:\n\n" + "\n\n".join(parts)


def inject(messages: list[dict], references: list[str], instruction: str) -> list[dict]:
    """The messages an aggregator (or a proposer of layer 2 or later) is sent."""
    out = [dict(m) for m in messages]
    if not references:
        return out
    if out[0]["role"] == "system":
        out[0]["content"] = out[0]["content"] + "\n\n" + block(references, instruction)
    else:
        out.insert(0, {"role": "system", "content": block(references, instruction)})
    return out


def strip_markers(text: str, key: str) -> str:
    """A reply without the marker lines of its prompt's block (key ``key``), as wire.md section 6 says."""
    marker = re.compile(rf"[ \t]*<{{0,3}}[ \t]*(end of )?response \d+( of \d+)?, key {key}[ \t]*>{{0,3}}[ \t\r]*")
    return "\n".join(line for line in text.split("\n") if not marker.fullmatch(line))


def remove_thoughts(text: str) -> str:
    """A reply without the thoughts that open it (wire.md section 2): while it starts, blanks aside, with
    <think>, everything through the next </think> goes, and the blanks after it; an unclosed one takes the rest."""
    blanks = " \t\r\n"
    rest = text.lstrip(blanks)
    if not rest.startswith("<think>"):
        return text
    while rest.startswith("<think>"):
        end = rest.find("</think>", len("<think>"))
        if end < 0:
            return ""
        rest = rest[end + len("</think>"):].lstrip(blanks)
    return rest


def thinking(text: str, who: str) -> str:
    """``text`` as a thinking model served without a reasoning parser writes it: its thoughts first."""
    return f"<think>\nLet me think about {who}. <think> is a tag.\n</think>\n\n{text}"


LAST_LINE = re.compile(r"\n<<<end of response (\d+), key ([0-9a-f]{8})>>>\s*\Z")


def read_back(messages: list[dict]) -> list[str]:
    """The references a request shows: those of the block that ends its system message (wire.md section 6).
    A layer-1 request of a prompt that already holds a block (from an upstream MoA) shows that block's."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    found = LAST_LINE.search(system)
    if not found:
        return []
    count, key = int(found.group(1)), found.group(2)
    position, out = system.rindex(f"<<<response 1 of {count}, key {key}>>>\n"), []
    for i in range(1, count + 1):
        begin, end = f"<<<response {i} of {count}, key {key}>>>\n", f"\n<<<end of response {i}, key {key}>>>"
        start = system.index(begin, position)
        stop = system.index(end, start + len(begin) - 1)
        out.append(system[start + len(begin):stop])
        position = stop + len(end)
    return out


def block_key(messages: list[dict]) -> str | None:
    """The key of the block that ends a request's system message, if it holds one (wire.md section 6)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    found = LAST_LINE.search(system)
    return found.group(2) if found else None


def pieces_of(text: str, size: int = 7) -> list[str]:
    """A streamed reply: the text in pieces of ``size`` characters (the last may be shorter)."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


# --- A scripted run: every request, in trace order, with its reply ---------------------------------------


class Script:
    """Collects the requests of one run in trace order (layer, round, proposers before aggregator, position)."""

    def __init__(self, prompt, instruction, seed, temperature, max_tokens, agg_temperature, agg_max_tokens):
        self.prompt, self.instruction, self.seed = prompt, instruction, seed
        self.proposer = (temperature, max_tokens)
        self.aggregator = (agg_temperature, agg_max_tokens)
        self.requests: list[dict] = []

    def ask(self, role, layer, round_, model, n, seed, references, carried, replies=None, error=None, *,
            indices, positions, bug=None, stream=False, pieces=None):
        """One request in trace order. ``indices`` are the positions it asks for, ``positions`` where the
        references it shows stood (the trace's ``references``); the reply is texts, an error or a bug."""
        temperature, max_tokens = self.proposer if role == "proposer" else self.aggregator
        messages = inject(self.prompt, list(references), self.instruction)
        shown = read_back(messages)
        assert not references or shown == list(references), "a built prompt reads back what went in"
        entry = {"role": role, "layer": layer, "round": round_, "model": model, "n": n, "seed": seed,
                 "temperature": temperature, "max_tokens": max_tokens, "stream": stream, "stop": None,
                 "references": shown, "carried": carried, "messages": messages}
        key = block_key(messages)
        if error is not None:
            entry["error"] = error
            outputs, failure = [], f"model '{model}': HTTP {error['status']}: {error['message']}"
        elif bug is not None:
            entry["bug"] = bug
            outputs, failure = [], f"{bug['type']}: {bug['message']}"
        elif not replies or replies[0] is None and n == 1:  # no usable text at all: a failed request
            entry["replies"] = list(replies)
            outputs, failure = [], f"model '{model}': the reply holds no text"
        else:
            entry["replies"] = list(replies)
            if pieces is not None:
                assert stream, "a model streams only a request that asks for it"
                entry["pieces"] = list(pieces)
            outputs = [text if text is None else remove_thoughts(text) for text in replies[:n]]
            outputs = [text if text is None or key is None else strip_markers(text, key) for text in outputs]
            failure = None
        entry["trace"] = {"indices": list(indices), "references": list(positions), "outputs": outputs,
                          "error": failure}
        self.requests.append(entry)
        return entry

    def samples(self, layer, model, first, count, references, positions, text, use_n, honour_n, failure, bug,
                extra=False, unusable=(), trailing=False, empty=False):
        """Samples first..first+count-1 of one prompt: one request with n (split at MAX_N) when use_n,
        else one request each; a server ignoring n gets one request per missing sample, seed S + i.
        ``failure(model, position)`` and ``bug(model, position)`` give a request's error or bug, or None.
        With extra, the server returns one choice more than asked, which must be ignored. A position in
        unusable gets a choice without usable text (null) in the grouped reply, and is asked for alone; with
        trailing, a reply to n > 1 holds its first text and then nulls, each asked for alone; with empty, the
        reply holds no choice at all, which fails every position it asked for (none is asked again).
        Returns position -> text as the next layer sees it, or None for a sample whose request failed."""
        out: dict[int, str | None] = {}
        sizes = []
        if use_n:
            for start in range(first, first + count, MAX_N):
                sizes.append((start, min(MAX_N, first + count - start)))
        else:
            sizes = [(i, 1) for i in range(first, first + count)]
        key = block_key(inject(self.prompt, list(references), self.instruction))
        seen = ((lambda t: remove_thoughts(t)) if key is None  # noqa: E731
                else (lambda t: strip_markers(remove_thoughts(t), key)))
        for start, size in sizes:
            seed = None if self.seed is None else self.seed + start
            indices = list(range(start, start + size))
            if failure(model, start) or bug(model, start):
                self.ask("proposer", layer, None, model, size, seed, references, 0, error=failure(model, start),
                         bug=bug(model, start), indices=indices, positions=positions)
                out.update({i: None for i in indices})
                continue
            if empty:
                self.ask("proposer", layer, None, model, size, seed, references, 0, replies=[], indices=indices,
                         positions=positions)
                out.update({i: None for i in indices})
                continue
            returned = size if honour_n else 1
            replies = [None if size > 1 and (start + j in unusable or trailing and j > 0) else text(model, start + j)
                       for j in range(returned)]
            self.ask("proposer", layer, None, model, size, seed, references, 0,
                     replies=replies + (["an extra choice nobody asked for"] if extra else []),
                     indices=indices, positions=positions)
            out.update({start + j: seen(reply) for j, reply in enumerate(replies) if reply is not None})
            again = [start + j for j, reply in enumerate(replies) if reply is None]
            for missing in again + list(range(start + returned, start + size)):
                seed = None if self.seed is None else self.seed + missing
                self.ask("proposer", layer, None, model, 1, seed, references, 0, replies=[text(model, missing)],
                         indices=[missing], positions=positions)
                out[missing] = seen(text(model, missing))
        return out


def failure_text(model: str, error: dict) -> str:
    """A failed call as messages name it (methods.md section 6): model 'm': HTTP status: message."""
    return f"model '{model}': HTTP {error['status']}: {error['message']}"


def failures_text(failures: list[str]) -> str:
    """The failures, in order, '; '-separated, identical ones once with a count (methods.md section 6)."""
    counted: dict[str, int] = {}
    for text in failures:
        counted[text] = counted.get(text, 0) + 1
    return "; ".join(text if count == 1 else f"{count} x {text}" for text, count in counted.items())


def run_moa(plan, aggregator, *, prompt, seed, use_n=True, honour_n=True, fail=(), min_ok=1,
            instruction=None, temperature=0.7, max_tokens=None, agg_temperature=0.7, agg_max_tokens=None,
            sample_text=None, extra=False, unusable=(), trailing=False, fail_with=None, bugs=(), agg_error=None,
            stream=False, streams=True, empty=False, think=False):
    """MoA over ``plan`` (one list of proposer models per proposer layer): the requests and the outcome.
    ``fail_with`` is the error of every failed request (by default one naming model and position); ``bugs``
    the (model, position) pairs whose request raises a bug; ``agg_error`` fails the aggregation; with
    ``stream`` the caller gives a stream function, and the model streams its answer unless ``streams`` is
    false."""
    script = Script(prompt, instruction or default_instruction(), seed, temperature, max_tokens,
                    agg_temperature, agg_max_tokens)

    def failure(model, position):
        if model in fail or (model, position) in fail:
            return fail_with or {"status": 500, "message": f"scripted failure of {model} at position {position}"}
        return None

    def bug(model, position):
        return {"type": "RuntimeError", "message": f"bug at {model} {position}"} if (model, position) in bugs else None

    references: list[str] = []
    positions: list[int] = []
    for number, layer in enumerate(plan, 1):
        outputs: dict[int, str | None] = {}

        def text(model, position, number=number):
            plain = sample_text(model, position) if sample_text else f"{model}: answer {position} of layer {number}"
            return thinking(plain, f"{model} {position}") if think else plain

        position = 0
        while position < len(layer):  # consecutive proposers of one model share a request when use_n
            model, size = layer[position], 1
            while use_n and position + size < len(layer) and layer[position + size] == model:
                size += 1
            outputs.update(script.samples(number, model, position, size, references, positions, text, use_n,
                                          honour_n, failure, bug, extra, unusable, trailing, empty))
            position += size
        raised = [bug(m, j) for j, m in enumerate(layer) if bug(m, j)]
        if raised:  # a bug wins over a min_ok shortfall in the same layer: the first, in configuration order
            return script.requests, {"error": "bug", "bug": raised[0], "match": [raised[0]["message"]],
                                     "failures": 0, "requests": len(script.requests)}
        good = [outputs[j] for j in range(len(layer)) if outputs[j] is not None]
        if len(good) < min_ok:
            failed = [f"model '{m}': the reply holds no text" if empty else failure_text(m, failure(m, j))
                      for j, m in enumerate(layer) if outputs[j] is None]
            message = (f"layer {number}: only {len(good)} of {len(layer)} proposers succeeded, fewer than "
                       f"min_ok={min_ok}. Failures: {failures_text(failed)}")
            return script.requests, {"error": "NotEnoughProposals", "message": message,
                                     "match": [f"layer {number}", f"min_ok={min_ok}", failed[0]],
                                     "failures": len(failed), "requests": len(script.requests)}
        references = good
        positions = [j for j in range(len(layer)) if outputs[j] is not None]
    answer = f"{aggregator}: synthesis of {len(references)} responses"
    if agg_error is not None:
        script.ask("aggregator", len(plan) + 1, None, aggregator, 1, seed, references, 0, error=agg_error,
                   indices=[0], positions=positions, stream=stream)
        message = failure_text(aggregator, agg_error)
        return script.requests, {"error": "ModelError", "message": message, "match": [message], "failures": 0,
                                 "requests": len(script.requests)}
    written = thinking(answer, aggregator) if think else answer  # what the model sends: its thoughts first
    script.ask("aggregator", len(plan) + 1, None, aggregator, 1, seed, references, 0, replies=[written],
               indices=[0], positions=positions, stream=stream,
               pieces=pieces_of(written, 5 if think else 7) if stream and streams else None)
    return script.requests, dict(counts(script.requests, answer), **streamed(stream, streams, answer))


def streamed(stream: bool, streams: bool, answer: str) -> dict:
    """What the caller's stream function receives, joined: the answer if the model streamed it, else nothing."""
    return {"streamed": answer if streams else ""} if stream else {}


def run_seq(*, prompt, window, carry, aggregator, seed, samples=None, model=None, n=None, use_n=True,
            honour_n=True, fail=(), min_ok=1, instruction=None, temperature=0.7, max_tokens=None,
            agg_temperature=0.7, agg_max_tokens=None, echo=False, stream=False):
    """Self-MoA-Seq: samples given, or generated window by window; then the rounds. With ``stream`` the
    caller gives a stream function: only the round known to be last carries it (methods.md section 3)."""
    script = Script(prompt, instruction or default_instruction(), seed, temperature, max_tokens,
                    agg_temperature, agg_max_tokens)
    failed: dict[int, str] = {}
    if samples is None:
        # Every sample is requested at once: round 1's window in one request, then each round's new ones.
        def failure(model_, position):
            if position in fail:
                return {"status": 500, "message": f"scripted failure of {model_} at position {position}"}
            return None

        chunks = [(0, min(n, window))] + [(s, min(window - carry, n - s)) for s in range(window, n, window - carry)]
        outcomes: dict[int, str | None] = {}
        for start, size in chunks:
            outcomes.update(script.samples(1, model, start, size, [], [], lambda m, i: f"{m} sample {i}", use_n,
                                           honour_n, failure, lambda m, i: None))
        stream_ = [outcomes[i] for i in range(n)]
        failed = {i: failure_text(model, failure(model, i)) for i in range(n) if outcomes[i] is None}
    else:
        stream_ = list(samples)
    total = len(stream_)
    synthesis, round_number, position, failures = None, 0, 0, []
    while True:
        wanted = window if synthesis is None else window - carry
        new = []
        while len(new) < wanted and position < total:  # failed samples are skipped, in order
            if stream_[position] is None:
                failures.append(failed[position])  # only the failures the filling has reached (gap 8)
                if total - len(failures) < min_ok:
                    message = (f"only {total - len(failures)} of {total} samples can still succeed, fewer than "
                               f"min_ok={min_ok}. Failures: {failures_text(failures)}")
                    return script.requests, {"error": "NotEnoughProposals", "message": message,
                                             "match": [f"min_ok={min_ok}", "scripted failure"],
                                             "failures": len(failures), "requests": len(script.requests)}
            else:
                new.append((position, stream_[position]))
            position += 1
        if not new:
            break
        round_number += 1
        carried = [] if synthesis is None else [synthesis] * carry
        reply = f"{aggregator}: synthesis of round {round_number}"
        shown = carried + [t for _, t in new]
        if echo:  # the model copies its prompt's first and (mangled) last marker lines around its answer
            key, count = key_for(shown), len(shown)
            reply = f"<<<response 1 of {count}, key {key}>>>\n{reply}\n <<<end of response {count}, key {key}>>"
        last = stream and position >= total  # known to be last: filling it took the last sample there is
        script.ask("aggregator", 2, round_number, aggregator, 1, seed, shown, len(carried), replies=[reply],
                   indices=[0], positions=[i for i, _ in new], stream=last,
                   pieces=pieces_of(reply) if last else None)
        synthesis = strip_markers(reply, key_for(shown))
    good = total - len(failures)
    if samples is not None:
        assert round_number == rounds(good, window, carry)
    return script.requests, dict(counts(script.requests, synthesis), rounds=round_number,
                                 **streamed(stream, True, synthesis))


def rounds(n: int, window: int, carry: int) -> int:
    return 1 if n <= window else 1 + math.ceil((n - window) / (window - carry))


def counts(requests: list[dict], answer: str) -> dict:
    """calls = generations (texts returned, at most n per request), requests = requests sent."""
    return {"answer": answer, "calls": sum(sum(text is not None for text in r.get("replies", [])[:r["n"]])
                                           for r in requests),
            "requests": len(requests)}


def refused(argument: str, value) -> tuple[list, dict]:
    """A call with a bad argument: ConfigError naming the argument and its value, and no request at all."""
    return [], {"error": "ConfigError", "match": [f"{argument}={value!r}"], "failures": 0, "requests": 0}


# --- The vectors -------------------------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is 6 * 7?"}]
PRIME = [{"role": "user", "content": "Name a prime between 10 and 20."}]
HAMLET = [{"role": "user", "content": "Summarise the plot of Hamlet in one sentence."}]
SIX = ["a", "b", "c", "d", "e", "f"]


def vector(name, description, method, prompt, params, outcome):
    requests, expected = outcome
    keys = [(r["model"], r["n"], r["seed"], tuple(r["references"])) for r in requests]
    assert len(set(keys)) == len(keys), f"{name}: two requests share (model, n, seed, references)"
    return {"name": name, "description": description, "method": method, "prompt": prompt, "params": params,
            "requests": requests, "expected": expected}


def build() -> list[dict]:
    default = default_instruction()
    system = [{"role": "system", "content": "You are a terse calculator."},
              {"role": "user", "content": "What is 6 * 7?"},
              {"role": "assistant", "content": "42."},
              {"role": "user", "content": "And 6 * 8?"}]
    upstream = inject([{"role": "system", "content": "You answer arithmetic."}, QUESTION[0]],
                      ["upstream says 41", "upstream says 42"], default)
    upstream_key = key_for(["upstream says 41", "upstream says 42"])
    quoting = "Merge the answers. An example of the format:\n\n" + block(["like this"], "Example.")
    s = lambda count: [f"sample {i}" for i in range(count)]  # noqa: E731
    seq = lambda name, description, count, window, carry: vector(  # noqa: E731
        name, description, "self_moa_seq", HAMLET,
        {"samples": s(count), "aggregator": "m", "window": window, "carry": carry, "seed": 3},
        run_seq(prompt=HAMLET, samples=s(count), window=window, carry=carry, aggregator="m", seed=3))
    return [
        # --- MoA
        vector("moa-2-layer", "2-layer MoA as the papers count it: 6 different proposers, then the aggregator; "
               "7 calls, references numbered in configuration order; proposer j has seed S + j, the aggregator S.",
               "moa", QUESTION, {"proposers": SIX, "aggregator": "z", "seed": 10, "use_n": False},
               run_moa([SIX], "z", prompt=QUESTION, seed=10, use_n=False)),
        vector("moa-3-layer", "3-layer MoA: the same 6 proposers twice (layers=3), then the aggregator: "
               "6 + 6 + 1 = 13 calls; layer 2 sees exactly layer 1, the aggregator exactly layer 2.",
               "moa", QUESTION, {"proposers": SIX, "aggregator": "z", "layers": 3, "seed": 0, "use_n": False},
               run_moa([SIX, SIX], "z", prompt=QUESTION, seed=0, use_n=False)),
        vector("moa-per-layer-lists", "One list per proposer layer (3, then 2 proposers): 3 + 2 + 1 = 6 calls; "
               "seeds restart at S in every layer.",
               "moa", QUESTION, {"proposers": [["a", "b", "c"], ["d", "e"]], "aggregator": "z", "seed": 100,
                                 "use_n": False},
               run_moa([["a", "b", "c"], ["d", "e"]], "z", prompt=QUESTION, seed=100, use_n=False)),
        vector("moa-same-model-grouped", "Consecutive proposers of one model share a request with n (use_n, the "
               "default): a,a,b,a is sent as a (n=2, seed S), b (seed S+2), a (seed S+3).",
               "moa", QUESTION, {"proposers": ["a", "a", "b", "a"], "aggregator": "z", "seed": 20},
               run_moa([["a", "a", "b", "a"]], "z", prompt=QUESTION, seed=20)),
        vector("moa-failed-proposer", "Proposer b still fails after its retries: it is dropped and the survivors "
               "a and c are numbered 1 and 2; the failed request still counts as a request, not as a call.",
               "moa", QUESTION, {"proposers": ["a", "b", "c"], "aggregator": "z", "seed": 0, "use_n": False},
               run_moa([["a", "b", "c"]], "z", prompt=QUESTION, seed=0, use_n=False, fail={"b"})),
        vector("moa-min-ok-not-met", "min_ok=2 and one of two proposers fails: NotEnoughProposals naming the "
               "failure, and no aggregation is asked for.",
               "moa", QUESTION, {"proposers": ["a", "b"], "aggregator": "z", "seed": 0, "min_ok": 2,
                                 "use_n": False},
               run_moa([["a", "b"]], "z", prompt=QUESTION, seed=0, use_n=False, fail={"b"}, min_ok=2)),
        vector("moa-existing-system-message", "The caller's system message gets the block after a blank line; "
               "the other messages (user, assistant, user) pass through unchanged; layer 1 sees them as given.",
               "moa", system, {"proposers": ["a", "b"], "aggregator": "z", "seed": 4, "use_n": False},
               run_moa([["a", "b"]], "z", prompt=system, seed=4, use_n=False)),
        vector("moa-sampling-per-role", "Proposers use the temperature and max_tokens of proposing, the aggregator "
               "those of aggregating; a custom instruction replaces the default one.",
               "moa", QUESTION, {"proposers": ["a", "b"], "aggregator": "z", "seed": 1, "use_n": False,
                                 "proposing": {"temperature": 1.0, "max_tokens": 64},
                                 "aggregating": {"temperature": 0.0, "max_tokens": 256},
                                 "instruction": "Merge these answers into one."},
               run_moa([["a", "b"]], "z", prompt=QUESTION, seed=1, use_n=False, temperature=1.0, max_tokens=64,
                       agg_temperature=0.0, agg_max_tokens=256, instruction="Merge these answers into one.")),
        vector("moa-no-seed", "Without a seed no request carries one (seed null).",
               "moa", QUESTION, {"proposers": ["a", "b"], "aggregator": "z", "use_n": False},
               run_moa([["a", "b"]], "z", prompt=QUESTION, seed=None, use_n=False)),
        vector("moa-nested-prompt", "selfmoa behind another MoA: the caller's system message already ends with "
               "an upstream reference block. Layer 1 is sent it unchanged (and so shows the upstream references); "
               "the aggregator reads back the block selfmoa added last, never the upstream one.",
               "moa", upstream, {"proposers": ["a", "b"], "aggregator": "z", "seed": 2, "use_n": False},
               run_moa([["a", "b"]], "z", prompt=upstream, seed=2, use_n=False)),
        vector("self-moa-instruction-quotes-a-block", "An instruction that itself holds a reference block: the "
               "aggregator's references are the samples, in the block after the instruction.",
               "self_moa", PRIME, {"model": "m", "n": 2, "seed": 0, "instruction": quoting},
               run_moa([["m"] * 2], "m", prompt=PRIME, seed=0, instruction=quoting,
                       sample_text=lambda m, i: f"{m} sample {i}")),
        vector("moa-layers-below-two", "layers=1 is refused before any request: layers count the aggregator, so "
               "MoA has at least 2.",
               "moa", QUESTION, {"proposers": ["a", "b"], "aggregator": "z", "layers": 1}, refused("layers", 1)),
        vector("moa-min-ok-above-layer", "min_ok=3 with a layer of 2 proposers can never be met: refused up front.",
               "moa", QUESTION, {"proposers": ["a", "b"], "aggregator": "z", "min_ok": 3}, refused("min_ok", 3)),
        # --- Self-MoA
        vector("self-moa-n6", "Self-MoA, n=6: the six samples in one request (n=6, seed S), then one aggregation "
               "by the same model with seed S: 6 + 1 = 7 calls in 2 requests.",
               "self_moa", PRIME, {"model": "m", "n": 6, "seed": 5},
               run_moa([["m"] * 6], "m", prompt=PRIME, seed=5, sample_text=lambda m, i: f"{m} sample {i}")),
        vector("self-moa-n-ignored", "The server returns one choice for n=4: samples 1..3 are asked for one by one "
               "with n=1 and seeds S+1..S+3; still 4 + 1 calls, now in 5 requests.",
               "self_moa", PRIME, {"model": "m", "n": 4, "seed": 7},
               run_moa([["m"] * 4], "m", prompt=PRIME, seed=7, honour_n=False,
                       sample_text=lambda m, i: f"{m} sample {i}")),
        vector("self-moa-3-layer", "Self-MoA with layers=3: n samples, n samples that see the first n, then the "
               "aggregation: 3 + 3 + 1 calls in 3 requests.",
               "self_moa", PRIME, {"model": "m", "n": 3, "layers": 3, "seed": 0},
               run_moa([["m"] * 3, ["m"] * 3], "m", prompt=PRIME, seed=0)),
        vector("self-moa-extra-choice-ignored", "The server returns n + 1 choices for n=3: the extra one is "
               "ignored (not a sample, not a call, not shown to the aggregator): 3 + 1 calls in 2 requests.",
               "self_moa", PRIME, {"model": "m", "n": 3, "seed": 4},
               run_moa([["m"] * 3], "m", prompt=PRIME, seed=4, extra=True, sample_text=lambda m, i: f"{m} sample {i}")),
        vector("self-moa-unusable-first-choice", "The reply to n=3 holds no usable text for its first choice "
               "(content null): only that sample is asked for again, alone, with the same seed S; in the trace the "
               "request for n=3 comes before the request for n=1 that starts at the same position (larger n "
               "first): 3 + 1 calls in 3 requests.",
               "self_moa", PRIME, {"model": "m", "n": 3, "seed": 2},
               run_moa([["m"] * 3], "m", prompt=PRIME, seed=2, unusable=(0,),
                       sample_text=lambda m, i: f"{m} sample {i}")),
        vector("self-moa-temperature-zero", "Self-MoA at temperature 0 is refused: every sample would be the same.",
               "self_moa", PRIME, {"model": "m", "n": 3, "proposing": {"temperature": 0}},
               refused("temperature", 0)),
        vector("self-moa-n20-split", "n=20 > MAX_N=16: one request for samples 0-15 (seed S), one for 16-19 "
               "(seed S+16).",
               "self_moa", PRIME, {"model": "m", "n": 20, "seed": 0, "aggregator": "judge"},
               run_moa([["m"] * 20], "judge", prompt=PRIME, seed=0, sample_text=lambda m, i: f"{m} sample {i}")),
        vector("self-moa-thoughts-removed", "A thinking model served without a reasoning parser: every reply "
               "opens with <think>...</think>. The thoughts (and the blank lines after them) are removed from "
               "each sample before it is a reference, and from the final answer (wire.md section 2).",
               "self_moa", PRIME, {"model": "m", "n": 3, "seed": 5},
               run_moa([["m"] * 3], "m", prompt=PRIME, seed=5, think=True)),
        vector("moa-thoughts-streamed", "Thinking proposers and a thinking aggregator whose answer is streamed in "
               "pieces of 5 characters that cut the tags: the stream shows exactly the answer, no piece of a "
               "thought.",
               "moa", QUESTION, {"proposers": ["a", "b"], "aggregator": "z", "seed": 2, "use_n": False,
                                 "stream": True},
               run_moa([["a", "b"]], "z", prompt=QUESTION, seed=2, use_n=False, think=True, stream=True)),
        # --- Self-MoA-Seq, samples given
        seq("seq-n-below-window", "n=4 <= w=6: one aggregation over the 4 samples, exactly Self-MoA's.", 4, 6, 3),
        seq("seq-n-equals-window", "n=6 = w: still one round, no carry.", 6, 6, 3),
        seq("seq-n-equals-window-plus-one", "n=7, w=6, r=3: round 2 holds 3 carried copies and 1 new sample.",
            7, 6, 3),
        seq("seq-last-round-partial", "n=10, w=6, r=3 (the worked example): rounds take samples 0-5, 6-8, then 9 "
            "alone after 3 carried copies.", 10, 6, 3),
        seq("seq-carry-window-minus-one", "w=3, r=2 = w-1: one new sample per round after the first; n=5 gives "
            "3 rounds.", 5, 3, 2),
        # --- Self-MoA-Seq, samples generated
        vector("seq-echoed-markers", "The aggregator copies its prompt's marker lines (one of them mangled, as "
               "small models do) around its answer: they are removed, so round 2 carries the clean synthesis and "
               "the answer holds no marker line (wire.md section 6). w=2, r=1 over 3 given samples.",
               "self_moa_seq", HAMLET, {"samples": s(3), "aggregator": "m", "window": 2, "carry": 1, "seed": 3},
               run_seq(prompt=HAMLET, samples=s(3), window=2, carry=1, aggregator="m", seed=3, echo=True)),
        vector("seq-worked-example", "The worked example of methods.md, generated: n=10, w=6, r=3, seed 0. "
               "Samples in one request per round (n=6 seed 0, n=3 seed 6, n=1 seed 9), then 3 rounds: "
               "10 + 3 = 13 calls in 6 requests.",
               "self_moa_seq", PRIME, {"model": "m", "n": 10, "window": 6, "carry": 3, "seed": 0},
               run_seq(prompt=PRIME, model="m", n=10, window=6, carry=3, aggregator="m", seed=0)),
        vector("seq-separate-aggregator", "model m samples, aggregator j aggregates at its own temperature; "
               "n=7, w=4, r=1: 1 + ceil(3 / 3) = 2 rounds.",
               "self_moa_seq", PRIME, {"model": "m", "n": 7, "window": 4, "carry": 1, "seed": 50,
                                       "aggregator": "j", "aggregating": {"temperature": 0.2}},
               run_seq(prompt=PRIME, model="m", n=7, window=4, carry=1, aggregator="j", seed=50,
                       agg_temperature=0.2)),
        vector("seq-n-ignored", "The server returns one choice whatever n says: each missing sample is asked for "
               "alone with seed S + i; the rounds are unchanged.",
               "self_moa_seq", PRIME, {"model": "m", "n": 8, "window": 6, "carry": 3, "seed": 0},
               run_seq(prompt=PRIME, model="m", n=8, window=6, carry=3, aggregator="m", seed=0, honour_n=False)),
        vector("seq-failed-sample", "Sample 2 fails for good (use_n=False): it is skipped and recorded; round 1 "
               "takes the next good samples 0,1,3,4,5,6 and round 2 takes 7. 7 + 2 calls in 10 requests.",
               "self_moa_seq", PRIME, {"model": "m", "n": 8, "window": 6, "carry": 3, "seed": 0, "use_n": False},
               run_seq(prompt=PRIME, model="m", n=8, window=6, carry=3, aggregator="m", seed=0, use_n=False,
                       fail={2})),
        vector("seq-carry-fills-the-window", "carry=3 with window=3 leaves no room for a new sample: refused.",
               "self_moa_seq", PRIME, {"model": "m", "n": 5, "window": 3, "carry": 3}, refused("carry", 3)),
        vector("seq-min-ok-above-given-samples", "min_ok=3 over a list of 2 given samples can never be met: refused.",
               "self_moa_seq", HAMLET, {"samples": ["one", "two"], "aggregator": "m", "min_ok": 3},
               refused("min_ok", 3)),
        # --- Streaming: only the final aggregation, filtered; nothing the model did not stream
        vector("self-moa-streamed", "With a stream function, only the aggregation carries it (the samples do "
               "not); the model streams its answer in pieces and the function receives exactly the answer.",
               "self_moa", PRIME, {"model": "m", "n": 3, "seed": 1, "stream": True},
               run_moa([["m"] * 3], "m", prompt=PRIME, seed=1, stream=True,
                       sample_text=lambda m, i: f"{m} sample {i}")),
        vector("moa-streamed-final-only", "3-layer MoA with a stream function: neither proposer layer is "
               "streamed, only the aggregator.",
               "moa", QUESTION, {"proposers": ["a", "b"], "aggregator": "z", "layers": 3, "seed": 0,
                                 "stream": True},
               run_moa([["a", "b"], ["a", "b"]], "z", prompt=QUESTION, seed=0, stream=True)),
        vector("self-moa-stream-not-streamed-by-model", "A stream function is given but the completion function "
               "returns the answer whole, streaming nothing: the stream function is never called (it receives "
               "only what is streamed), and the answer is in the result.",
               "self_moa", PRIME, {"model": "m", "n": 2, "seed": 0, "stream": True},
               run_moa([["m"] * 2], "m", prompt=PRIME, seed=0, stream=True, streams=False,
                       sample_text=lambda m, i: f"{m} sample {i}")),
        vector("seq-streams-only-the-last-round", "Self-MoA-Seq, n=8, w=6, r=3, generated, with a stream "
               "function: round 1 is not streamed, round 2 (known last: it takes sample 7, the last) is.",
               "self_moa_seq", PRIME, {"model": "m", "n": 8, "window": 6, "carry": 3, "seed": 0, "stream": True},
               run_seq(prompt=PRIME, model="m", n=8, window=6, carry=3, aggregator="m", seed=0, stream=True)),
        vector("seq-streamed-echoed-markers", "The last round streams an answer wrapped in its prompt's marker "
               "lines, cut into pieces across the markers: the stream function receives the answer without them, "
               "exactly the returned answer. w=2, r=1 over 3 given samples.",
               "self_moa_seq", HAMLET, {"samples": s(3), "aggregator": "m", "window": 2, "carry": 1, "seed": 3,
                                        "stream": True},
               run_seq(prompt=HAMLET, samples=s(3), window=2, carry=1, aggregator="m", seed=3, echo=True,
                       stream=True)),
        # --- Errors: whole messages, partial traces, which error wins
        vector("moa-identical-failures-counted", "Three proposers of a model the server does not know fail alike, "
               "a fourth succeeds, min_ok=2: the message names the identical failures once, with a count, and "
               "the partial trace holds every request with its error.",
               "moa", QUESTION, {"proposers": ["x", "x", "x", "y"], "aggregator": "z", "min_ok": 2, "seed": 0,
                                 "use_n": False},
               run_moa([["x", "x", "x", "y"]], "z", prompt=QUESTION, seed=0, use_n=False, fail={"x"}, min_ok=2,
                       fail_with={"status": 404, "message": "The model 'x' does not exist"})),
        vector("self-moa-aggregation-fails", "The aggregation fails for good: its ModelError is raised, naming "
               "the model and status, and the partial trace holds the samples and the failed aggregation.",
               "self_moa", PRIME, {"model": "m", "n": 2, "seed": 0},
               run_moa([["m"] * 2], "m", prompt=PRIME, seed=0, agg_error={"status": 503, "message": "overloaded"},
                       sample_text=lambda m, i: f"{m} sample {i}")),
        vector("seq-failures-reached-only", "n=12, w=6, r=3, min_ok=12, samples 2 and 8 fail: the filling reaches "
               "sample 2 first, and NotEnoughProposals lists only the failures reached (sample 2), though "
               "sample 8's failure is known and in the partial trace. No round is aggregated.",
               "self_moa_seq", PRIME, {"model": "m", "n": 12, "seed": 0, "use_n": False, "min_ok": 12},
               run_seq(prompt=PRIME, model="m", n=12, window=6, carry=3, aggregator="m", seed=0, use_n=False,
                       fail={2, 8}, min_ok=12)),
        vector("moa-bug-beats-min-ok", "In one layer b fails (a ModelError) and the completion function raises "
               "a bug on c, so min_ok=3 is not met either: the bug is raised, not NotEnoughProposals, after "
               "every request of the layer; its trace entry records it as `Type: message`.",
               "moa", QUESTION, {"proposers": ["a", "b", "c"], "aggregator": "z", "min_ok": 3, "seed": 0,
                                 "use_n": False},
               run_moa([["a", "b", "c"]], "z", prompt=QUESTION, seed=0, use_n=False, fail={"b"}, min_ok=3,
                       bugs={("c", 2)})),
        # --- Replies that echo markers or leave choices empty
        vector("moa-nested-prompt-echoed-upstream-markers", "The caller's prompt ends with an upstream block, and "
               "a layer-1 proposer echoes that block's end marker line: the line is removed from its reply (its "
               "prompt holds a block), so the aggregator is shown the clean text.",
               "moa", upstream, {"proposers": ["a", "b"], "aggregator": "z", "seed": 2, "use_n": False},
               run_moa([["a", "b"]], "z", prompt=upstream, seed=2, use_n=False,
                       sample_text=lambda m, i: f"{m} says 42" + (f"\n<<<end of response 2, key {upstream_key}>>>"
                                                                 if m == "a" else ""))),
        vector("self-moa-trailing-null-choices", "The reply to n=3 holds the first text and then two choices "
               "without usable text (null): samples 1 and 2 are asked for again alone (seeds S+1, S+2); the "
               "trace records the nulls as returned, and the request counts 1 call.",
               "self_moa", PRIME, {"model": "m", "n": 3, "seed": 6},
               run_moa([["m"] * 3], "m", prompt=PRIME, seed=6, trailing=True,
                       sample_text=lambda m, i: f"{m} sample {i}")),
        vector("self-moa-empty-reply", "The reply to n=3 holds no choice at all: the request fails, with it every "
               "sample it asked for (none is asked again), and the failure's text is fixed: `model 'm': the reply "
               "holds no text`, three times, counted once.",
               "self_moa", PRIME, {"model": "m", "n": 3, "seed": 0},
               run_moa([["m"] * 3], "m", prompt=PRIME, seed=0, empty=True)),
        vector("seq-min-ok-not-met", "n=4, min_ok=3, samples 1 and 2 fail: NotEnoughProposals as soon as fewer "
               "than 3 samples can succeed; no aggregation is asked for.",
               "self_moa_seq", PRIME, {"model": "m", "n": 4, "seed": 0, "use_n": False, "min_ok": 3},
               run_seq(prompt=PRIME, model="m", n=4, window=6, carry=3, aggregator="m", seed=0, use_n=False,
                       fail={1, 2}, min_ok=3)),
    ]


def main(argv: list[str] | None = None) -> None:
    import argparse

    summary = (__doc__ or "").split("\n\n")[0]
    summary += " Writes every *.json file of spec/vectors/ again (removing the others)."
    argparse.ArgumentParser(prog="python3 spec/vectors/make_vectors.py", description=summary).parse_args(argv)
    vectors = build()
    for old in HERE.glob("*.json"):
        old.unlink()
    for item in vectors:
        (HERE / f"{item['name']}.json").write_text(render(item), encoding="utf-8")
    print(f"wrote {len(vectors)} vectors to {HERE}")


def render(item: dict) -> str:
    return json.dumps(item, indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    main()
