"""``iterconv export`` and ``iterconv zoo``, run in-process with CliRunner."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from iterconv_keras import zoo
from iterconv_keras.models.variants import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cli():
    from iterconv_cli.main import cli as root

    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished training run as the runner leaves it, with a saved eval document."""
    run = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(5)
    create_model("tiny", (16, 16, 1), 10).save(run / "model.keras")
    config = {"dataset": "mnist", "variant": "tiny", "coupling": 0.0, "lipschitz": None, "epochs": 1, "seed": 5}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.91, "loss": 0.3, "dataset": "mnist"}))
    evaluation = {"model": str(run), "dataset": "mnist", "accuracy": 0.9, "loss": 0.31,
                  "indices": {"recurrence": 0.12, "divergence": 0.85, "convergence": -0.4,
                              "effective_parameters": 2000, "parameters": 3422, "per_stage": []},
                  "occlusion": {"levels": [0.0, 0.5], "accuracy": [0.9, 0.3], "auc": 0.71}}
    (run / "eval.json").write_text(json.dumps(evaluation))
    return str(run)


@pytest.fixture(scope="module")
def exported(cli, run_dir, tmp_path_factory):
    """A zoo holding digits@1 and digits@2, exported through the command."""
    root = str(tmp_path_factory.mktemp("zoo"))
    runner = CliRunner()
    first = runner.invoke(cli, ["export", run_dir, "--name", "digits", "--zoo", root])
    second = runner.invoke(cli, ["export", run_dir, "--name", "digits", "--zoo", root, "--json"])
    return root, first, second


def test_export_prints_the_new_versions_path(exported):
    root, first, second = exported
    assert first.exit_code == 0, first.output
    assert first.stdout == os.path.join(root, "digits", "1") + "\n" and os.path.isabs(first.stdout)
    # Review U6: the docs say what it prints.
    with open(os.path.join(REPO, "docs", "serving.md")) as f:
        assert "prints one line on stdout: the new version's absolute path" in f.read()
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout) == {
        "name": "digits", "version": 2, "reference": "digits@2", "path": os.path.join(root, "digits", "2"),
    }


