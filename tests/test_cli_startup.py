"""Commands that need no TensorFlow start without it, or numpy (--help, data info)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs the CLI in a fresh interpreter and reports what it imported.
_PROBE = (
    "import sys, json\n"
    "from iterconv_cli.main import cli\n"
    "code = 0\n"
    "try:\n"
    "    cli(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "print(json.dumps({'code': code, 'heavy': [m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules]}),\n"
    "      file=sys.stderr)\n"
)

HELP_COMMANDS = [
    ["--help"], ["train", "--help"], ["eval", "--help"], ["export", "--help"], ["zoo", "--help"],
    ["zoo", "list", "--help"], ["zoo", "retire", "--help"], ["data", "--help"], ["data", "digitclutter", "--help"],
]


def _probe(args):
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    return result, json.loads(result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", HELP_COMMANDS, ids=" ".join)
def test_help_imports_no_tensorflow(args):
    result, report = _probe(args)
    assert report == {"code": 0, "heavy": []}, result.stderr
    assert "Usage:" in result.stdout


@pytest.mark.parametrize("group", [[], ["zoo"], ["data"]], ids=lambda g: " ".join(["iterconv", *g]))
def test_a_group_without_its_command_shows_its_help_as_a_usage_error(group):
    # The help as `--help` prints it, multi-line, on stderr; exit 2 (README: usage error), as click does.
    def run(args):
        return subprocess.run([sys.executable, "-m", "iterconv_cli.main", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    result = run(group)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    shown = result.stderr
    assert shown == run([*group, "--help"]).stdout
    assert shown.startswith(f"Usage: iterconv {' '.join(group)}".rstrip() + " [OPTIONS] COMMAND [ARGS]...\n")
    assert "\nCommands:\n" in shown and "iterconv: error" not in shown


def test_data_info_imports_no_tensorflow():
    result, report = _probe(["data", "info", "--json"])
    assert report == {"code": 0, "heavy": []}, result.stderr
    names = [row["name"] for row in json.loads(result.stdout)["datasets"]]
    assert names[:2] == ["digitclutter", "digitdebris"]


def _exit_of(raiser):
    """Exit code and stderr of a command, wrapped like iterconv's, whose body calls ``raiser``."""
    import click
    from click.testing import CliRunner

    from iterconv_cli._common import report_errors

    @click.group()
    def root():
        pass

    @root.command()
    @report_errors(tensorflow=False)
    def run():
        raiser()

    result = CliRunner().invoke(root, ["run"])
    return result.exit_code, result.stderr


def test_validation_errors_of_iterconv_are_usage_errors():
    from iterconv_keras.models import variants

    code, err = _exit_of(lambda: variants.variant_kwargs("no-such-variant"))
    assert code == 2
    assert err.startswith("iterconv: error: unknown variant 'no-such-variant'")


def test_value_errors_from_inside_other_libraries_are_unexpected_failures():
    import numpy as np

    code, err = _exit_of(lambda: np.zeros(3).reshape(2, 2))
    assert code == 1
    assert err.startswith("iterconv: error: unexpected ValueError: cannot reshape")
    assert "--debug" in err and len(err.strip().splitlines()) == 1
