"""experiments/lipschitz_c/summarize.py: runs found by their bound, rows against hand-computed values."""

import importlib.util
import json
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "lipschitz_c" / "summarize.py"
_spec = importlib.util.spec_from_file_location("lipschitz_c_summarize", _PATH)
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def _run(path, lipschitz, rates, accuracy=0.9, finished=True):
    """A run directory with the few fields the summary reads."""
    path.mkdir(parents=True)
    config = {"spectral_norm": lipschitz is not None, "lipschitz": lipschitz if lipschitz is not None else 0.9}
    (path / "config.json").write_text(json.dumps(config))
    if not finished:
        return
    (path / "metrics.json").write_text(json.dumps({"accuracy": accuracy}))
    stages = [{"convergence_rate": r} for r in rates]
    evaluation = {"indices": {"recurrence": 0.5, "divergence": 0.25, "per_stage": stages,
                              "lipschitz": {"certified": [[lipschitz or 3.0] * 2] * len(rates)}},
                  "occlusion": {"auc": 0.75}}
    (path / "eval.json").write_text(json.dumps(evaluation))


def test_runs_are_found_by_bound_with_their_rows(tmp_path):
    grid, folder = tmp_path / "grid", tmp_path / "exp"
    _run(grid / "digitclutter" / "l0-s0", None, [10.0, 10.0, 10.0], accuracy=0.97)
    _run(grid / "digitclutter" / "sn-l0-s0", 0.9, [1.0, 10.0, 100.0])
    _run(folder / "c0.5-s0", 0.5, [0.1, 1.0, 1.0])
    _run(folder / "c0.25-s0", 0.25, [1.0], finished=False)
    found, missing = summarize.collect(str(grid), str(folder))
    assert sorted(found) == [0.5, 0.9, math.inf]
    assert missing == [str(folder / "c0.25-s0")]
    lines = summarize.table(found).splitlines()[2:]
    # Sorted by c, unconstrained last; log10 rates by hand: (-1 + 0 + 0) / 3, (0 + 1 + 2) / 3, 1.
    assert lines[0].startswith("| 0.5 | 0.9000 |") and "| -0.333 | [0.50, 1.50] | 0.500 |" in lines[0]
    assert "| 1.000 / 10.000 / 100.000 | +1.000 | [0.10, 1.90] | 0.900 |" in lines[1]
    assert lines[2].startswith("| none | 0.9700 |") and "| +1.000 | - | 3.000 |" in lines[2]


def test_main_writes_the_table_and_figure(tmp_path):
    grid, folder = tmp_path / "grid", tmp_path / "exp"
    _run(folder / "c0.5-s0", 0.5, [0.1, 1.0, 1.0])
    assert summarize.main(["--grid", str(grid), "--folder", str(folder)]) == 0
    assert (folder / "summary.md").read_text() == summarize.table(summarize.collect(str(grid), str(folder))[0])
    assert (folder / "rates_vs_c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "runs, message",
    [
        ({"c0.5-s0": (0.25, [1.0])}, "lipschitz 0.25, the folder name says 0.5"),
        ({"c0.9-s0": (0.9, [1.0])}, "a second run with bound c = 0.9"),
        ({"c1.2.3-s0": (0.5, [1.0])}, "expected a folder named c<number>-s0"),
        ({"c0.5-s0": (0.5, [1.0, None])}, "convergence rate per stage"),
    ],
)
def test_runs_that_cannot_be_summarised_are_exit_2_with_one_line(tmp_path, capsys, runs, message):
    grid, folder = tmp_path / "grid", tmp_path / "exp"
    _run(grid / "digitclutter" / "sn-l0-s0", 0.9, [1.0])
    for name, (lipschitz, rates) in runs.items():
        _run(folder / name, lipschitz, rates)
    assert summarize.main(["--grid", str(grid), "--folder", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (folder / "summary.md").exists() and not (folder / "rates_vs_c.png").exists()
