"""The paper's regression, score = a * quality + b * diversity + c (its Table 4).

It lives in ``selfmoa_eval`` (``selfmoa eval`` fits it over the compositions of a user's own run, and the
offline reproduction runs through that command); this module keeps the old import path working.
"""

from __future__ import annotations

from selfmoa_eval import fit_quality_diversity

__all__ = ["fit_quality_diversity"]
