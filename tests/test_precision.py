"""Mixed precision: the dtype policy reaches every layer, training keeps coupling and the certified bound.

Oracles: the float32 model's function (a mixed model with the same weights computes it up
to 16-bit rounding); bitwise identity of coupled blocks at lambda = 1; the certified and
exact operator norms of the kernel *as the layer computes with it* (rounded to 16 bits
by ml_dtypes, independently of TensorFlow's cast); scaling by powers of two, which is
exact in floating point; an uninterrupted run for resume.
"""

import json
import os
import shutil

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from test_lipschitz import explicit_conv_matrix, largest_singular_value

from iterconv_cli.main import cli
from iterconv_keras import training
from iterconv_keras.config import TrainConfig
from iterconv_keras.errors import UsageError
from iterconv_keras.models import coupling, lipschitz, operator_norm
from iterconv_keras.models.normalization import inference_gains
from iterconv_keras.models.variants import create_model
from iterconv_keras.zoo import savedmodel
from iterconv_keras.zoo.card import ModelCard

SHAPE = (8, 8, 1)
C = 0.9
MIXED = ("mixed_bfloat16", "mixed_float16")
NUMPY_16 = {"mixed_bfloat16": ml_dtypes.bfloat16, "mixed_float16": np.float16, "float32": np.float32}


def _computed(kernel, policy):
    """The kernel rounded to the policy's compute dtype by NumPy (round to nearest even), as float64."""
    return np.asarray(kernel, np.float32).astype(NUMPY_16[policy]).astype(np.float64)


def _sublayers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def _identical_blocks(model):
    for blocks in model.stages:
        for block in blocks[1:]:
            for a, b in zip(block.weights, blocks[0].weights, strict=True):
                if "moving" not in a.path:  # BN statistics are per block by design
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- the model ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", MIXED)
def test_policy_reaches_every_layer_and_variables_stay_float32(policy):
    model = create_model("tiny", SHAPE, 3, dtype=policy, lipschitz=C)
    compute = policy.removeprefix("mixed_")
    layers = _sublayers(model)
    # A transition's (Sequential's) input layer passes its first layer's compute dtype through.
    assert {layer.dtype for layer in layers if isinstance(layer, keras.layers.InputLayer)} == {compute}
    other = [layer for layer in layers
             if layer.dtype_policy.name != policy and not isinstance(layer, keras.layers.InputLayer)]
    assert other == [model.head_dense] and model.head_dense.dtype_policy.name == "float32"
    assert {w.dtype for w in model.weights} == {"float32"}
    out = model.forward_intermediates(np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32))
    assert {t.dtype.name for outputs in out["block_outputs"] for t in outputs} == {compute}
    assert out["logits"].dtype == tf.float32
    for _, _, block in lipschitz.constrained_blocks(model):
        for conv in block.convolutions:
            assert conv.kernel_constraint.compute_dtype == compute
            assert conv.kernel_constraint.vector.dtype == "float32"


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_sixteen_bit_variables_are_refused(policy):
    with pytest.raises(ValueError, match=f"policy '{policy}' stores them as {policy}"):
        create_model("tiny", SHAPE, 3, dtype=policy)


@pytest.mark.parametrize("policy", MIXED)
def test_mixed_model_computes_the_float32_function_up_to_rounding(policy):
    keras.utils.set_random_seed(1)
    reference = create_model("tiny", SHAPE, 3)
    mixed = create_model("tiny", SHAPE, 3, dtype=policy)
    mixed.set_weights(reference.get_weights())
    x = np.random.default_rng(2).random((16, *SHAPE), dtype=np.float32)
    for training_mode in (False, True):
        expected = np.asarray(reference(x, training=training_mode))
        got = np.asarray(mixed(x, training=training_mode))
        assert got.dtype == np.float32
        diff = np.abs(got - expected).max()
        # 16-bit arithmetic really is in effect, and it computes the same function.
        assert 0 < diff < (0.05 if policy == "mixed_bfloat16" else 0.01) * np.abs(expected).max()


@pytest.mark.parametrize("policy", MIXED)
def test_saved_model_keeps_its_policy(tmp_path, policy):
    keras.utils.set_random_seed(1)
    model = create_model("tiny", SHAPE, 3, dtype=policy, lipschitz=C)
    rebuilt = type(model).from_config(json.loads(json.dumps(model.get_config())))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32)
    for other in (rebuilt, loaded):
        assert other.dtype_policy.name == policy
        assert [(type(layer), layer.dtype_policy.name) for layer in _sublayers(other)] == [
            (type(layer), layer.dtype_policy.name) for layer in _sublayers(model)]
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


