"""experiments/publish.py: which grid runs go to the zoo under which name, and the README table."""

import importlib.util
import os
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


def test_a_run_is_published_when_a_card_names_it_from_any_machine():
    sources = {os.path.normpath("/elsewhere/checkout/experiments/grid/digitclutter/l0-s0")}
    assert publish.is_published("experiments/grid/digitclutter/l0-s0", sources)
    assert not publish.is_published("experiments/grid/fashion_mnist/l0-s0", sources)
    assert not publish.is_published("experiments/grid/digitclutter/sn-l0-s0", sources)  # a suffix of the name
    assert not publish.is_published("experiments/grid/digitclutter/l0-s0", set())


def test_exportable_runs_need_the_model_and_the_evaluation(tmp_path):
    run = tmp_path / "digitclutter" / "l1-s0"
    run.mkdir(parents=True)
    for name in ("model.keras", "metrics.json"):
        (run / name).write_text("x")
    assert publish.exportable_runs(str(tmp_path)) == []
    (run / "eval.json").write_text("{}")
    assert publish.exportable_runs(str(tmp_path)) == [(str(run), "digitclutter-small-recurrent")]
    (tmp_path / "digitclutter" / "l1-s1").mkdir()  # other seeds are never exported
    assert publish.exportable_runs(str(tmp_path)) == [(str(run), "digitclutter-small-recurrent")]


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
