"""The report's paired comparison: a 95 % Student-t interval over per-seed differences."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "report.py"
_spec = importlib.util.spec_from_file_location("report", _PATH)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def test_paired_interval_by_hand():
    # Differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303 -> half width 4.303 / sqrt(3) = 2.4843.
    interval = report.paired_interval({0: 1.0, 1: 2.5, 2: 3.0, 3: 9.0}, {0: 0.0, 1: 0.5, 2: 0.0})
    assert interval["n"] == 3 and interval["mean"] == pytest.approx(2.0)
    assert interval["low"] == pytest.approx(2.0 - 2.48434, abs=1e-4)
    assert interval["high"] == pytest.approx(2.0 + 2.48434, abs=1e-4)
    assert report.verdict(interval) == "no detectable difference"


def test_paired_interval_edge_cases_and_verdicts():
    assert report.paired_interval({0: 1.0}, {1: 1.0}) is None
    single = report.paired_interval({0: 1.0}, {0: 0.25})
    assert single == {"n": 1, "mean": 0.75, "low": None, "high": None}
    assert report.verdict(single) == "one seed only: no interval"
    assert report.verdict(report.paired_interval({0: 1.0, 1: 1.1}, {0: 0.0, 1: 0.0})) == "A > B"
    assert report.verdict(report.paired_interval({0: 0.0, 1: 0.1}, {0: 1.0, 1: 1.0})) == "A < B"


def test_coupling_comes_from_the_runs_configs_and_must_agree():
    runs = {0: {"config": {"coupling": 0.9}}, 1: {"config": {"coupling": 0.9}}}
    assert report.coupling_of(runs) == 0.9
    with pytest.raises(ValueError, match=r"disagree on the coupling: \[0.5, 0.9\]"):
        report.coupling_of({0: {"config": {"coupling": 0.9}}, 1: {"config": {"coupling": 0.5}}})