# -- loss scaling and coupling ----------------------------------------------------------


@pytest.mark.parametrize("strength", [0.5, 0.9, 0.99, 1.0])
def test_coupling_commutes_bitwise_with_the_loss_scale(strength):
    # IterativeResNet.train_step couples the gradients of the *scaled* loss, and
    # LossScaleOptimizer divides by the scale afterwards. Its scale is a power of two
    # (2^15, halved or doubled), and floating-point rounding is invariant under powers
    # of two, so coupling before or after unscaling gives the same bits.
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-8, 3, size=(4, 1, 1))
    gradients = [tf.constant((rng.standard_normal((4, 5, 6)) * magnitudes)[i].astype(np.float32)) for i in range(4)]
    groups = [[0, 1, 2, 3]]
    unscaled = coupling.couple_gradients(gradients, groups, strength)
    for scale in (2.0**15, 2.0**7, 2.0**24):
        scaled = coupling.couple_gradients([g * scale for g in gradients], groups, strength)
        for a, b in zip(scaled, unscaled, strict=True):
            np.testing.assert_array_equal((a / scale).numpy(), b.numpy())


# -- the certified bound ------------------------------------------------------------------


@pytest.mark.parametrize("policy", MIXED)
def test_projection_certifies_the_kernel_the_layer_computes_with(policy):
    keras.utils.set_random_seed(3)
    model = create_model("tiny", SHAPE, 3, dtype=policy, lipschitz=C)
    per_conv = lipschitz.per_conv_bound(C)
    convs = [(conv, block.feature_shape) for _, _, block in lipschitz.constrained_blocks(model)
             for conv in block.convolutions]
    for conv, _ in convs:
        conv.kernel.assign(conv.kernel * 5.0)
    lipschitz.enforce(model)
    for conv, shape in convs:
        kernel = np.asarray(conv.kernel)
        rounded = _computed(kernel, policy)
        np.testing.assert_array_equal(rounded, kernel)  # stored exactly as the layer uses it
        certified = operator_norm.certified_operator_norm(rounded, shape)
        assert per_conv * (1 - 1e-2) <= certified <= per_conv  # onto the bound, not far below
        assert largest_singular_value(explicit_conv_matrix(rounded, shape[0], shape[1])) <= per_conv


def test_rounding_to_bfloat16_can_lift_a_float32_certified_kernel_above_its_bound():
    # Why the projection certifies the rounded kernel: projected in float32 alone, about a
    # third of random kernels end above the bound once the layer rounds them to bfloat16.
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(20):
        kernel = lipschitz.project_certified(rng.standard_normal((3, 3, 8, 8)).astype(np.float32), (8, 8, 8), C)
        ratios.append(operator_norm.certified_operator_norm(_computed(kernel, "mixed_bfloat16"), (8, 8)) / C)
        again = lipschitz.project_certified(kernel, (8, 8, 8), C, compute_dtype="bfloat16")
        assert operator_norm.certified_operator_norm(_computed(again, "mixed_bfloat16"), (8, 8)) <= C
    assert max(ratios) > 1.0


@pytest.mark.parametrize("policy", MIXED)
def test_constrained_mixed_model_satisfies_its_bound_after_fit(policy):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.random((128, *SHAPE), dtype=np.float32), rng.integers(0, 3, 128)
    model = create_model("tiny", SHAPE, 3, dtype=policy, lipschitz=C, coupling=1.0)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    _identical_blocks(model)
    for _, _, block in lipschitz.constrained_blocks(model):
        shape = block.feature_shape
        # Oracle: exact norms of the explicit matrices of the 16-bit kernels, times the BN gains.
        exact = [largest_singular_value(explicit_conv_matrix(_computed(conv.kernel, policy), shape[0], shape[1]))
                 for conv in block.convolutions]
        gains = [float(np.max(inference_gains(norm))) for norm in block.normalizations]
        assert np.prod(exact) * np.prod(gains) <= C
        for conv in block.convolutions:
            assert operator_norm.certified_operator_norm(_computed(conv.kernel, policy), shape) <= C**0.5


# -- training runs and the command line ----------------------------------------------


FAST = ["--variant", "tiny", "--epochs", "1", "--batch-size", "32", "--train-size", "64",
        "--validation-size", "32", "--test-size", "32"]


