"""``iterconv eval``: accuracy, indices of iterative convergence and occlusion robustness."""

import os

import click

from iterconv_cli._common import data_dir_option, dataset_option, emit_json, given_options, report_errors

# The iterations-under-occlusion sweep of --occlusion runs at fixed settings
# (occlusion.DEFAULT_ITERATIONS, DEFAULT_ITERATION_LEVEL; a test keeps these in step).
_ITERATION_SWEEP = "K = 0, 1, 2, 4, 8, 16 extra iterations at 30 % occluded"

# Options that only feed one part of the evaluation: given with that part switched off,
# they would be silently ignored, so they are refused (click's parameter source tells
# a given option from its default, whatever its value).
_NEEDS_INDICES = ("extra_iterations", "tolerance")
_NEEDS_OCCLUSION = ("levels",)


@click.command("eval")
@click.argument("model_reference", metavar="MODEL")
@dataset_option(default=None,
                help="Dataset to evaluate on (default: the one in the model's metadata).")
@click.option("--indices/--no-indices", default=True, show_default=True,
              help="Recurrence, divergence and convergence indices and effective parameters.")
@click.option("--occlusion/--no-occlusion", default=True, show_default=True,
              help="Patch-occlusion sweep (--levels), clutter digit counts or debris levels, and iterations under "
                   f"occlusion (always {_ITERATION_SWEEP}).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate the first N test examples only (default: the test set of a run trained with "
                   "--test-size, else the whole test split).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass: memory and speed; the results are the same up to float rounding.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Write PNG figures (index curves, update sizes, occlusion) into this folder; needs --indices or "
                   "--occlusion.")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON document to FILE.")
@data_dir_option()
@click.option("--zoo", "zoo_root", type=click.Path(file_okay=False), default=None,
              help="Zoo folder for NAME[@VERSION] references.")
@click.option("--extra-iterations", default="1,2,4,8,16", show_default=True,
              callback=lambda ctx, param, value: _numbers(value, int, param),
              help="K of the divergence index, comma-separated, increasing; the last is K_max of the convergence "
                   f"index and rate. Needs --indices; iterations under occlusion keep {_ITERATION_SWEEP}.")
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=1e-3, show_default=True,
              help="Recurrence index: skip a block whose drop changes the loss by less than this (nats). Needs "
                   "--indices.")
@click.option("--levels", default="0,0.1,0.2,0.3,0.4,0.5", show_default=True,
              callback=lambda ctx, param, value: _numbers(value, float, param),
              help="Occluded fractions of the occlusion sweep, comma-separated, starting with 0. Needs --occlusion; "
                   f"iterations under occlusion keep {_ITERATION_SWEEP}.")
