"""Write the conformance vectors of spec/vectors/ from the rules of spec/methods.md.

This script is a second, deliberately plain statement of the methods (loops over the rules, no concurrency,
no selfmoa import): each vector lists the requests an implementation must send, with the reply the
scripted model gives to each, and the expected outcome. Run it to regenerate the JSON files:

    python spec/vectors/make_vectors.py
"""

from __future__ import annotations

import json
import math
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
T = 0.7  # the default temperature of proposers and aggregator


def req(model, seed, references=(), n=1, replies=None, error=None, carried=0, role="proposer"):
    entry = {"role": role, "model": model, "n": n, "seed": seed, "temperature": T, "references": list(references),
             "carried": carried}
    if error is not None:
        entry["error"] = error
    else:
        entry["replies"] = replies if replies is not None else [f"{model} sample {seed + j}" for j in range(n)]
    return entry


def moa_vector(name, description, layers, aggregator, seed, prompt=None, fail=(), min_ok=1):
    """MoA, one request per proposer (use_n=False): proposer j of every layer has seed S + j."""
    prompt = prompt or [{"role": "user", "content": "What is 6 * 7?"}]
    requests, references = [], []
    for number, layer in enumerate(layers, 1):
        outputs = []
        for j, model in enumerate(layer):
            if model in fail:
                requests.append(req(model, seed + j, references, error={"status": 500, "message": "boom"}))
                continue
            reply = f"{model} layer {number} answer {j}"
            requests.append(req(model, seed + j, references, replies=[reply]))
            outputs.append(reply)
        if len(outputs) < min_ok:
            return {"name": name, "description": description, "method": "moa", "prompt": prompt,
                    "params": {"proposers": layers, "aggregator": aggregator, "seed": seed, "min_ok": min_ok,
                               "use_n": False},
                    "requests": requests, "expected": {"error": "NotEnoughProposals", "match": "min_ok"}}
        references = outputs
    answer = f"{aggregator} final"
    requests.append(req(aggregator, seed, references, replies=[answer], role="aggregator"))
    return {"name": name, "description": description, "method": "moa", "prompt": prompt,
            "params": {"proposers": layers, "aggregator": aggregator, "seed": seed, "min_ok": min_ok,
                       "use_n": False},
            "requests": requests,
            "expected": {"answer": answer, "calls": sum(len(r.get("replies", [])) for r in requests),
                         "requests": len(requests)}}


def seq_rounds(n, window, carry):
    return 1 if n <= window else 1 + math.ceil((n - window) / (window - carry))


def seq_vector(name, description, samples, window, carry, aggregator="m", seed=3):
    """Self-MoA-Seq over given samples: round 1 takes a window, later rounds carry the synthesis r times."""
    requests, synthesis, position, t = [], None, 0, 0
    while position < len(samples):
        take = window if synthesis is None else window - carry
        new = samples[position:position + take]
        position += len(new)
        t += 1
        carried = [] if synthesis is None else [synthesis] * carry
        reply = f"synthesis of round {t}"
        requests.append(req(aggregator, seed, carried + new, replies=[reply], carried=len(carried), role="aggregator"))
        synthesis = reply
    assert t == seq_rounds(len(samples), window, carry)
    return {"name": name, "description": description, "method": "self_moa_seq",
            "prompt": [{"role": "user", "content": "Summarise the plot of Hamlet."}],
            "params": {"samples": samples, "aggregator": aggregator, "window": window, "carry": carry, "seed": seed},
            "requests": requests, "expected": {"answer": synthesis, "calls": t, "requests": t, "rounds": t}}


def main() -> None:
    vectors = [
        moa_vector("moa-2-layer", "Three proposers, then the aggregator: 3 + 1 calls; references in order.",
                   [["a", "b", "c"]], "z", seed=10),
        moa_vector("moa-3-layer", "Two proposer layers of two: layer 2 sees layer 1; 2 + 2 + 1 calls.",
                   [["a", "b"], ["a", "b"]], "z", seed=0),
        moa_vector("moa-failed-proposer", "Proposer b fails after its retries: dropped; a and c are numbered 1 and 2.",
                   [["a", "b", "c"]], "z", seed=0, fail={"b"}),
        moa_vector("moa-min-ok-not-met", "min_ok=2 and one of two proposers fails: an error, no aggregation.",
                   [["a", "b"]], "z", seed=0, fail={"b"}, min_ok=2),
        moa_vector("moa-existing-system-message", "The caller's system message gets the block after a blank line.",
                   [["a"]], "z", seed=4, prompt=[{"role": "system", "content": "Be terse."},
                                                 {"role": "user", "content": "What is 6 * 7?"}]),
        {"name": "self-moa-n6", "description": "Six samples in one request with n=6 and the base seed; 6 + 1 calls.",
         "method": "self_moa", "prompt": [{"role": "user", "content": "Name a prime."}],
         "params": {"model": "m", "n": 6, "seed": 5},
         "requests": [req("m", 5, n=6), req("m", 5, [f"m sample {5 + j}" for j in range(6)], replies=["m final"],
                                              role="aggregator")],
         "expected": {"answer": "m final", "calls": 7, "requests": 2}},
        {"name": "self-moa-n-ignored", "description": "The server returns one choice for n=4: samples 1..3 are "
         "asked for one by one with seeds S+1..S+3.",
         "method": "self_moa", "prompt": [{"role": "user", "content": "Name a prime."}],
         "params": {"model": "m", "n": 4, "seed": 7},
         "requests": [req("m", 7, n=4, replies=["m sample 7"]), req("m", 8), req("m", 9), req("m", 10),
                      req("m", 7, [f"m sample {s}" for s in range(7, 11)], replies=["m final"], role="aggregator")],
         "expected": {"answer": "m final", "calls": 5, "requests": 5}},
        seq_vector("seq-n-below-window", "n=4 <= w=6: one aggregation, exactly Self-MoA on the same samples.",
                   [f"s{i}" for i in range(4)], 6, 3),
        seq_vector("seq-n-equals-window-plus-one", "n=7, w=6, r=3: round 2 holds 3 carried copies and 1 new sample.",
                   [f"s{i}" for i in range(7)], 6, 3),
        seq_vector("seq-last-round-partial", "n=10, w=6, r=3: rounds take samples 0-5, 6-8, then 9 alone.",
                   [f"s{i}" for i in range(10)], 6, 3),
        seq_vector("seq-carry-window-minus-one", "w=3, r=2: one new sample per round after the first.",
                   [f"s{i}" for i in range(5)], 3, 2),
        {"name": "seq-generated", "description": "n=8, w=6, r=3, generated: the first window in one request "
         "(n=6, seed S), the rest in one request per round (n=2, seed S+6); 8 + 2 calls.",
         "method": "self_moa_seq", "prompt": [{"role": "user", "content": "Name a prime."}],
         "params": {"model": "m", "n": 8, "window": 6, "carry": 3, "seed": 0},
         "requests": [req("m", 0, n=6), req("m", 6, n=2),
                      req("m", 0, [f"m sample {j}" for j in range(6)], replies=["round 1"], role="aggregator"),
                      req("m", 0, ["round 1"] * 3 + ["m sample 6", "m sample 7"], replies=["round 2"], carried=3,
                          role="aggregator")],
         "expected": {"answer": "round 2", "calls": 10, "requests": 4, "rounds": 2}},
    ]
    for vector in vectors:
        (HERE / f"{vector['name']}.json").write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {len(vectors)} vectors to {HERE}")


if __name__ == "__main__":
    main()
