"""The accuracy-vs-time plot: accuracy axis [0, 1], a 95% Wilson interval per point."""

from __future__ import annotations

import math

import pytest

from powerfast.evaluation import MethodSummary, Summary, accuracy_vs_time_figure, plot_accuracy_vs_time, wilson_interval


@pytest.mark.parametrize("correct, n, low, high", [
    (0, 10, 0.0, 0.27753),  # published values of the 95% Wilson score interval
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (1, 1, 0.206549, 1.0),
])
def test_wilson_interval_known_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=5e-6)


def test_wilson_interval_covers_the_estimate_and_shrinks():
    for n in (3, 30, 300):
        for correct in (0, n // 3, n):
            low, high = wilson_interval(correct, n)
            assert 0.0 <= low <= correct / n <= high <= 1.0
    assert wilson_interval(30, 300)[1] - wilson_interval(30, 300)[0] < wilson_interval(3, 30)[1] - wilson_interval(3, 30)[0]
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def summary_of(rows):
    return Summary("task", [MethodSummary(name, n, correct, correct / n if n else math.nan, seconds, 10.0)
                            for name, n, correct, seconds in rows], "out")


def test_all_zero_accuracy_keeps_the_unit_axis_and_shows_intervals(tmp_path):
    summary = summary_of([("power", 20, 0, 30.0), ("plain", 20, 0, 2.0), ("greedy", 1, 0, 1.0)])
    fig = accuracy_vs_time_figure(summary)
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.0)
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 2  # the single-sample method gets a plain point
    for bar in bars:
        (segments,) = [col.get_segments() for col in bar.lines[2]]
        (x, y_low), (_, y_high) = segments[0]
        assert (y_low, y_high) == pytest.approx(wilson_interval(0, 20))
    assert "Wilson" in ax.get_ylabel()
    path = tmp_path / "plot.png"
    plot_accuracy_vs_time(summary, path)
    assert path.read_bytes().startswith(b"\x89PNG")
