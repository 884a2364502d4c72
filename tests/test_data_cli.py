"""``iterconv data``: digitclutter and debris writers' refusals, info table, run in-process with CliRunner."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from iterconv_keras.data import digitclutter, sources


@pytest.fixture(scope="module")
def cli():
    from iterconv_cli.main import cli as root

    return root


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    return CliRunner()


def test_digitclutter_writes_the_generated_set(cli, runner, tmp_path):
    out = tmp_path / "sub" / "clutter.npz"
    result = runner.invoke(
        cli, ["data", "digitclutter", "--n-digits", "4", "--count", "300", "--seed", "5", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["count"] == 300 and summary["path"] == str(out)
    expected = digitclutter.generate(4, 300, seed=5)
    with np.load(out) as archive:
        np.testing.assert_array_equal(archive["images"], expected.images)
        np.testing.assert_array_equal(archive["labels"], expected.labels)
        np.testing.assert_array_equal(archive["order"], expected.order)
        info = json.loads(str(archive["info"]))
    assert info["font_sha256"] == expected.info["font_sha256"] and info["seed"] == 5
    # Atomic write: no temporary file is left next to the output.
    assert os.listdir(out.parent) == ["clutter.npz"]


@pytest.mark.parametrize(
    "command, args, echoed",
    [
        ("digitclutter", ["--n-digits", "7"], "got 7"),
        ("digitclutter", ["--count", "-3"], "got -3"),
        ("digitclutter", ["--seed", "-1"], "got -1"),
        ("digitclutter", ["--out-name", "x.txt"], "x.txt'"),
        ("debris", ["--fragments", "20"], "--fragments must be one of 10, 30, 50 (the debris levels), got 20"),
        ("debris", ["--count", "-3"], "got -3"),
        ("debris", ["--count", "0"], "--count must be at least 1, got 0"),
        ("debris", ["--seed", "-1"], "got -1"),
        ("debris", ["--out-name", "x.txt"], "x.txt'"),
    ],
)
def test_generators_refuse_bad_values(cli, runner, tmp_path, command, args, echoed):
    out = str(tmp_path / "c.npz")
    if args[0] == "--out-name":
        args, out = [], str(tmp_path / args[1])
    result = runner.invoke(cli, ["data", command, "--count", "10", "--out", out, *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iterconv: error:") and echoed in lines[0], result.stderr
    assert [name for name in os.listdir(tmp_path) if name != "home"] == []  # nothing written


def test_info_lists_datasets_as_json_and_table(cli, runner, tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"")  # info locates files; it does not parse them
    result = runner.invoke(cli, ["data", "info", "--data-dir", str(tmp_path / "data"), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["datasets"]}
    assert set(rows) == set(sources.DATASET_NAMES)
    assert rows["cifar10"]["available"] and rows["cifar10"]["where"] == str(folder)
    assert not rows["cifar100"]["available"]
    table = runner.invoke(cli, ["data", "info", "--data-dir", str(tmp_path / "data")])
    assert table.exit_code == 0
    lines = {line.split()[0]: line for line in table.stdout.splitlines()}
    assert " yes " in lines["cifar10"] and str(folder) in lines["cifar10"]
    assert " no " in lines["cifar100"] and "cifar-100-python.tar.gz" in lines["cifar100"]
