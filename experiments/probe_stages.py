"""Per-stage probe: accuracy with extra iterations of one stage at a time, and state norms per block.

The divergence index iterates every stage's last block; this probe separates the stages, and
prints the mean L2 norm of the state after each block, to tell a state that shrinks (its scale
carries the depth) from one that converges to a fixed point of similar size. With
``--rescale`` it also reruns the extra iterations with the state scaled back, per image, to
its norm after the trained blocks, which tests whether the scale alone is what the extra
iterations break. docs/results.md quotes it for the contractive block.

Usage:
    python experiments/probe_stages.py experiments/grid/digitclutter/contractive-l0-s0 --limit 1000 --rescale

Exit codes: 0 done, 2 usage error (a model or dataset that cannot be loaded): one line on stderr.
"""

import argparse
import json
import sys


def stage_probe(model, x, y, extra=(1, 2), batch_size=250):
    """Accuracy under the trained schedule and with ``k`` extra iterations of one stage's last block.

    The divergence index of Lippl, Peters & Kriegeskorte (2024), as operationalised in
    docs/indices.md, iterates every stage at once; this separates them.

    Args:
        model: an `IterativeResNet`.
        x, y: test images and labels.
        extra: the numbers of extra iterations to try, per stage.
        batch_size: evaluation batch size.

    Returns:
        ``{"trained": acc, "per_stage": [{k: acc} for each stage]}``.
    """
    from iterconv_keras.analysis.programs import StagePrograms

    programs = StagePrograms(model)
    trained = [list(range(len(blocks))) for blocks in model.stages]

    def accuracy(schedule):
        return float(programs.accuracy_and_loss(x, y, batch_size, schedule=schedule)[0])

    per_stage = []
    for stage in range(model.num_stages):
        scores = {}
        for k in extra:
            schedule = [list(order) for order in trained]
            schedule[stage] += [schedule[stage][-1]] * k
            scores[k] = accuracy(schedule)
        per_stage.append(scores)
    return {"trained": accuracy(trained), "per_stage": per_stage}


def rescaled_stage_probe(model, x, y, extra=(1, 2), batch_size=250):
    """Accuracy with ``k`` extra iterations of one stage's last block, the state then rescaled.

    After the extra iterations each image's state is multiplied by
    ``||h_T|| / ||h_(T+k)||``, its norm after the trained blocks over its norm now, before
    the later stages and the head see it. If the extra iterations only shrank the state
    (a fixed direction, a smaller scale), this restores the trained accuracy; if accuracy
    stays low, they changed its direction too. Our test of the reading of the contractive
    block in docs/results.md, not a measure of Lippl, Peters & Kriegeskorte (2024).

    Args:
        model: an `IterativeResNet`.
        x, y: test images (uint8, or float in [0, 1]) and labels.
        extra: the numbers of extra iterations to try, per stage.
        batch_size: evaluation batch size.

    Returns:
        ``[{k: acc} for each stage]``.
    """
    import numpy as np
    import tensorflow as tf

    from iterconv_keras.analysis.programs import per_example_correct

    per_stage = []
    for stage in range(model.num_stages):
        scores = {}
        for k in extra:
            # Scored as the evaluation scores (exact set for Digitclutter's multi-label head).
            correct = [per_example_correct(rescaled_logits(model, x[i:i + batch_size], stage, k),
                                           tf.constant(y[i:i + batch_size]), model.multi_label)
                       for i in range(0, len(x), batch_size)]
            scores[k] = float(np.mean(np.concatenate(correct), dtype=np.float64))
        per_stage.append(scores)
    return per_stage


def rescaled_logits(model, images, stage, k):
    """Logits with ``k`` extra iterations of ``stage``'s last block, then the state rescaled per image.

    Args:
        model: an `IterativeResNet`.
        images: a batch as the evaluation gets it (uint8, or float in [0, 1]).
        stage: the stage whose last block gets the extra iterations.
        k: how many extra iterations (0: the trained schedule).

    Returns:
        The logits, ``[batch, classes]``.
    """
    import tensorflow as tf

    from iterconv_keras.analysis.programs import per_example_norm, to_unit_float

    h = model.embed(tf.constant(to_unit_float(images)), training=False)
    for s in range(model.num_stages):
        h = model.run_stage(model.enter_stage(h, s, training=False), s, training=False)
        if s == stage:
            trained_norm = per_example_norm(h)
            h = model.run_stage(h, s, [len(model.stages[s]) - 1] * k, training=False)
            scale = trained_norm / tf.maximum(per_example_norm(h), 1e-12)
            h = h * tf.cast(tf.reshape(scale, [-1] + [1] * (len(h.shape) - 1)), h.dtype)
    return model.classify(h, training=False)


def state_norms(model, x):
    """Per stage: the mean L2 norm of the state entering the stage and after each of its blocks.

    ``x`` as the evaluation gets it (uint8 or float in [0, 1]); scaled as `StagePrograms` scales it.
    """
    import tensorflow as tf

    from iterconv_keras.analysis.programs import per_example_norm, to_unit_float

    def mean_norm(h):
        return float(tf.reduce_mean(per_example_norm(h)))

    h = model.embed(tf.constant(to_unit_float(x)), training=False)
    norms = []
    for stage in range(model.num_stages):
        h = model.enter_stage(h, stage, training=False)
        stage_norms = [mean_norm(h)]
        for block in range(len(model.stages[stage])):
            h = model.run_stage(h, stage, [block], training=False)
            stage_norms.append(mean_norm(h))
        norms.append(stage_norms)
    return norms


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run directory, .keras file or zoo reference")
    parser.add_argument("--limit", type=_positive, default=1000, help="test images (default 1000)")
    parser.add_argument("--norm-images", type=_positive, default=200, help="images for the state norms (default 200)")
    parser.add_argument("--rescale", action="store_true",
                        help="also run the extra iterations with the state rescaled to its trained norm")
    args = parser.parse_args(argv)
    from iterconv_keras.analysis import evaluation
    from iterconv_keras.errors import IterconvError
    from iterconv_keras.loading import load

    try:
        loaded = load(args.model)
        data = evaluation.load_for_model(loaded.model, loaded.card.to_json(), limit=args.limit)
    except (IterconvError, ValueError, OSError) as error:
        print(f"probe_stages: {error}", file=sys.stderr)
        return 2
    x, y = data.x[:args.limit], data.y[:args.limit]
    result = stage_probe(loaded.model, x, y)
    result["state_norms"] = state_norms(loaded.model, x[:args.norm_images])
    if args.rescale:
        result["per_stage_rescaled"] = rescaled_stage_probe(loaded.model, x, y)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
