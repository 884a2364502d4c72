"""Retiring a zoo version: it leaves the served path, the manifest keeps its record, nothing is half-done.

Runs on the toy zoo of tests/test_zoo.py (toy@1, toy@2 with different weights,
other@1; each test copies it before changing it).
"""

import datetime
import json
import os
import shutil

import pytest
import test_zoo
from click.testing import CliRunner

from iterconv_cli.main import cli
from iterconv_keras import loading, zoo
from iterconv_keras.errors import IntegrityError, ModelNotFound, UsageError
from iterconv_keras.zoo import manifest, retire, savedmodel

# The toy zoo's fixtures, reused: models (two tiny models), pristine_zoo (exported once), zoo_root (a copy per test).
models, pristine_zoo, zoo_root = test_zoo.models, test_zoo.pristine_zoo, test_zoo.zoo_root

REASON = "5-epoch budget; superseded by version 2"


def _manifest_file(root):
    with open(os.path.join(root, "MANIFEST.json")) as f:
        return json.load(f)


def _config_text(root):
    with open(os.path.join(root, "models.config")) as f:
        return f.read()


def _parsed_config(root):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(_config_text(root), model_server_config_pb2.ModelServerConfig())
    return {c.name: c for c in config.model_config_list.config}


def _utc_dates_around(action):
    # The retirement date is today's UTC date, read before and after (a test run across midnight sees either).
    before = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    result = action()
    after = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return result, {before, after}


def _staging_left(root):
    return [e for e in os.listdir(root) if e.startswith(".tmp-")]


def test_retiring_the_default_moves_it_and_keeps_the_whole_entry(zoo_root):
    live_before = _manifest_file(zoo_root)["models"]["toy"]["versions"]["2"]
    result, dates = _utc_dates_around(lambda: zoo.retire_version("toy", 2, f"  {REASON}\n", root=zoo_root))
    assert result["retired_at"][:10] in dates
    assert result == {"name": "toy", "version": 2, "reference": "toy@2", "retired_at": result["retired_at"],
                      "reason": REASON, "default_version": 1, "versions": [1],
                      "removed": os.path.join(zoo_root, "toy", "2"),
                      "config": os.path.join(zoo_root, "models.config")}
    toy = _manifest_file(zoo_root)["models"]["toy"]
    assert toy["default_version"] == 1 and list(toy["versions"]) == ["1"]
    # Everything the live entry held (metrics, checksums, ...) is kept, plus when and why.
    assert toy["retired"] == {"2": {**live_before, "retired_at": result["retired_at"], "reason": REASON}}
    assert sorted(os.listdir(os.path.join(zoo_root, "toy"))) == ["1"]
    assert not _staging_left(zoo_root)
    rows = {row["name"]: row for row in zoo.list_pretrained(zoo_root)}
    assert (rows["toy"]["versions"], rows["toy"]["default_version"], len(rows["toy"]["sizes"])) == ([1], 1, 1)
    assert rows["toy"]["retired"] == [{"version": 2, "retired_at": result["retired_at"], "reason": REASON}]
    assert rows["other"]["retired"] == []


def test_retiring_an_older_version_keeps_the_default(zoo_root):
    zoo.retire_version("toy", 1, REASON, root=zoo_root)
    toy = _manifest_file(zoo_root)["models"]["toy"]
    assert (toy["default_version"], list(toy["versions"]), list(toy["retired"])) == (2, ["2"], ["1"])
    assert loading.load("toy", zoo=zoo_root).provenance.source == "toy@2"


def test_a_retired_number_is_never_given_to_the_next_export(monkeypatch, zoo_root, models):
    # The highest version is retired: its folder is gone and it is not live, yet 2 stays taken.
    monkeypatch.setattr(savedmodel, "write_saved_model", test_zoo._fake_write_saved_model)
    zoo.retire_version("toy", 2, REASON, root=zoo_root)
    assert zoo.export_version(models[0], "toy", root=zoo_root)[1:] == (3, os.path.join(zoo_root, "toy", "3"))
    toy = _manifest_file(zoo_root)["models"]["toy"]
    assert (list(toy["versions"]), toy["default_version"], list(toy["retired"])) == (["1", "3"], 3, ["2"])


def test_the_last_live_version_is_refused(zoo_root):
    zoo.retire_version("toy", 2, REASON, root=zoo_root)
    before, files = _manifest_file(zoo_root), zoo.file_checksums(os.path.join(zoo_root, "toy", "1"))
    for name, version in (("other", 1), ("toy", 1)):
        with pytest.raises(UsageError, match=f"refusing to retire {name}@{version}: .*export a new version first"):
            zoo.retire_version(name, version, REASON, root=zoo_root)
    assert _manifest_file(zoo_root) == before
    assert zoo.file_checksums(os.path.join(zoo_root, "toy", "1")) == files
    assert not _staging_left(zoo_root)


