"""Paired statistics over seeds: per-seed differences between two arms, a 95% t-interval, sign agreement, the
minimum detectable effect at 80% power for the seeds there were, and a reading that states only what the
interval supports (and, where it includes zero, what the study could have seen), in the same words whichever way
it falls. Intervals and power come from scipy.stats (t and noncentral t)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from scipy import optimize as _opt
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
    sd: Optional[float] = None                               # standard deviation of the per-seed differences
    mde: Optional[float] = None                              # minimum detectable |effect| at `power` (two-sided)
    power: float = 0.8
    verdict: str = "insufficient"                            # "above zero" | "below zero" | "includes zero" | ...
    reading: str = ""                                        # one sentence (set by `paired`)

    def read(self) -> str:
        """One sentence: the interval and what it supports (identical wording for either sign)."""
        name = f"{self.arm} - {self.baseline}, {self.metric}"
        if self.n < 2 or self.mean is None:
            return f"{name}: fewer than 2 paired seeds; no interval."
        ci = f"[{self.ci_low:+.4g}, {self.ci_high:+.4g}]"
        agree = f"{self.positive} of {self.n} seeds positive, {self.negative} negative"
        if self.verdict == "includes zero" and self.sd == 0:
            what = "the difference is the same in every seed: exactly zero"
        elif self.verdict == "includes zero":
            what = (f"the interval includes zero: not detectable at this power (MDE {self.mde:.3g} at "
                    f"{self.power:.0%} power with {self.n} seeds)")
        else:
            what = f"the interval lies {self.verdict}: {self.arm} is {'higher' if self.verdict == 'above zero' else 'lower'}"
        mde = "" if self.verdict == "includes zero" or self.mde is None else f" (MDE {self.mde:.3g})"
        return f"{name}: mean {self.mean:+.4g}, {int(self.level * 100)}% CI {ci} ({agree}); {what}{mde}."


def power_t(effect: float, sd: float, n: int, level: float = 0.95) -> float:
    """Power of the two-sided paired t-test at significance 1 - level to reject zero when the true mean
    difference is `effect` and the differences' standard deviation `sd` (noncentral t, n - 1 df)."""
    df = n - 1
    crit = float(_st.t.ppf(0.5 + level / 2, df))
    nc = abs(effect) * math.sqrt(n) / sd
    lower = float(_st.nct.cdf(-crit, df, nc))  # the far tail: scipy returns NaN where it is below ~1e-16
    return float(_st.nct.sf(crit, df, nc)) + (lower if math.isfinite(lower) else 0.0)


def mde(sd: Optional[float], n: int, level: float = 0.95, power: float = 0.8) -> Optional[float]:
    """The minimum detectable effect: the true mean difference the two-sided paired t-test on n seeds detects
    with probability `power`, for differences of standard deviation `sd` (None for n < 2 or unknown sd)."""
    if sd is None or n < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    hi = sd
    while power_t(hi, sd, n, level) < power:
        hi *= 2
    return float(_opt.brentq(lambda e: power_t(e, sd, n, level) - power, 0.0, hi, xtol=1e-12 * sd, rtol=1e-10))


def seeds_for(effect: float, sd: float, level: float = 0.95, power: float = 0.8, max_n: int = 100_000) -> Optional[int]:
    """The fewest paired seeds with which the two-sided paired t-test detects a true mean difference `effect`
    with probability `power` (differences of standard deviation `sd`); None beyond max_n."""
    if sd == 0:
        return 2
    n = 2
    while n <= max_n:
        if power_t(abs(effect), sd, n, level) >= power:
            return n
        n += 1 if n < 200 else n // 10
    return None


def paired(metric: str, arm: str, baseline: str, seeds: Sequence, a: Sequence, b: Sequence,
           level: float = 0.95, power: float = 0.8) -> PairedDiff:
    """Paired differences a_s - b_s over seeds (skipping missing or non-finite values) and their t-interval."""
    diffs = []
    for x, y in zip(a, b):
        ok = x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
        diffs.append(float(x) - float(y) if ok else None)
    vals = [d for d in diffs if d is not None]
    res = PairedDiff(metric=metric, arm=arm, baseline=baseline, seeds=list(seeds), diffs=diffs, n=len(vals),
                     level=level, power=power, positive=sum(d > 0 for d in vals), negative=sum(d < 0 for d in vals))
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
    res.sd, res.mde = sd, mde(sd, n, level, power)
    res.verdict = "above zero" if res.ci_low > 0 else "below zero" if res.ci_high < 0 else "includes zero"
    res.reading = res.read()
    return res
