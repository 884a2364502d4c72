"""Bad input across every command: one clear line, a documented exit code, nothing left behind.

Table-driven: each row is a command line, the expected exit code, a phrase the
error line must contain, and paths that must not exist afterwards.
"""

import os

import keras
import pytest
from click.testing import CliRunner

from iterconv_cli.main import cli
from iterconv_keras import zoo
from iterconv_keras.models.variants import create_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files the bad inputs refer to: a clutter model, a zoo, corrupt files."""
    root = tmp_path_factory.mktemp("bad")
    keras.utils.set_random_seed(0)
    model = create_model("tiny", (32, 32, 1), 10, multi_label=True)
    model.save(root / "clutter.keras")
    (root / "garbage.keras").write_bytes(b"this is not a zip archive")
    (root / "a_file").write_text("x")
    (root / "not_a_run").mkdir()
    (root / "empty_data").mkdir()
    full = root / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    good_zoo = root / "zoo"
    zoo.export_version(model, "clutter", root=str(good_zoo))
    bad_zoo = root / "badzoo"
    zoo.export_version(model, "clutter", root=str(bad_zoo))
    variables = next((bad_zoo / "clutter" / "1" / "variables").glob("variables.data-*"))
    data = bytearray(variables.read_bytes())
    data[len(data) // 2] ^= 0xFF
    variables.write_bytes(bytes(data))
    return root


def _p(env, name):
    return str(env / name)


# (id, args with {placeholders}, exit code, phrase in the error line, paths that must not exist)
CASES = [
    # train
    ("train-coupling-range", ["train", "--coupling", "1.5", "--out", "{out}"], 2, "coupling", ["{out}"]),
    ("train-coupling-type", ["train", "--coupling", "strong", "--out", "{out}"],
     2, "'strong' is not a valid float", ["{out}"]),
    ("train-epochs-zero", ["train", "--epochs", "0", "--out", "{out}"], 2, "epochs", ["{out}"]),
    ("train-lipschitz-negative", ["train", "--spectral-norm", "--lipschitz", "-1", "--out", "{out}"],
     2, "lipschitz", ["{out}"]),
    ("train-unknown-variant", ["train", "--variant", "resnet9000", "--out", "{out}"], 2, "resnet9000", ["{out}"]),
    ("train-unknown-dataset", ["train", "--dataset", "imagenet", "--out", "{out}"], 2, "imagenet", ["{out}"]),
    ("train-debris-fragments", ["train", "--dataset", "digitdebris", "--debris-fragments", "20", "--out", "{out}"],
     2, "got 20", ["{out}"]),
    ("train-train-size-zero", ["train", "--train-size", "0", "--out", "{out}"], 2, "--train-size", ["{out}"]),
    ("train-existing-output", ["train", "--out", "{full}"], 2, "already exists", []),
    ("train-resume-not-a-run", ["train", "--resume", "--out", "{not_a_run}"], 2, "not a run directory", []),
    ("train-missing-dataset", ["train", "--dataset", "cifar10", "--data-dir", "{empty_data}", "--out", "{out}"],
     3, "cifar10", ["{out}"]),
    ("train-unwritable-output", ["train", "--variant", "tiny", "--train-size", "64", "--out", "/proc/iterconv-run"],
     2, "/proc", ["/proc/iterconv-run"]),
    ("train-output-under-a-file", ["train", "--variant", "tiny", "--train-size", "64", "--out", "{a_file}/run"],
     2, "a_file", []),
    # eval
    ("eval-missing-model", ["eval", "{root}/nope.keras"], 4, "nope.keras", []),
    ("eval-unknown-zoo-name", ["eval", "nosuchmodel", "--zoo", "{zoo}"], 4, "nosuchmodel", []),
    ("eval-unknown-zoo-version", ["eval", "clutter@7", "--zoo", "{zoo}"], 4, "no version 7", []),
    ("eval-corrupt-model", ["eval", "{garbage}"], 5, "garbage.keras", []),
    ("eval-wrong-dataset", ["eval", "{clutter}", "--dataset", "fashion_mnist", "--limit", "8", "--out", "{out}.json"],
     2, "(28, 28, 1)", ["{out}.json"]),
    ("eval-clutter-model-on-debris",
     ["eval", "{clutter}", "--dataset", "digitdebris", "--limit", "8", "--out", "{out}.json"],
     2, "single-label", ["{out}.json"]),
    ("eval-limit-zero", ["eval", "{clutter}", "--limit", "0"], 2, "--limit", []),
    ("eval-dir-not-a-model", ["eval", "{not_a_run}"], 4, "not_a_run", []),
    ("eval-plots-is-a-file", ["eval", "{clutter}", "--limit", "8", "--plots", "{a_file}"], 2, "a_file", []),
    # export
    ("export-missing-model", ["export", "{root}/missing", "--name", "m", "--zoo", "{out}"], 4, "missing", ["{out}"]),
    ("export-bad-name", ["export", "{clutter}", "--name", "Bad/Name", "--zoo", "{out}"], 2, "Bad/Name", ["{out}"]),
    ("export-zoo-is-a-file", ["export", "{clutter}", "--name", "m", "--zoo", "{a_file}"], 2, "a_file", []),
    ("export-corrupt-model", ["export", "{garbage}", "--name", "m", "--zoo", "{out}"], 5, "garbage.keras", ["{out}"]),
    # zoo
    ("zoo-show-unknown", ["zoo", "show", "ghost", "--zoo", "{zoo}"], 4, "ghost", []),
    ("zoo-show-unknown-version", ["zoo", "show", "clutter@99", "--zoo", "{zoo}"], 4, "no version 99", []),
    ("zoo-show-bad-reference", ["zoo", "show", "clutter@x", "--zoo", "{zoo}"], 2, "clutter@x", []),
    ("zoo-verify-flipped-byte", ["zoo", "verify", "--zoo", "{badzoo}"], 5, "variables.data", []),
    ("zoo-list-missing-zoo", ["zoo", "list", "--zoo", "{root}/no-zoo-here"], 4, "no-zoo-here", ["{root}/no-zoo-here"]),
    ("zoo-retire-last-version", ["zoo", "retire", "clutter@1", "--reason", "old", "--zoo", "{zoo}"],
     2, "export a new version first", []),
    ("zoo-retire-unknown-version", ["zoo", "retire", "clutter@9", "--reason", "old", "--zoo", "{zoo}"],
     4, "no version 9", []),
    ("zoo-retire-no-version", ["zoo", "retire", "clutter", "--reason", "old", "--zoo", "{zoo}"],
     2, "NAME@VERSION", []),
    ("zoo-retire-no-reason", ["zoo", "retire", "clutter@1", "--zoo", "{zoo}"], 2, "--reason", []),
    ("zoo-retire-missing-zoo", ["zoo", "retire", "clutter@1", "--reason", "old", "--zoo", "{root}/no-zoo-here"],
     4, "no-zoo-here", ["{root}/no-zoo-here"]),
    ("zoo-serving-config-unwritable", ["zoo", "serving-config", "--zoo", "{zoo}", "--out", "/proc/models.config"],
     2, "/proc", []),
    # data
    ("data-too-many-digits", ["data", "digitclutter", "--n-digits", "7", "--count", "4", "--out", "{out}.npz"],
     2, "7", ["{out}.npz"]),
    ("data-count-zero", ["data", "digitclutter", "--count", "0", "--out", "{out}.npz"], 2, "count", ["{out}.npz"]),
    ("data-count-type", ["data", "digitclutter", "--count", "many", "--out", "{out}.npz"],
     2, "'many' is not a valid integer", ["{out}.npz"]),
    ("data-unwritable-output", ["data", "digitclutter", "--count", "4", "--out", "/proc/clutter.npz"],
     2, "/proc", ["/proc/clutter.npz"]),
    ("data-output-under-a-file", ["data", "digitclutter", "--count", "4", "--out", "{a_file}/c.npz"], 2, "a_file", []),
    ("data-debris-fragments", ["data", "debris", "--fragments", "40", "--count", "4", "--out", "{out}.npz"],
     2, "got 40", ["{out}.npz"]),
    ("data-debris-fragments-type", ["data", "debris", "--fragments", "lots", "--out", "{out}.npz"],
     2, "'lots' is not a valid integer", ["{out}.npz"]),
    ("data-debris-count-zero", ["data", "debris", "--count", "0", "--out", "{out}.npz"], 2, "count", ["{out}.npz"]),
    ("data-debris-not-npz", ["data", "debris", "--count", "4", "--out", "{out}.txt"], 2, "{out}.txt", ["{out}.txt"]),
    ("data-debris-unwritable-output", ["data", "debris", "--count", "4", "--out", "/proc/debris.npz"],
     2, "/proc", ["/proc/debris.npz"]),
]


def _fill(value, env, out):
    names = {"out": out, "root": str(env), "zoo": _p(env, "zoo"), "badzoo": _p(env, "badzoo"),
             "full": _p(env, "full"), "not_a_run": _p(env, "not_a_run"), "empty_data": _p(env, "empty_data"),
             "a_file": _p(env, "a_file"), "garbage": _p(env, "garbage.keras"), "clutter": _p(env, "clutter.keras")}
    return value.format(**names)


def test_there_are_at_least_25_cases_across_all_commands():
    assert len(CASES) >= 25
    assert {case[1][0] for case in CASES} == {"train", "eval", "export", "zoo", "data"}


@pytest.mark.parametrize("case_id, args, code, phrase, absent", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, tmp_path, monkeypatch, case_id, args, code, phrase, absent):
    monkeypatch.setenv("HOME", str(tmp_path))  # no datasets in the usual places
    monkeypatch.delenv("ITERCONV_DATA_DIR", raising=False)
    out = str(tmp_path / "out")
    before = sorted(os.listdir(env))
    result = CliRunner().invoke(cli, [_fill(a, env, out) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("iterconv: error:") and "Traceback" not in result.stderr
    assert _fill(phrase, env, out) in lines[0], lines[0]
    for path in absent:
        assert not os.path.exists(_fill(path, env, out)), path
    assert sorted(os.listdir(env)) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
