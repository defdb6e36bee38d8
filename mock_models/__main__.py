"""python3 -m mock_models [serve] [options] | python3 -m mock_models demo"""

from __future__ import annotations

import argparse
import math
import sys

from mock_models.models import MODELS
from mock_models.server import FAULTS, OVERFLOWS, THINKING, MockServer

PROG = "python3 -m mock_models"
USAGE = f"""{PROG} [serve] [-h] [--host HOST] [--port PORT] [--latency S] [--latency-per-token S]
                              [--fault-rate P] [--faults KINDS] [--fault-seed N] [--retry-after S]
                              [--stall-seconds S] [--ignore-n] [--api-key KEY] [--max-concurrency K]
       {PROG} demo [-h]"""
DESCRIPTION = f"""\
Serve deterministic mock LLMs behind an OpenAI-compatible endpoint (POST /v1/chat/completions,
GET /v1/models, GET /health), standard library only. The first line printed is the base URL.

models: {", ".join(MODELS)}
  generalist, coder, mathematician and generalist-2 answer the questions of a small task world
  (MATH, CRUX, MMLU) with the accuracies of the paper's models, and any other prompt with a
  plausible paragraph; echo returns the messages it was sent. Any other name is a 404.

subcommands:
  serve  serve the models (the default)
  demo   start a mock server and run selfmoa's three methods against it, showing each command"""
DEMO_DESCRIPTION = """\
Start a mock server on a free port, run the selfmoa command line (MoA, Self-MoA, Self-MoA-Seq)
against it on one task of each domain, printing every command it runs, and compare the answers
with the ground truth. The server stops when the demo ends: to follow along afterwards, start one
of your own (python3 -m mock_models) and export OPENAI_BASE_URL as it says."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a number of seconds >= 0, such as 1 or 0.1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, usage=USAGE, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="the address to listen on, IPv4 or IPv6 (::1) (default: 127.0.0.1, "
        "this machine only)")
    add("--port", type=int, default=8000, help="the port to listen on; 0 picks a free one (default: 8000)")
    add("--latency", type=_seconds, default=0.0, metavar="S", help="seconds added to every call (default: 0)")
    add("--latency-per-token", type=_seconds, default=0.0, metavar="S",
        help="seconds added per generated token (default: 0)")
    add("--fault-rate", type=float, default=0.0, metavar="P", help="the share of calls that fail, 0 to 1 (default: 0)")
    add("--faults", default=",".join(FAULTS), metavar="KINDS",
        help=f"the kinds of fault to inject, comma-separated (default: {','.join(FAULTS)})")
    add("--fault-seed", type=int, default=0, metavar="N",
        help="the seed of the fault draws: the same seed and requests give the same faults (default: 0)")
    add("--retry-after", type=_seconds, default=1.0, metavar="S",
        help="the Retry-After of injected 429s, in seconds; a fraction such as 0.1 is sent as written "
             "(default: 1)")
    add("--stall-seconds", type=_seconds, default=30.0, metavar="S",
        help="how long a stall fault holds a call (default: 30)")
    add("--ignore-n", action="store_true", help="return one choice whatever n asks (like llama.cpp)")
    add("--api-key", metavar="KEY", help="require this bearer key (default: none)")
    add("--max-concurrency", type=int, metavar="K",
        help="work on at most K requests at once and queue the rest (default: no limit)")
    add("--openai-reasoning", action="store_true",
        help="behave like OpenAI's reasoning models: refuse a temperature other than 1 and max_tokens (take "
             "max_completion_tokens), with OpenAI's error bodies; report reasoning tokens")
    add("--refuse-n", action="store_true", help="answer n > 1 with a 400 (like Anthropic's compatible endpoint)")
    add("--thinking", choices=THINKING, metavar="WHERE",
        help="think before answering, the thoughts in the content (<think>...</think>, as without a reasoning "
             "parser), in reasoning_content or in reasoning, with reasoning-token usage; chat_template_kwargs "
             '{"enable_thinking": false} turns it off (default: no thinking)')
    add("--thought-tokens", type=int, default=40, metavar="K",
        help="tokens of thought per answer at reasoning_effort medium (default: 40)")
    add("--context-length", type=int, metavar="TOKENS",
        help="every model's context window (default: each model's own, 4096 to 32768)")
    add("--overflow", choices=OVERFLOWS, default="openai",
        help="how a prompt beyond the context window is refused: OpenAI's 400 context_length_exceeded, vLLM's "
             "400, llama.cpp's 400 exceed_context_size_error, or a 200 with an empty stream (llama-cpp-python; "
             "a 400 when not streamed) (default: openai)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        demo_parser = argparse.ArgumentParser(prog=f"{PROG} demo", description=DEMO_DESCRIPTION,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
        demo_parser.parse_args(argv[1:])
        from mock_models.demo import demo

        return demo()
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        server = MockServer(args.host, args.port, latency=args.latency, latency_per_token=args.latency_per_token,
                            fault_rate=args.fault_rate, faults=[f for f in args.faults.split(",") if f],
                            fault_seed=args.fault_seed, retry_after=args.retry_after,
                            stall_seconds=args.stall_seconds, honour_n=not args.ignore_n, api_key=args.api_key,
                            max_concurrency=args.max_concurrency, openai_reasoning=args.openai_reasoning,
                            refuse_n=args.refuse_n, thinking=args.thinking, thought_tokens=args.thought_tokens,
                            context_length=args.context_length, overflow=args.overflow)
    except (ValueError, OSError) as exc:
        print(f"mock_models: {exc}", file=sys.stderr)
        return 2
    print(server.base_url, flush=True)
    print(f"mock_models: serving the models {', '.join(MODELS)} at {server.base_url} (Ctrl-C stops it); "
          f"to use it: export OPENAI_BASE_URL={server.base_url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
