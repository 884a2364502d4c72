"""``iterconv eval`` in-process: the JSON document of docs/indices.md, --limit, --plots, --out, errors."""

import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import exact_set_accuracy

from iterconv_cli.main import cli
from iterconv_keras.models.variants import create_model

LIMIT = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory of an (untrained) tiny Digitclutter model."""
    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("run")
    model = create_model("tiny", (32, 32, 1), 10, multi_label=True)
    model.save(os.path.join(folder, "model.keras"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"dataset": "digitclutter", "clutter_digits": 3}, f)
    return str(folder)


def _invoke(args):
    result = CliRunner().invoke(cli, args)
    return result


def test_json_document_follows_interfaces(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    plots = tmp_path / "plots"
    result = _invoke(["eval", run_dir, "--limit", str(LIMIT), "--json", "--out", str(out), "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert list(document)[:6] == ["model", "dataset", "split", "examples", "accuracy", "loss"]
    assert document["model"] == run_dir
    assert document["dataset"] == "digitclutter"  # from the run's config.json
    assert document["split"] == "test"
    assert document["examples"] == LIMIT
    indices = document["indices"]
    for key in ("recurrence", "divergence", "convergence", "effective_parameters", "parameters", "per_stage", "curves"):
        assert key in indices
    assert [row["stage"] for row in indices["per_stage"]] == [0, 1]
    for row in indices["per_stage"]:
        assert {"stage", "recurrence", "divergence", "convergence"} <= set(row)
    curves = indices["curves"]
    assert curves["extra_iterations"] == [1, 2, 4, 8, 16]
    for key in ("accuracy", "loss", "update_norm", "relative_update"):
        assert len(curves[key]) == 5
    occluded = document["occlusion"]
    assert occluded["levels"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert len(occluded["accuracy"]) == 6
    assert sorted(occluded["clutter"]) == ["2", "3", "4", "5"]  # a Digitclutter model
    assert occluded["accuracy"][0] == pytest.approx(document["accuracy"])
    # The clutter sweep's 3-digit set is the evaluated test set itself.
    assert occluded["clutter"]["3"] == pytest.approx(document["accuracy"])
    # An untrained network's blocks are tied at initialisation (docs/method.md, "Soft gradient coupling"):
    # rho = 0, one block's worth of parameters per stage.
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    per_block = [sum(int(np.prod(v.shape)) for v in blocks[0].trainable_variables) for blocks in model.stages]
    tied = sum((len(blocks) - 1) * p for blocks, p in zip(model.stages, per_block, strict=True))
    assert indices["parameters"] == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert indices["effective_parameters"] == pytest.approx(indices["parameters"] - tied)
    # --out holds the same document, written atomically (no temporary left behind).
    assert json.loads(out.read_text()) == document
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert sorted(p.name for p in plots.iterdir()) == ["indices.png", "occlusion.png", "updates.png"]
    for png in plots.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sections_not_requested_are_absent_and_table_is_default(run_dir):
    result = _invoke(["eval", run_dir, "--limit", "8", "--no-indices", "--no-occlusion", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert "indices" not in document and "occlusion" not in document
    assert document["examples"] == 8
    table = _invoke(["eval", run_dir, "--limit", "8", "--no-indices", "--no-occlusion"])
    assert table.exit_code == 0
    assert "accuracy" in table.stdout and "digitclutter" in table.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(table.stdout)


def test_limit_evaluates_a_prefix(run_dir):
    from iterconv_keras import loading
    from iterconv_keras.data import generated

    result = _invoke(["eval", run_dir, "--limit", "10", "--no-indices", "--no-occlusion", "--json"])
    document = json.loads(result.stdout)
    model = loading.load_model(run_dir)
    images, labels, _ = generated.clutter_test_set(3, 10)
    # Oracle: the model's plain forward pass, exact-set accuracy and Keras' own loss.
    logits = np.asarray(model(images.astype(np.float32) / 255, training=False))
    assert document["accuracy"] == pytest.approx(exact_set_accuracy(logits, labels))
    loss = keras.losses.BinaryCrossentropy(from_logits=True)(labels, logits)
    assert document["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_missing_model_exits_4(tmp_path):
    result = _invoke(["eval", str(tmp_path / "nothing.keras"), "--json"])
    assert result.exit_code == 4
    assert "nothing.keras" in result.stderr
    assert result.stdout == ""


def test_mismatched_dataset_is_a_usage_error(run_dir, tmp_path):
    # A bare .keras file of a 28x28 single-label model evaluated on Digitclutter.
    path = tmp_path / "mnist_like.keras"
    create_model("tiny", (28, 28, 1), 10).save(path)
    result = _invoke(["eval", str(path), "--dataset", "digitclutter", "--limit", "4"])
    assert result.exit_code == 2
    assert "(28, 28, 1)" in result.stderr and "(32, 32, 1)" in result.stderr
    # Without metadata and without --dataset the user is told what to pass.
    result = _invoke(["eval", str(path), "--limit", "4"])
    assert result.exit_code == 2 and "--dataset" in result.stderr


@pytest.fixture(scope="module")
def contractive_run(tmp_path_factory):
    """A run directory of an (untrained) tiny Digitclutter model with contractive blocks."""
    keras.utils.set_random_seed(1)
    folder = tmp_path_factory.mktemp("contractive")
    model = create_model("tiny", (32, 32, 1), 10, multi_label=True, lipschitz=0.5, residual_form="contractive",
                        alpha=0.5)
    model.save(os.path.join(folder, "model.keras"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"dataset": "digitclutter", "clutter_digits": 3}, f)
    return str(folder)


def test_rate_contraction_bound_and_certified_lipschitz_in_json_and_table(run_dir, contractive_run, tmp_path):
    from iterconv_keras.analysis.certify import certify

    plain = json.loads(_invoke(["eval", run_dir, "--limit", "16", "--no-occlusion", "--json"]).stdout)
    ind = plain["indices"]
    for row in ind["per_stage"]:
        # Oracle: the rate from the stage's own update curve, (u_(T+16) / u_T)^(1/16).
        updates = row["curves"]["update_norm"]
        assert row["convergence_rate"] == pytest.approx((updates[-1] / updates[row["blocks"] - 1]) ** (1 / 16))
        assert row["contraction_bound"] is None  # plain blocks guarantee nothing
    assert ind["lipschitz"]["bound"] is None and ind["lipschitz"]["residual_form"] == "plain"
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    report = certify(model, iterations=5, jacobian_iterations=5, num_random=1)
    assert ind["lipschitz"]["certified"] == [
        [pytest.approx(b["certified"]) for b in report["blocks"] if b["stage"] == s] for s in range(2)]
    # An unconstrained model's certificate is informative, and above its empirical lower bound.
    assert all(b["empirical"] <= b["certified"] for b in report["blocks"])

    result = _invoke(["eval", contractive_run, "--limit", "16", "--no-occlusion", "--json", "--plots",
                      str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "updates.png").read_bytes()[:4] == b"\x89PNG"  # with the guaranteed envelope
    document = json.loads(result.stdout)
    ind = document["indices"]
    assert ind["lipschitz"]["residual_form"] == "contractive" and ind["lipschitz"]["alpha"] == 0.5
    for row in ind["per_stage"]:
        assert row["convergence_rate"] <= row["contraction_bound"]
        assert row["convergence"] >= 1 - row["contraction_bound"] ** 16
    table = _invoke(["eval", contractive_run, "--limit", "16", "--no-occlusion"]).stdout
    header = next(line for line in table.splitlines() if line.startswith("stage"))
    assert header.split() == ["stage", "RI", "RI(acc)", "skipped", "DI", "DI(loss)", "CI", "rate", "L", "rho",
                              "Lip(f)"]
    stage0 = next(line for line in table.splitlines() if line.startswith("0 ")).split()
    assert float(stage0[7]) == pytest.approx(ind["per_stage"][0]["convergence_rate"], abs=1e-3)
    assert float(stage0[8]) == pytest.approx(ind["per_stage"][0]["contraction_bound"], abs=1e-3)
    assert "contractive, alpha = 0.5" in table


def test_index_and_occlusion_parameters_from_the_command_line(run_dir):
    # Review U8: the parameters Python's evaluate() takes are options of `iterconv eval`.
    result = _invoke(["eval", run_dir, "--limit", str(LIMIT), "--json", "--extra-iterations", "1,3",
                      "--tolerance", "0.5", "--levels", "0,0.25,0.5"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["indices"]["curves"]["extra_iterations"] == [1, 3]
    assert document["indices"]["settings"]["tolerance"] == 0.5
    assert document["occlusion"]["levels"] == [0.0, 0.25, 0.5]
    assert len(document["occlusion"]["accuracy"]) == 3


@pytest.mark.parametrize("option, value, message", [
    ("--extra-iterations", "1,x", "expected comma-separated int values, got '1,x'"),
    ("--levels", "0,half", "expected comma-separated float values, got '0,half'"),
    ("--levels", "0.1,0.2", "occlusion levels must start with 0.0 (clean), got [0.1, 0.2]"),
    ("--extra-iterations", "4,2", "extra_iterations must be increasing positive ints, got (4, 2)"),
    ("--levels", "0,0.3,0.1", "occlusion levels must increase and stay below 1, got [0.0, 0.3, 0.1]"),
    ("--levels", "0,1", "occlusion levels must increase and stay below 1, got [0.0, 1.0]"),
])
def test_bad_index_parameters_are_usage_errors(run_dir, option, value, message):
    result = _invoke(["eval", run_dir, "--limit", str(LIMIT), option, value])
    assert result.exit_code == 2, result.output
    assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("option, value", [("--levels", "0,0.5,0.2"), ("--extra-iterations", "0,1")])
def test_bad_index_parameters_are_refused_before_the_model_is_looked_for(tmp_path, option, value):
    # A model that does not exist would be exit 4: exit 2 shows the option was checked first,
    # so a bad setting never costs the load and the index suite.
    result = _invoke(["eval", str(tmp_path / "no-such-run"), option, value])
    assert result.exit_code == 2, result.output
    assert option in result.stderr


def test_evaluate_refuses_bad_levels_before_the_first_batch(run_dir):
    from iterconv_keras.analysis import evaluation
    from iterconv_keras.loading import load_model

    model = load_model(run_dir)
    images = np.zeros((4, *model.image_shape), np.uint8)
    labels = np.zeros((4, model.num_classes), np.float32) if model.multi_label else np.zeros(4, np.int64)
    calls = []
    with pytest.raises(ValueError, match="must increase"):
        evaluation.evaluate(model, (images, labels), levels=(0.0, 0.4, 0.2), progress=lambda *a: calls.append(a))
    assert calls == []