@pytest.mark.parametrize(
    "name, version, reason, error, message",
    [
        ("toy", 9, REASON, ModelNotFound, "has no version 9 .*versions: 1, 2 \\(default 2\\)"),
        ("ghost", 1, REASON, ModelNotFound, "no model 'ghost' .*available: other@1, toy@2"),
        ("toy", 0, REASON, ValueError, "positive integer, got 0"),
        ("toy", "1", REASON, ValueError, "positive integer, got '1'"),
        ("toy", 1, " \n", ValueError, "needs a reason .*got ' \\\\n'"),
        ("toy", 1, None, ValueError, "needs a reason .*got None"),
        ("Toy", 1, REASON, ValueError, "got 'Toy'"),
    ],
)
def test_bad_requests_change_nothing(zoo_root, name, version, reason, error, message):
    before = _manifest_file(zoo_root)
    with pytest.raises(error, match=message):
        zoo.retire_version(name, version, reason, root=zoo_root)
    assert _manifest_file(zoo_root) == before and sorted(os.listdir(os.path.join(zoo_root, "toy"))) == ["1", "2"]


def test_a_missing_zoo_is_not_created(tmp_path):
    with pytest.raises(ModelNotFound, match="no zoo found at"):
        zoo.retire_version("toy", 1, REASON, root=str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_a_retired_version_says_when_and_why_wherever_it_is_asked_for(zoo_root):
    _, dates = _utc_dates_around(lambda: zoo.retire_version("toy", 1, REASON, root=zoo_root))
    for ask in (lambda: zoo.show("toy@1", zoo_root), lambda: zoo.resolve("toy@1", zoo_root),
                lambda: loading.load_model("toy@1", zoo=zoo_root), lambda: zoo.verify("toy@1", root=zoo_root)):
        with pytest.raises(ModelNotFound) as info:
            ask()
        said = str(info.value)
        assert any(f"toy@1 was retired on {date}: {REASON}" in said for date in dates), said
        assert "versions: 2 (default 2)" in said and "has no version" not in said
    with pytest.raises(UsageError, match=f"toy@1 was retired on .*: {REASON}; it is already retired"):
        zoo.retire_version("toy", 1, "again", root=zoo_root)


def test_verify_is_clean_after_retiring_and_flags_a_folder_left_behind(zoo_root, tmp_path):
    shutil.copytree(os.path.join(zoo_root, "toy", "1"), tmp_path / "kept")
    zoo.retire_version("toy", 1, REASON, root=zoo_root)
    report = zoo.verify(root=zoo_root, load_models=False)
    assert [(r["name"], r["version"], r["ok"]) for r in report] == [("other", 1, True), ("toy", 2, True)]
    assert [r["version"] for r in zoo.verify("toy", root=zoo_root, load_models=False)] == [2]

    leftover = os.path.join(zoo_root, "toy", "1")
    shutil.copytree(tmp_path / "kept", leftover)  # e.g. restored from a backup: TF Serving would serve it again
    for reference in (None, "toy"):
        problems = [p for r in zoo.verify_report(reference, root=zoo_root, load_models=False) for p in r["problems"]]
        assert len(problems) == 1 and problems[0].startswith(f"{leftover}: toy@1 was retired on ")
        assert problems[0].endswith(f"{REASON}, but its folder is still served; delete it")
    with pytest.raises(IntegrityError, match="toy@1 was retired on"):
        zoo.verify(root=zoo_root, load_models=False)


def test_a_registered_version_whose_folder_is_gone_is_retired_all_the_same(zoo_root):
    shutil.rmtree(os.path.join(zoo_root, "toy", "1"))
    assert zoo.retire_version("toy", 1, REASON, root=zoo_root)["removed"] is None
    assert all(r["ok"] for r in zoo.verify_report(root=zoo_root, load_models=False))


def test_the_serving_config_no_longer_points_at_the_retired_version(zoo_root):
    assert dict(_parsed_config(zoo_root)["toy"].version_labels) == {"default": 2}
    zoo.retire_version("toy", 2, REASON, root=zoo_root)
    entries = _parsed_config(zoo_root)
    assert set(entries) == {"toy", "other"}
    toy = entries["toy"]
    # Every version on disk is served ("all"), and the folder TF Serving polls holds only live versions;
    # the label moved with the default, so no label names a version the server no longer has.
    assert toy.model_version_policy.WhichOneof("policy_choice") == "all"
    assert dict(toy.version_labels) == {"default": 1}
    assert os.listdir(os.path.join(zoo_root, "toy")) == ["1"]
    assert dict(entries["other"].version_labels) == {"default": 1}


@pytest.mark.parametrize("failing", ["manifest", "config"])
def test_a_failed_write_renames_the_folder_back_and_restores_the_manifest(monkeypatch, zoo_root, failing):
    root = zoo_root
    version_dir = os.path.join(root, "toy", "2")
    manifest_before, config_before = _manifest_file(root), _config_text(root)
    files_before = zoo.file_checksums(version_dir)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b))[1])

    def broken(*args, **kwargs):
        # The version must already be out of the served path when the zoo's files are written.
        assert not os.path.exists(version_dir)
        raise OSError("disk full")

    if failing == "manifest":
        monkeypatch.setattr(manifest, "write_json_atomic", broken)
    else:
        monkeypatch.setattr(retire.serving, "write_zoo_config", broken)
    with pytest.raises(OSError, match="disk full"):
        zoo.retire_version("toy", 2, REASON, root=root)
    staged = renames[0][1]
    assert renames == [(version_dir, staged), (staged, version_dir)]  # out by one rename, back by one rename
    assert zoo.file_checksums(version_dir) == files_before
    assert _manifest_file(root) == manifest_before and _config_text(root) == config_before
    assert not _staging_left(root)
    monkeypatch.undo()
    assert zoo.retire_version("toy", 2, REASON, root=root)["versions"] == [1]  # the lock was released


