"""Figures and the claim-by-claim table of docs/results.md, from the sweep's summary.json.

Reads ``GRID/summary.json`` (written by ``experiments/sweep.py`` after every run)
and writes PNG figures to ``--figures`` and a Markdown report (tables of every
condition with mean and spread over seeds, and one paired comparison per claim of
the paper) to ``--out``. Works on a partial grid: a figure or claim with no data yet
says so instead of failing.

Usage:
    python experiments/report.py --grid experiments/grid --figures docs/figures \\
        --out experiments/grid/report.md --results docs/results.md

``--results`` fills the section of docs/results.md between the ``grid-report`` markers,
so the tables and figures there are always the sweep's, never copied by hand.

Paired comparisons: for a claim "A versus B" the difference is taken per seed (the
same seed trains both conditions on the same data order), then
``mean +- t(0.975, n-1) * sd / sqrt(n)`` is its 95 % interval (Student's t, n pairs).
With one pair there is no interval; the report says so.

Exit codes: 0 written; 2 usage error (no or malformed summary.json, a results file
without the markers, an output that cannot be written): one line on stderr and
nothing written.
"""

import argparse
import collections
import json
import math
import os
import sys

import numpy as np

from iterconv_keras import fsutil
from iterconv_keras.analysis import formulas

# Two-sided 95 % quantiles of Student's t, by degrees of freedom (no SciPy needed).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}
COUPLING_GRID = ("l0", "l0.5", "l0.9", "l0.99", "l1")
FAMILIES = {  # series of the "versus lambda" figures: condition names in lambda order
    "unconstrained": ("l0", "l0.5", "l0.9", "l0.99", "l1"),
    "Lipschitz constraint (c = 0.9)": ("sn-l0", "sn-l1"),
    "contractive (alpha 0.5, c 0.5)": ("contractive-l0", "contractive-l1"),
    "conventional (independent init)": ("conventional",),
}
CORNERS = ("l0", "l1", "sn-l0", "sn-l1", "contractive-l0", "contractive-l1")
DATASET_TITLES = {"digitclutter": "Digitclutter (3 digits)", "fashion_mnist": "Fashion-MNIST"}


# ---------------------------------------------------------------------------- metrics of one run

def accuracy(row):
    return row["test"]["accuracy"]


def recurrence(row):
    return row["evaluation"]["indices"]["recurrence"]


def recurrence_median(row):
    """The median of the run's per-block recurrence terms (docs/indices.md), from its stored terms."""
    value = formulas.recurrence_median(row["evaluation"]["indices"]["per_stage"])
    return None if math.isnan(value) else value


def divergence(row):
    return row["evaluation"]["indices"]["divergence"]


def log_rate(row):
    """Mean over stages of log10 of the measured convergence rate (< 0: updates shrink)."""
    rates = [s.get("convergence_rate") for s in row["evaluation"]["indices"]["per_stage"]]
    rates = [r for r in rates if r is not None and r > 0]
    return float(np.mean(np.log10(rates))) if rates else None


def occlusion_auc(row):
    return row["evaluation"]["occlusion"]["auc"]


METRICS = {"test accuracy": accuracy, "recurrence index": recurrence, "median recurrence index": recurrence_median,
           "divergence index": divergence,
           "log10 convergence rate": log_rate, "occlusion AUC": occlusion_auc}


# ---------------------------------------------------------------------------- statistics

