"""Table and figure of the smaller-c experiment (README.md here), from the runs' eval.json.

Sets the runs of this folder (``c<c>-s0``, from ``run.sh``) beside the grid's seed-0
Digitclutter runs with the same budget: ``sn-l0`` (c = 0.9) and ``l0`` (no constraint).
Writes ``summary.md`` (one row per bound c) and ``rates_vs_c.png`` (per-stage convergence
rate against c, with the interval [1 - c, 1 + c] the bound allows; docs/results.md,
"The constraint makes networks convergent").

Usage:
    python experiments/lipschitz_c/summarize.py [--grid experiments/grid]

A run that has not finished (no metrics.json or eval.json) is left out and named on stderr.
Exit codes: 0 written; 2 no finished run, or a run whose config.json disagrees with its
folder name (one line on stderr, nothing written).
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
    """A run as report.py's metrics read it, or None when unfinished."""
    paths = {name: os.path.join(run_dir, f"{name}.json") for name in ("config", "metrics", "eval")}
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    loaded = {}
    for name, path in paths.items():
        with open(path) as f:
            loaded[name] = json.load(f)
    return {"run_dir": run_dir, "config": loaded["config"], "test": loaded["metrics"], "evaluation": loaded["eval"]}


def collect(grid, folder=HERE):
    """Finished runs by bound c (math.inf for the unconstrained network), and the unfinished run dirs.

    Args:
        grid: the sweep's output folder (its seed-0 Digitclutter ``l0`` and ``sn-l0`` runs).
        folder: where the ``c<c>-s0`` runs of this experiment are.
    """
    found, missing = {}, []
    candidates = [
        (math.inf, os.path.join(grid, "digitclutter", "l0-s0")),
        (0.9, os.path.join(grid, "digitclutter", "sn-l0-s0")),
    ]
    for path in sorted(glob.glob(os.path.join(folder, "c*-s0"))):
        match = re.fullmatch(r"c([0-9.]+)-s0", os.path.basename(path))
        if match:
            candidates.append((float(match.group(1)), path))
    for c, path in candidates:
        row = _row(path)
        if row is None:
            missing.append(path)
            continue
        stored = row["config"].get("lipschitz") if row["config"].get("spectral_norm") else math.inf
        if stored != c:  # the folder name and the run's own config must agree
            raise ValueError(f"{path}: config.json has lipschitz {stored}, the folder name says {c}")
        found[c] = row
    return found, missing


def _stage_rates(row):
    return [s["convergence_rate"] for s in row["evaluation"]["indices"]["per_stage"]]


def table(found):
    lines = [
        "| bound c | test accuracy | RI | DI | rate per stage | log10 rate (mean over stages) "
        "| allowed by the bound | max certified Lip(f) | occlusion AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(found):
        row = found[c]
        rates = " / ".join(f"{r:.3f}" for r in _stage_rates(row))
        allowed = "-" if math.isinf(c) else f"[{1 - c:.2f}, {1 + c:.2f}]"
        certified = report.max_certified_lipschitz(row)
        lines.append(
            f"| {'none' if math.isinf(c) else c} | {report.accuracy(row):.4f} | {report.recurrence(row):.2f} "
            f"| {report.divergence(row):.2f} | {rates} | {report.log_rate(row):+.3f} | {allowed} "
            f"| {'-' if certified is None else f'{certified:.3f}'} | {report.occlusion_auc(row):.3f} |"
        )
    return "\n".join(lines) + "\n"


def figure(found, path):
    plt, fig, axes = report._figure(1, width=5.4, height=3.8)
    ax = axes[0][0]
    bounded = sorted(c for c in found if not math.isinf(c))
    if bounded:
        grid_c = [0.0, 1.0]
        ax.fill_between(
            grid_c,
            [1 - c for c in grid_c],
            [1 + c for c in grid_c],
            color="grey",
            alpha=0.15,
            label="allowed by Lip(f) <= c: [1 - c, 1 + c]",
        )
    stages = len(_stage_rates(next(iter(found.values()))))
    for stage in range(stages):
        ax.plot(bounded, [_stage_rates(found[c])[stage] for c in bounded], marker="o", label=f"stage {stage}")
        if math.inf in found:
            ax.scatter([1.05], [_stage_rates(found[math.inf])[stage]], marker="x", color=ax.lines[-1].get_color())
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("bound c on Lip(f)  (x at right: no constraint)")
    ax.set_ylabel("convergence rate (update ratio per extra iteration)")
    ax.set_title("Digitclutter (3 digits), lambda 0, seed 0", fontsize=9)
    ax.legend(fontsize=7)
    return report._save(plt, fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=os.path.join(os.path.dirname(HERE), "grid"))
    args = parser.parse_args(argv)
    try:
        found, missing = collect(args.grid)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    for path in missing:
        print(f"not finished, left out: {path}", file=sys.stderr)
    if not found:
        print("no finished run", file=sys.stderr)
        return 2
    fsutil.write_text_atomic(os.path.join(HERE, "summary.md"), table(found))
    figure(found, os.path.join(HERE, "rates_vs_c.png"))
    print(table(found), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