# -- the command


def _invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_retire_command_prints_what_it_did_and_list_shows_it(zoo_root):
    result = _invoke("zoo", "retire", "toy@2", "--reason", REASON, "--zoo", zoo_root)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"retired toy@2 (removed {os.path.join(zoo_root, 'toy', '2')}): {REASON}",
        f"toy: live versions 1, default 1; rewrote {os.path.join(zoo_root, 'models.config')}",
    ]
    listed = _invoke("zoo", "list", "--zoo", zoo_root).stdout.splitlines()
    assert listed[-2] == "retired (kept in the manifest, no longer served):"
    assert listed[-1].startswith("  toy@2 on ") and listed[-1].endswith(f": {REASON}")
    assert [line.split()[:3] for line in listed[1:3]] == [["other", "1", "1"], ["toy", "1", "1"]]
    document = json.loads(_invoke("zoo", "list", "--zoo", zoo_root, "--json").stdout)
    assert [(m["name"], [r["version"] for r in m["retired"]]) for m in document["models"]] == [
        ("other", []), ("toy", [2])]


def test_retire_command_json(zoo_root):
    result = _invoke("zoo", "retire", "toy@1", "--reason", REASON, "--zoo", zoo_root, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert {k: document[k] for k in ("reference", "reason", "default_version", "versions", "removed")} == {
        "reference": "toy@1", "reason": REASON, "default_version": 2, "versions": [2],
        "removed": os.path.join(zoo_root, "toy", "1")}


@pytest.mark.parametrize(
    "args, code, phrase",
    [
        (["toy@2"], 2, "Missing option '--reason'"),
        (["toy", "--reason", REASON], 2, "NAME@VERSION, got 'toy'"),
        (["toy@x", "--reason", REASON], 2, "toy@x"),
        (["other@1", "--reason", REASON], 2, "export a new version first"),
        (["toy@7", "--reason", REASON], 4, "no version 7"),
        (["ghost@1", "--reason", REASON], 4, "no model 'ghost'"),
    ],
)
def test_retire_command_refusals(zoo_root, args, code, phrase):
    before = _manifest_file(zoo_root)
    result = _invoke("zoo", "retire", *args, "--zoo", zoo_root)
    assert result.exit_code == code, result.output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and phrase in result.stderr
    assert _manifest_file(zoo_root) == before


def test_show_and_verify_commands_of_a_retired_version(zoo_root, tmp_path):
    shutil.copytree(os.path.join(zoo_root, "toy", "1"), tmp_path / "kept")
    assert _invoke("zoo", "retire", "toy@1", "--reason", REASON, "--zoo", zoo_root).exit_code == 0
    shown = _invoke("zoo", "show", "toy@1", "--zoo", zoo_root)
    assert shown.exit_code == 4 and "toy@1 was retired on " in shown.stderr and REASON in shown.stderr
    again = _invoke("zoo", "retire", "toy@1", "--reason", REASON, "--zoo", zoo_root)
    assert again.exit_code == 2 and "already retired" in again.stderr
    assert _invoke("zoo", "verify", "--no-load", "--zoo", zoo_root).exit_code == 0
    shutil.copytree(tmp_path / "kept", os.path.join(zoo_root, "toy", "1"))
    flagged = _invoke("zoo", "verify", "--no-load", "--zoo", zoo_root)
    assert flagged.exit_code == 5 and "toy@1 was retired on" in flagged.stderr
    assert "toy@1  FAILED" in flagged.stdout
