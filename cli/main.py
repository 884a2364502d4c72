"""Entry point of the ``iterconv`` command."""

import click

from iterconv_keras import _env

_env.configure()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="iterconv")
@click.pass_context
def cli(ctx, debug):
    """iterconv: iterative convergent computation in residual networks.

    Exit codes: 0 success, 1 unexpected failure, 2 usage error, 3 dataset not
    available, 4 model or version not found, 5 integrity check failed.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register():
    # Each command module keeps TensorFlow out of its import; the heavy work is
    # imported inside the command functions.
    from iterconv_cli import data_cmd, train_cmd

    for module in (train_cmd, data_cmd):
        cli.add_command(module.COMMAND)


_register()


def main():
    cli(prog_name="iterconv")


if __name__ == "__main__":
    main()
