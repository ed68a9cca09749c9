"""Paired statistics over seeds: per-seed differences between two arms, a 95% t-interval, sign agreement,
and a reading that states only what the interval supports, in the same words whichever way it falls."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from scipy import stats as _st

from ..result import Result


@dataclasses.dataclass
class PairedDiff(Result):
    """`arm - baseline` for one metric over paired seeds, with its mean, t-interval and sign agreement."""

    metric: str = ""
    arm: str = ""
    baseline: str = ""
    seeds: list = dataclasses.field(default_factory=list)
    diffs: list = dataclasses.field(default_factory=list)   # per seed (None where either value is missing)
    n: int = 0                                               # seeds with both values
    mean: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    level: float = 0.95
    positive: int = 0                                        # seeds with diff > 0
    negative: int = 0                                        # seeds with diff < 0
    verdict: str = "insufficient"                            # "above zero" | "below zero" | "includes zero" | ...
    reading: str = ""                                        # one sentence (set by `paired`)

    def read(self) -> str:
        """One sentence: the interval and what it supports (identical wording for either sign)."""
        name = f"{self.arm} - {self.baseline}, {self.metric}"
        if self.n < 2 or self.mean is None:
            return f"{name}: fewer than 2 paired seeds; no interval."
        ci = f"[{self.ci_low:+.4g}, {self.ci_high:+.4g}]"
        agree = f"{self.positive} of {self.n} seeds positive, {self.negative} negative"
        if self.verdict == "includes zero":
            what = "the interval includes zero: no difference is supported"
        else:
            what = f"the interval lies {self.verdict}: {self.arm} is {'higher' if self.verdict == 'above zero' else 'lower'}"
        return f"{name}: mean {self.mean:+.4g}, {int(self.level * 100)}% CI {ci} ({agree}); {what}."


def paired(metric: str, arm: str, baseline: str, seeds: Sequence, a: Sequence, b: Sequence,
           level: float = 0.95) -> PairedDiff:
    """Paired differences a_s - b_s over seeds (skipping missing or non-finite values) and their t-interval."""
    diffs = []
    for x, y in zip(a, b):
        ok = x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
        diffs.append(float(x) - float(y) if ok else None)
    vals = [d for d in diffs if d is not None]
    res = PairedDiff(metric=metric, arm=arm, baseline=baseline, seeds=list(seeds), diffs=diffs, n=len(vals),
                     level=level, positive=sum(d > 0 for d in vals), negative=sum(d < 0 for d in vals))
    if len(vals) < 2:
        if vals:
            res.mean = vals[0]
        res.reading = res.read()
        return res
    n = len(vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in vals) / (n - 1))
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    res.mean, res.ci_low, res.ci_high = mean, mean - half, mean + half
    res.verdict = "above zero" if res.ci_low > 0 else "below zero" if res.ci_high < 0 else "includes zero"
    res.reading = res.read()
    return res
