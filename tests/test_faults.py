"""Training survives SIGKILL at any moment: resume gives the uninterrupted weights.

Each trial starts ``iterconv train`` in a subprocess, kills it with SIGKILL,
resumes it with ``--resume`` and compares the final weights bitwise with an
uninterrupted run of the same command (also a subprocess, so both use the same
process-level TensorFlow configuration). Kills at an exact point go through the
test-only runner ``tests/_fault_injection.py``; the library has no fault hook.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_RUNNER = os.path.join(REPO, "tests", "_fault_injection.py")

ARGS = ["--variant", "tiny", "--epochs", "2", "--batch-size", "32", "--train-size", "256",
        "--validation-size", "32", "--test-size", "32", "--lr", "0.01", "--seed", "5"]


def _command(out, *extra, inject=False):
    entry = [FAULT_RUNNER] if inject else ["-m", "iterconv_cli.main"]
    return [sys.executable, *entry, "train", *ARGS, "--out", str(out), *extra]


def _run(out, *extra, env=None, inject=False):
    return subprocess.run(_command(out, *extra, inject=inject), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def _weights(run_dir):
    from iterconv_keras.loading import load_model

    return [np.asarray(w) for w in load_model(run_dir).weights]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The plain ``iterconv train`` run, with the fault variable set as the injected runs set it."""
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    return out, _run(out, env={"ITERCONV_FAULT": "checkpoint:2"})


@pytest.fixture(scope="module")
def uninterrupted(plain_run):
    out, result = plain_run
    assert result.returncode == 0, result.stderr
    return _weights(out)


def test_the_fault_variable_does_nothing_outside_the_tests(plain_run):
    # Review D4: a production run must not react to a test's fault variable.
    out, result = plain_run
    assert result.returncode == 0, result.stderr
    assert (out / "model.keras").is_file() and (out / "checkpoints" / "epoch-0002").is_dir()
    sources = [os.path.join(base, name) for folder in ("iterconv_keras", "cli")
               for base, _, names in os.walk(os.path.join(REPO, folder)) for name in names if name.endswith(".py")]
    assert not [path for path in sources if "ITERCONV_FAULT" in open(path).read()]


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
    result = _run(out, env={"ITERCONV_FAULT": f"checkpoint:{epoch}"}, inject=True)
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
