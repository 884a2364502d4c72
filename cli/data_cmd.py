"""``iterconv data``: generate Digitclutter and debris files; report which datasets are available."""

import os

import click

from iterconv_cli._common import data_dir_option, emit_json, report_errors


@click.group("data")
def COMMAND():
    """Datasets: generate Digitclutter or its debris variant, show what is available offline."""


def _set_options(command):
    """The options every generator command shares: --count, --seed, --out, --json."""
    options = [
        click.option("--count", type=int, default=10_000, show_default=True, help="Number of images."),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed; the same seed gives the same bytes."
        ),
        click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Output .npz file."),
        click.option("--json", "json_output", is_flag=True, help="Print a JSON summary on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@COMMAND.command("digitclutter")
@click.option("--n-digits", type=int, default=3, show_default=True, help="Distinct digits per image (2..5).")
@_set_options
@report_errors
def digitclutter_command(n_digits, count, seed, out, json_output):
    """Generate a Digitclutter set (Spoerer et al. 2017) into an .npz file.

    The file holds ``images`` uint8 [N,32,32,1], ``labels`` float32 [N,10]
    (multi-hot), ``order`` int8 [N,n] (drawing order, last is front-most) and
    ``info`` (a JSON string: font, sha256, recipe, seed). It is written to a
    temporary file and renamed, so a reader never sees half a file. Train on it
    with ``iterconv train --data-file OUT``.
    """
    from iterconv_keras.data import digitclutter

    # Validate before the (possibly long) generation, with the generator's messages.
    digitclutter.validate(n_digits, count, 32, seed)
    _check_output(count, out)
    clutter = _with_progress(lambda progress: digitclutter.generate(n_digits, count, seed, progress=progress), count)
    _write(out, clutter, {"n_digits": n_digits}, json_output,
           f"wrote {count} images with {n_digits} digits (seed {seed}) to {out}")


@COMMAND.command("debris")
@click.option("--fragments", type=int, default=10, show_default=True, help="Digit fragments per image (10, 30 or 50).")
@_set_options
@report_errors
def debris_command(fragments, count, seed, out, json_output):
    """Generate a debris set (one digit among digit fragments, Spoerer et al. 2017) into an .npz file.

    The file holds ``images`` uint8 [N,32,32,1], ``labels`` int64 [N] (the target
    digit) and ``info`` (a JSON string: font, sha256, recipe, seed). The recipe is
    iterconv's operationalisation (docs/datasets.md). It is written to a temporary
    file and renamed, so a reader never sees half a file. Train on it with
    ``iterconv train --dataset digitdebris --debris-fragments N --data-file OUT``.
    """
    from iterconv_keras.data import debris
    from iterconv_keras.data import digitclutter as dc

    debris.validate_fragments(fragments, "--fragments")
    dc.validate_generation(count, 32, seed)
    _check_output(count, out)
    generated = _with_progress(lambda progress: debris.generate(fragments, count, seed, progress=progress), count)
    _write(out, generated, {"fragments": fragments}, json_output,
           f"wrote {count} images with {fragments} fragments (seed {seed}) to {out}")


def _check_output(count, out):
    """Refuse an empty set or an output that is not a writable ``.npz`` before generating."""
    from iterconv_keras import fsutil

    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    if not out.endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {out!r}")
    fsutil.check_writable(out)


def _with_progress(generate, count):
    """Call ``generate(progress)`` under a progress bar on stderr."""
    with click.progressbar(length=count, label="generating", file=click.get_text_stream("stderr")) as bar:
        done = [0]

        def progress(total):
            bar.update(total - done[0])
            done[0] = total

        return generate(progress)


def _write(out, generated, settings, json_output, message):
    """Write the set atomically to ``out`` (`setfile.save_npz`); report as JSON or one line."""
    from iterconv_keras.data import setfile

    setfile.save_npz(out, generated)
    info = generated.info
    summary = {"path": os.path.abspath(out), "count": len(generated.images), **settings, "seed": info["seed"],
               "info": info}
    if json_output:
        emit_json(summary)
    else:
        click.echo(message)


@COMMAND.command("info")
@data_dir_option()
@click.option("--json", "json_output", is_flag=True, help="Print JSON on stdout.")
@report_errors(tensorflow=False)
def info_command(data_dir, json_output):
    """Show which datasets can be loaded offline, and from where.

    Searched: --data-dir, $ITERCONV_DATA_DIR, ~/.keras/datasets,
    ~/tensorflow_datasets, /usr/share/datasets. Nothing is downloaded.
    """
    from iterconv_keras.data import sources

    rows = sources.available(data_dir)
    if json_output:
        emit_json({"datasets": rows})
        return
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        if row["available"]:
            click.echo(f"{row['name']:<{width}}  yes  {row['format']}: {row['where']}")
        else:
            looked = "; ".join(row["where"]) if isinstance(row["where"], list) else row["where"]
            click.echo(f"{row['name']:<{width}}  no   looked in: {looked}; to get it: {row['how_to_get']}")
