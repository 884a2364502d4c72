"""Train and evaluate a grid of conditions; write one JSON and one Markdown table.

The grid reproduces the paper's comparison on a CPU budget: soft gradient
coupling lambda in {0, 0.5, 0.9, 0.99, 1} without the constraint, and lambda in
{0, 1} with the Lipschitz constraint (c = 0.9), each trained with the same seed
and settings, then scored by `iterconv_keras.analysis.evaluation.evaluate` (indices,
occlusion). Results in docs/results.md come from this script.

Usage:
    python experiments/sweep.py --dataset digitclutter --out experiments/digitclutter \
        [--epochs 5] [--seeds 0] [--limit 2000] [--conditions l0,l1,sn-l0]

Runs that already have model.keras are not retrained; those with eval.json are
not re-evaluated, so an interrupted sweep continues where it stopped.
"""

import argparse
import json
import os
import sys

import iterconv_keras  # noqa: F401  (environment before TensorFlow)

CONDITIONS = {
    "l0": {"coupling": 0.0},
    "l0.5": {"coupling": 0.5},
    "l0.9": {"coupling": 0.9},
    "l0.99": {"coupling": 0.99},
    "l1": {"coupling": 1.0},
    "sn-l0": {"coupling": 0.0, "spectral_norm": True},
    "sn-l1": {"coupling": 1.0, "spectral_norm": True},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digitclutter")
    parser.add_argument("--variant", default="small")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--limit", type=int, default=2000, help="test images for the evaluation")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    args = parser.parse_args(argv)

    from iterconv_keras import training
    from iterconv_keras.analysis import evaluation
    from iterconv_keras.fsutil import write_json_atomic
    from iterconv_keras.loading import load

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.conditions.split(","):
            run = os.path.join(args.out, f"{name}-s{seed}")
            if not os.path.isfile(os.path.join(run, "model.keras")):
                config = training.TrainConfig(
                    dataset=args.dataset, variant=args.variant, epochs=args.epochs, seed=seed,
                    train_size=args.train_size, out=run, **CONDITIONS[name],
                )
                resume = os.path.isfile(os.path.join(run, "config.json"))
                training.train(config, resume=resume)
            eval_path = os.path.join(run, "eval.json")
            if not os.path.isfile(eval_path):
                loaded = load(run)
                data = evaluation.load_for_model(loaded.model, loaded.card.to_json(), limit=args.limit)
                document = evaluation.evaluate(loaded.model, data, limit=args.limit, model_reference=run)
                document = {"model": run, "dataset": args.dataset, **document}
                write_json_atomic(eval_path, document)  # evaluate() returns strict-JSON values
            with open(eval_path) as f:
                document = json.load(f)
            with open(os.path.join(run, "metrics.json")) as f:
                metrics = json.load(f)
            rows.append(_row(name, seed, metrics, document))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    write_json_atomic(os.path.join(args.out, "summary.json"), rows)
    text = _table(rows)
    if len({r["seed"] for r in rows}) > 1:
        text += "\n" + _seed_table(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


def _row(name, seed, metrics, document):
    indices = document.get("indices", {})
    occlusion = document.get("occlusion", {})
    return {
        "condition": name,
        "seed": seed,
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "recurrence": indices.get("recurrence"),
        "divergence": indices.get("divergence"),
        "convergence": indices.get("convergence"),
        "effective_parameters": indices.get("effective_parameters"),
        "parameters": indices.get("parameters"),
        "occlusion_auc": occlusion.get("auc"),
        "clutter": occlusion.get("clutter"),
    }


def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(rows):
    header = ("| condition | seed | test acc | test loss | RI | DI | CI | P_eff / P | occl. AUC | clutter 2/3/4/5 |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        clutter = r["clutter"] or {}
        clutter_text = "/".join(_fmt(clutter.get(k), 2) for k in ("2", "3", "4", "5")) if clutter else "n/a"
        ratio = (f"{r['effective_parameters']:,.0f} / {r['parameters']:,}"
                 if r["effective_parameters"] is not None else "n/a")
        lines.append(f"| {r['condition']} | {r['seed']} | {_fmt(r['test_accuracy'])} | {_fmt(r['test_loss'])} | "
                     f"{_fmt(r['recurrence'])} | {_fmt(r['divergence'])} | {_fmt(r['convergence'])} | {ratio} | "
                     f"{_fmt(r['occlusion_auc'])} | {clutter_text} |")
    return header + "\n".join(lines) + "\n"


SEED_COLUMNS = ("test_accuracy", "recurrence", "divergence", "convergence", "occlusion_auc")


def _seed_table(rows):
    """Mean and sample standard deviation over seeds, per condition (n seeds each)."""
    import numpy as np

    header = ("| condition | seeds | " + " | ".join(SEED_COLUMNS) + " |\n"
              "|---|---|" + "---|" * len(SEED_COLUMNS) + "\n")
    lines = []
    for name in dict.fromkeys(r["condition"] for r in rows):
        group = [r for r in rows if r["condition"] == name]
        cells = []
        for column in SEED_COLUMNS:
            values = np.array([r[column] for r in group if r[column] is not None], dtype=float)
            if values.size == 0:
                cells.append("n/a")
            elif values.size == 1:
                cells.append(_fmt(float(values[0])))
            else:
                cells.append(f"{values.mean():.3f} +- {values.std(ddof=1):.3f}")
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
