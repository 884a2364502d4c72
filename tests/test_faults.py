"""Training survives SIGKILL at any moment: resume gives the uninterrupted weights.

Each trial starts ``iterconv train`` in a subprocess, kills it with SIGKILL,
resumes it with ``--resume`` and compares the final weights bitwise with an
uninterrupted run of the same command (also a subprocess, so both use the same
process-level TensorFlow configuration).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ARGS = ["--variant", "tiny", "--epochs", "2", "--batch-size", "32", "--train-size", "256",
        "--validation-size", "32", "--test-size", "32", "--lr", "0.01", "--seed", "5"]


def _command(out, *extra):
    return [sys.executable, "-m", "iterconv_cli.main", "train", *ARGS, "--out", str(out), *extra]


def _run(out, *extra, env=None):
    return subprocess.run(_command(out, *extra), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def _weights(run_dir):
    from iterconv_keras.loading import load_model

    return [np.asarray(w) for w in load_model(run_dir).weights]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    result = _run(out)
    assert result.returncode == 0, result.stderr
    return _weights(out)


def _resume_and_compare(out, uninterrupted):
    result = _run(out, "--resume")
    assert result.returncode == 0, result.stderr
    for a, b in zip(_weights(out), uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)
    with open(out / "history.json") as f:
        assert [h["epoch"] for h in json.load(f)] == [1, 2]
    leftovers = [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]
    assert not leftovers


@pytest.mark.parametrize("epoch", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_kill_while_a_checkpoint_is_written(tmp_path, uninterrupted, epoch):
    out = tmp_path / "run"
    result = _run(out, env={"ITERCONV_FAULT": f"checkpoint:{epoch}"})
    assert result.returncode == -signal.SIGKILL
    # The half-written checkpoint is not visible as a checkpoint.
    complete = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("epoch-"))
    assert complete == [f"epoch-{e:04d}" for e in range(1, epoch)]
    assert not (out / "model.keras").exists()
    _resume_and_compare(out, uninterrupted)


def test_kill_during_an_epoch(tmp_path, uninterrupted):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait until epoch 1 is checkpointed, then kill in the middle of epoch 2.
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "epoch-0001").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training ended or stalled"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    # The kill landed while training ran: resuming a finished run would prove nothing.
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    _resume_and_compare(out, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 2.0, 3.0])
def test_kill_at_arbitrary_times(tmp_path, uninterrupted, delay):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "config.json").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    # The kill landed while training ran: resuming a finished run would prove nothing.
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    _resume_and_compare(out, uninterrupted)