@report_errors(tensorflow=False)  # TensorFlow is imported below, once the options are known to be usable
def COMMAND(model_reference, dataset, indices, occlusion, limit, batch_size, plots_dir, json_output, out,
            data_dir, zoo_root, extra_iterations, tolerance, levels):
    """Evaluate MODEL: accuracy, indices of iterative convergence, occlusion robustness.

    MODEL is a run directory, a .keras file, a zoo version directory or a zoo
    reference NAME[@VERSION]. The indices are iterconv's operationalisation of
    Lippl, Peters & Kriegeskorte (PLoS One 2024); see docs/indices.md.
    """
    from iterconv_keras import _env

    # Everything that can be refused is checked before the (long) evaluation starts.
    ctx = click.get_current_context()
    _refuse_ignored_options(ctx, indices, occlusion)
    _env.import_tensorflow()  # its native start-up lines hidden: errors stay one line
    from iterconv_keras import fsutil, loading
    from iterconv_keras.analysis import evaluation

    extra_iterations, levels = _validated(ctx, extra_iterations, levels)
    if plots_dir:
        if os.path.exists(plots_dir) and not os.path.isdir(plots_dir):
            raise ValueError(f"--plots {plots_dir} exists and is not a directory")
        fsutil.check_writable(os.path.join(plots_dir, "indices.png"))
    if out:
        fsutil.check_writable(out)
    if zoo_root is not None and loading.looks_like_path(model_reference):
        # A path is loaded from where it points; the zoo folder would be silently ignored.
        raise click.UsageError(f"--zoo applies to NAME[@VERSION] references only, got the path {model_reference!r}")
    loaded = loading.load(model_reference, zoo=zoo_root)
    # The card's recipe holds the run's settings (data_dir, clutter_digits, test_size, ...).
    metadata = loaded.card.to_json()
    data = evaluation.load_for_model(loaded.model, metadata, dataset=dataset, data_dir=data_dir, limit=limit)
    evaluation.check_compatible(loaded.model, data)
    test_size = evaluation.recorded_test_size(metadata, dataset, limit)  # the one load_for_model used
    if test_size is not None:
        click.echo(f"evaluating on the {len(data.x)} test images of the model's training run (--test-size "
                   f"{test_size}); --limit N evaluates the first N of the whole test split", err=True)
    stderr = click.get_text_stream("stderr")
    with click.progressbar(length=1, label="evaluating", file=stderr) as bar:

        def progress(done, total):
            bar.length = total
            bar.update(done - bar.pos)

        document = evaluation.evaluate(
            loaded.model, data, indices=indices, occlusion=occlusion, limit=limit, batch_size=batch_size,
            extra_iterations=extra_iterations, tolerance=tolerance, levels=levels,
            progress=progress, model_reference=model_reference,
        )
    if plots_dir:
        from iterconv_keras.analysis import plots

        for path in plots.write_plots(document, plots_dir):
            click.echo(f"wrote {path}", err=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fsutil.write_json_atomic(out, document)
    if json_output:
        emit_json(document)
    else:
        click.echo(format_table(document))


def _refuse_ignored_options(ctx, indices, occlusion):
    """A usage error for an option given with the part of the evaluation it feeds switched off."""
    typed = set(given_options(ctx))
    ignored = []
    if not indices:
        ignored += [f"{_flag(ctx, name)} has no effect with --no-indices" for name in _NEEDS_INDICES if name in typed]
    if not occlusion:
        ignored += [f"{_flag(ctx, name)} has no effect with --no-occlusion"
                    for name in _NEEDS_OCCLUSION if name in typed]
    if not indices and not occlusion and "plots_dir" in typed:
        ignored.append("--plots has nothing to draw with --no-indices and --no-occlusion")
    if ignored:
        raise click.UsageError("; ".join(ignored) + " (drop the option or the switch)", ctx=ctx)


def _param(ctx, name):
    return next(param for param in ctx.command.params if param.name == name)


def _flag(ctx, name):
    return _param(ctx, name).opts[0]


def _validated(ctx, extra_iterations, levels):
    """The lists checked by the library's own validators, a usage error naming the option otherwise.

    A list the evaluators would refuse (levels not starting at 0, extra iterations
    not increasing) is refused before the model is loaded, not after the index suite
    has run.
    """
    from iterconv_keras.analysis import indices, occlusion

    checked = []
    for name, value, validate in (("extra_iterations", extra_iterations, indices.validate_extra_iterations),
                                  ("levels", levels, occlusion.validate_levels)):
        try:
            checked.append(tuple(validate(value)))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=_param(ctx, name)) from None
    return checked


def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    # Diverging networks reach huge losses and indices; keep the columns aligned.
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.2g}"


def _table_notes(ind):
    """What the rate, L and Lip(f) columns mean, and why a DI is missing."""
    lip = ind.get("lipschitz") or {}
    bound = "none" if lip.get("bound") is None else f"c = {lip['bound']:g}"
    form = lip.get("residual_form", "plain")
    if form == "contractive":
        form = f"contractive, alpha = {lip['alpha']:g}"
    notes = ["rate: update factor per extra iteration; L: its certified bound (contractive blocks only)",
             f"Lip(f): largest certified Lipschitz constant of a block's constrained function ({form} blocks, "
             f"bound {bound})"]
    settings = ind.get("settings", {})
    if ind.get("divergence_skipped"):
        notes.append(f"DI null: accuracy within {settings.get('accuracy_tolerance')} of chance")
    if ind.get("divergence_loss_skipped"):
        notes.append(f"DI(loss) null: loss within {settings.get('tolerance')} nats of chance")
    return notes


