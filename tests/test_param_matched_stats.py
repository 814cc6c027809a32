"""experiments.stats: t quantiles against published tables, intervals, verdict words, interpolation."""

from __future__ import annotations

import math

import pytest

from experiments import stats


@pytest.mark.parametrize(
    ("df", "q"),
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)],
)
def test_t_quantiles_match_the_table(df, q):
    # Two-sided 95% critical values of Student's t (any statistics textbook's table).
    assert stats.t_quantile(0.95, df) == pytest.approx(q, abs=1e-4)


def test_t_quantile_at_90_percent_and_bad_input():
    assert stats.t_quantile(0.90, 2) == pytest.approx(2.9200, abs=1e-4)
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="level"):
        stats.t_quantile(1.5, 3)


def test_interval_by_hand():
    iv = stats.interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["sd"] == 1.0 and iv["n"] == 3
    half = 4.302653 / math.sqrt(3)
    assert iv["lo"] == pytest.approx(2 - half, abs=1e-5) and iv["hi"] == pytest.approx(
        2 + half, abs=1e-5
    )
    one = stats.interval([1.5])
    assert one["sd"] is None and one["lo"] is None and one["mean"] == 1.5


def test_paired_differences_use_common_seeds_only():
    d = stats.paired({0: 1.0, 1: 1.2, 2: 1.1, 3: 9.0}, {0: 1.1, 1: 1.3, 2: 1.2})
    assert d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(-0.1)
    assert d["sd"] == pytest.approx(0.0, abs=1e-12) and d["hi"] < 0
    assert stats.paired({0: 1.0}, {1: 1.0}) is None


def test_verdict_words_follow_the_interval():
    lower = stats.verdict(stats.paired({0: 1.0, 1: 1.1, 2: 1.05}, {0: 1.2, 1: 1.25, 2: 1.3}), "T")
    assert lower.startswith("lower CE than T") and "excludes 0" in lower
    higher = stats.verdict(stats.paired({0: 1.3, 1: 1.3, 2: 1.4}, {0: 1.2, 1: 1.25, 2: 1.3}), "T")
    assert higher.startswith("higher CE than T")
    crossing = stats.verdict(stats.paired({0: 1.0, 1: 1.4, 2: 1.2}, {0: 1.2, 1: 1.2, 2: 1.2}), "T")
    assert crossing.startswith("no resolved difference") and "contains 0" in crossing
    assert "lower" not in crossing and "beats" not in crossing
    single = stats.verdict(stats.paired({0: 1.0}, {0: 1.2}), "T")
    assert "no claim" in single


def test_log_interpolation():
    curve = [(0, 9.0), (10, 3.0), (1000, 1.0)]
    assert stats.log_interpolate(curve, 100) == pytest.approx(2.0)  # halfway in log x
    assert stats.log_interpolate(curve, 10) == pytest.approx(3.0)
    assert stats.log_interpolate(curve, 1000) == pytest.approx(1.0)
    assert stats.log_interpolate(curve, 5) is None and stats.log_interpolate(curve, 2000) is None
