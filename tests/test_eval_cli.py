"""``iterconv eval`` in-process: the JSON document of docs/indices.md, --limit, --plots, --out, errors."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import exact_set_accuracy

from iterconv_cli.eval_cmd import format_table
from iterconv_cli.main import cli
from iterconv_keras.models.variants import create_model

LIMIT = 24
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    # The table prints the document's median, not its mean (here they differ by construction).
    shown = dict(document, indices=dict(ind, recurrence=0.5, recurrence_median=-0.25))
    median = next(line for line in format_table(shown).splitlines() if line.startswith("RI median"))
    assert median.split()[6] == "-0.250"
    shown["indices"]["recurrence_median"] = None  # every term skipped
    assert "RI median over every stage's terms n/a" in format_table(shown)


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


# -- no option is silently ignored


@pytest.mark.parametrize("args, named", [
    # Given at its default value it is still given: click's parameter source, not the value, decides.
    (["--no-indices", "--tolerance", "0.001"], "--tolerance has no effect with --no-indices"),
    (["--no-indices", "--extra-iterations", "1,2,4,8,16"], "--extra-iterations has no effect with --no-indices"),
    (["--no-occlusion", "--levels", "0,0.3"], "--levels has no effect with --no-occlusion"),
    (["--no-indices", "--no-occlusion", "--plots", "{plots}"],
     "--plots has nothing to draw with --no-indices and --no-occlusion"),
])
def test_an_option_of_a_part_switched_off_is_a_usage_error(run_dir, tmp_path, args, named):
    plots = tmp_path / "plots"
    result = _invoke(["eval", run_dir, "--limit", "8", *[a.format(plots=plots) for a in args]])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"iterconv: error: {named}") and len(result.stderr.splitlines()) == 1
    assert result.stdout == "" and not plots.exists()


def test_every_ignored_option_is_named_in_one_line(run_dir, tmp_path):
    # The audit's command line: each option that would have no effect is named.
    result = _invoke(["eval", run_dir, "--limit", "20", "--no-indices", "--no-occlusion", "--tolerance", "0.5",
                      "--extra-iterations", "1,2", "--levels", "0,0.3", "--plots", str(tmp_path / "x")])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    for option in ("--extra-iterations", "--tolerance", "--levels", "--plots"):
        assert option in line
    assert not (tmp_path / "x").exists()


def test_plots_with_one_part_draws_that_part(run_dir, tmp_path):
    result = _invoke(["eval", run_dir, "--limit", "8", "--no-indices", "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["occlusion.png"]


def test_help_says_the_iteration_sweep_is_fixed():
    from iterconv_keras.analysis import occlusion

    text = " ".join(_invoke(["eval", "--help"]).stdout.split())
    # Oracle: the sweep's constants, which --levels and --extra-iterations do not change.
    fixed = (f"K = {', '.join(map(str, occlusion.DEFAULT_ITERATIONS))} extra iterations at "
             f"{round(occlusion.DEFAULT_ITERATION_LEVEL * 100)} % occluded")
    assert text.count(fixed) == 3  # --occlusion, --extra-iterations, --levels
    assert "Needs --indices; iterations under occlusion keep" in text
    assert "Needs --occlusion; iterations under occlusion keep" in text


# -- TensorFlow's start-up lines stay hidden (a user's shell, not CliRunner: they are written to fd 2)


@pytest.mark.parametrize("args, code", [(["{missing}", "--limit", "10"], 4),
                                        (["{missing}", "--levels", "0.1,0.2"], 2)], ids=["exit-4", "exit-2"])
def test_a_failing_eval_writes_exactly_one_line_on_stderr(tmp_path, args, code):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}  # as a user's shell has it
    environment["PYTHONPATH"] = REPO
    missing = str(tmp_path / "no-such-model.keras")
    result = subprocess.run([sys.executable, "-m", "iterconv_cli.main", "eval", *[a.format(missing=missing)
                                                                                   for a in args]],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == code
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("iterconv: error: ")


# -- a run's --test-size is the test set its model is evaluated on


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """`iterconv train --test-size 12` on tiny MNIST-format files (30 test images), as a user runs it."""
    from test_datasets import write_idx

    root = tmp_path_factory.mktemp("mnist-run")
    written = write_idx(root / "mnist", n_train=60, n_test=30, seed=3)
    out = root / "run"
    result = _invoke(["train", "--dataset", "mnist", "--data-dir", str(root / "mnist"), "--variant", "tiny",
                      "--epochs", "1", "--batch-size", "16", "--train-size", "40", "--validation-size", "10",
                      "--test-size", "12", "--seed", "0", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    return str(out), json.loads(result.stdout)["test"], written


def test_eval_of_a_run_uses_its_test_size(mnist_run, tmp_path):
    run, test, written = mnist_run
    assert test["examples"] == 12
    result = _invoke(["eval", run, "--json", "--no-occlusion", "--extra-iterations", "1,2",
                      "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["examples"] == 12
    assert "evaluating on the 12 test images of the model's training run (--test-size 12)" in result.stderr
    # Oracle: the training run's own test metrics (Keras' evaluate) on the same 12 subsampled images;
    # the first 12 test images would give another loss.
    assert document["accuracy"] == pytest.approx(test["accuracy"])
    assert document["loss"] == pytest.approx(test["loss"], rel=1e-5)
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    first = written["t10k-images-idx3-ubyte"][:12, :, :, None].astype(np.float32) / 255
    labels = written["t10k-labels-idx1-ubyte"][:12].astype(np.int64)
    first_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, model(first, training=False))
    assert float(first_loss) != pytest.approx(test["loss"], rel=1e-3)  # so the oracle tells the two sets apart


def test_the_card_records_the_examples_of_metrics_and_indices(mnist_run, tmp_path):
    from iterconv_keras.zoo.card import ModelCard

    run, _, _ = mnist_run
    eval_file = os.path.join(run, "eval.json")
    try:
        for args, examples in ((["--limit", "7"], 7), ([], 12)):
            result = _invoke(["eval", run, "--no-occlusion", "--extra-iterations", "1,2", "--out", eval_file, *args])
            assert result.exit_code == 0, result.stderr
            card = ModelCard.from_run_dir(run)
            assert card.metrics["examples"] == 12  # the run's test set
            assert card.indices["examples"] == examples  # the evaluation's
            assert dict(card.summary())["evaluation examples"] == examples
    finally:
        os.remove(eval_file)


def test_limit_overrides_the_test_size_with_the_first_images_of_the_split(mnist_run):
    run, _, written = mnist_run
    result = _invoke(["eval", run, "--json", "--no-indices", "--no-occlusion", "--limit", "5"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["examples"] == 5 and "--test-size" not in result.stderr
    model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
    images = written["t10k-images-idx3-ubyte"][:5, :, :, None].astype(np.float32) / 255
    logits = np.asarray(model(images, training=False))
    labels = written["t10k-labels-idx1-ubyte"][:5].astype(np.int64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    assert document["loss"] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("recorded", ["absent", "null"])
def test_a_run_without_test_size_is_evaluated_on_the_whole_split(mnist_run, tmp_path, recorded):
    # The grid's runs: no test_size (or null) in config.json, the whole test split as before.
    run, _, _ = mnist_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("model.keras", "metrics.json"):
        (copy / name).write_bytes(open(os.path.join(run, name), "rb").read())
    config = json.load(open(os.path.join(run, "config.json")))
    if recorded == "absent":
        del config["test_size"]
    else:
        config["test_size"] = None
    (copy / "config.json").write_text(json.dumps(config))
    result = _invoke(["eval", str(copy), "--json", "--no-indices", "--no-occlusion"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["examples"] == 30 and "--test-size" not in result.stderr


def test_another_dataset_than_the_recorded_one_gets_its_whole_split():
    from iterconv_keras.analysis.evaluation import recorded_test_size

    recipe = {"dataset": "mnist", "test_size": 12}
    assert recorded_test_size(recipe) == 12 and recorded_test_size(recipe, "mnist") == 12
    assert recorded_test_size(recipe, "fashion_mnist") is None
    assert recorded_test_size({"dataset": "mnist", "recipe": {"test_size": 12}}) == 12  # a zoo card


def test_a_data_dir_for_a_generated_dataset_is_a_usage_error(run_dir, tmp_path):
    # Digitclutter is generated, so a folder of files would be silently ignored.
    from conftest import one_error_line

    out = tmp_path / "eval.json"
    line = one_error_line(_invoke(["eval", run_dir, "--limit", "4", "--data-dir", str(tmp_path),
                                   "--out", str(out)]), 2)
    assert "--data-dir" in line and "'digitclutter', the model's dataset" in line and "fashion_mnist" in line
    assert "--dataset" not in line  # the user typed none
    assert not out.exists()


def test_a_data_dir_that_does_not_exist_is_a_usage_error(run_dir, tmp_path):
    from conftest import one_error_line

    line = one_error_line(_invoke(["eval", run_dir, "--limit", "4", "--data-dir", str(tmp_path / "gone")]), 2)
    assert "gone" in line and "does not exist" in line


def test_the_hyphenated_dataset_name_is_read_as_the_python_one(run_dir):
    # The model is a multi-label Digitclutter net: asked for fashion-mnist, eval must
    # compare it with fashion_mnist (and refuse the mismatch), not reject the spelling.
    from conftest import one_error_line

    result = _invoke(["eval", run_dir, "--limit", "4", "--dataset", "fashion-mnist", "--no-occlusion"])
    assert "model and --dataset 'fashion_mnist' do not fit" in one_error_line(result, 2)


def test_a_zoo_folder_with_a_model_path_is_a_usage_error(run_dir, tmp_path):
    # A path is loaded from where it points: --zoo would be silently ignored.
    from conftest import one_error_line

    line = one_error_line(_invoke(["eval", run_dir, "--limit", "4", "--zoo", str(tmp_path)]), 2)
    assert "--zoo applies to NAME[@VERSION] references only" in line and run_dir in line