def test_train_cli_mixed_bfloat16_records_the_precision_and_keeps_coupling_and_bound(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", *FAST, "--precision", "mixed_bfloat16", "--coupling", "1",
                                      "--lipschitz", str(C), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["config"]["precision"] == "mixed_bfloat16"
    assert all(np.isfinite(h["loss"]) for h in document["history"])
    with open(out / "config.json") as f:
        assert json.load(f)["precision"] == "mixed_bfloat16"
    model = keras.saving.load_model(out / "model.keras")
    assert model.dtype_policy.name == "mixed_bfloat16"
    _identical_blocks(model)
    for _, _, block in lipschitz.constrained_blocks(model):
        for conv in block.convolutions:
            rounded = _computed(conv.kernel, "mixed_bfloat16")
            assert operator_norm.certified_operator_norm(rounded, block.feature_shape) <= C**0.5
    assert ModelCard.from_run_dir(str(out), model=model).recipe["precision"] == "mixed_bfloat16"


def test_mixed_float16_trains_with_loss_scaling_and_resumes_bitwise(tmp_path):
    # mixed_float16 runs on this CPU (slowly: it is for GPUs): Keras wraps the optimizer in a
    # LossScaleOptimizer, and a resumed run restores its scale and step counter.
    settings = {"variant": "tiny", "epochs": 2, "batch_size": 32, "train_size": 64, "validation_size": 32,
                "test_size": 32, "coupling": 1.0, "precision": "mixed_float16", "lr": 0.01}
    lines = []
    whole = training.train(TrainConfig(**settings, out=str(tmp_path / "whole")), log=lines.append)
    assert all(np.isfinite(h["loss"]) for h in whole["history"])
    assert any(line.startswith("note: mixed_float16 on a CPU is very slow") for line in lines)
    run = str(tmp_path / "resumed")
    shutil.copytree(whole["run_dir"], run)
    for name in ("model.keras", "metrics.json"):
        os.remove(os.path.join(run, name))
    shutil.rmtree(os.path.join(run, "checkpoints", "epoch-0002"))
    training.train(TrainConfig(out=run), resume=True, log=lambda line: None)
    a, b = (keras.saving.load_model(os.path.join(r, "model.keras")) for r in (whole["run_dir"], run))
    assert isinstance(a.optimizer, keras.optimizers.LossScaleOptimizer)
    _identical_blocks(a)
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [np.asarray(v).tolist() for v in a.optimizer.variables] == [
        np.asarray(v).tolist() for v in b.optimizer.variables]
    assert int(a.optimizer.step_counter) == 4  # every step's gradients were finite; counted across the resume


def test_precision_setting_is_validated_and_old_configs_mean_float32(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of .* got 'float64'"):
        TrainConfig(precision="float64").validate()
    old = TrainConfig().to_dict()
    del old["precision"]
    assert TrainConfig.from_dict(old).precision == "float32"
    result = CliRunner().invoke(cli, ["train", *FAST, "--precision", "half"])
    assert result.exit_code == 2 and "'half' is not one of" in result.stderr
    from iterconv_keras import runs

    stored = TrainConfig(out=str(tmp_path)).validate()
    with pytest.raises(UsageError, match="precision 'mixed_bfloat16' differs from the run's 'float32'"):
        runs.check_resume(TrainConfig(out=str(tmp_path), precision="mixed_bfloat16").validate(), stored,
                          ["precision"])


# -- export ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", MIXED)
def test_saved_model_of_a_mixed_model_serves_float32(tmp_path, policy):
    keras.utils.set_random_seed(2)
    model = create_model("tiny", SHAPE, 3, dtype=policy)
    path = str(tmp_path / "1")
    savedmodel.write_saved_model(model, path, {"class_names": ["a", "b", "c"]})
    serve = tf.saved_model.load(path).signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.dtype == tf.float32
    assert {k: v.dtype for k, v in serve.structured_outputs.items()} == {
        "logits": tf.float32, "probabilities": tf.float32, "classes": tf.int64}
    for batch in (1, 5):
        x = np.random.default_rng(batch).random((batch, *SHAPE), dtype=np.float32)
        out = serve(images=tf.constant(x))
        # The same 16-bit graph as the Keras model: equal up to float32 op scheduling.
        np.testing.assert_allclose(out["logits"].numpy(), np.asarray(model(x, training=False)), rtol=0, atol=1e-5)
    assert keras.saving.load_model(os.path.join(path, savedmodel.MODEL_FILE)).dtype_policy.name == policy
