"""The zoo: versions, manifest checksums, loading, verification, concurrency, TF Serving config."""

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import random_images

from iterconv_keras import loading, zoo
from iterconv_keras.errors import IntegrityError, ModelNotFound
from iterconv_keras.models.variants import create_model
from iterconv_keras.zoo import manifest, publish, savedmodel

SHAPE = (16, 16, 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed):
    keras.utils.set_random_seed(seed)
    return create_model("tiny", SHAPE, 10)


@pytest.fixture(scope="module")
def models():
    return [tiny_model(1), tiny_model(2)]


@pytest.fixture(scope="module")
def pristine_zoo(models, tmp_path_factory):
    """A zoo with toy@1, toy@2 (different weights) and other@1. Tests copy it before changing it."""
    root = str(tmp_path_factory.mktemp("zoo"))
    paths = [zoo.export_version(m, "toy", root=root)[2] for m in models]
    card = zoo.ModelCard.from_model(models[0], metrics={"accuracy": 0.5})
    paths.append(zoo.export_version(models[0], "other", root=root, card=card)[2])
    return root, paths


@pytest.fixture
def zoo_root(pristine_zoo, tmp_path):
    root = str(tmp_path / "zoo")
    shutil.copytree(pristine_zoo[0], root)
    return root


def test_versions_are_consecutive_directories(pristine_zoo):
    root, paths = pristine_zoo
    assert paths == [os.path.join(root, "toy", "1"), os.path.join(root, "toy", "2"), os.path.join(root, "other", "1")]
    for path in paths:
        assert sorted(os.listdir(path)) == ["assets", "assets.extra", "fingerprint.pb", "saved_model.pb", "variables"]
        assert sorted(os.listdir(os.path.join(path, "assets.extra"))) == ["metadata.json", "model.keras"]
    # No staging directory is left behind.
    assert sorted(os.listdir(root)) == [".lock", "MANIFEST.json", "models.config", "other", "toy"]


def test_export_returns_name_version_and_path(models, tmp_path):
    root = str(tmp_path / "zoo")
    assert zoo.export_version(models[0], "a", root=root) == ("a", 1, os.path.join(root, "a", "1"))
    assert zoo.export_version(models[1], "a", root=root) == ("a", 2, os.path.join(root, "a", "2"))


