"""The command line refuses every flag that would have no effect, and speaks in flags (spec invariant E3)."""

from __future__ import annotations

import re

import pytest

import selfmoa

URL = ["--base-url", "http://127.0.0.1:9/v1", "--retries", "0"]  # nothing listens: a refused run must not try
FOR = {"moa": ["--method", "moa", "-p", "a", "-p", "b", "-a", "z"],
       "self-moa": ["--method", "self-moa", "-m", "q"],
       "self-moa-seq": ["--method", "self-moa-seq", "-m", "q"]}
ONLY = {"--layers": ({"moa", "self-moa"}, ["--layers", "3"]),
        "-n/--samples": ({"self-moa", "self-moa-seq"}, ["-n", "4"]),
        "--window": ({"self-moa-seq"}, ["--window", "4"]),
        "--carry": ({"self-moa-seq"}, ["--carry", "2"]),
        "--proposer": ({"moa"}, ["-p", "x"])}
REFUSED = [(method, flag, argv) for flag, (methods, argv) in ONLY.items() for method in FOR if method not in methods]


def run(capsys, argv):
    code = selfmoa.main(argv, environ={})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method, flag, argv", REFUSED, ids=[f"{m}{a[0]}" for m, _, a in REFUSED])
def test_E3_a_flag_the_method_does_not_use_is_refused_naming_flag_and_method(capsys, method, flag, argv):
    """--layers with self-moa-seq, --window/--carry with moa or self-moa, -n with moa, -p with self-moa: exit 2,
    naming the flag and the method, before any request."""
    code, out, err = run(capsys, URL + FOR[method] + argv + ["hi"])
    assert code == 2 and out == ""
    assert f"error: {flag}: --method {method} " in err and "no effect" in err


@pytest.mark.parametrize("method, argv", [(m, a) for flag, (methods, a) in ONLY.items() for m in sorted(methods)
                                          if flag != "--proposer"])
def test_E3_a_flag_the_method_uses_is_passed_on(method, argv):
    options = selfmoa._method_options(selfmoa.build_parser().parse_args(FOR[method] + argv + ["hi"]), {})
    name = {"--layers": "layers", "-n": "n", "--window": "window", "--carry": "carry"}[argv[0]]
    assert options[name] == int(argv[1])


def test_E3_flags_left_out_take_the_methods_defaults():
    """Not giving --layers, -n, --window or --carry passes nothing: the library's defaults apply."""
    for argv in FOR.values():
        options = selfmoa._method_options(selfmoa.build_parser().parse_args(argv + ["hi"]), {})
        assert not {"layers", "n", "window", "carry"} & set(options)


@pytest.mark.parametrize("argv, flag", [
    (["--method", "moa", "-p", "a", "-a", "z", "-m", "q"], "--model"),
    (["-m", "q", "--diversity"], "--diversity"),
])
def test_E3_other_flags_without_effect_are_refused(capsys, argv, flag):
    code, _, err = run(capsys, URL + argv + ["hi"])
    assert code == 2 and f"error: {flag}: " in err and "no effect" in err


BAD = [["--layers", "1"], ["--layers", "0"], ["-n", "0"], ["--window", "1"], ["--carry", "0"], ["--carry", "9"],
       ["--min-ok", "0"], ["--min-ok", "99"], ["--temperature", "3"], ["--temperature", "0"], ["--max-tokens", "0"],
       ["--aggregator-temperature", "-1"], ["--aggregator-max-tokens", "0"], ["--concurrency", "0"],
       ["--seed", "-1", "--min-ok", "7"]]


@pytest.mark.parametrize("method", list(FOR))
@pytest.mark.parametrize("bad", BAD, ids=[" ".join(b) for b in BAD])
def test_E3_usage_errors_speak_in_flags_not_in_library_arguments(capsys, method, bad):
    """A bad value is refused with exit 2 in the words of the command line: the flag, never 'name=value'."""
    if method == "moa" and bad == ["--temperature", "0"]:
        return  # MoA may sample at temperature 0; only Self-MoA's diversity needs more
    if any(flag in bad for flag in ("--layers", "-n", "--window", "--carry")):
        flag = next(f for f in ONLY if bad[0] in f.split("/"))
        if method not in ONLY[flag][0]:
            return  # refused as unused, checked above
    code, out, err = run(capsys, URL + FOR[method] + bad + ["hi"])
    assert code == 2 and out == "", err
    message = err.splitlines()[-1]
    assert message.startswith("selfmoa: error: --"), message
    assert not re.search(r"\b[a-z_]+=", message), f"library spelling in {message!r}"
    assert not re.search(r"(?<![-\w])(min_ok|max_tokens|aggregator_\w+|layers|window|carry|n) (>=|between)", message)
