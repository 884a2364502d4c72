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
    assert interval["n"] == 3 and interval["above"] == 3 and interval["mean"] == pytest.approx(2.0)
    assert interval["low"] == pytest.approx(2.0 - 2.48434, abs=1e-4)
    assert interval["high"] == pytest.approx(2.0 + 2.48434, abs=1e-4)
    assert report.verdict(interval) == "no detectable difference"


def test_paired_interval_edge_cases_and_verdicts():
    assert report.paired_interval({0: 1.0}, {1: 1.0}) is None
    single = report.paired_interval({0: 1.0}, {0: 0.25})
    assert single == {"n": 1, "above": 1, "mean": 0.75, "sd": None, "low": None, "high": None}
    assert report.paired_interval({0: 1.0, 1: 0.0, 2: 2.0}, {0: 1.5, 1: 0.0, 2: 1.0})["above"] == 1  # -0.5, 0, 1
    assert report.verdict(single) == "one seed only: no interval"
    assert report.verdict(report.paired_interval({0: 1.0, 1: 1.1}, {0: 0.0, 1: 0.0})) == "A > B"
    assert report.verdict(report.paired_interval({0: 0.0, 1: 0.1}, {0: 1.0, 1: 1.0})) == "A < B"


def test_coupling_comes_from_the_runs_configs_and_must_agree():
    runs = {0: {"config": {"coupling": 0.9}}, 1: {"config": {"coupling": 0.9}}}
    assert report.coupling_of(runs) == 0.9
    with pytest.raises(ValueError, match=r"disagree on the coupling: \[0.5, 0.9\]"):
        report.coupling_of({0: {"config": {"coupling": 0.9}}, 1: {"config": {"coupling": 0.5}}})


def _interval(diffs):
    return report.paired_interval(dict(enumerate(diffs)), dict.fromkeys(range(len(diffs)), 0.0))


@pytest.mark.parametrize(("diffs", "expected", "answer"), [
    ([1.0, 1.1, 0.9], "A > B", "agrees"),
    ([-1.0, -1.1, -0.9], "A > B", "disagrees"),
    ([-1.0, 1.1, 0.2], "A > B", "not shown"),
    ([-1.0, -1.1, -0.9], "A < B", "agrees"),
    ([1.0, 1.1, 0.9], "A <= B", "disagrees"),  # "does not help", yet it helps
    ([-1.0, -1.1, -0.9], "A <= B", "agrees"),  # it hurts: still does not help
    ([-1.0, 1.1, 0.2], "A <= B", "not contradicted"),  # no difference found is not no difference
    ([1.0, 1.1, 0.9], "A < B", "disagrees"),
    ([1.0], "A > B", "open"),
    ([1.0, 1.1], None, "-"),
])
def test_agreement_with_the_papers_expectation(diffs, expected, answer):
    assert report.agreement(_interval(diffs), expected) == answer


