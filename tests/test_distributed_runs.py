"""``iterconv train --strategy mirrored / multi-worker`` end to end, against one-device training.

One module fixture starts every run at once (they share two cores, so running
them side by side costs less wall time than in turn): two ``multi-worker``
processes on 127.0.0.1 (each in its own working directory, as on two machines
without a shared disk), ``mirrored`` over 3 logical CPU devices (a fresh process,
since logical devices are fixed when TensorFlow starts), and in this process
``one-device`` (the reference) and ``mirrored`` over the two logical devices
conftest made. All train the same tiny, Lipschitz-constrained model at lambda = 1
for 4 steps of the same global batch (12 images: 6, 4 or 3 per replica).
Subprocesses have time limits and are killed in ``finally``. Slow tests: 4
logical devices, and a worker killed mid-epoch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import exact_set_accuracy

from iterconv_cli import train_cmd
from iterconv_cli.main import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIPSCHITZ = 0.9
ARGS = ["--variant", "tiny", "--epochs", "1", "--batch-size", "12", "--train-size", "48", "--validation-size", "0",
        "--test-size", "24", "--coupling", "1", "--lipschitz", str(LIPSCHITZ), "--optimizer", "momentum",
        "--lr", "0.05", "--seed", "4"]
TIMEOUT = 480  # seconds per process; the two cores are shared with the rest of the suite


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _start(args, cwd=REPO, **env):
    environment = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    environment.update(env, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "iterconv_cli.main", "train", *args], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers(args, ports, cwds, **env):
    return [_start(args, cwd=cwd, TF_CONFIG=_tf_config(ports, i), **env) for i, cwd in enumerate(cwds)]


def _finish(process, timeout=TIMEOUT):
    """``(returncode, stdout, stderr)``; a process still running at the deadline is killed."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args[-8:]} did not finish in {timeout} s:\n{err[-2000:]}")
    return process.returncode, out, err


