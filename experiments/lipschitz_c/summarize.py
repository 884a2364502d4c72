"""Table and figure of the smaller-c experiment (README.md here), from the runs' eval.json.

Sets the runs of this folder (``c<c>-s0``, from ``run.sh``) beside the grid's seed-0
Digitclutter runs with the same budget: ``sn-l0`` (c = 0.9) and ``l0`` (no constraint).
Writes ``summary.md`` (one row per bound c) and ``rates_vs_c.png`` (per-stage convergence
rate against c, with the interval [1 - c, 1 + c] the bound allows; docs/results.md,
"The constraint makes networks convergent") into the folder.

Usage:
    python experiments/lipschitz_c/summarize.py [--grid experiments/grid] [--folder DIR]

A run that has not finished (no metrics.json or eval.json) is left out and named on stderr.
Exit codes: 0 written; 2 no finished run, or a run that cannot be summarised (a folder
name that is not ``c<number>-s0`` or disagrees with the run's config.json, two runs with
one bound, an evaluation without the indices or occlusion): one line on stderr for the
error, nothing written.
"""

import argparse
import glob
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # experiments/, for report.py's metrics

import report  # noqa: E402  (the same metric definitions as the grid's report)

from iterconv_keras import fsutil  # noqa: E402


def _row(run_dir):
    """A run as report.py's metrics read it, or None when unfinished.

    Raises:
        ValueError: naming the run, when its evaluation lacks what the summary reads.
    """
    paths = {name: os.path.join(run_dir, f"{name}.json") for name in ("config", "metrics", "eval")}
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    loaded = {}
    for name, path in paths.items():
        with open(path) as f:
            loaded[name] = json.load(f)
    evaluation = loaded["eval"]
    stages = evaluation.get("indices", {}).get("per_stage") or []
    if not stages or any(s.get("convergence_rate") is None for s in stages) or "occlusion" not in evaluation:
        raise ValueError(f"{run_dir}: eval.json needs the indices with a convergence rate per stage and the "
                         "occlusion sweep (rerun `iterconv eval` without --no-indices / --no-occlusion)")
    return {"run_dir": run_dir, "config": loaded["config"], "test": loaded["metrics"], "evaluation": evaluation}


def collect(grid, folder=HERE):
    """Finished runs by bound c (math.inf for the unconstrained network), and the unfinished run dirs.

    Args:
        grid: the sweep's output folder (its seed-0 Digitclutter ``l0`` and ``sn-l0`` runs).
        folder: where the ``c<c>-s0`` runs of this experiment are.

    Raises:
        ValueError: a run that cannot be summarised (see the module's exit codes).
    """
    candidates = [
        (math.inf, os.path.join(grid, "digitclutter", "l0-s0")),
        (0.9, os.path.join(grid, "digitclutter", "sn-l0-s0")),
    ]
    for path in sorted(glob.glob(os.path.join(folder, "c*-s0"))):
        match = re.fullmatch(r"c(\d+(?:\.\d+)?)-s0", os.path.basename(path))
        if not match:
            raise ValueError(f"{path}: not a run of this experiment (expected a folder named c<number>-s0)")
        candidates.append((float(match.group(1)), path))
    found, missing = {}, []
    for c, path in candidates:
        row = _row(path)
        if row is None:
            missing.append(path)
            continue
        stored = row["config"].get("lipschitz") if row["config"].get("spectral_norm") else math.inf
        if stored != c:  # the folder name and the run's own config must agree
            raise ValueError(f"{path}: config.json has lipschitz {stored}, the folder name says {c}")
        if c in found:
            raise ValueError(f"{path}: a second run with bound c = {c} (the other: {found[c]['run_dir']})")
        found[c] = row
    return found, missing


def stage_rates(row):
    """The run's measured convergence rate of each stage (docs/indices.md)."""
    return [s["convergence_rate"] for s in row["evaluation"]["indices"]["per_stage"]]


def table(found):
    """Markdown table, one row per bound c (the unconstrained run last), with report.py's metrics."""
    lines = [
        "| bound c | test accuracy | RI | DI | rate per stage | log10 rate (mean over stages) "
        "| allowed by the bound | max certified Lip(f) | occlusion AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(found):
        row = found[c]
        rates = " / ".join(f"{r:.3f}" for r in stage_rates(row))
        allowed = "-" if math.isinf(c) else f"[{1 - c:.2f}, {1 + c:.2f}]"
        certified = report.max_certified_lipschitz(row)
        lines.append(
            f"| {'none' if math.isinf(c) else c} | {report.accuracy(row):.4f} | {report.recurrence(row):.2f} "
            f"| {report.divergence(row):.2f} | {rates} | {report.log_rate(row):+.3f} | {allowed} "
            f"| {'-' if certified is None else f'{certified:.3f}'} | {report.occlusion_auc(row):.3f} |"
        )
    return "\n".join(lines) + "\n"


def figure(found):
    """Per-stage convergence rate against c (crosses at the right: no constraint); a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    bounded = sorted(c for c in found if not math.isinf(c))
    ax.fill_between([0.0, 1.0], [1.0, 0.0], [1.0, 2.0], color="grey", alpha=0.15,
                    label="allowed by Lip(f) <= c: [1 - c, 1 + c]")
    for stage in range(len(stage_rates(next(iter(found.values()))))):
        (line,) = ax.plot(bounded, [stage_rates(found[c])[stage] for c in bounded], marker="o", label=f"stage {stage}")
        if math.inf in found:
            ax.scatter([1.05], [stage_rates(found[math.inf])[stage]], marker="x", color=line.get_color())
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("bound c on Lip(f)  (x at right: no constraint)")
    ax.set_ylabel("convergence rate (update ratio per extra iteration)")
    ax.set_title("Digitclutter (3 digits), lambda 0, seed 0", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return plt, fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=os.path.join(os.path.dirname(HERE), "grid"))
    parser.add_argument("--folder", default=HERE, help="the c<c>-s0 runs; summary.md and rates_vs_c.png go here")
    args = parser.parse_args(argv)
    try:
        found, missing = collect(args.grid, args.folder)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    for path in missing:
        print(f"not finished, left out: {path}", file=sys.stderr)
    if not found:
        print("no finished run", file=sys.stderr)
        return 2
    text = table(found)
    plt, fig = figure(found)  # both built before either is written
    fsutil.write_text_atomic(os.path.join(args.folder, "summary.md"), text)
    png = os.path.join(args.folder, "rates_vs_c.png")
    fig.savefig(png + ".tmp", dpi=110, format="png")
    plt.close(fig)
    os.replace(png + ".tmp", png)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