def format_table(document):
    """The evaluation document as a readable text table."""
    lines = [
        f"model     {document.get('model', '?')}",
        f"dataset   {document.get('dataset', '?')} ({document['split']}, {document['examples']} examples)",
        f"accuracy  {_fmt(document['accuracy'])}    loss {_fmt(document['loss'])}",
    ]
    if "indices" in document:
        ind = document["indices"]
        lines += [
            "",
            "indices of iterative convergence (loss-based RI, accuracy-based DI; see docs/indices.md)",
            f"{'stage':<8}{'RI':>8}{'RI(acc)':>9}{'skipped':>9}{'DI':>8}{'DI(loss)':>10}{'CI':>9}{'rate':>8}"
            f"{'L':>7}{'rho':>7}{'Lip(f)':>8}",
        ]
        certified = (ind.get("lipschitz") or {}).get("certified") or [[] for _ in ind["per_stage"]]
        mean_row = dict(ind, stage="mean", rho=None, contraction_bound=None)
        for row, lip in zip(ind["per_stage"] + [mean_row], certified + [[]], strict=True):
            lines.append(
                f"{row['stage']!s:<8}{_fmt(row['recurrence']):>8}{_fmt(row['recurrence_accuracy']):>9}"
                f"{row['recurrence_skipped']:>9}{_fmt(row['divergence']):>8}{_fmt(row['divergence_loss']):>10}"
                f"{_fmt(row['convergence']):>9}{_fmt(row.get('convergence_rate')):>8}"
                f"{_fmt(row.get('contraction_bound')):>7}{_fmt(row['rho'], 2):>7}"
                f"{_fmt(max(lip) if lip else None, 2):>8}"
            )
        lines.append(f"RI median over every stage's terms {_fmt(ind['recurrence_median'])} "
                     "(one outlying term cannot move it far; docs/indices.md)")
        lines += _table_notes(ind)
        lines.append(
            f"parameters {_fmt(ind['parameters'])}, effective {_fmt(round(ind['effective_parameters']))}"
        )
        curves = ind["curves"]
        lines.append("extra iterations " + " ".join(f"{k:>6}" for k in curves["extra_iterations"]))
        lines.append("  accuracy       " + " ".join(f"{_fmt(v):>6}" for v in curves["accuracy"]))
        lines.append("  loss           " + " ".join(f"{_fmt(v):>6}" for v in curves["loss"]))
    if "occlusion" in document:
        occ = document["occlusion"]
        lines += ["", f"occlusion (AUC {_fmt(occ['auc'])})"]
        lines.append("  occluded  " + " ".join(f"{p:>6.0%}" for p in occ["levels"]))
        lines.append("  accuracy  " + " ".join(f"{_fmt(v):>6}" for v in occ["accuracy"]))
        if "clutter" in occ:
            lines.append("  clutter   " + "  ".join(f"{n} digits: {_fmt(a)}" for n, a in occ["clutter"].items()))
        if "debris" in occ:
            lines.append("  debris    " + "  ".join(f"{n} fragments: {_fmt(a)}" for n, a in occ["debris"].items()))
        if "iterations" in occ:
            it = occ["iterations"]
            lines.append("  extra iterations " + " ".join(f"{k:>6}" for k in it["extra_iterations"]))
            lines.append("    clean          " + " ".join(f"{_fmt(v):>6}" for v in it["clean"]))
            lines.append(f"    {it['level']:.0%} occluded   " + " ".join(f"{_fmt(v):>6}" for v in it["occluded"]))
    return "\n".join(lines)


def _numbers(text, kind, param):
    """A comma-separated option as a tuple of ``kind``; `_validated` checks the list itself.

    A bad item is a usage error naming it. Nothing is imported here: click runs this
    while it parses, before TensorFlow can be imported with its log lines hidden.
    """
    try:
        return tuple(kind(item) for item in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {text!r}",
                                 param=param) from None
