"""python -m mock_models [serve] [options] | demo"""

from __future__ import annotations

import argparse
import sys

from mock_models.server import FAULTS, MockServer


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from mock_models.demo import demo

        return demo()
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m mock_models",
                                     description="Serve deterministic mock LLMs (OpenAI-compatible). "
                                                 "Subcommands: serve (default), demo.")
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds added to every call")
    parser.add_argument("--latency-per-token", type=float, default=0.0, metavar="S",
                        help="seconds added per generated token")
    parser.add_argument("--fault-rate", type=float, default=0.0, metavar="P", help="share of calls that fail")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"kinds of fault (default: {','.join(FAULTS)})")
    parser.add_argument("--fault-seed", type=int, default=0, metavar="N")
    parser.add_argument("--retry-after", type=int, default=1, metavar="S", help="Retry-After of injected 429s")
    parser.add_argument("--stall-seconds", type=float, default=30.0, metavar="S", help="length of a stall fault")
    parser.add_argument("--ignore-n", action="store_true", help="return one choice whatever n asks (like llama.cpp)")
    parser.add_argument("--api-key", metavar="KEY", help="require this bearer key")
    parser.add_argument("--max-concurrency", type=int, metavar="K",
                        help="work on at most K requests at once and queue the rest (default: no limit)")
    args = parser.parse_args(argv)
    try:
        server = MockServer(args.host, args.port, latency=args.latency, latency_per_token=args.latency_per_token,
                            fault_rate=args.fault_rate, faults=[f for f in args.faults.split(",") if f],
                            fault_seed=args.fault_seed, retry_after=args.retry_after,
                            stall_seconds=args.stall_seconds, honour_n=not args.ignore_n, api_key=args.api_key,
                            max_concurrency=args.max_concurrency)
    except (ValueError, OSError) as exc:
        print(f"mock_models: {exc}", file=sys.stderr)
        return 2
    print(server.base_url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
