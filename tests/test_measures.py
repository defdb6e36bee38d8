"""The diversity and quality measures: Vendi score properties, the eigen-solver (selfmoa), the regression (bench)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import selfmoa
from bench.regression import fit_quality_diversity

words = st.text("abcdefgh", min_size=1, max_size=3)
texts = st.lists(st.lists(words, min_size=0, max_size=6).map(" ".join), min_size=1, max_size=8)


@given(text=st.lists(words, max_size=6).map(" ".join), n=st.integers(1, 10))
def test_vendi_of_identical_items_is_one(text, n):
    """n copies of one text have Vendi score 1."""
    assert selfmoa.vendi_score([text] * n) == pytest.approx(1.0)


@given(n=st.integers(1, 12))
def test_vendi_of_mutually_orthogonal_items_is_n(n):
    """n texts that share no word have Vendi score n."""
    assert selfmoa.vendi_score([f"w{i} x{i}" for i in range(n)]) == pytest.approx(n)


@given(items=texts, data=st.data())
def test_vendi_is_permutation_invariant(items, data):
    """Reordering the texts leaves the Vendi score unchanged."""
    shuffled = data.draw(st.permutations(items))
    assert selfmoa.vendi_score(shuffled) == pytest.approx(selfmoa.vendi_score(items), abs=1e-7)


@given(items=texts)
def test_vendi_is_between_one_and_n(items):
    """1 <= VS <= n for any texts."""
    assert 1.0 <= selfmoa.vendi_score(items) <= len(items)


@given(items=texts)
def test_similarity_matrix_is_symmetric_with_unit_diagonal(items):
    """K is symmetric, K_ii = 1 and 0 <= K_ij <= 1."""
    k = selfmoa.similarity_matrix(items)
    assert all(k[i][i] == 1.0 for i in range(len(items)))
    assert all(k[i][j] == k[j][i] and 0 <= k[i][j] <= 1 for i in range(len(items)) for j in range(len(items)))


@given(seed=st.integers(0, 10_000), size=st.integers(1, 10))
@settings(max_examples=40)
def test_eigenvalues_match_trace_and_determinant_invariants(seed, size):
    """Eigenvalues of a random symmetric matrix sum to its trace and their squares to its Frobenius norm."""
    rng = random.Random(seed)
    m = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i, size):
            m[i][j] = m[j][i] = rng.uniform(-2, 2)
    values = selfmoa.symmetric_eigenvalues(m)
    assert sum(values) == pytest.approx(sum(m[i][i] for i in range(size)), abs=1e-9)
    assert sum(v * v for v in values) == pytest.approx(sum(x * x for row in m for x in row), abs=1e-8)


def test_regression_recovers_known_coefficients():
    rng = random.Random(7)
    rows = [(q, d, 3.0 * q + 1.0 * d + 5 + rng.gauss(0, 0.01))
            for q, d in ((rng.uniform(0, 1), rng.uniform(0, 1)) for _ in range(200))]
    fit = fit_quality_diversity(rows)
    qs = [r[0] for r in rows]
    ds = [r[1] for r in rows]
    sd = lambda xs: math.sqrt(sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs))  # noqa: E731
    assert fit["a"] == pytest.approx(3.0 * sd(qs), rel=0.01)
    assert fit["b"] == pytest.approx(1.0 * sd(ds), rel=0.03)
    assert fit["r2"] > 0.99 and 0 < fit["se_a"] < 0.01


def test_regression_refuses_too_few_or_constant_rows():
    with pytest.raises(selfmoa.ConfigError, match="at least 4"):
        fit_quality_diversity([(1, 2, 3)] * 3)
    with pytest.raises(selfmoa.ConfigError, match="must vary"):
        fit_quality_diversity([(1, d, d) for d in range(5)])


def test_V2_reporting_computes_diversity_only_when_asked():
    """to_dict() leaves the O(n^3) Vendi score out unless asked: reporting never costs more than the run."""
    result = selfmoa.moa("Q", ["a", "b"], "c", layers=3, complete=lambda r: f"{r.model} says {r.seed}", seed=0)
    assert "diversity" not in result.to_dict() and "diversity" not in result.to_dict(trace=False)
    data = result.to_dict(diversity=True)
    assert set(data["diversity"]) == {"1", "2"}
    assert data["diversity"]["1"] == selfmoa.vendi_score(["a says 0", "b says 1"])


def test_V2_the_command_line_computes_diversity_only_with_the_diversity_flag(monkeypatch, capsys):
    """--json alone never runs the O(n^3) Vendi score; --json --diversity does."""
    import json

    from mock_models import MockServer

    calls = []
    monkeypatch.setattr(selfmoa, "vendi_score", lambda texts: calls.append(len(texts)) or 1.0)
    with MockServer() as server:
        argv = ["--base-url", server.base_url, "-m", "generalist", "-n", "3", "--seed", "0", "--json", "Hi"]
        assert selfmoa.main(argv, environ={}) == 0
        assert calls == [] and "diversity" not in json.loads(capsys.readouterr().out)
        assert selfmoa.main(argv + ["--diversity"], environ={}) == 0
        assert calls == [3] and json.loads(capsys.readouterr().out)["diversity"] == {"1": 1.0}
