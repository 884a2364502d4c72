"""Figures of an evaluation document (``iterconv eval --plots DIR``).

Three PNGs, each readable on its own:

- ``indices.png``: accuracy and loss versus extra iterations of each stage's
  last block (the divergence index), one line per stage, with chance and the
  trained depth marked.
- ``updates.png``: update size along the trained blocks and the extra
  iterations (the convergence index and rate), absolute and relative, per
  stage; for contractive blocks the guaranteed envelope ``u_T L^k``.
- ``occlusion.png``: accuracy versus occluded fraction (with the AUC), and
  accuracy versus extra iterations on clean and occluded inputs.

Definitions in ``docs/indices.md`` (after Lippl, Peters & Kriegeskorte, PLoS
One 19(3): e0293440, 2024).
"""

import os


def write_plots(document, folder):
    """Write the figures for the sections present in ``document``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(folder, exist_ok=True)
    title = _title(document)
    paths = []
    if "indices" in document:
        paths.append(_save(_index_curves(document, title), os.path.join(folder, "indices.png")))
        paths.append(_save(_update_sizes(document, title), os.path.join(folder, "updates.png")))
    if "occlusion" in document:
        paths.append(_save(_occlusion(document, title), os.path.join(folder, "occlusion.png")))
    return paths


def _title(document):
    parts = [document.get("model"), document.get("dataset"), f"{document.get('examples')} examples"]
    return " | ".join(str(p) for p in parts if p)


def _save(figure, path):
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _nan(values):
    return [float("nan") if v is None else v for v in values]


def _index_curves(document, title):
    import matplotlib.pyplot as plt

    indices = document["indices"]
    settings = indices.get("settings", {})
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in indices["per_stage"]:
        ks = [0] + row["curves"]["extra_iterations"]
        label = f"stage {row['stage']} (DI {_fmt(row['divergence'])})"
        left.plot(ks, _nan([document["accuracy"]] + row["curves"]["accuracy"]), marker="o", label=label)
        right.plot(ks, _nan([document["loss"]] + row["curves"]["loss"]), marker="o", label=f"stage {row['stage']}")
    if settings.get("chance_accuracy") is not None:
        left.axhline(settings["chance_accuracy"], color="grey", linestyle="--", label="chance")
    if settings.get("chance_loss") is not None:
        right.axhline(settings["chance_loss"], color="grey", linestyle="--", label="chance-level loss")
    for axis, ylabel in ((left, "accuracy"), (right, "loss (cross-entropy)")):
        axis.set_xscale("symlog", linthresh=1)
        axis.set_xticks([0] + indices["curves"]["extra_iterations"])
        axis.set_xticklabels([str(k) for k in [0] + indices["curves"]["extra_iterations"]])
        axis.set_xlabel("extra iterations K of the stage's last block (0 = trained depth)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _accuracy_limits(
        left, [document["accuracy"]] + [v for row in indices["per_stage"] for v in row["curves"]["accuracy"]]
    )
    # Diverging networks reach losses many orders above the trained one.
    right.set_yscale("symlog", linthresh=1)
    right.set_ylim(bottom=0)
    figure.suptitle(
        f"Divergence: performance beyond the trained depth, one stage at a time\n"
        f"RI {_fmt(indices['recurrence'])}  DI {_fmt(indices['divergence'])}  CI {_fmt(indices['convergence'])}"
        f"   ({title})",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def _update_sizes(document, title):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    indices = document["indices"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in indices["per_stage"]:
        updates = _nan(row["curves"]["update_norm"])
        steps = list(range(1, len(updates) + 1))
        label = f"stage {row['stage']} (CI {_fmt(row['convergence'])}, rate {_fmt(row.get('convergence_rate'))})"
        (line,) = left.plot(steps, updates, marker=".", label=label)
        right.plot(steps, _nan(row["curves"]["relative_update"]), marker=".", label=f"stage {row['stage']}")
        bound, last = row.get("contraction_bound"), row["blocks"] - 1
        if bound is not None and updates[last] == updates[last]:
            # The guarantee of a contractive block: u_(T+k) <= L^k u_T.
            left.plot(steps[last:], [updates[last] * bound ** k for k in range(len(steps) - last)],
                      color=line.get_color(), linestyle="--", linewidth=1, label=f"  guaranteed, L {_fmt(bound)}")
        for axis in (left, right):
            axis.axvline(row["blocks"] + 0.5, color="grey", linestyle=":", linewidth=1)
    left.set_ylabel("update size  u_k = mean ||f(x_k)||")
    right.set_ylabel("relative update  u_k / mean ||x_k||")
    for axis in (left, right):
        values = [v for line in axis.get_lines() for v in line.get_ydata() if v == v and v > 0]
        # Log scale only when the sizes span decades; otherwise it hides the tick labels.
        if values and max(values) / min(values) > 20:
            axis.set_yscale("log")
        axis.set_xlabel("block application k (dotted: end of the trained blocks, then extra iterations)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    figure.suptitle(f"Convergence: update size per block, then extra iterations of the last block\n({title})",
                    fontsize=10)
    figure.tight_layout()
    return figure


def _occlusion(document, title):
    import matplotlib.pyplot as plt

    section = document["occlusion"]
    panels = 2 if "iterations" in section else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    left = axes[0][0]
    levels = [100 * p for p in section["levels"]]
    left.plot(levels, _nan(section["accuracy"]), marker="o", label=f"patch occlusion (AUC {_fmt(section['auc'])})")
    left.set_xlabel("occluded area (% of the image, patches filled with the mean)")
    left.set_ylabel("accuracy")
    _accuracy_limits(left, section["accuracy"])
    left.grid(alpha=0.3)
    if section.get("clutter"):
        text = "  ".join(f"{n} digits: {_fmt(a)}" for n, a in section["clutter"].items())
        left.set_title("Digitclutter exact-set accuracy: " + text, fontsize=8)
    if section.get("debris"):
        text = "  ".join(f"{n} fragments: {_fmt(a)}" for n, a in section["debris"].items())
        left.set_title("debris accuracy: " + text, fontsize=8)
    left.legend(fontsize=8)
    if panels == 2:
        right = axes[0][1]
        sweep = section["iterations"]
        ks = sweep["extra_iterations"]
        right.plot(ks, _nan(sweep["clean"]), marker="o", label="clean")
        right.plot(ks, _nan(sweep["occluded"]), marker="s", label=f"{100 * sweep['level']:.0f}% occluded")
        right.set_xscale("symlog", linthresh=1)
        right.set_xticks(ks)
        right.set_xticklabels([str(k) for k in ks])
        right.set_xlabel("extra iterations of every stage's last block")
        right.set_ylabel("accuracy")
        _accuracy_limits(right, sweep["clean"] + sweep["occluded"])
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    figure.suptitle(f"Occlusion robustness ({title})", fontsize=10)
    figure.tight_layout()
    return figure


def _accuracy_limits(axis, values):
    # From 0 to a little above the best value: low accuracies stay readable.
    top = max([v for v in values if v is not None] + [0.05])
    axis.set_ylim(0, min(1.02, top * 1.15))


def _fmt(value):
    if value is None:
        return "n/a"
    return f"{value:.2f}" if abs(value) < 1000 else f"{value:.2g}"
