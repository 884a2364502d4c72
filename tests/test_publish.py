"""experiments/publish.py: which grid runs go to the zoo under which name, and the README table."""

import importlib.util
import pathlib

import pytest

from iterconv_keras.zoo import manifest

_EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publish, sweep = _load("publish"), _load("sweep")


def test_every_condition_of_the_sweep_has_one_valid_distinct_name():
    planned = {(dataset, condition.name) for dataset in sweep.DATASETS for condition in sweep.CONDITIONS}
    assert set(publish.NAMES) == planned
    assert len(set(publish.NAMES.values())) == len(publish.NAMES)
    for name in publish.NAMES.values():
        manifest.validate_name(name)


def test_exportable_runs_need_the_model_and_the_evaluation(tmp_path):
    run = tmp_path / "digitclutter" / "l1-s0"
    run.mkdir(parents=True)
    for name in ("model.keras", "metrics.json"):
        (run / name).write_text("x")
    assert publish.exportable_runs(str(tmp_path)) == []
    (run / "eval.json").write_text("{}")
    assert publish.exportable_runs(str(tmp_path)) == [("digitclutter/l1-s0", "digitclutter-small-recurrent")]
    (tmp_path / "digitclutter" / "l1-s1").mkdir()  # other seeds are never exported
    assert publish.exportable_runs(str(tmp_path)) == [("digitclutter/l1-s0", "digitclutter-small-recurrent")]


def test_the_record_keeps_every_export_of_a_run(tmp_path):
    assert publish.read_record(str(tmp_path)) == {}
    publish.record_export(str(tmp_path), "fashion_mnist/l0-s0", "fashion-mnist-small@2")
    publish.record_export(str(tmp_path), "fashion_mnist/l0-s0", "fashion-mnist-small@4")
    assert publish.read_record(str(tmp_path)) == {"fashion_mnist/l0-s0": ["fashion-mnist-small@2",
                                                                          "fashion-mnist-small@4"]}


def test_a_readme_without_the_table_is_refused_before_any_export(tmp_path, capsys):
    _finished_run_with_a_broken_model(tmp_path)
    (tmp_path / "zoo").mkdir()
    (tmp_path / "README.md").write_text("# no table\n")
    code = publish.main(["--grid", str(tmp_path / "grid"), "--zoo", str(tmp_path / "zoo"),
                         "--readme", str(tmp_path / "README.md")])
    assert code == 2 and capsys.readouterr().err == "publish: no zoo table (its header row) in the README\n"
    assert not (tmp_path / "grid" / publish.RECORD).exists() and not list((tmp_path / "zoo").iterdir())


@pytest.mark.parametrize(("problem", "message"), [
    ("zoo", "no zoo folder at"),
    ("record", "cannot read"),
    ("record-list", "must map run paths to lists"),
])
def test_a_bad_zoo_or_record_is_refused_and_the_readme_kept(tmp_path, capsys, problem, message):
    _finished_run_with_a_broken_model(tmp_path)
    if problem != "zoo":
        (tmp_path / "zoo").mkdir()
        (tmp_path / "grid" / publish.RECORD).write_text("{broken" if problem == "record" else "[]")
    readme = tmp_path / "README.md"
    readme.write_text(f"{publish.TABLE_HEADER}\n| `kept` |\n")
    code = publish.main(["--grid", str(tmp_path / "grid"), "--zoo", str(tmp_path / "zoo"), "--readme", str(readme)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert readme.read_text() == f"{publish.TABLE_HEADER}\n| `kept` |\n"


def _finished_run_with_a_broken_model(tmp_path):
    run = tmp_path / "grid" / "fashion_mnist" / "l1-s0"
    run.mkdir(parents=True)
    (run / "model.keras").write_text("not a zip file")
    for name in ("metrics.json", "eval.json"):
        (run / name).write_text("{}")


def test_a_failed_export_is_one_line_and_the_table_still_follows_the_zoo(tmp_path, capsys):
    _finished_run_with_a_broken_model(tmp_path)
    (tmp_path / "zoo").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{publish.TABLE_HEADER}\n|---|\n| `gone` | 1 |\n\nafter\n")
    code = publish.main(["--grid", str(tmp_path / "grid"), "--zoo", str(tmp_path / "zoo"), "--readme", str(readme)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[0] == "publish: fashion_mnist/l1-s0 -> fashion-mnist-small-recurrent"
    assert err[1].startswith("publish: exporting fashion_mnist/l1-s0 failed: ") and len(err) == 2
    assert not (tmp_path / "grid" / publish.RECORD).exists()
    # The empty zoo's table: header and rule, the stale row gone, the rest untouched.
    assert readme.read_text() == f"intro\n\n{publish.TABLE_HEADER}\n|" + "---|" * 10 + "\n\nafter\n"


def test_replace_table_touches_only_the_table():
    readme = f"intro\n\n{publish.TABLE_HEADER}\n|---|\n| old | row |\n\nafter\n"
    assert publish.replace_table(readme, [publish.TABLE_HEADER, "| new |"]) == (
        f"intro\n\n{publish.TABLE_HEADER}\n| new |\n\nafter\n")
    with pytest.raises(ValueError, match="no zoo table"):
        publish.replace_table("intro\n", ["x"])


def test_table_row_by_hand():
    card = {"name": "digits", "dataset": "digitclutter", "recipe": {"clutter_digits": 4}, "coupling": 0.5,
            "constraint": {"lipschitz": 0.9}, "metrics": {"accuracy": 0.97251}, "occlusion_auc": 0.514,
            "indices": {"recurrence": -0.005, "divergence": 0.6949,
                        "per_stage": [{"convergence_rate": 1.234}, {"convergence_rate": 0.9951}]}}
    assert publish.table_row(card, 3) == (
        "| `digits` | 3 | Digitclutter, 4 digits | 0.5 | 0.9 | 0.973 | -0.01 | 0.69 | 1.23 / 1.00 | 0.51 |")
    card["indices"]["per_stage"][1]["convergence_rate"] = None
    card["constraint"]["lipschitz"] = None
    assert publish.table_row(card, 3).endswith("| 0.5 | - | 0.973 | -0.01 | 0.69 | - | 0.51 |")
