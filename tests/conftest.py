"""Hypothesis profiles. The default ("ci") is deterministic: the same examples on every run and machine,
no example database, and no deadline (many properties cross threads or loopback HTTP, whose timing a busy
machine cannot promise). HYPOTHESIS_PROFILE=explore searches randomly, with more examples, to find new bugs
(pin any it finds with @example); "explore-short" is the same search with fewer examples, the pass .ci/run makes
so that races and other bugs a fixed seed never meets show up in CI."""

import os

import pytest
from hypothesis import HealthCheck, settings

import selfmoa

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore-short", max_examples=60, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite starts selfmoa, mock_models and the benchmarks as processes some 170 times. Where the environment
# sets PYTHONDONTWRITEBYTECODE, each start compiled them from source again (selfmoa.py alone takes about 0.06 s
# of CPU); these processes write and reuse __pycache__ as Python does by default (git ignores it).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture
def retries_at_once(monkeypatch):
    """Every HTTPClient made meanwhile, the command line's too, retries without its backoff wait (0.25 s on
    average at the default backoff): what is retried, and what it says, stays the same."""
    init = selfmoa.HTTPClient.__init__

    def without_waits(self, *args, **kwargs):
        init(self, *args, **{"sleep": lambda seconds: None, **kwargs})
    monkeypatch.setattr(selfmoa.HTTPClient, "__init__", without_waits)