def paired_interval(a, b):
    """Mean of the per-seed differences a - b with its 95 % t interval.

    Args:
        a, b: dicts seed -> value; only seeds present in both with non-None values pair up.

    Returns:
        ``{"n", "above", "mean", "sd", "low", "high"}`` (``above``: how many differences are
        > 0, a description beside the interval at small n; ``sd``, ``low``, ``high`` None
        when n < 2), or None for n = 0.
    """
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    diffs = np.array([a[s] - b[s] for s in seeds], np.float64)
    if diffs.size == 0:
        return None
    mean, above = float(diffs.mean()), int((diffs > 0).sum())
    if diffs.size < 2:
        return {"n": 1, "above": above, "mean": mean, "sd": None, "low": None, "high": None}
    sd = float(diffs.std(ddof=1))
    half = t975(diffs.size - 1) * sd / math.sqrt(diffs.size)
    return {"n": int(diffs.size), "above": above, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def verdict(interval):
    if interval is None:
        return "no runs yet"
    if interval["low"] is None:
        return "one seed only: no interval"
    if interval["low"] > 0:
        return "A > B"
    if interval["high"] < 0:
        return "A < B"
    return "no detectable difference"


# ---------------------------------------------------------------------------- grouping

def by_condition(rows, dataset):
    """condition -> seed -> row, for one dataset."""
    out = {}
    for row in rows:
        if row["dataset"] == dataset:
            out.setdefault(row["condition"], {})[row["seed"]] = row
    return out


def values(runs, metric):
    return {seed: METRICS[metric](row) for seed, row in runs.items()}


def mean_sd(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None), len(vals)


# ---------------------------------------------------------------------------- the report

# Claims checked by paired comparisons. ``b`` None compares A with 0. ``expected``: "A > B" /
# "A < B" (the difference has this sign), "A <= B" (A does not help: it is not better).
# ``source``: "paper" (Lippl, Peters & Kriegeskorte 2024, section 1 of the method; every
# measure is still our operationalisation, docs/indices.md), "ours" (a question of this
# project: robustness to patch occlusion, the contractive block and the initialisation go
# beyond the paper's claims).
Claim = collections.namedtuple("Claim", "title metric a b expected source")


def with_median_checks(claims):
    """Each recurrence claim followed by the same claim on the median of the per-block terms.

    The median (docs/indices.md) is a robustness check added after the first runs showed
    single terms moving the mean; the mean stays the primary measure.
    """
    checked = []
    for claim in claims:
        checked.append(claim)
        if claim.metric == "recurrence index":
            checked.append(claim._replace(title=f"{claim.title} (check: median RI)", metric="median recurrence index"))
    return checked


CLAIMS = with_median_checks([
    Claim("Conventionally trained ResNets do not learn iterative solutions", "recurrence index", "conventional",
          None, "A <= B", "paper"),
    Claim("Coupling makes networks iterative", "recurrence index", "l1", "l0", "A > B", "paper"),
    Claim("Coupling under the constraint", "recurrence index", "sn-l1", "sn-l0", "A > B", "paper"),
    Claim("The constraint makes networks convergent (geometric mean rate over stages below 1)",
          "log10 convergence rate", "sn-l0", None,
          "A < B", "paper"),
    Claim("The constraint makes networks more convergent than lambda 0", "log10 convergence rate", "sn-l0", "l0",
          "A < B", "paper"),
    Claim("The contractive block makes networks convergent (geometric mean rate over stages below 1)",
          "log10 convergence rate", "contractive-l0", None, "A < B", "ours"),
    Claim("Coupling does not help accuracy", "test accuracy", "l1", "l0", "A <= B", "paper"),
    Claim("The constraint does not help accuracy", "test accuracy", "sn-l0", "l0", "A <= B", "paper"),
    Claim("Convergence by construction does not help accuracy", "test accuracy", "contractive-l0", "l0", "A <= B",
          "ours"),
    Claim("Coupling does not help occlusion robustness", "occlusion AUC", "l1", "l0", "A <= B", "ours"),
    Claim("The constraint does not help occlusion robustness", "occlusion AUC", "sn-l0", "l0", "A <= B", "ours"),
    Claim("Convergence by construction does not help occlusion robustness", "occlusion AUC", "contractive-l0", "l0",
          "A <= B", "ours"),
    Claim("Tied initialisation is a head start towards recurrence", "recurrence index", "l0", "conventional",
          "A > B", "ours"),
    Claim("Tied versus conventional initialisation: accuracy", "test accuracy", "l0", "conventional", None, "ours"),
])


def agreement(interval, expected):
    """Whether a paired comparison bears out the expectation stated for it.

    Args:
        interval: a ``paired_interval`` result (or None).
        expected: "A > B", "A < B", "A <= B" (A does not help) or None (no expectation).

    Returns:
        "agrees" (the interval lies on the expected side of 0), "disagrees" (it lies on the
        other side), "not shown" (it contains 0 where a sign is expected), "not
        contradicted" (it contains 0 where A is expected not to help: absence of a
        difference at this n, not evidence of none), "open" (fewer than two seeds) or "-".
    """
    found = verdict(interval)
    if expected is None:
        return "-"
    if found in ("no runs yet", "one seed only: no interval"):
        return "open"
    if expected == "A <= B":
        return {"A > B": "disagrees", "A < B": "agrees"}.get(found, "not contradicted")
    if found == expected:
        return "agrees"
    return "disagrees" if found in ("A > B", "A < B") else "not shown"


def seeds_to_resolve(interval, most=1000):
    """Seeds at which this mean difference and spread would give an interval excluding 0.

    A planning number, not a result: it assumes the observed mean difference and standard
    deviation stay as they are (the smallest n with t(0.975, n - 1) * sd / sqrt(n) < |mean|).
    None when there is no spread yet (n < 2) or the mean is 0; ``most`` + 1 means "more
    than ``most``".
    """
    if interval is None or interval["sd"] is None or interval["mean"] == 0:
        return None
    sd = interval["sd"]
    for n in range(2, most + 1):
        if t975(n - 1) * sd / math.sqrt(n) < abs(interval["mean"]):
            return n
    return most + 1


def t975(df):
    """Two-sided 95 % Student-t quantile: the table to 30 df, then 1.96 + 2.4 / df (within 0.2 %)."""
    return T975[df] if df in T975 else 1.96 + 2.4 / df


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def claims_table(rows, datasets):
    lines = ["| claim | dataset | measure | A | B | n | A > B in | mean A - B | 95 % interval | verdict | "
             "expected (source) | outcome | seeds to resolve |", "|" + "---|" * 13]
    for claim in CLAIMS:
        for dataset in datasets:
            runs = by_condition(rows, dataset)
            first = values(runs.get(claim.a, {}), claim.metric)
            second = values(runs.get(claim.b, {}), claim.metric) if claim.b is not None else dict.fromkeys(first, 0.0)
            interval = paired_interval(first, second)
            n = f"{interval['n']}{second_look_tag(runs, claim, first, second)}" if interval else 0
            ci = (f"[{_fmt(interval['low'])}, {_fmt(interval['high'])}]"
                  if interval and interval["low"] is not None else "-")
            needed = seeds_to_resolve(interval) if verdict(interval) == "no detectable difference" else None
            above = f"{interval['above']} of {interval['n']}" if interval else "-"
            expected = f"{claim.expected} ({claim.source})" if claim.expected else f"- ({claim.source})"
            lines.append(f"| {claim.title} | {dataset} | {claim.metric} | {claim.a} | "
                         f"{'0' if claim.b is None else claim.b} | {n} | {above} | "
                         f"{_fmt(interval['mean'] if interval else None)} | {ci} | {verdict(interval)} | "
                         f"{expected} | {agreement(interval, claim.expected)} | {_seeds(needed)} |")
    return "\n".join(lines) + "\n"


def second_look_tag(runs, claim, first, second):
    """" (second look)" when a paired seed of the claim's conditions was added after looking (sweep.py)."""
    paired = [s for s in first if s in second and first[s] is not None and second[s] is not None]
    later = any(runs.get(name, {}).get(s, {}).get("added_later") for name in (claim.a, claim.b) for s in paired)
    return " (second look)" if later else ""


def _seeds(needed, most=1000):
    if needed is None:
        return "-"
    return f"> {most}" if needed > most else str(needed)


def conditions_table(rows, dataset):
    runs = by_condition(rows, dataset)
    header = "| condition | seeds | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for condition in runs:  # plan order (the summary's row order)
        cells = []
        for metric in METRICS:
            mean, sd, n = mean_sd(values(runs[condition], metric).values())
            cells.append(_fmt(mean) + (f" +- {_fmt(sd)}" if sd is not None else ""))
        lines.append(f"| {condition} | {len(runs[condition])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def max_certified_lipschitz(row):
    """The largest certified Lip(f) over the blocks (docs/lipschitz.md), or None."""
    certified = row["evaluation"]["indices"].get("lipschitz", {}).get("certified")
    flat = [c for stage in certified or [] for c in stage if c is not None]
    return max(flat) if flat else None


def training_cpu(row):
    """CPU seconds of a run's training, or None when unrecorded.

    The larger of the training calls' total (which misses a call killed before it
    returned) and the sum over complete epochs (which misses set-up and the final test).
    """
    timing = row["timing"]
    found = max(timing.get("train", {}).get("cpu_seconds", 0.0), timing.get("epochs_cpu_seconds", 0.0))
    return found or None


def cpu_totals(rows):
    """``(training + evaluation CPU seconds, runs whose training CPU is unrecorded)``."""
    total = sum((training_cpu(r) or 0.0) + r["timing"].get("evaluation", {}).get("cpu_seconds", 0.0) for r in rows)
    return total, [f"{r['dataset']} {r['condition']} s{r['seed']}" for r in rows if training_cpu(r) is None]


def runs_table(rows, dataset):
    """One row per run: the numbers a zoo card holds, plus clutter sizes and training CPU."""
    clutter = dataset == "digitclutter"
    header = ("| condition | seed | test accuracy | RI | RI median | DI | convergence rate per stage | "
              "max certified Lip(f) | occlusion AUC | " + ("4 / 5 digits | " if clutter else "") + "train CPU-min |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for condition, runs in by_condition(rows, dataset).items():
        for seed in sorted(runs):
            row = runs[seed]
            indices = row["evaluation"]["indices"]
            rates = " / ".join(_fmt(s.get("convergence_rate"), 2) for s in indices["per_stage"])
            cpu = training_cpu(row)
            cells = [condition, str(seed), _fmt(accuracy(row)), _fmt(recurrence(row), 2),
                     _fmt(recurrence_median(row), 2),
                     _fmt(divergence(row), 2), rates, _fmt(max_certified_lipschitz(row), 3),
                     _fmt(occlusion_auc(row), 2)]
            if clutter:
                sizes = row["evaluation"]["occlusion"].get("clutter") or {}
                cells.append(f"{_fmt(sizes.get('4'))} / {_fmt(sizes.get('5'))}")
            cells.append(_fmt(cpu / 60 if cpu else None, 1))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- figures

def _figure(ncols, nrows=1, width=5.0, height=3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coupling_of(runs_of_condition):
    """The coupling lambda a condition's runs were trained with (from their stored configs)."""
    couplings = {row["config"]["coupling"] for row in runs_of_condition.values()}
    if len(couplings) != 1:
        raise ValueError(f"a condition's runs disagree on the coupling: {sorted(couplings)}")
    return couplings.pop()


def plot_versus_lambda(rows, datasets, metric, path, ylabel):
    plt, fig, axes = _figure(len(datasets))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        runs = by_condition(rows, dataset)
        # 0.9, 0.99 and 1 would overlap on a linear axis: categorical positions.
        ticks = sorted({coupling_of(r) for r in runs.values()})
        for offset, (family, names) in enumerate(FAMILIES.items()):
            xs, ys, es = [], [], []
            for name in names:
                mean, sd, n = mean_sd(values(runs.get(name, {}), metric).values())
                if mean is not None:
                    xs.append(ticks.index(coupling_of(runs[name])) + 0.06 * (offset - 1.5))
                    ys.append(mean)
                    es.append(sd or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=family, color=condition_color(names[0]))
        ax.set_xticks(range(len(ticks)), [f"{t:g}" for t in ticks])
        ax.set_xlabel("coupling lambda")
        ax.set_ylabel(ylabel)
        ax.set_title(DATASET_TITLES.get(dataset, dataset))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{ylabel}: mean over seeds, error bars 1 sd (none with one seed)", fontsize=9)
    return _save(plt, fig, path)


def plot_update_norms(rows, dataset, path):
    runs = by_condition(rows, dataset)
    present = [c for c in CORNERS if 0 in runs.get(c, {})]
    if not present:
        return None
    plt, fig, axes = _figure(len(present), width=max(3.4, 6.0 / len(present)), height=3.2)
    for ax, condition in zip(axes[0], present, strict=True):
        stages = runs[condition][0]["evaluation"]["indices"]["per_stage"]
        for stage in stages:
            updates = stage["curves"]["update_norm"]
            ax.semilogy(range(1, len(updates) + 1), updates, marker=".", label=f"stage {stage['stage']}")
            ax.axvline(stage["blocks"] + 0.5, color="grey", lw=0.5)
        ax.set_title(condition, fontsize=9)
        ax.set_xlabel("block application (trained | extra)")
        ax.set_ylabel("mean ||f(x_k)||")
        ax.legend(fontsize=7)
    fig.suptitle(f"{DATASET_TITLES.get(dataset, dataset)}: update size per block application, seed 0", fontsize=9)
    return _save(plt, fig, path)


def _mean_curve(runs, extract):
    curves = [np.asarray(extract(row), np.float64) for row in runs.values()]
    curves = [c for c in curves if c.size]
    if not curves or len({c.size for c in curves}) != 1:
        return None, None
    stack = np.stack(curves)
    return stack.mean(axis=0), (stack.std(axis=0, ddof=1) if len(curves) > 1 else None)


def condition_color(condition):
    """One colour per condition, the same in every figure (matplotlib's ten default colours;
    grey for a condition outside the grid)."""
    order = [*COUPLING_GRID, "sn-l0", "sn-l1", "conventional", "contractive-l0", "contractive-l1"]
    return f"C{order.index(condition)}" if condition in order else "0.4"


def plot_curves(rows, datasets, path, extract, xs_of, xlabel, ylabel, title, dashed=None):
    from matplotlib import ticker

    plt, fig, axes = _figure(len(datasets))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        runs = by_condition(rows, dataset)
        for condition in runs:
            for style, fn in (("-", extract), ("--", dashed)):
                if fn is None:
                    continue
                mean, sd = _mean_curve(runs[condition], fn)
                if mean is None:
                    continue
                xs = xs_of(next(iter(runs[condition].values())))
                ax.errorbar(xs, mean, yerr=sd, ls=style, marker=".", capsize=2, color=condition_color(condition),
                            label=condition if style == "-" else None)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # epochs, iterations, digits: whole numbers
        ax.set_ylabel(ylabel)
        ax.set_title(DATASET_TITLES.get(dataset, dataset))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def make_figures(rows, datasets, folder):
    os.makedirs(folder, exist_ok=True)
    made = []
    for metric, name in (("test accuracy", "accuracy_vs_lambda"), ("recurrence index", "recurrence_vs_lambda"),
                         ("median recurrence index", "recurrence_median_vs_lambda"),
                         ("divergence index", "divergence_vs_lambda"),
                         ("log10 convergence rate", "convergence_rate_vs_lambda"),
                         ("occlusion AUC", "occlusion_auc_vs_lambda")):
        made.append(plot_versus_lambda(rows, datasets, metric, os.path.join(folder, f"{name}.png"), metric))
    for dataset in datasets:
        made.append(plot_update_norms(rows, dataset, os.path.join(folder, f"update_norms_{dataset}.png")))
    made.append(plot_curves(
        rows, datasets, os.path.join(folder, "occlusion_curves.png"),
        lambda r: r["evaluation"]["occlusion"]["accuracy"], lambda r: r["evaluation"]["occlusion"]["levels"],
        "occluded fraction p", "test accuracy", "Accuracy under patch occlusion (mean over seeds, 1 sd)"))
    made.append(plot_curves(
        rows, datasets, os.path.join(folder, "iterations_under_occlusion.png"),
        lambda r: r["evaluation"]["occlusion"]["iterations"]["clean"],
        lambda r: r["evaluation"]["occlusion"]["iterations"]["extra_iterations"],
        "extra iterations of every stage's last block", "test accuracy",
        "Accuracy versus extra iterations: clean (solid) and 30 % occluded (dashed)",
        dashed=lambda r: r["evaluation"]["occlusion"]["iterations"]["occluded"]))
    made.append(plot_curves(
        rows, [d for d in datasets if d == "digitclutter"], os.path.join(folder, "clutter_digits.png"),
        lambda r: [r["evaluation"]["occlusion"]["clutter"][k] for k in ("2", "3", "4", "5")],
        lambda r: [2, 3, 4, 5], "digits in the image (trained on 3)", "exact-set accuracy",
        "Digitclutter: accuracy on 2-5 digit test sets"))
    made.append(plot_curves(
        rows, datasets, os.path.join(folder, "learning_curves.png"),
        lambda r: [h["val_accuracy"] for h in r["history"]], lambda r: [h["epoch"] for h in r["history"]],
        "epoch", "validation accuracy", "Learning curves (validation, mean over seeds, error bars 1 sd)"))
    return [m for m in made if m]


BEGIN, END = "<!-- grid-report:begin -->", "<!-- grid-report:end -->"
CLAIMS_LEGEND = (
    "A - B per seed (B = 0: A itself; only the seeds both conditions ran, so a condition with more "
    "seeds than its partner, as the tables above average them, contributes only the shared ones), "
    "then the mean with its 95 % Student-t interval; the verdict "
    "says on which side of 0 the interval lies. *expected (source)*: what the claim says of A - B "
    "(A <= B: A does not help) and whose claim it is: *paper* (Lippl, Peters & Kriegeskorte 2024, who "
    "tested MNIST, CIFAR and Digitclutter, not Fashion-MNIST), *ours* (beyond the paper: patch "
    "occlusion, the contractive block, the initialisation); every measure is our operationalisation "
    "(docs/indices.md). *outcome*: *agrees* / *disagrees* (the interval "
    "lies on the expected / the other side of 0), *not shown* (it contains 0 where a sign is "
    "expected), *not contradicted* (it contains 0 where A should not help: no difference found at "
    "this n, which is not evidence of none), *open* (fewer than two seeds). *seeds to resolve*: "
    "for an interval containing 0, the seeds at which it would exclude 0 if the observed mean and "
    "spread held (a planning number, not a result). Rows marked *check: median RI* repeat a "
    "recurrence claim with the median of the per-block terms (docs/indices.md), added after the first "
    "runs showed single terms moving the mean: a check of robustness, not a second chance; the mean "
    "stays the primary measure. *A > B in*: the seeds whose difference is above 0, a description "
    "beside the interval (at n = 3 a t interval can contain 0 while every seed points one way). "
    "*n (second look)*: the pairs include seeds added after the first ones had been looked at "
    "(experiments/sweep.py records which); the interval is not corrected for it, docs/results.md "
    "gives the corrected one.")


def render(summary, datasets, figures, figure_prefix):
    """The report in Markdown: condition tables, the claims table and the figures."""
    rows = summary["runs"]
    cpu, unrecorded = cpu_totals(rows)
    parts = [f"{len(rows)} finished runs; {cpu / 3600:.2f} CPU-hours recorded (training and evaluation)"
             + (f", without the training of {', '.join(unrecorded)} (unrecorded)" if unrecorded else "") + ".\n"]
    for dataset in datasets:
        parts.append(f"#### {DATASET_TITLES.get(dataset, dataset)}\n\nMean over seeds (+- 1 sd when there are "
                     "several).\n\n" + conditions_table(rows, dataset) + "\nEvery run (train CPU-min: "
                     "n/a where the run's training time was not recorded):\n\n" + runs_table(rows, dataset))
    parts.append("#### Claims, paired over seeds\n\n" + CLAIMS_LEGEND + "\n\n" + claims_table(rows, datasets))
    parts.append("#### Figures\n")
    for path in figures:
        name = os.path.splitext(os.path.basename(path))[0]
        parts.append(f"![{name.replace('_', ' ')}]({figure_prefix}{os.path.basename(path)})\n")
    return "\n".join(parts)


def splice(document, text):
    """``document`` with what lies between the report markers replaced by ``text``.

    Raises:
        ValueError: when the document lacks the markers, or holds them out of order.
    """
    begin, end = document.find(BEGIN), document.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"no '{BEGIN}' ... '{END}' section to fill")
    return document[:begin + len(BEGIN)] + "\n" + text + "\n" + document[end:]


def load_summary(path):
    """The sweep's summary document; ValueError (one line) when it is missing or malformed."""
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no {path}; run experiments/sweep.py first") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), list):
        raise ValueError(f"{path} is not a sweep summary (no list of runs)")
    return summary


def datasets_of(rows):
    """The datasets with runs: the known ones in `DATASET_TITLES` order, then any other, sorted."""
    present = {r["dataset"] for r in rows}
    return [d for d in DATASET_TITLES if d in present] + sorted(present - set(DATASET_TITLES))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="experiments/grid")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--out", default=None, help="Markdown report (default: GRID/report.md)")
    parser.add_argument("--results", default=None,
                        help="also fill the section between the grid-report markers of this Markdown file "
                             "(docs/results.md)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.grid, "report.md")
    # Everything is checked before the first figure is drawn: a bad input writes nothing.
    try:
        summary = load_summary(os.path.join(args.grid, "summary.json"))
        document = None
        if args.results:
            try:
                with open(args.results) as f:
                    document = f.read()
            except OSError as error:
                raise ValueError(f"cannot read {args.results}: {error.strerror}") from None
            try:
                splice(document, "")
            except ValueError as error:
                raise ValueError(f"{args.results}: {error}") from None
        for target in (out, os.path.join(args.figures, "probe.png"), args.results):
            if target:
                fsutil.check_writable(target)
    except ValueError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    rows = summary["runs"]
    datasets = datasets_of(rows)
    figures = make_figures(rows, datasets, args.figures)
    prefix = os.path.relpath(args.figures, os.path.dirname(os.path.abspath(out))) + "/"
    fsutil.write_text_atomic(out, "# Grid report\n\n" + render(summary, datasets, figures, prefix))
    if document is not None:
        prefix = os.path.relpath(args.figures, os.path.dirname(os.path.abspath(args.results))) + "/"
        fsutil.write_text_atomic(args.results, splice(document, render(summary, datasets, figures, prefix)))
    print(f"report: {out}; figures: {', '.join(os.path.basename(p) for p in figures)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
