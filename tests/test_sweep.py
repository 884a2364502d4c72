"""experiments/sweep.py: the grid's order, skipping, and resuming without retraining."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "sweep.py")
_spec = importlib.util.spec_from_file_location("sweep", _PATH)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

QUICK = ["--datasets", "digitclutter", "--conditions", "l0", "--seeds", "0", "--variant", "tiny",
         "--epochs", "2", "--train-size", "128", "--validation-size", "32", "--limit", "48"]


def _weights(run_dir):
    import keras

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    return [np.asarray(w) for w in model.weights]


def test_plan_runs_seed_0_of_everything_first_and_skips_unknown_settings(monkeypatch):
    fake = sweep.Condition("future", {"coupling": 0.0, "no_such_setting": 1}, {"digitclutter": 3})
    monkeypatch.setattr(sweep, "CONDITIONS", (*sweep.CONDITIONS, fake))
    runs, skipped = sweep.plan(sweep.DATASETS, sweep.CONDITIONS, sweep.SEEDS)
    assert {"condition": "future", "unknown_settings": ["no_such_setting"]} in skipped
    assert "future" not in {c.name for _, c, _ in runs}
    seeds = [seed for _, _, seed in runs]
    assert seeds == sorted(seeds) and seeds[0] == 0  # seed-major
    first = {(d, c.name) for d, c, s in runs if s == 0}
    runnable = [c for c in sweep.CONDITIONS if not sweep.unknown_settings(c.overrides)]
    assert first == {(d, c.name) for d in sweep.DATASETS for c in runnable}
    # The grid of issue 16: 3 seeds for the corners and the conventional ResNet, one
    # for the intermediate couplings, on both datasets; a fourth for lambda 0 and 1 on
    # Digitclutter (the planning number for coupling's effect on RI).
    count = {key: sum(1 for d, c, _ in runs if (d, c.name) == key) for key in first}
    for name, n in (("l0", 3), ("l1", 3), ("sn-l0", 3), ("sn-l1", 3), ("l0.5", 1), ("l0.9", 1), ("l0.99", 1),
                    ("conventional", 3)):
        extra = 1 if name in ("l0", "l1") else 0
        assert (count[("digitclutter", name)], count[("fashion_mnist", name)]) == (n + extra, n)
    assert len(runs) == 46


def test_budgets_are_the_issue_16_starting_point(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path)])
    conventional = next(c for c in sweep.CONDITIONS if c.name == "conventional")
    clutter = sweep.run_config(args, "digitclutter", conventional, 0, str(tmp_path / "a"))
    assert (clutter.epochs, clutter.train_size, clutter.fresh_data, clutter.block_init) == (
        10, 100_000, True, "independent")
    fashion = sweep.run_config(args, "fashion_mnist", conventional, 1, str(tmp_path / "b"))
    assert (fashion.epochs, fashion.train_size, fashion.augment, fashion.seed) == (20, None, True, 1)
    assert fashion.test_size is None  # the full test set


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished quick sweep (Digitclutter, lambda = 0, seed 0), shared by the tests below."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    assert sweep.main(["--out", str(out), *QUICK], log=lambda line: None) == 0
    return out


def test_summary_holds_every_finished_run_with_its_cost(finished):
    with open(finished / "summary.json") as f:
        summary = json.load(f)
    (row,) = summary["runs"]
    assert (row["dataset"], row["condition"], row["seed"]) == ("digitclutter", "l0", 0)
    assert row["test"]["examples"] == 48 and row["evaluation"]["examples"] == 48
    assert "indices" in row["evaluation"] and "clutter" in row["evaluation"]["occlusion"]
    assert [h["epoch"] for h in row["history"]] == [1, 2]
    for part in ("train", "evaluation"):
        assert row["timing"][part]["wall_seconds"] > 0 and row["timing"][part]["cpu_seconds"] > 0
    assert row["timing"]["epochs_cpu_seconds"] == pytest.approx(sum(h["cpu_seconds"] for h in row["history"]))
    assert summary["totals"]["cpu_seconds"] == pytest.approx(
        row["timing"]["train"]["cpu_seconds"] + row["timing"]["evaluation"]["cpu_seconds"])
    assert "| digitclutter | l0 | 0 |" in (finished / "summary.md").read_text()


def test_a_seed_added_later_is_marked_in_its_row(finished):
    l0 = next(c for c in sweep.CONDITIONS if c.name == "l0")
    run_dir = str(finished / "digitclutter" / "l0-s0")
    assert sweep.summary_row("digitclutter", l0, 0, run_dir)["added_later"] is False
    later = sweep.Condition("l0", l0.overrides, l0.seeds, {"digitclutter": (0,)})
    assert sweep.summary_row("digitclutter", later, 0, run_dir)["added_later"] is True
    assert sweep.summary_row("fashion_mnist", later, 0, run_dir)["added_later"] is False


def test_rerun_trains_and_evaluates_nothing(finished, monkeypatch):
    from iterconv_keras import training
    from iterconv_keras.analysis import evaluation

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(training, "train", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)
    assert sweep.main(["--out", str(finished), *QUICK], log=lambda line: None) == 0


def test_a_run_directory_with_other_settings_is_refused(finished, capsys):
    changed = [a if a != "2" else "3" for a in QUICK]  # --epochs 3
    assert sweep.main(["--out", str(finished), *changed], log=lambda line: None) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sweep: error:") and "epochs 3 differs from the run's 2" in error


def test_an_unusable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert sweep.main(["--out", str(blocker / "grid"), *QUICK], log=lambda line: None) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sweep: error: cannot use --out {blocker / 'grid'}")


def test_a_half_finished_run_resumes_to_the_uninterrupted_weights(finished, tmp_path, monkeypatch):
    from iterconv_keras import training

    out = tmp_path / "grid"
    shutil.copytree(finished, out)
    run = str(out / "digitclutter" / "l0-s0")
    reference = _weights(run)
    # A run killed during epoch 2: config and epoch 1's checkpoint, nothing else.
    for name in ("model.keras", "metrics.json", "eval.json", "timing.json"):
        os.remove(os.path.join(run, name))
    shutil.rmtree(os.path.join(run, "checkpoints", "epoch-0002"))
    with open(out / "summary.json") as f:
        stale = json.load(f)
    calls = []
    real_train = training.train

    def spy(config, *, resume=False, log=None):
        calls.append((config.out, resume))
        return real_train(config, resume=resume, log=log)

    monkeypatch.setattr(training, "train", spy)
    lines = []
    assert sweep.main(["--out", str(out), *QUICK], log=lines.append) == 0
    assert calls == [(run, True)] and f"resuming {run}" in lines
    for a, b in zip(_weights(run), reference, strict=True):
        np.testing.assert_array_equal(a, b)
    with open(out / "summary.json") as f:
        (row,) = json.load(f)["runs"]
    assert row["test"] == stale["runs"][0]["test"]


def test_unknown_names_are_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--out", str(tmp_path), "--conditions", "l0,l7"])
    assert exit_info.value.code == 2