def test_manifest_holds_every_file_hash_and_the_default_version(pristine_zoo, models):
    root, paths = pristine_zoo
    with open(os.path.join(root, "MANIFEST.json")) as f:
        document = json.load(f)
    toy = document["models"]["toy"]
    assert toy["default_version"] == 2 and list(toy["versions"]) == ["1", "2"]
    for version, path in zip(("1", "2"), paths[:2], strict=True):
        on_disk = {}
        for folder, _, files in os.walk(path):
            for name in files:
                full = os.path.join(folder, name)
                with open(full, "rb") as f:
                    on_disk[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
        assert toy["versions"][version]["files"] == on_disk
        assert toy["versions"][version]["parameters"] == _trainable(models[0])
    assert document["models"]["other"]["versions"]["1"]["metrics"] == {"accuracy": 0.5}


def test_list_pretrained_reports_each_versions_size(pristine_zoo):
    root, _ = pristine_zoo
    rows = {row["name"]: row for row in zoo.list_pretrained(root)}
    assert rows["toy"]["versions"] == [1, 2] and rows["toy"]["default_version"] == 2
    assert rows["other"]["metrics"] == {"accuracy": 0.5}
    # Oracle: the sizes of the files the manifest lists for that version.
    entries = zoo.read_manifest(root)["models"]["toy"]["versions"]
    expected = [sum(os.path.getsize(os.path.join(root, "toy", v, f)) for f in entries[v]["files"]) for v in ("1", "2")]
    assert rows["toy"]["sizes"] == expected and all(size > 0 for size in expected)


def test_load_by_name_and_version_returns_that_versions_weights(pristine_zoo, models):
    root, paths = pristine_zoo
    images = random_images(3, SHAPE, seed=7)
    for reference, model, path in (("toy", models[1], paths[1]), ("toy@1", models[0], paths[0]),
                                   ("toy@2", models[1], paths[1])):
        loaded = loading.load(reference, zoo=root)
        assert loaded.provenance.kind == "zoo"
        assert loaded.provenance.path == os.path.join(path, "assets.extra", "model.keras")
        assert loaded.provenance.source == "toy@" + os.path.basename(path)
        assert loaded.card.name == "toy" and loaded.card.parameters == _trainable(model)
        np.testing.assert_array_equal(loaded.model(images, training=False), model(images, training=False))
    # Versions 1 and 2 really are different models.
    assert not np.allclose(models[0](images, training=False), models[1](images, training=False))


def test_load_serving_returns_the_signature(pristine_zoo, models):
    import tensorflow as tf

    root, _ = pristine_zoo
    images = random_images(2, SHAPE, seed=8)
    serve = zoo.load_serving("toy@1", root=root, signature="serving_default")
    expected = tf.nn.softmax(models[0](images, training=False)).numpy()
    np.testing.assert_allclose(serve(images=tf.constant(images))["probabilities"].numpy(), expected, atol=1e-6)
    assert set(zoo.load_serving("toy", root=root).signatures) == {"serving_default", "classify"}


@pytest.mark.parametrize(
    "reference, listed",
    [("missing", "available: other@1, toy@2"), ("toy@3", "versions: 1, 2 (default 2)"),
     ("other@9", "versions: 1 (default 1)")],
)
def test_unknown_name_or_version_lists_what_exists(pristine_zoo, reference, listed):
    root, _ = pristine_zoo
    with pytest.raises(ModelNotFound) as info:
        loading.load_model(reference, zoo=root)
    assert listed in str(info.value)
    assert ModelNotFound.exit_code == 4


@pytest.mark.parametrize("reference", ["Toy", "a/b", "toy@0", "toy@x", "toy@1@2", ""])
def test_malformed_references_echo_the_value(reference):
    with pytest.raises(ValueError, match="got"):
        zoo.parse_reference(reference)


def test_flipped_byte_fails_verify_naming_the_file_and_load_refuses(zoo_root):
    variables = os.path.join(zoo_root, "toy", "1", "variables", "variables.data-00000-of-00001")
    with open(variables, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = {(r["name"], r["version"]): r for r in zoo.verify_report(root=zoo_root, load_models=False)}
    assert report[("toy", 2)]["ok"] and report[("other", 1)]["ok"]
    assert not report[("toy", 1)]["ok"]
    assert report[("toy", 1)]["problems"] == [
        f"{variables}: sha256 {_sha(variables)[:12]}... does not match the manifest's "
        f"{_manifest_hash(zoo_root, 'toy', 1, 'variables/variables.data-00000-of-00001')[:12]}..."
    ]
    with pytest.raises(IntegrityError, match="variables.data-00000-of-00001"):
        zoo.verify(root=zoo_root)
    with pytest.raises(IntegrityError, match=r"refusing to load toy@1: checksum verification failed: .*variables\."):
        loading.load_model("toy@1", zoo=zoo_root)
    with pytest.raises(IntegrityError, match="refusing to load toy@1"):
        zoo.load_serving("toy@1", root=zoo_root)
    loading.load_model("toy@2", zoo=zoo_root)  # the intact version still loads


def test_added_and_missing_files_and_unregistered_versions_are_reported(zoo_root):
    os.remove(os.path.join(zoo_root, "toy", "2", "fingerprint.pb"))
    with open(os.path.join(zoo_root, "toy", "2", "extra.txt"), "w") as f:
        f.write("x")
    shutil.copytree(os.path.join(zoo_root, "other", "1"), os.path.join(zoo_root, "other", "7"))
    problems = [p for r in zoo.verify_report(root=zoo_root, load_models=False) for p in r["problems"]]
    assert problems == [
        f"{os.path.join(zoo_root, 'toy', '2', 'fingerprint.pb')}: file is missing",
        f"{os.path.join(zoo_root, 'toy', '2', 'extra.txt')}: file is not in the manifest",
        f"{os.path.join(zoo_root, 'other', '7')}: version folder is not in the manifest",
    ]


def test_verify_loads_every_version(zoo_root):
    report = zoo.verify(root=zoo_root)
    assert [(r["name"], r["version"], r["ok"]) for r in report] == [
        ("other", 1, True), ("toy", 1, True), ("toy", 2, True)]


def test_verify_detects_a_model_that_does_not_load_even_with_matching_checksums(zoo_root):
    # Corrupt the .keras file and re-register its hash: checksums pass, loading must not.
    path = os.path.join(zoo_root, "toy", "2", "assets.extra", "model.keras")
    with open(path, "wb") as f:
        f.write(b"not a zip")
    document = zoo.read_manifest(zoo_root)
    document["models"]["toy"]["versions"]["2"]["files"]["assets.extra/model.keras"] = _sha(path)
    with open(os.path.join(zoo_root, "MANIFEST.json"), "w") as f:
        json.dump(document, f)
    with pytest.raises(IntegrityError, match=r"model\.keras: does not load"):
        zoo.verify("toy@2", root=zoo_root)


def test_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.ENV_VAR, str(tmp_path / "env"))
    assert zoo.resolve_root(tmp_path / "arg") == str(tmp_path / "arg")
    assert zoo.resolve_root() == str(tmp_path / "env")
    assert zoo.writable_root() == str(tmp_path / "env")
    monkeypatch.delenv(zoo.ENV_VAR)
    assert zoo.resolve_root() == os.path.join(REPO, "zoo")  # the checkout holding tests/
    assert zoo.in_checkout() and zoo.writable_root() == os.path.join(REPO, "zoo")


def _fake_write_saved_model(model, path, card):
    # The zoo's bookkeeping does not depend on what the version holds; skipping the
    # trace and save keeps these tests fast.
    os.makedirs(os.path.join(path, "variables"))
    with open(os.path.join(path, "variables", "variables.index"), "w") as f:
        f.write(json.dumps(card, sort_keys=True))


def test_rename_falls_through_to_the_next_free_number(monkeypatch, zoo_root, models):
    # An exporter that saw a stale listing (or skipped the lock) must not overwrite
    # a version: renaming onto a non-empty directory fails and it tries N+1.
    before = zoo.file_checksums(os.path.join(zoo_root, "toy", "1"))
    monkeypatch.setattr(savedmodel, "write_saved_model", _fake_write_saved_model)
    monkeypatch.setattr(manifest, "versions_on_disk", lambda *_: [])
    monkeypatch.setattr(manifest, "registered_versions", lambda *_: [])
    _, version, path = zoo.export_version(models[0], "toy", root=zoo_root)
    assert (version, path) == (3, os.path.join(zoo_root, "toy", "3"))
    assert zoo.file_checksums(os.path.join(zoo_root, "toy", "1")) == before
    assert all(r["ok"] for r in zoo.verify_report(root=zoo_root, load_models=False))


def test_a_deleted_version_number_is_not_reused(monkeypatch, zoo_root, models):
    monkeypatch.setattr(savedmodel, "write_saved_model", _fake_write_saved_model)
    shutil.rmtree(os.path.join(zoo_root, "toy", "2"))  # still registered in the manifest
    assert zoo.export_version(models[0], "toy", root=zoo_root)[2] == os.path.join(zoo_root, "toy", "3")


@pytest.mark.parametrize("failing", ["register_version", "write_zoo_config"])
def test_failed_registration_unpublishes_by_renaming_back(monkeypatch, zoo_root, models, failing):
    root = zoo_root
    before = zoo.read_manifest(root)
    with open(os.path.join(root, "models.config")) as f:
        config_before = f.read()
    final = os.path.join(root, "toy", "3")
    # A server polling toy/ may already be loading toy/3: it must disappear by one
    # rename, never by deleting its files in place (review U7).
    renames, removed = [], []
    real_rename, real_rmtree = os.rename, shutil.rmtree
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (removed.append(os.fspath(p)), real_rmtree(p, **kw))[1])

    def broken(*args):
        if failing == "register_version":
            raise OSError("disk full")
        manifest_path = os.path.join(root, "MANIFEST.json")
        assert zoo.read_manifest(root) != before, "the manifest was written before the config"
        raise OSError(f"disk full after {manifest_path}")

    monkeypatch.setattr(savedmodel, "write_saved_model", _fake_write_saved_model)
    target = manifest if failing == "register_version" else publish.serving
    monkeypatch.setattr(target, failing, broken)
    with pytest.raises(OSError, match="disk full"):
        zoo.export_version(models[1], "toy", root=root)
    staged = renames[0][0]
    assert renames == [(staged, final), (final, staged)]
    assert all(not path.startswith(os.path.join(root, "toy")) for path in removed), removed
    assert sorted(os.listdir(os.path.join(root, "toy"))) == ["1", "2"]
    assert not [e for e in os.listdir(root) if e.startswith(".tmp-")]
    assert zoo.read_manifest(root) == before
    with open(os.path.join(root, "models.config")) as f:
        assert f.read() == config_before


