"""Small statistics for the experiments: t-intervals over seeds, paired differences, the words
that may describe them, and interpolation of evaluation curves at a budget.

The t quantiles come from ``scipy.stats.t`` (scipy is a dependency of jax itself);
``tests/test_param_matched_stats.py`` holds them to published table values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def t_quantile(level: float, df: int) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must lie in (0, 1)")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df={df!r} must be a positive int")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """n, mean, sd and the ``level`` t-interval of the mean (sd and interval None for n < 2)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("interval of no values")
    n, mean = len(vals), statistics.fmean(vals)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None, "level": level}
    sd = statistics.stdev(vals)
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "level": level}


def paired(a: dict[Any, float], b: dict[Any, float], level: float = 0.95) -> dict[str, Any] | None:
    """The t-interval of ``a[k] - b[k]`` over the keys (seeds) both have; None if they share none."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    out = interval([a[k] - b[k] for k in keys], level)
    out["seeds"] = keys
    return out


def verdict(diff: dict[str, Any] | None, baseline: str, unit: str = "nats") -> str:
    """Words for a CE difference (model minus ``baseline``) that follow its interval.

    Lower CE is better. "lower"/"higher" only when the whole interval is on one side of zero;
    otherwise "no resolved difference" (and nothing at all is claimed from one seed).
    """
    if diff is None:
        return f"no paired seeds with {baseline}"
    mean = diff["mean"]
    if diff["lo"] is None:
        return f"{mean:+.4f} {unit} vs {baseline} from 1 seed: no interval, no claim"
    span = (
        f"{mean:+.4f} {unit}, {100 * diff['level']:.0f}% CI [{diff['lo']:+.4f}, {diff['hi']:+.4f}]"
    )
    if diff["hi"] < 0:
        return f"lower CE than {baseline} ({span}; the interval excludes 0)"
    if diff["lo"] > 0:
        return f"higher CE than {baseline} ({span}; the interval excludes 0)"
    return f"no resolved difference from {baseline} ({span}; the interval contains 0)"


def log_interpolate(curve: Sequence[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on a curve of ``(x, y)`` points, linear in ``log x`` (points with x <= 0 are
    ignored); None when ``x`` lies outside the curve (no extrapolation)."""
    pts = sorted((float(px), float(py)) for px, py in curve if px > 0)
    if not pts or x <= 0:
        return None
    tol = 1e-9 * max(abs(x), 1.0)
    if x < pts[0][0] - tol or x > pts[-1][0] + tol:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 - tol <= x <= x1 + tol:
            if x1 == x0:
                return y1
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + min(max(w, 0.0), 1.0) * (y1 - y0)
    return pts[-1][1]


def fmt_interval(iv: dict[str, Any] | None, signed: bool = False) -> str:
    """``mean ± sd [lo, hi]`` (just the mean for one seed)."""
    if iv is None:
        return "-"
    f = "{:+.4f}" if signed else "{:.4f}"
    if iv["sd"] is None:
        return f.format(iv["mean"]) + " (1 seed)"
    return f"{f.format(iv['mean'])} ± {iv['sd']:.4f} [{f.format(iv['lo'])}, {f.format(iv['hi'])}]"
