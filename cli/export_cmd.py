"""``iterconv export``: write a model as the next version of a zoo name."""

import click

from iterconv_cli._common import emit_json, report_errors


@click.command("export")
@click.argument("model")
@click.option("--name", required=True, help="Zoo name: lower-case letters, digits, '_', '.', '-'.")
@click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False), default=None,
              help="Zoo directory (default: $ITERCONV_ZOO, then the checkout's zoo/; an installed "
                   "iterconv needs one of the two).")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON summary on stdout.")
@report_errors
def export_command(model, name, zoo_dir, json_output):
    """Export MODEL to the zoo as the next integer version of NAME.

    Prints the new version's absolute path (with --json: name, version,
    reference NAME@N and path). MODEL is a run directory, a .keras file, a zoo
    version directory or NAME[@VERSION]. The version is a SavedModel
    (signatures serving_default and classify, for TensorFlow Serving) with the
    full Keras model and a model card in assets.extra/. For a run directory the
    card takes the recipe from config.json, test metrics from metrics.json and
    indices from eval.json. A Lipschitz-constrained model is projected onto its
    bound on a copy, and the card says so. The version appears atomically;
    concurrent exports get distinct versions; <zoo>/models.config is rewritten
    (base paths /models/NAME, see docs/serving.md).
    """
    from iterconv_keras import loading, zoo

    # Refuse a bad name or a missing zoo before loading the model.
    zoo.validate_name(name)
    root = zoo.writable_root(zoo_dir)
    loaded = loading.load(model, zoo=zoo_dir)
    card = loaded.card.replace(source=loaded.provenance.source)
    name, version, path = zoo.export_version(loaded.model, name, root=root, card=card)
    if json_output:
        emit_json({"name": name, "version": version, "reference": f"{name}@{version}", "path": path})
    else:
        click.echo(path)


COMMAND = export_command