# -- TF Serving config


def test_zoo_config_uses_the_container_convention_and_parses(zoo_root):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(zoo_root, "models.config")) as f:
        text = f.read()
    assert zoo_root not in text  # no machine's path in the zoo's own file
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    entries = {c.name: c for c in config.model_config_list.config}
    assert set(entries) == {"toy", "other"}
    for name, default in (("toy", 2), ("other", 1)):
        entry = entries[name]
        assert entry.base_path == f"/models/{name}"
        assert entry.model_platform == "tensorflow"
        assert entry.model_version_policy.WhichOneof("policy_choice") == "all"
        assert dict(entry.version_labels) == {"default": default}
    # Rewriting it from the manifest gives the same file.
    os.remove(os.path.join(zoo_root, "models.config"))
    zoo.refresh_zoo_config(zoo_root)
    with open(os.path.join(zoo_root, "models.config")) as f:
        assert f.read() == text


@pytest.mark.parametrize("base_path", [None, "/srv/zoo", "/srv/zoo/", "gs://bucket/zoo"])
def test_serving_config_for_another_base_path_points_at_integer_versions(zoo_root, base_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = zoo.serving_config(zoo_root, base_path=base_path)
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    base = (base_path or zoo_root).rstrip("/")
    assert {c.name: c.base_path for c in config.model_config_list.config} == {
        "other": f"{base}/other", "toy": f"{base}/toy"}
    if base_path is None:  # here the base paths are real folders of integer versions
        for entry in config.model_config_list.config:
            children = os.listdir(entry.base_path)
            assert children and all(child.isdigit() for child in children), children
            assert max(int(c) for c in children) == dict(entry.version_labels)["default"]


@pytest.mark.parametrize("base_path", ["models", "./zoo", ""])
def test_relative_base_paths_are_refused(zoo_root, base_path):
    with pytest.raises(ValueError, match=f"absolute path or a URL.*got {base_path!r}"):
        zoo.serving_config(zoo_root, base_path=base_path)


# -- concurrency


_EXPORTER = textwrap.dedent(
    """
    import os, sys, time
    import iterconv_keras  # environment defaults before TensorFlow
    from iterconv_keras import loading, zoo

    model = loading.load_model(sys.argv[1])
    go = sys.argv[3]
    open(f"{go}.ready-{os.getpid()}", "w").close()
    while not os.path.exists(go):  # start the exports together, after the slow imports
        time.sleep(0.01)
    print(zoo.export_version(model, "race", root=sys.argv[2])[2])
    """
)


RACE_TEST = "test_four_concurrent_exports_make_four_complete_versions"


@pytest.fixture(scope="module", autouse=True)
def racers(request, models, tmp_path_factory):
    """Four exporter processes, started with the module so their TensorFlow imports
    overlap the other tests; each waits for the ``go`` file before exporting."""
    if not any(item.name == RACE_TEST for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("race")
    model_file = str(folder / "m.keras")
    models[0].save(model_file)
    root, go = str(folder / "zoo"), str(folder / "go")
    env = {**os.environ, "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "PYTHONPATH": REPO}
    procs = [
        subprocess.Popen([sys.executable, "-c", _EXPORTER, model_file, root, go], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    yield {"folder": folder, "root": root, "go": go, "procs": procs}
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_four_concurrent_exports_make_four_complete_versions(racers):
    folder, root, go, procs = racers["folder"], racers["root"], racers["go"], racers["procs"]
    deadline = time.monotonic() + 120
    while len([f for f in os.listdir(folder) if f.startswith("go.ready-")]) < 4:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "an exporter died while starting"
        time.sleep(0.05)
    open(go, "w").close()
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    paths = sorted(out.strip() for out, _ in outputs)
    assert paths == [os.path.join(root, "race", str(v)) for v in (1, 2, 3, 4)]
    document = zoo.read_manifest(root)
    assert list(document["models"]["race"]["versions"]) == ["1", "2", "3", "4"]
    assert document["models"]["race"]["default_version"] == 4
    report = zoo.verify("race", root=root)
    assert [r["version"] for r in report] == [1, 2, 3, 4] and all(r["ok"] for r in report)
    assert not [e for e in os.listdir(root) if e.startswith(".tmp-")]


# -- one owner per format, no cycle (review D1, D2)


_OWNED_NAMES = {
    # file name -> the modules allowed to spell it: the owner of each format that uses it
    "assets.extra": ["iterconv_keras/zoo/savedmodel.py"],
    "metadata.json": ["iterconv_keras/zoo/savedmodel.py"],
    "MANIFEST.json": ["iterconv_keras/zoo/manifest.py"],
    "models.config": ["iterconv_keras/zoo/serving.py"],
    "config.json": ["iterconv_keras/runs.py"],
    "metrics.json": ["iterconv_keras/runs.py"],
    "history.json": ["iterconv_keras/runs.py"],
    "eval.json": ["iterconv_keras/runs.py"],
    # a run's model.keras and a zoo version's assets.extra/model.keras
    "model.keras": ["iterconv_keras/runs.py", "iterconv_keras/zoo/savedmodel.py"],
}


def _python_files(*folders):
    for folder in folders:
        for base, _, files in os.walk(os.path.join(REPO, folder)):
            yield from (os.path.join(base, f) for f in files if f.endswith(".py"))


def test_each_file_name_of_a_format_is_spelled_in_one_module():
    spelled = {}
    for path in _python_files("iterconv_keras"):
        tree = ast.parse(open(path).read())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for name in _OWNED_NAMES:
                    if name in node.value:
                        spelled.setdefault(name, set()).add(os.path.relpath(path, REPO))
    assert {name: sorted(paths) for name, paths in spelled.items()} == _OWNED_NAMES


def _zoo_modules():
    folder = os.path.join(REPO, "iterconv_keras", "zoo")
    return {f[:-3]: ast.parse(open(os.path.join(folder, f)).read()) for f in sorted(os.listdir(folder))
            if f.endswith(".py")}


def test_only_the_manifest_module_writes_the_manifest():
    # MANIFEST.json's structure has one owner: publish and retire ask manifest.py to
    # register, retire or restore an entry rather than editing the document themselves.
    writers = {module for module, tree in _zoo_modules().items() for node in ast.walk(tree)
               if (isinstance(node, ast.Attribute) and node.attr == "write_manifest")
               or (isinstance(node, ast.Name) and node.id == "write_manifest")}
    assert writers == {"manifest"}


def test_zoo_writers_depend_on_the_manifest_not_on_each_other():
    def imported(tree):
        # Sibling modules named by `from iterconv_keras.zoo import x`, `... .zoo.x import y` or `import ... .zoo.x`.
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "iterconv_keras.zoo":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                names |= {m.split(".")[2] for m in modules if m.startswith("iterconv_keras.zoo.")}
        return names

    trees = _zoo_modules()
    assert "manifest" in imported(trees["publish"]) and "manifest" in imported(trees["retire"])
    assert "retire" not in imported(trees["publish"]) and "publish" not in imported(trees["retire"])


def test_the_zoo_never_imports_loading():
    for path in _python_files(os.path.join("iterconv_keras", "zoo")):
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
                     if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n == "iterconv_keras.loading"], path


def test_importing_the_zoo_imports_no_tensorflow():
    script = ("import sys, iterconv_keras.zoo; "
              "print([m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _manifest_hash(root, name, version, relative):
    return zoo.read_manifest(root)["models"][name]["versions"][str(version)]["files"][relative]


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)