def test_show_reports_the_model_card_from_the_run_files(cli, exported, run_dir):
    root = exported[0]
    result = CliRunner().invoke(cli, ["zoo", "show", "digits@1", "--zoo", root, "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)["card"]
    assert card["dataset"] == "mnist" and card["variant"] == "tiny" and card["recipe"]["seed"] == 5
    assert card["metrics"] == {"accuracy": 0.91, "loss": 0.3}
    assert card["effective_parameters"] == 2000 and card["occlusion_auc"] == 0.71
    assert card["indices"]["recurrence"] == 0.12 and card["source"] == run_dir
    assert card["name"] == "digits" and card["projection"] is None and card["lipschitz"] is None
    table = CliRunner().invoke(cli, ["zoo", "show", "digits", "--zoo", root]).stdout
    rows = {line[:22].strip(): line[22:].strip() for line in table.splitlines()}
    assert rows["model"] == "digits@2" and rows["test accuracy"] == "0.9100" and rows["occlusion AUC"] == "0.7100"
    assert rows["dataset"] == "mnist" and rows["files"] == "6"


def test_list_table_and_json(cli, exported):
    root = exported[0]
    table = CliRunner().invoke(cli, ["zoo", "list", "--zoo", root])
    assert table.exit_code == 0
    model = keras.saving.load_model(os.path.join(exported[0], "digits", "2", "assets.extra", "model.keras"))
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    # Oracle: what the file system says the files of each version weigh.
    sizes = [sum(f.stat().st_size for f in pathlib.Path(root, "digits", v).rglob("*") if f.is_file())
             for v in ("1", "2")]
    header = ["NAME", "DEFAULT", "VERSIONS", "DATASET", "ACCURACY", "PARAMS", "SIZE"]
    assert table.stdout.splitlines()[0].split() == header
    assert table.stdout.splitlines()[1].split() == [
        "digits", "2", "1,2", "mnist", "0.9100", str(trainable), ",".join(f"{s / 2**20:.1f}MiB" for s in sizes)]
    document = json.loads(CliRunner().invoke(cli, ["zoo", "list", "--zoo", root, "--json"]).stdout)
    assert [(m["name"], m["versions"], m["sizes"]) for m in document["models"]] == [("digits", [1, 2], sizes)]


def test_zoo_root_from_the_environment(cli, exported, monkeypatch):
    monkeypatch.setenv(zoo.ENV_VAR, exported[0])
    document = json.loads(CliRunner().invoke(cli, ["zoo", "list", "--json"]).stdout)
    assert document["zoo"] == exported[0]


def test_verify_passes_then_exits_5_naming_a_flipped_file(cli, exported, tmp_path):
    root = str(tmp_path / "zoo")
    shutil.copytree(exported[0], root)
    ok = CliRunner().invoke(cli, ["zoo", "verify", "--zoo", root])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines() == ["digits@1  ok", "digits@2  ok"]

    bad_file = os.path.join(root, "digits", "2", "variables", "variables.index")
    with open(bad_file, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0x01
        f.seek(0)
        f.write(data)
    result = CliRunner().invoke(cli, ["zoo", "verify", "--zoo", root, "--json"])
    assert result.exit_code == 5
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert [v["ok"] for v in document["versions"]] == [True, False]
    assert result.stderr.startswith(f"iterconv: error: zoo verification failed: {bad_file}: sha256 ")
    assert len(result.stderr.splitlines()) == 1

    refused = CliRunner().invoke(cli, ["export", "digits@2", "--name", "copy", "--zoo", root])
    assert refused.exit_code == 5 and "refusing to load digits@2" in refused.stderr and bad_file in refused.stderr


@pytest.mark.parametrize(
    "args, listed",
    [
        (["zoo", "show", "nope"], "available: digits@2"),
        (["zoo", "show", "digits@9"], "versions: 1, 2 (default 2)"),
        (["zoo", "verify", "digits@9"], "versions: 1, 2 (default 2)"),
        (["export", "nope@1", "--name", "x"], "available: digits@2"),
    ],
)
def test_unknown_name_or_version_exits_4_listing_what_exists(cli, exported, args, listed):
    result = CliRunner().invoke(cli, [*args, "--zoo", exported[0]])
    assert result.exit_code == 4, result.output
    assert listed in result.stderr and result.stdout == ""


@pytest.mark.parametrize("name", ["Digits", "a/b", "a@1", "-x", ""])
def test_export_rejects_bad_names_echoing_them(cli, run_dir, tmp_path, name):
    result = CliRunner().invoke(cli, ["export", run_dir, "--name", name, "--zoo", str(tmp_path)])
    assert result.exit_code == 2
    assert f"got {name!r}" in result.stderr
    assert os.listdir(tmp_path) == []  # validated before anything is written


def _parse_config(text):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    return {c.name: (c.base_path, dict(c.version_labels)) for c in config.model_config_list.config}


def test_export_writes_the_container_convention_into_the_zoo(exported):
    with open(os.path.join(exported[0], "models.config")) as f:
        assert _parse_config(f.read()) == {"digits": ("/models/digits", {"default": 2})}


@pytest.mark.parametrize("base_path", [None, "/srv/zoo"])
def test_serving_config_prints_and_writes_out_for_a_base_path(cli, exported, tmp_path, base_path):
    root = str(tmp_path / "zoo")
    shutil.copytree(exported[0], root)
    os.remove(os.path.join(root, "models.config"))
    out = tmp_path / "served" / "models.config"
    args = ["zoo", "serving-config", "--zoo", root, "--out", str(out), "--json"]
    result = CliRunner().invoke(cli, args + (["--base-path", base_path] if base_path else []))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert out.read_text() == document["config"]
    expected_base = base_path or root  # default: the zoo's absolute path here
    assert _parse_config(document["config"]) == {"digits": (f"{expected_base}/digits", {"default": 2})}
    # The zoo's own file is rewritten in the container convention, whatever --base-path says.
    assert document["written"] == [os.path.join(root, "models.config"), str(out)]
    with open(os.path.join(root, "models.config")) as f:
        assert _parse_config(f.read()) == {"digits": ("/models/digits", {"default": 2})}


def test_serving_config_refuses_a_relative_base_path(cli, exported):
    result = CliRunner().invoke(cli, ["zoo", "serving-config", "--zoo", exported[0], "--base-path", "zoo"])
    assert result.exit_code == 2
    assert result.stderr == ("iterconv: error: --base-path must be an absolute path or a URL (gs://..., s3://...), "
                             "got 'zoo'\n")


# -- an installed package (a copy of the package outside any checkout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """iterconv_keras and iterconv_cli copied into a site-packages-like folder (no pyproject.toml beside them)."""
    site = tmp_path_factory.mktemp("site-packages")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(REPO, "iterconv_keras"), site / "iterconv_keras", ignore=ignore)
    shutil.copytree(os.path.join(REPO, "cli"), site / "iterconv_cli", ignore=ignore)
    return site


def _run_installed(site, args, cwd, **env):
    environment = {k: v for k, v in os.environ.items() if k != "ITERCONV_ZOO"}
    environment.update(PYTHONPATH=str(site), **env)
    return subprocess.run([sys.executable, "-m", "iterconv_cli.main", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_an_installed_package_refuses_to_export_into_itself(installed, run_dir, tmp_path):
    result = _run_installed(installed, ["export", run_dir, "--name", "digits"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"iterconv: error: no zoo to export to: iterconv is installed in {installed}")
    assert "pass --zoo DIR or set $ITERCONV_ZOO" in result.stderr and len(result.stderr.splitlines()) == 1
    assert sorted(os.listdir(installed)) == ["iterconv_cli", "iterconv_keras"]  # nothing written beside it
    # Reading commands say where they looked.
    listed = _run_installed(installed, ["zoo", "list"], cwd=tmp_path)
    assert listed.returncode == 4 and f"no zoo found at {installed / 'zoo'}" in listed.stderr


_LIST_PRETRAINED = textwrap.dedent(
    """
    import iterconv_keras as ick
    for call in (ick.list_pretrained, lambda: ick.load_model("digits")):
        try:
            print(repr(call()))
        except Exception as exc:
            print(type(exc).__name__, exc)
    """
)


def test_the_python_api_reports_a_missing_zoo_as_the_cli_does(installed, tmp_path):
    # After a plain `pip install .` without $ITERCONV_ZOO there is no zoo: not an empty one.
    environment = {k: v for k, v in os.environ.items() if k != "ITERCONV_ZOO"}
    python = subprocess.run([sys.executable, "-c", _LIST_PRETRAINED], cwd=tmp_path, capture_output=True, text=True,
                            env={**environment, "PYTHONPATH": str(installed)}, timeout=120)
    listed = _run_installed(installed, ["zoo", "list"], cwd=tmp_path)
    assert listed.returncode == 4
    message = listed.stderr.strip().removeprefix("iterconv: error: ")
    assert message.startswith(f"no zoo found at {installed / 'zoo'} (from the package's default)")
    assert python.stdout.splitlines() == [f"ModelNotFound {message}"] * 2, python.stderr[-2000:]
    # A zoo that exists and holds nothing yet is an empty list.
    (tmp_path / "empty-zoo").mkdir()
    empty = subprocess.run([sys.executable, "-c", _LIST_PRETRAINED], cwd=tmp_path, capture_output=True, text=True,
                           env={**environment, "PYTHONPATH": str(installed), "ITERCONV_ZOO": "empty-zoo"},
                           timeout=120)
    assert empty.stdout.splitlines() == [
        "[]", f"ModelNotFound no model 'digits' in the zoo at {tmp_path / 'empty-zoo'}; available: none (the zoo is "
              "empty)"], empty.stderr[-2000:]


# -- listing reads JSON only


_NO_TENSORFLOW = textwrap.dedent(
    """
    import sys
    from iterconv_cli import main
    sys.argv = ["iterconv", *sys.argv[1:]]
    try:
        main.main()
    except SystemExit as exc:
        code = exc.code
    print("TENSORFLOW", "tensorflow" in sys.modules, "KERAS", "keras" in sys.modules, "EXIT", code)
    """
)


@pytest.mark.parametrize("args", [["zoo", "list", "--json"], ["zoo", "show", "fashion-mnist-small"]])
def test_zoo_list_and_show_import_no_tensorflow(args):
    result = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert result.stdout.splitlines()[-1] == "TENSORFLOW False KERAS False EXIT 0", result.stderr[-2000:]
