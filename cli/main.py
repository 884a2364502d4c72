"""Entry point of the ``iterconv`` command."""

import sys

import click

from iterconv_keras import _env

_env.configure()


class _OneLineErrors(click.Group):
    """A group whose usage errors are one line on stderr (exit 2), like every other error.

    Bare ``iterconv`` or ``iterconv zoo`` (a group without its command) is the
    exception: click shows the group's help, as it would itself, multi-line on
    stderr with exit 2 (a usage error: the command is missing).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # the help text itself; flattening it to one line would garble it
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"iterconv: error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("iterconv: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
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
    from iterconv_cli import data_cmd, eval_cmd, export_cmd, train_cmd, zoo_cmd

    for module in (train_cmd, eval_cmd, data_cmd, export_cmd, zoo_cmd):
        cli.add_command(module.COMMAND)


_register()


def main():
    cli(prog_name="iterconv")


if __name__ == "__main__":
    main()
