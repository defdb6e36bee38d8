"""The measures beyond the invariants V1, V2 (tests/test_invariants.py): the similarity matrix, the eigen-solver
(selfmoa), the regression (bench/regression.py)."""

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

