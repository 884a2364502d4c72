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
    x = np.random.default_rng(0).random((40, 16, 16, 1), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 4, 40)
    return model, x, y


def test_zero_extra_iterations_score_like_the_model_itself():
    model, x, y = _model_and_data()
    expected = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))  # Keras' own forward pass
    result = probe.stage_probe(model, x, y, extra=(0, 1), batch_size=16)
    assert result["trained"] == expected
    assert [scores[0] for scores in result["per_stage"]] == [expected] * model.num_stages


def test_state_norms_follow_the_blocks_one_by_one():
    model, x, _ = _model_and_data()
    norms = probe.state_norms(model, x[:8])
    assert [len(stage) for stage in norms] == [len(blocks) + 1 for blocks in model.stages]
    # Independent: the whole stage at once, from the same stem, gives the last norm.
    h = model.embed(tf.constant(x[:8]), training=False)
    for stage in range(model.num_stages):
        h = model.run_stage(model.enter_stage(h, stage, training=False), stage,
                            list(range(len(model.stages[stage]))), training=False)
        flat = tf.reshape(h, [8, -1]).numpy().astype(np.float64)
        assert np.isclose(norms[stage][-1], np.linalg.norm(flat, axis=1).mean(), rtol=1e-5)
