"""``iterconv zoo``: list, show and verify zoo models; retire a version; write the TF Serving config.

``list``, ``show`` and ``retire`` read and write only JSON and text (the
manifest, a model card, ``models.config``) and import no TensorFlow.
"""

import click

from iterconv_cli._common import emit_json, report_errors

_ZOO_OPTION = click.option(
    "--zoo", "zoo_dir", type=click.Path(file_okay=False), default=None,
    help="Zoo directory (default: $ITERCONV_ZOO, then the repository's zoo/).",
)
_JSON_OPTION = click.option("--json", "json_output", is_flag=True, help="Print JSON on stdout.")


@click.group("zoo")
def zoo_group():
    """The versioned model zoo (see docs/serving.md for TensorFlow Serving)."""


@zoo_group.command("list")
@_ZOO_OPTION
@_JSON_OPTION
@report_errors(tensorflow=False)
def list_command(zoo_dir, json_output):
    """Models of the zoo: versions, default version, accuracy and each version's size on disk."""
    from iterconv_keras import zoo

    root = zoo.existing_root(zoo_dir)
    rows = zoo.list_pretrained(root)
    if json_output:
        emit_json({"zoo": root, "models": rows})
        return
    if not rows:
        click.echo(f"the zoo at {root} is empty")
        return
    table = [("NAME", "DEFAULT", "VERSIONS", "DATASET", "ACCURACY", "PARAMS", "SIZE")]
    for row in rows:
        table.append((
            row["name"], str(row["default_version"]), ",".join(map(str, row["versions"])),
            row["dataset"] or "-", _number(row["metrics"].get("accuracy")), str(row["parameters"] or "-"),
            ",".join(_size(size) for size in row["sizes"]),
        ))
    _echo_table(table)
    retired = [f"  {row['name']}@{r['version']} on {str(r['retired_at'])[:10]}: {r['reason']}"
               for row in rows for r in row["retired"]]
    if retired:
        click.echo("retired (kept in the manifest, no longer served):")
        click.echo("\n".join(retired))


@zoo_group.command("show")
@click.argument("reference", metavar="NAME[@VERSION]")
@_ZOO_OPTION
@_JSON_OPTION
@report_errors(tensorflow=False)
def show_command(reference, zoo_dir, json_output):
    """The model card of a version (default: the default version)."""
    from iterconv_keras import zoo

    info = zoo.show(reference, zoo.existing_root(zoo_dir))
    card = info["card"]
    if json_output:
        emit_json({**info, "card": card.to_json()})
        return
    rows = [("model", f"{info['name']}@{info['version']}"), ("path", info["path"]), ("size", _size(info["size"])),
            *card.summary(), ("files", len(info["files"]))]
    _echo_table([(key, "-" if value is None else _number(value)) for key, value in rows])


@zoo_group.command("verify")
@click.argument("reference", metavar="[NAME[@VERSION]]", required=False)
@click.option("--no-load", is_flag=True, help="Only compare checksums; do not load each version.")
@_ZOO_OPTION
@_JSON_OPTION
@report_errors
def verify_command(reference, no_load, zoo_dir, json_output):
    """Check every file's sha256 against MANIFEST.json and that each version loads.

    Exits 5 naming the bad file when a check fails, 4 for an unknown name.
    """
    from iterconv_keras import zoo

    root = zoo.existing_root(zoo_dir)
    report = zoo.verify_report(reference, root, load_models=not no_load)
    if json_output:
        emit_json({"zoo": root, "ok": all(r["ok"] for r in report), "versions": report})
    elif not report:
        click.echo(f"the zoo at {root} is empty: nothing to verify")
    else:
        for result in report:
            status = "ok" if result["ok"] else "FAILED"
            click.echo(f"{result['name']}@{result['version']}  {status}")
            for problem in result["problems"]:
                click.echo(f"  {problem}")
    zoo.raise_on_problems(report)


@zoo_group.command("retire")
@click.argument("reference", metavar="NAME@VERSION")
@click.option("--reason", required=True,
              help="Why it is retired (kept in the manifest, shown to anyone who asks for the version).")
@_ZOO_OPTION
@_JSON_OPTION
@report_errors(tensorflow=False)
def retire_command(reference, reason, zoo_dir, json_output):
    """Retire a version: it leaves the served zoo, the manifest keeps its record.

    The version folder is renamed out of <zoo>/NAME/ (a TensorFlow Serving
    server polling it unloads that version), MANIFEST.json records when and
    why with the version's metrics and checksums, the default version moves
    to the highest live one if it was this one, and <zoo>/models.config is
    rewritten. Its number is never reused. A name keeps at least one version:
    export a new one before retiring the last. Exits 2 for that, a version
    already retired or no --reason; 4 for an unknown name or version.
    """
    from iterconv_keras import zoo
    from iterconv_keras.errors import UsageError

    name, version = zoo.parse_reference(reference)
    if version is None:
        raise UsageError(f"name the version to retire as NAME@VERSION, got {reference!r}")
    result = zoo.retire_version(name, version, reason, root=zoo_dir)
    if json_output:
        emit_json(result)
        return
    removed = f"removed {result['removed']}" if result["removed"] else "its folder was already gone"
    click.echo(f"retired {result['reference']} ({removed}): {result['reason']}")
    click.echo(f"{name}: live versions {', '.join(map(str, result['versions']))}, default {result['default_version']}; "
               f"rewrote {result['config']}")


@zoo_group.command("serving-config")
@click.option("--base-path", default=None,
              help="Where the server sees the zoo: model NAME is served from BASE_PATH/NAME (an absolute path "
                   "or a URL). Default: the zoo's absolute path on this machine.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the config to FILE.")
@_ZOO_OPTION
@_JSON_OPTION
@report_errors(tensorflow=False)
def serving_config_command(base_path, out, zoo_dir, json_output):
    """Print TensorFlow Serving's models.config for the whole zoo.

    Also rewrites <zoo>/models.config from MANIFEST.json, which always uses the
    tensorflow/serving container's base paths /models/NAME (mount the zoo at
    /models), so the committed file is the same on every machine.
    """
    import os

    from iterconv_keras import fsutil, zoo

    root = zoo.existing_root(zoo_dir)
    # Refuse a bad --out or --base-path before <zoo>/models.config is rewritten.
    if out:
        fsutil.check_writable(out)
    text = zoo.serving_config(root, base_path=base_path)
    written = [zoo.refresh_zoo_config(root)]
    if out:
        fsutil.write_text_atomic(out, text)
        written.append(os.path.abspath(out))
    if json_output:
        emit_json({"config": text, "base_path": base_path or root, "written": written})
    else:
        click.echo(text, nl=False)
        click.echo(f"written to {', '.join(written)}", err=True)


COMMAND = zoo_group


def _number(value):
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _size(size):
    # MiB, the unit `du -h` uses; "-" for a version folder that is missing.
    return "-" if size is None else f"{size / 2**20:.1f}MiB"


def _echo_table(rows):
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
