"""experiments/probe_stages.py on a tiny model: its schedules and norms against direct computations."""

import importlib.util
import pathlib

import numpy as np
import tensorflow as tf

from iterconv_keras.models.variants import create_model

_PATH = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "probe_stages.py"
_spec = importlib.util.spec_from_file_location("probe_stages", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _model_and_data():
    tf.keras.utils.set_random_seed(3)
    model = create_model("tiny", (16, 16, 1), 4)
    # uint8, as the evaluation loads test sets: the probe must scale them as the model expects.
    x = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    y = np.random.default_rng(1).integers(0, 4, 40)
    return model, x, y


def _keras_accuracy(model, x, y, schedule=None):
    """Keras' own forward pass (the model's call with a schedule) on [0, 1] images."""
    logits = model(tf.constant(x.astype(np.float32) / 255), training=False, schedule=schedule)
    return float(np.mean(np.argmax(logits.numpy(), -1) == y))


def test_each_stage_alone_gets_its_extra_iterations():
    model, x, y = _model_and_data()
    result = probe.stage_probe(model, x, y, extra=(0, 1, 3), batch_size=16)
    trained = [list(range(len(blocks))) for blocks in model.stages]
    assert result["trained"] == _keras_accuracy(model, x, y)
    for stage, scores in enumerate(result["per_stage"]):
        for k, accuracy in scores.items():
            schedule = [list(order) for order in trained]
            schedule[stage] += [len(trained[stage]) - 1] * k
            assert accuracy == _keras_accuracy(model, x, y, schedule), (stage, k)


def test_state_norms_follow_the_blocks_one_by_one_on_unit_scaled_images():
    model, x, _ = _model_and_data()
    norms = probe.state_norms(model, x[:8])
    assert [len(stage) for stage in norms] == [len(blocks) + 1 for blocks in model.stages]
    # Independent: whole stages at once, from [0, 1] images scaled here, in float64 NumPy norms.
    h = model.embed(tf.constant(x[:8].astype(np.float32) / 255), training=False)
    for stage in range(model.num_stages):
        h = model.run_stage(model.enter_stage(h, stage, training=False), stage,
                            list(range(len(model.stages[stage]))), training=False)
        flat = tf.reshape(h, [8, -1]).numpy().astype(np.float64)
        assert np.isclose(norms[stage][-1], np.linalg.norm(flat, axis=1).mean(), rtol=1e-5)


def test_rescaling_with_no_extra_iterations_changes_nothing():
    model, x, y = _model_and_data()
    rescaled = probe.rescaled_stage_probe(model, x, y, extra=(0,), batch_size=16)
    assert [scores[0] for scores in rescaled] == [_keras_accuracy(model, x, y)] * model.num_stages


def test_rescaled_logits_against_numpy_rescaling_of_the_intermediates():
    model, x, _ = _model_and_data()
    trained = [list(range(len(blocks))) for blocks in model.stages]
    images = tf.constant(x.astype(np.float32) / 255)
    for stage in range(model.num_stages):
        # Independent: the model's forward_intermediates under the longer schedule gives the
        # state after the trained blocks and after the extras; rescale in float64 NumPy.
        schedule = [list(order) for order in trained]
        schedule[stage] += [len(trained[stage]) - 1] * 2
        outputs = model.forward_intermediates(images, schedule=schedule)["block_outputs"][stage]
        before = outputs[len(trained[stage]) - 1].numpy().astype(np.float64)
        after = outputs[-1].numpy().astype(np.float64)
        norm = lambda v: np.linalg.norm(v.reshape(len(v), -1), axis=1).reshape(-1, 1, 1, 1)  # noqa: E731
        h = tf.constant((after * norm(before) / norm(after)).astype(np.float32))
        for later in range(stage + 1, model.num_stages):
            h = model.run_stage(model.enter_stage(h, later, training=False), later, training=False)
        expected = model.classify(h, training=False).numpy()
        unscaled = model.forward_intermediates(images, schedule=schedule)["logits"].numpy()
        assert not np.allclose(expected, unscaled, atol=1e-3), "the oracle must see the rescaling"
        np.testing.assert_allclose(probe.rescaled_logits(model, x, stage, 2).numpy(), expected,
                                   rtol=1e-4, atol=1e-5, err_msg=f"stage {stage}")
