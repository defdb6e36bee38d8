"""The paper's regression, score = a * quality + b * diversity + c, for the offline reproduction.

The paper (Li et al. 2025, Table 4) explains Self-MoA's edge by fitting, over many MoA configurations, the
aggregate's score against the quality (mean accuracy) and the diversity (Vendi score, ``selfmoa.vendi_score``)
of the proposals, and finds a > b in every domain. ``bench.reproduce`` runs that experiment against the mock
models; selfmoa itself never needs the fit, so it lives here, with the reproduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from selfmoa import ConfigError


def _require(ok: bool, name: str, value: object, why: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}; {fix}")


def fit_quality_diversity(rows: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    """Least-squares fit of ``score = a * quality + b * diversity + c`` on standardised inputs.

    ``rows`` are ``(quality, diversity, score)`` triples, one per configuration. Quality and diversity
    are standardised (zero mean, unit variance) so that ``a`` and ``b`` compare: each is the change in
    score per standard deviation. Returns ``a``, ``b``, ``c``, their standard errors ``se_a`` and ``se_b``,
    and ``r2``, as the paper's Table 4 reports them.

    >>> fit = fit_quality_diversity([(q, d, 2 * q + d) for q, d in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1)]])
    >>> round(fit["a"] / fit["b"], 6) > 1, round(fit["r2"], 6)
    (True, 1.0)
    """
    _require(len(rows) >= 4, "rows", len(rows), "a fit of 3 coefficients needs at least 4 configurations",
           "pass more (quality, diversity, score) rows")

    def standardised(values: list[float]) -> list[float]:
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        _require(spread > 0, "rows", "constant column", "quality and diversity must vary across configurations",
               "use configurations that differ")
        return [(v - mean) / spread for v in values]

    quality = standardised([float(r[0]) for r in rows])
    diversity = standardised([float(r[1]) for r in rows])
    scores = [float(r[2]) for r in rows]
    design = [[q, d, 1.0] for q, d in zip(quality, diversity)]
    gram = [[sum(x[i] * x[j] for x in design) for j in range(3)] for i in range(3)]
    inverse = _invert3(gram)
    moments = [sum(x[i] * y for x, y in zip(design, scores)) for i in range(3)]
    a, b, c = (sum(inverse[i][j] * moments[j] for j in range(3)) for i in range(3))
    residuals = [y - (a * x[0] + b * x[1] + c) for x, y in zip(design, scores)]
    mean = sum(scores) / len(scores)
    total = sum((y - mean) ** 2 for y in scores)
    error = sum(r * r for r in residuals)
    sigma2 = error / max(1, len(rows) - 3)
    return {"a": a, "b": b, "c": c, "se_a": math.sqrt(max(0.0, sigma2 * inverse[0][0])),
            "se_b": math.sqrt(max(0.0, sigma2 * inverse[1][1])), "r2": 1 - error / total if total else 1.0,
            "n": len(rows)}


def _invert3(m: list[list[float]]) -> list[list[float]]:
    """The inverse of a 3 x 3 matrix by cofactors."""
    cof = [[m[(i + 1) % 3][(j + 1) % 3] * m[(i + 2) % 3][(j + 2) % 3]
            - m[(i + 1) % 3][(j + 2) % 3] * m[(i + 2) % 3][(j + 1) % 3] for j in range(3)] for i in range(3)]
    det = sum(m[0][j] * cof[0][j] for j in range(3))
    _require(abs(det) > 1e-12, "rows", "collinear", "quality and diversity move together exactly",
           "use configurations where they vary independently")
    return [[cof[j][i] / det for j in range(3)] for i in range(3)]