def _kill_all(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _summary(result):
    code, out, err = result
    assert code == 0, err[-3000:]
    return json.loads(out)


def _model(run_dir):
    from iterconv_keras.loading import load_model

    return load_model(str(run_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    machines = [root / "machine0", root / "machine1"]
    for folder in (*machines, root / "tmp1"):
        folder.mkdir()
    started = []
    try:
        # Worker 1's temporary files go to tmp1, so the test can see that it removed them.
        started += _workers([*ARGS, "--strategy", "multi-worker", "--out", "run", "--json"], _free_ports(2),
                            machines, TMPDIR=str(root / "tmp1"))
        started.append(_mirrored(3, root))
        in_process = {}
        # mirrored2-bf16: mixed precision beside the strategy, and validation / test sets
        # whose first batch does not split over the replicas (13 and 25 images).
        for name, extra in (("one-device", ["--strategy", "one-device"]),
                            ("mirrored2", ["--strategy", "mirrored", "--devices", "2"]),
                            ("mirrored2-bf16", ["--strategy", "mirrored", "--devices", "2", "--precision",
                                                "mixed_bfloat16", "--validation-size", "13", "--test-size", "25"])):
            result = CliRunner().invoke(cli, ["train", *ARGS, *extra, "--out", str(root / name), "--json"])
            in_process[name] = (result.exit_code, result.stdout, result.stderr)
        names = ("worker0", "worker1", "mirrored3")
        finished = {name: _finish(process) for name, process in zip(names, started, strict=True)}
    finally:
        _kill_all(started)
    reference = None
    if in_process["one-device"][0] == 0:
        reference = [np.asarray(w) for w in _model(root / "one-device").weights]
    return {"root": root, "results": {**in_process, **finished}, "reference": reference}


def _mirrored(devices, root):
    out = root / f"mirrored{devices}"
    return _start([*ARGS, "--strategy", "mirrored", "--devices", str(devices), "--out", str(out), "--json"])


def _assert_same_training(run_dir, reference):
    """Every weight within rtol 1e-4 of the one-device run's (atol 1e-6 for values near 0)."""
    assert reference is not None, "the one-device run failed"
    for a, b in zip(_model(run_dir).weights, reference, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6, err_msg=a.path)


def _assert_blocks_identical(model):
    for blocks in model.stages:
        for block in blocks[1:]:
            for a, b in zip(block.weights, blocks[0].weights, strict=True):
                if a.trainable or "power_vector" in a.path:
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def _assert_certified_bound(model):
    """Certified Lip(f) <= c for every block, and above what the Jacobian shows at random points."""
    from iterconv_keras.analysis import certify

    for blocks in model.stages:
        for block in blocks:
            certified = certify.block_certificate(block)["certified"]
            points = np.random.default_rng(0).standard_normal((2, *block.feature_shape)).astype(np.float32)
            seen = certify.jacobian_norms(lambda x, b=block: b.residual(x, training=False), points, iterations=10)
            assert seen.max() <= certified <= LIPSCHITZ, (block.name, seen.max(), certified)


def test_two_workers_train_like_one_process(runs):
    root, results = runs["root"], runs["results"]
    chief, other = _summary(results["worker0"]), _summary(results["worker1"])
    assert chief["distribution"] == {"strategy": "multi-worker", "replicas": 2, "workers": 2, "task": "worker 0",
                                     "chief": True}
    assert other["distribution"]["task"] == "worker 1" and other["distribution"]["chief"] is False
    assert chief["config"]["strategy"] == "multi-worker"
    # Both workers saw the same global batches: identical metrics, epoch by epoch.
    assert [h["loss"] for h in chief["history"]] == [h["loss"] for h in other["history"]]
    run = root / "machine0" / "run"
    _assert_same_training(run, runs["reference"])
    model = _model(run)
    assert model.norm == "sync_batch"
    _assert_blocks_identical(model)
    _assert_certified_bound(model)
    # Only the chief wrote a run directory; the other worker's scratch copy is gone.
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "history.json", "metrics.json", "model.keras"]
    assert sorted(os.listdir(run / "checkpoints")) == ["epoch-0001"]
    assert not (root / "machine1" / "run").exists()
    assert os.listdir(root / "tmp1") == []
    assert "(written by the chief only)" in results["worker1"][2]
    # Each says truthfully where the model is: worker 1 wrote no run directory.
    assert chief["run_dir"] == "run" and other["run_dir"] is None
    assert other["config"]["out"] == "run"
    assert train_cmd.model_line(chief) == "model: run/model.keras"
    assert train_cmd.model_line(other) == ("model: written by the chief to run/model.keras "
                                           "(this process, worker 1, writes no run directory)")


def test_mirrored_over_two_devices_through_the_cli_equals_one_device(runs):
    root, results = runs["root"], runs["results"]
    one, mirrored = _summary(results["one-device"]), _summary(results["mirrored2"])
    assert one["distribution"]["replicas"] == 1 and one["config"]["strategy"] == "one-device"
    assert mirrored["distribution"] == {"strategy": "mirrored", "replicas": 2, "workers": 1, "task": "local",
                                        "chief": True}
    assert (mirrored["config"]["strategy"], mirrored["config"]["devices"]) == ("mirrored", 2)
    _assert_same_training(root / "mirrored2", runs["reference"])
    _assert_blocks_identical(_model(root / "mirrored2"))
    _assert_blocks_identical(_model(root / "one-device"))


def _check_mirrored(runs, devices, result):
    # Coupling before the cross-replica sum fails this from 3 replicas on (docs/scaling.md).
    assert _summary(result)["distribution"]["replicas"] == devices
    model = _model(runs["root"] / f"mirrored{devices}")
    _assert_blocks_identical(model)
    _assert_certified_bound(model)
    _assert_same_training(runs["root"] / f"mirrored{devices}", runs["reference"])


def test_mirrored_bfloat16_with_uneven_evaluation_sets(runs):
    from iterconv_keras.data import datasets

    summary = _summary(runs["results"]["mirrored2-bf16"])
    model = _model(runs["root"] / "mirrored2-bf16")
    assert model.dtype_policy.name == "mixed_bfloat16"
    _assert_blocks_identical(model)
    _assert_certified_bound(model)
    assert [h.get("val_accuracy") is not None for h in summary["history"]] == [True]
    # Oracle: the saved model on one device, on the run's 25 test images (every one counted once).
    images, labels, _ = datasets.clutter_test_set(3, 25)
    logits = np.asarray(model(images.astype(np.float32) / 255, training=False), np.float32)
    assert summary["test"]["examples"] == 25
    assert summary["test"]["accuracy"] == pytest.approx(exact_set_accuracy(logits, labels), abs=1e-6)


def test_mirrored_over_three_devices_keeps_lambda_one_blocks_identical(runs):
    _check_mirrored(runs, 3, runs["results"]["mirrored3"])


@pytest.mark.slow
def test_mirrored_over_four_devices_keeps_lambda_one_blocks_identical(runs):
    process = _mirrored(4, runs["root"])
    try:
        result = _finish(process)
    finally:
        _kill_all([process])
    _check_mirrored(runs, 4, result)


# -- a killed worker -------------------------------------------------------------------------

KILL_ARGS = [*ARGS[:ARGS.index("--epochs")], "--epochs", "3", "--batch-size", "12", "--train-size", "240",
             "--validation-size", "12", *ARGS[ARGS.index("--test-size"):]]


@pytest.mark.slow
def test_killing_a_worker_mid_epoch_then_restarting_both_continues_from_the_last_complete_epoch(tmp_path):
    # Oracle: an uninterrupted pair of workers (started alongside); the resumed run must end bitwise there.
    run, whole = tmp_path / "run", tmp_path / "whole"  # on a disk both workers read: --resume needs it
    args = [*KILL_ARGS, "--strategy", "multi-worker"]
    uninterrupted = _workers([*args, "--out", str(whole)], _free_ports(2), [tmp_path, tmp_path])
    processes = _workers([*args, "--out", str(run)], _free_ports(2), [tmp_path, tmp_path])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "checkpoints" / "epoch-0001").exists():
            assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, "training ended or stalled"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)
        killed = _finish(processes[1])
        chief = _finish(processes[0])  # it notices the lost worker by itself
        assert [_finish(p)[0] for p in uninterrupted] == [0, 0]
    finally:
        _kill_all(processes + uninterrupted)
    assert killed[0] == -signal.SIGKILL
    complete = sorted(os.listdir(run / "checkpoints"))
    assert chief[0] == 1 and complete[-1] != "epoch-0003", "the kill landed after training"
    last = int(complete[-1].split("-")[1])
    error = chief[2].strip().splitlines()[-1]
    assert error.startswith("iterconv: error: worker 0 lost the other workers") and "--resume" in error, error
    assert "Traceback" not in chief[2] and "Exception ignored" not in chief[2], chief[2][-2000:]
    with open(run / "checkpoints" / complete[-1] / "state.json") as f:
        kept = json.load(f)["history"]

    processes = _workers([*args, "--out", str(run), "--resume", "--json"], _free_ports(2), [tmp_path, tmp_path])
    try:
        results = [_finish(p) for p in processes]
    finally:
        _kill_all(processes)
    summaries = [_summary(r) for r in results]
    for result in results:
        assert f"resuming after epoch {last}" in result[2]
    history = summaries[0]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[:last] == kept  # the completed epochs were kept, not trained again
    for a, b in zip(_model(run).weights, _model(whole).weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    _assert_blocks_identical(_model(run))


# -- why the coupling waits for the cross-replica sum ---------------------------------------

_ORDER_SCRIPT = """
import json, sys
import iterconv_keras  # noqa: F401  (environment defaults)
import keras, numpy as np, tensorflow as tf
from iterconv_keras import distribution
from iterconv_keras.models import coupling
from iterconv_keras.models.resnet import IterativeResNet

class CoupleThenSum(IterativeResNet):
    # The train step before 0.3: couple each replica's gradients, then let the optimizer sum them.
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._track_loss(loss, x)
        gradients = tape.gradient(loss, self.trainable_variables)
        gradients = coupling.couple_gradients(gradients, self.coupling_groups(), self.coupling)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

strategy = distribution.place("mirrored", int(sys.argv[1])).strategy
rng = np.random.default_rng(0)
x, y = rng.random((96, 16, 16, 1), dtype=np.float32), rng.integers(0, 4, 96)
differing = {}
for cls in (CoupleThenSum, IterativeResNet):
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = cls((16, 16, 1), 4, stage_widths=(8, 16), blocks_per_stage=4, coupling=1.0, norm="sync_batch")
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(distribution.shard_by_data(tf.data.Dataset.from_tensor_slices((x, y)).batch(24)), verbose=0)
    differing[cls.__name__] = sum(int(np.sum(np.asarray(a) != np.asarray(b)))
                                  for blocks in model.stages for block in blocks[1:]
                                  for a, b in zip(block.trainable_variables, blocks[0].trainable_variables))
print(json.dumps(differing))
"""


@pytest.mark.slow
def test_coupling_before_the_sum_lets_blocks_drift_apart_from_three_replicas():
    # What docs/scaling.md reports: 4 Adam steps at lambda = 1 over 3 logical CPU devices.
    environment = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT, "3"], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    differing = json.loads(result.stdout.strip().splitlines()[-1])
    assert differing["IterativeResNet"] == 0
    assert differing["CoupleThenSum"] > 0, differing