def test_t_quantiles_beyond_the_table_stay_close_to_the_exact_values():
    # Exact two-sided 95 % quantiles (standard tables): df 40, 60, 120.
    for df, exact in ((40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert report.t975(df) == pytest.approx(exact, rel=2e-3)
    assert report.t975(5) == 2.571


def test_seeds_to_resolve_by_hand():
    # Differences 0, 2: mean 1, sd sqrt(2). Smallest n with t(n-1) * sqrt(2) / sqrt(n) < 1:
    # n = 10: 2.262 * 1.4142 / 3.1623 = 1.0116 (no); n = 11: 2.228 * 1.4142 / 3.3166 = 0.9500 (yes).
    assert report.seeds_to_resolve(_interval([0.0, 2.0])) == 11
    assert report.seeds_to_resolve(_interval([1.0])) is None
    assert report.seeds_to_resolve(_interval([-1.0, 1.0])) is None  # mean 0: no n resolves it
    assert report.seeds_to_resolve(_interval([-1.0, 1.02]), most=50) == 51


def test_splice_replaces_only_the_marked_section():
    document = f"# Results\nintro\n{report.BEGIN}\nold table\n{report.END}\nafter\n"
    spliced = report.splice(document, "new table")
    assert spliced == f"# Results\nintro\n{report.BEGIN}\nnew table\n{report.END}\nafter\n"
    assert report.splice(spliced, "new table") == spliced  # idempotent
    with pytest.raises(ValueError, match="no '<!-- grid-report:begin -->'"):
        report.splice("# Results\n", "x")
    with pytest.raises(ValueError):
        report.splice(f"{report.END}\n{report.BEGIN}\n", "x")


def test_a_results_file_without_markers_is_refused_before_anything_is_written(tmp_path, capsys):
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "summary.json").write_text('{"runs": [], "totals": {"cpu_seconds": 0}}')
    results = tmp_path / "results.md"
    results.write_text("# Results\n")
    code = report.main(["--grid", str(grid), "--figures", str(tmp_path / "figures"), "--results", str(results)])
    assert code == 2
    assert "results.md: no '<!-- grid-report:begin -->'" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists() and not (grid / "report.md").exists()
    assert results.read_text() == "# Results\n"


def _row(condition, seed, train=None, epochs=0.0, evaluation=0.0, certified=None):
    timing = {"epochs_cpu_seconds": epochs, "evaluation": {"cpu_seconds": evaluation}}
    if train is not None:
        timing["train"] = {"cpu_seconds": train}
    indices = {"recurrence": 0.5, "divergence": 0.25, "lipschitz": {"certified": certified},
               "per_stage": [{"convergence_rate": 1.5, "recurrence_per_block": [1.0, 0.9, -10.0]},
                             {"convergence_rate": None, "recurrence_per_block": [0.8, None]}]}
    return {"dataset": "fashion_mnist", "condition": condition, "seed": seed, "timing": timing,
            "test": {"accuracy": 0.9}, "evaluation": {"indices": indices, "occlusion": {"auc": 0.5}}}


def test_training_cpu_survives_a_killed_call_and_totals_name_unrecorded_runs():
    killed = _row("l0", 0, train=600.0, epochs=1400.0, evaluation=100.0)  # first call killed: epochs know more
    whole = _row("l1", 0, train=1500.0, epochs=1450.0, evaluation=50.0)  # set-up and test beyond the epochs
    lost = _row("sn-l0", 0, evaluation=30.0)
    assert report.training_cpu(killed) == 1400.0 and report.training_cpu(whole) == 1500.0
    assert report.training_cpu(lost) is None
    assert report.cpu_totals([killed, whole, lost]) == (1400.0 + 100 + 1500 + 50 + 30, ["fashion_mnist sn-l0 s0"])


def test_runs_table_has_one_row_per_run_with_its_numbers():
    rows = [_row("l0", 1, train=120.0), _row("l0", 0, certified=[[0.5, None], [0.875]])]
    lines = report.runs_table(rows, "fashion_mnist").splitlines()
    assert len(lines) == 4
    # RI median: of 1.0, 0.9, -10.0 and 0.8 (the skipped term left out).
    assert lines[2] == "| l0 | 0 | 0.900 | 0.50 | 0.85 | 0.25 | 1.50 / n/a | 0.875 | 0.50 | n/a |"
    assert lines[3] == "| l0 | 1 | 0.900 | 0.50 | 0.85 | 0.25 | 1.50 / n/a | n/a | 0.50 | 2.0 |"


def test_every_condition_of_the_sweep_has_its_own_colour():
    spec = importlib.util.spec_from_file_location("sweep", _PATH.parent / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    conditions = [c.name for c in sweep.CONDITIONS]
    colours = [report.condition_color(c) for c in conditions]
    assert len(set(colours)) == len(conditions) and "0.4" not in colours
    assert report.condition_color("something-else") == "0.4"


def test_a_claim_without_b_compares_a_with_zero():
    def row(seed, ri):
        return {"dataset": "digitclutter", "condition": "conventional", "seed": seed, "test": {"accuracy": 0.9},
                "evaluation": {"indices": {"recurrence": ri,
                                           "per_stage": [{"recurrence_per_block": [ri + 0.25, ri - 3.0, None]},
                                                         {"recurrence_per_block": [ri + 0.5]}]}}}

    table = report.claims_table([row(0, -1.0), row(1, -0.5), row(2, -0.75)], ["digitclutter"])
    line = next(x for x in table.splitlines() if x.startswith("| Conventionally trained"))
    # Mean -0.75, sd 0.25, half width 4.303 * 0.25 / sqrt(3) = 0.6211: [-1.371, -0.129].
    assert line == ("| Conventionally trained ResNets do not learn iterative solutions | digitclutter | "
                    "recurrence index | conventional | 0 | 3 | 0 of 3 | -0.750 | [-1.371, -0.129] | A < B | "
                    "A <= B (paper) | agrees | - |")
    check = next(x for x in table.splitlines() if x.startswith("| Conventionally trained ResNets do not learn "
                                                                  "iterative solutions (check"))
    # The medians are RI + 0.25 (-0.75, -0.25, -0.5): mean -0.5, the same sd and half width: [-1.121, 0.121].
    assert ("| median recurrence index | conventional | 0 | 3 | 0 of 3 | -0.500 | [-1.121, 0.121] | "
            "no detectable difference | A <= B (paper) | not contradicted |") in check


def test_an_unresolvable_difference_reads_more_than_the_limit():
    assert report._seeds(report.seeds_to_resolve(_interval([-1.0, 1.02]))) == "> 1000"
    assert report._seeds(11) == "11" and report._seeds(None) == "-"


@pytest.mark.parametrize("content", ["{not json", '{"runs": 3}', "[]"])
def test_a_malformed_summary_is_one_line_and_writes_nothing(tmp_path, capsys, content):
    (tmp_path / "summary.json").write_text(content)
    code = report.main(["--grid", str(tmp_path), "--figures", str(tmp_path / "figures")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("report: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_an_unwritable_report_is_refused_before_any_figure(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"runs": []}')
    (tmp_path / "a-file").write_text("")
    code = report.main(["--grid", str(tmp_path), "--figures", str(tmp_path / "figures"),
                        "--out", str(tmp_path / "a-file" / "report.md")])
    assert code == 2 and "a-file" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()


_REPO = _PATH.parent.parent


def test_results_md_holds_what_the_report_makes_of_the_committed_summary(tmp_path):
    # docs/results.md's marked section is generated, never edited: regenerate it from the
    # committed summary.json in a scratch copy (same docs/figures layout) and compare.
    docs = tmp_path / "docs"
    docs.mkdir()
    committed = (_REPO / "docs" / "results.md").read_text()
    (docs / "results.md").write_text(report.splice(committed, "stale"))
    code = report.main(["--grid", str(_REPO / "experiments" / "grid"), "--figures", str(docs / "figures"),
                        "--out", str(tmp_path / "report.md"), "--results", str(docs / "results.md")])
    assert code == 0
    assert (docs / "results.md").read_text() == committed, "rerun experiments/report.py --results docs/results.md"
    assert sorted(p.name for p in (docs / "figures").iterdir()) == sorted(
        p.name for p in (_REPO / "docs" / "figures").iterdir())


def test_every_recurrence_claim_is_followed_by_its_median_check():
    primary = [c for c in report.CLAIMS if c.metric == "recurrence index"]
    assert len(primary) == 4
    for claim in primary:
        check = report.CLAIMS[report.CLAIMS.index(claim) + 1]
        assert check == claim._replace(title=claim.title + " (check: median RI)", metric="median recurrence index")
    assert sum(c.metric == "median recurrence index" for c in report.CLAIMS) == len(primary)


def test_a_comparison_using_a_seed_added_later_is_tagged_a_second_look():
    def row(condition, seed, ri, later=False):
        return {"dataset": "digitclutter", "condition": condition, "seed": seed, "added_later": later,
                "test": {"accuracy": 0.9},
                "evaluation": {"indices": {"recurrence": ri, "divergence": 0.5,
                                           "per_stage": [{"convergence_rate": 1.0, "recurrence_per_block": [ri]}]},
                               "occlusion": {"auc": 0.5}}}

    def coupling_line(rows):
        table = report.claims_table(rows, ["digitclutter"])
        return next(x for x in table.splitlines() if x.startswith("| Coupling makes networks iterative |"))

    base = [row("l0", 0, 0.0), row("l1", 0, 1.0), row("l0", 1, 0.0), row("l1", 1, 2.0)]
    assert "| l1 | l0 | 2 | 2 of 2 |" in coupling_line(base)
    # Seed 2 of l1 added later, but l0 has no seed 2: not paired, so no tag.
    assert "| l1 | l0 | 2 | 2 of 2 |" in coupling_line([*base, row("l1", 2, 3.0, later=True)])
    tagged = coupling_line([*base, row("l1", 2, 3.0, later=True), row("l0", 2, 0.0, later=True)])
    assert "| l1 | l0 | 3 (second look) | 3 of 3 |" in tagged
