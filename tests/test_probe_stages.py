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
