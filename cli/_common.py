"""Shared plumbing of the commands: error reporting, JSON output, exit codes."""

import contextlib
import errno
import functools
import json
import sys
import traceback

import click

from iterconv_keras import _env, errors, fsutil


def report_errors(func):
    """Turn library errors into one line on stderr and the documented exit code.

    `IterconvError` carries its own code; `ValueError` from argument validation
    is a usage error (2); anything else is an unexpected failure (1). With
    ``--debug`` on the root command, the traceback is shown as well.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool((ctx.find_root().obj or {}).get("debug"))
        try:
            _env.import_tensorflow()
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except errors.IterconvError as exc:
            _fail(exc, exc.exit_code, debug)
        except ValueError as exc:
            _fail(exc, 2, debug)
        except OSError as exc:
            _fail(_describe_os_error(exc), 1 if exc.errno == errno.ENOSPC else 2, debug)
        except KeyboardInterrupt:
            click.echo("iterconv: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1, debug)

    return wrapper


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
    click.echo(json.dumps(document, indent=2, sort_keys=False, default=fsutil.json_default))


def progress_to_stderr(json_output):
    """With ``--json``, send everything printed on stdout (Keras' progress bar) to stderr.

    stdout then carries exactly the one JSON document that the command emits
    after this context ends.
    """
    if json_output:
        return contextlib.redirect_stdout(sys.stderr)
    return contextlib.nullcontext()
