"""Shared plumbing of the commands: error reporting, JSON output, exit codes, shared options."""

import contextlib
import errno
import functools
import json
import re
import sys
import traceback

import click

from iterconv_keras.data.sources import DATASET_NAMES, FILE_DATASETS, canonical_name  # stdlib only


class _DatasetChoice(click.Choice):
    """`DATASET_NAMES`, also in the zoo's hyphenated spelling (``fashion-mnist``)."""

    def convert(self, value, param, ctx):
        return super().convert(canonical_name(value), param, ctx)


def dataset_option(**kwargs):
    """The ``--dataset`` option: a name of `DATASET_NAMES` (``fashion-mnist`` is read as ``fashion_mnist``).

    Args:
        **kwargs: the rest of `click.option`'s arguments (``default``, ``help``, ...).
    """
    return click.option("--dataset", type=_DatasetChoice(DATASET_NAMES), **kwargs)


def given_options(ctx):
    """The names of ``ctx``'s options the user typed (not defaults), for options that must not be ignored."""
    return [p.name for p in ctx.command.params
            if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]


def data_dir_option():
    """The ``--data-dir`` option: an existing folder, else a usage error (exit 2) naming the path.

    A folder that does not exist used to be skipped silently, and the dataset found
    in the usual places instead.
    """
    return click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
                        help=f"Folder searched first for the files of {', '.join(FILE_DATASETS)} "
                             "(it must exist).")


def report_errors(func=None, *, tensorflow=True):
    """Turn library errors into one line on stderr and the documented exit code.

    `IterconvError` carries its own code. A `ValueError` raised by iterconv's
    own code is argument validation, a usage error (2); one raised inside
    TensorFlow, Keras or NumPy is a bug or an unforeseen case, an unexpected
    failure (1) like anything else. With ``--debug`` on the root command, the
    traceback is shown as well.

    Args:
        func: the command function (when used as a bare ``@report_errors``).
        tensorflow: import TensorFlow, with its native start-up log lines
            hidden, before the command runs. Commands that only read JSON or
            write generated images pass False and stay fast.
    """
    if func is None:
        return functools.partial(report_errors, tensorflow=tensorflow)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from iterconv_keras import _env, errors

        ctx = click.get_current_context()
        debug = bool((ctx.find_root().obj or {}).get("debug"))
        try:
            if tensorflow:
                _env.import_tensorflow()
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except errors.IterconvError as exc:
            _fail(option_spelling(exc, ctx.command) if exc.exit_code == 2 else exc, exc.exit_code, debug)
        except ValueError as exc:
            if _raised_by_iterconv(exc):
                _fail(option_spelling(exc, ctx.command), 2, debug)
            _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1, debug)
        except OSError as exc:
            _fail(_describe_os_error(exc), 1 if exc.errno == errno.ENOSPC else 2, debug)
        except KeyboardInterrupt:
            click.echo("iterconv: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1, debug)

    return wrapper


# Where a bare word names a setting rather than being prose: before "=" or a value (a
# number, a quoted string, True/False/None) or a verb of the library's messages.
_NAMES_A_SETTING = re.compile(r"=|\s(?:-?\d|['\"]|(?:True|False|None|must|applies|needs|holds|draws)\b)")


def option_spelling(message, command):
    """A usage error's ``message`` with the library's setting names spelled as ``command``'s options.

    The library names settings by their keyword arguments (``epochs must be an
    integer > 0``), right from Python; at the command line the user typed
    ``--epochs``. A parameter name is rewritten wherever it appears as a word of
    its own (not inside a quote, a path or an option) and names the setting: it
    contains an underscore, starts the message, or is followed by ``=``, a value or
    one of the messages' verbs ("must", "applies", ...). ``name=value`` becomes
    ``--option value``.

    Args:
        message: the error (or its text).
        command: the click command that ran; its options give the spellings.

    Returns:
        The rewritten text.
    """
    text = str(message)
    params = {p.name: p for p in command.params if isinstance(p, click.Option) and p.name and p.opts}
    if not params or not text:
        return message  # an empty message keeps its type, which _fail shows instead
    names = "|".join(re.escape(name) for name in sorted(params, key=len, reverse=True))

    def rewrite(match):
        name, equals, boolean = match.group(1), match.group(2), match.group(3)
        if not ("_" in name or match.start() == 0 or _NAMES_A_SETTING.match(text[match.end(1):])):
            return match.group(0)
        option = params[name]
        if boolean and option.is_flag:
            # A flag takes no value: True is the flag itself, False its --no- form (if it has one).
            flags = option.opts if boolean.strip() == "True" else option.secondary_opts
            if flags:
                return flags[0]
        value = (" " + boolean.strip()) if boolean else ""
        return option.opts[0] + (" " if equals and not boolean else "") + value

    return re.sub(rf"(?<![\w\-./'\"])({names})(?![\w-])(=)?((?:(?<==)|\s)(?:True|False)\b)?", rewrite, text)


def _raised_by_iterconv(exc):
    """Whether the innermost frame of ``exc`` is in iterconv's own code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module.split(".")[0] in ("iterconv_keras", "iterconv_cli")


def _describe_os_error(exc):
    # An unwritable, missing or full output location is the user's to fix: name
    # the path and the reason rather than show an exception class.
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return f"cannot write or read {where}: {reason}" if where else reason


def _fail(message, code, debug):
    if debug:
        traceback.print_exc()
    text = " ".join(str(message).split()) or type(message).__name__
    click.echo(f"iterconv: error: {text}", err=True)
    sys.exit(code)


def emit_json(document):
    """Print exactly one JSON document on stdout."""
    from iterconv_keras import fsutil

    click.echo(json.dumps(document, indent=2, sort_keys=False, default=fsutil.json_default))


def progress_to_stderr(json_output):
    """With ``--json``, send everything printed on stdout (Keras' progress bar) to stderr.

    stdout then carries exactly the one JSON document that the command emits
    after this context ends.
    """
    if json_output:
        return contextlib.redirect_stdout(sys.stderr)
    return contextlib.nullcontext()
