"""Where a training run executes: the `tf.distribute` strategy behind ``iterconv train --strategy``.

- ``one-device``: TensorFlow's default strategy, one device (the first GPU if
  there is one, else the CPU); what iterconv did before it had strategies.
- ``mirrored``: `tf.distribute.MirroredStrategy`, one replica per device of this
  machine: every visible GPU, the first ``devices`` GPUs, or, on a machine without
  GPUs, ``devices`` logical devices carved out of the CPU. Those share the same
  cores and make nothing faster; they exist to test multi-replica training here.
- ``multi-worker``: `tf.distribute.MultiWorkerMirroredStrategy` over the machines
  that the ``TF_CONFIG`` environment variable lists, one process per machine.
- ``auto``: ``mirrored`` when more than one GPU is visible, else ``one-device``.

Whatever the strategy, ``batch_size`` is the global batch: each of the R replicas
trains on ``batch_size / R`` images of it, and the gradients are summed across
replicas, so a step is the one-device step on the same images (with batch
normalisation synchronised across replicas, see `compiling.build_and_compile`).
Only the chief of a multi-worker cluster writes the run directory; the other
workers write their copies to a temporary directory that is removed
(`run_dir_for_this_task`), as Keras' multi-worker checkpointing does.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile

import tensorflow as tf

from iterconv_keras.config import STRATEGIES
from iterconv_keras.errors import UsageError

TF_CONFIG = "TF_CONFIG"
# What a collective op raises when another worker stops (killed, crashed, unreachable).
COLLECTIVE_FAILURES = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
_CLUSTER_JOBS = ("chief", "worker")  # the jobs MultiWorkerMirroredStrategy trains with
# One strategy per set of devices and process: TensorFlow numbers the collective
# ops of every MirroredStrategy instance from the same start, so two instances
# over the same devices in one process collide (InvalidArgumentError in the
# all-reduce); and a process can set up multi-worker collectives only once.
_CREATED = {}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one process of a run trains.

    Args:
        strategy: the `tf.distribute.Strategy` to build and fit the model under.
        name: the strategy actually used (``auto`` resolved): one of
            ``one-device``, ``mirrored``, ``multi-worker``.
        replicas: replicas in sync over all workers (each trains on
            ``batch_size / replicas`` images of every global batch).
        workers: processes taking part (1 unless ``multi-worker``).
        task: this process in ``TF_CONFIG`` terms (``"worker 1"``), or ``"local"``.
        chief: whether this process writes the run directory.
    """

    strategy: object
    name: str
    replicas: int
    workers: int
    task: str
    chief: bool

    def describe(self):
        """The placement as a JSON-ready dict (the train summary's ``distribution``)."""
        return {"strategy": self.name, "replicas": self.replicas, "workers": self.workers, "task": self.task,
                "chief": self.chief}


def place(strategy="auto", devices=None, environ=None):
    """Create the strategy named ``strategy`` and say where this process trains.

    Call it before TensorFlow runs anything: logical CPU devices and the
    collective ops of ``multi-worker`` can only be set up before TensorFlow
    initialises its runtime.

    Args:
        strategy: one of `config.STRATEGIES`.
        devices: ``mirrored`` only: the number of devices (None: every GPU, or the CPU).
        environ: the environment to read ``TF_CONFIG`` from (default ``os.environ``).

    Raises:
        UsageError: an unknown strategy, ``devices`` that are not there, a
            missing or malformed ``TF_CONFIG`` for ``multi-worker``, or a
            ``TF_CONFIG`` naming a cluster beside another strategy.
    """
    environ = os.environ if environ is None else environ
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if devices is not None and strategy != "mirrored":
        raise UsageError(f"devices applies to strategy 'mirrored' only, got devices={devices!r} with {strategy!r}")
    if strategy == "multi-worker":
        return _multi_worker(read_tf_config(environ))
    _refuse_cluster(environ, strategy)
    if strategy == "mirrored" or (strategy == "auto" and len(tf.config.list_physical_devices("GPU")) > 1):
        mirrored = _mirrored(devices)
        return Placement(mirrored, "mirrored", mirrored.num_replicas_in_sync, 1, "local", True)
    return Placement(tf.distribute.get_strategy(), "one-device", 1, 1, "local", True)


def writes_run_dir(strategy, environ=None):
    """Whether this process writes the run directory: always, except on a multi-worker task other than the chief.

    Read from ``TF_CONFIG`` without starting TensorFlow, so a chief can check its
    run directory before it waits for the other workers.

    Raises:
        UsageError: a missing or malformed ``TF_CONFIG`` for ``multi-worker``.
    """
    return strategy != "multi-worker" or read_tf_config(environ).chief


def per_replica_batch(batch_size, replicas):
    """``batch_size / replicas``, or `UsageError` when the global batch does not split evenly.

    Uneven shares would weight the replicas' images unequally in the summed
    gradient (each replica averages its own loss), so they are refused.
    """
    if batch_size % replicas:
        raise UsageError(f"batch_size {batch_size} is the global batch and must split evenly over the {replicas} "
                         f"replicas; choose a multiple of {replicas}")
    return batch_size // replicas


def shard_by_data(dataset):
    """``dataset`` with tf.data's DATA auto-shard policy, for strategies that shard input by worker.

    Under ``multi-worker`` every worker builds the whole pipeline (it reads from
    memory or a generator, not from files) and keeps its replicas' part of each
    global batch: tf.data splits every batch into per-replica batches and hands
    each worker its own. The images of a step are those of the one-process step.
    The default policy (AUTO) would first look for files to shard and fall back
    to DATA with a warning. Without such a strategy the option does nothing.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@contextlib.contextmanager
def run_dir_for_this_task(placement, out):
    """The directory this process writes its run files to: ``out`` for the chief.

    Another worker must still save (saving can read variables that are summed
    across workers, a collective every worker joins) but must not touch the run
    directory, so it writes into a temporary directory removed on exit.
    """
    if placement.chief:
        yield out
        return
    scratch = tempfile.mkdtemp(prefix=f"iterconv-{placement.task.replace(' ', '')}-")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def failure_reason(error):
    """The gist of a `COLLECTIVE_FAILURES` error in one short line, without TensorFlow's node trace."""
    text = " ".join(str(getattr(error, "message", error)).split())
    start = text.find("aborted by:")
    if start < 0:
        return type(error).__name__
    reason = text[start + len("aborted by:"):]
    for end in (" Additional GRPC", " The error could be", " [[", " The tasks have crashed"):
        reason = reason.split(end)[0]
    reason = re.sub(r"^\s*Error reported from \S+: ", "", reason).strip()
    return f"{type(error).__name__}: {reason[:200]}"


@dataclasses.dataclass(frozen=True)
class ClusterTask:
    """This process's place in a ``TF_CONFIG`` cluster.

    Args:
        cluster: ``{"chief": [...], "worker": [...]}`` as given (``host:port`` strings).
        task_type: ``"chief"`` or ``"worker"``.
        task_index: index of this task in its job.
    """

    cluster: dict
    task_type: str
    task_index: int

    @property
    def workers(self):
        return sum(len(self.cluster.get(job, ())) for job in _CLUSTER_JOBS)

    @property
    def chief(self):
        """TensorFlow's rule: the ``chief`` task, or worker 0 when the cluster has no chief."""
        if "chief" in self.cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0


def read_tf_config(environ=None):
    """Parse and check ``TF_CONFIG`` for ``multi-worker`` training.

    Raises:
        UsageError: naming what is missing or malformed.

    Example:
        >>> read_tf_config({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:2222", "b:2222"]},
        ...                                             "task": {"type": "worker", "index": 1}})}).chief
        False
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG)
    if not text:
        raise UsageError("strategy multi-worker needs the TF_CONFIG environment variable (the cluster's "
                         "'host:port' addresses and this process's task), see docs/scaling.md")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(document, dict):
        raise UsageError(f"TF_CONFIG must be a JSON object with 'cluster' and 'task', got {text!r}")
    cluster = _check_cluster(document.get("cluster"))
    task = document.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise UsageError(f"TF_CONFIG 'task' must name a job of the cluster ({', '.join(cluster)}) as "
                         f"{{\"type\": ..., \"index\": ...}}, got {task!r}")
    index = task.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise UsageError(f"TF_CONFIG task index must be 0..{len(cluster[task['type']]) - 1} for job "
                         f"{task['type']!r}, got {index!r}")
    return ClusterTask(cluster, task["type"], index)


def _check_cluster(cluster):
    if not isinstance(cluster, dict) or not cluster:
        raise UsageError(f"TF_CONFIG 'cluster' must map jobs to lists of 'host:port' addresses, got {cluster!r}")
    others = sorted(set(cluster) - set(_CLUSTER_JOBS))
    if others or "worker" not in cluster and "chief" not in cluster:
        raise UsageError(f"TF_CONFIG cluster jobs for multi-worker training are 'chief' and 'worker', got "
                         f"{sorted(cluster)}")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(map(_is_address, addresses)):
            raise UsageError(f"TF_CONFIG cluster job {job!r} must list 'host:port' addresses, got {addresses!r}")
    if len(cluster.get("chief", ())) > 1:
        raise UsageError(f"TF_CONFIG cluster has one chief at most, got {cluster['chief']!r}")
    return cluster


def _is_address(address):
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _refuse_cluster(environ, strategy):
    # Each worker of a cluster would train alone and all would write the same run directory.
    if not environ.get(TF_CONFIG):
        return
    try:
        tasks = read_tf_config(environ).workers
    except UsageError:
        return  # not a multi-worker TF_CONFIG: nothing to contradict
    if tasks > 1:
        raise UsageError(f"TF_CONFIG describes a cluster of {tasks} workers but the strategy is {strategy!r}; "
                         "use strategy multi-worker, or unset TF_CONFIG to train on this machine alone")


def _mirrored(devices):
    if devices is None:
        return _once(("mirrored", None), tf.distribute.MirroredStrategy)  # every GPU, or the CPU
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise UsageError(f"devices must be an integer >= 1, got {devices!r}")
    # Physical devices: listing logical ones would start TensorFlow before the CPU can be split.
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        names = _cpu_devices(devices)
    elif devices > len(gpus):
        raise UsageError(f"devices {devices} asks for more GPUs than the {len(gpus)} visible")
    else:
        names = [gpu.name for gpu in tf.config.list_logical_devices("GPU")[:devices]]
    return _once(("mirrored", tuple(names)), lambda: tf.distribute.MirroredStrategy(names))


def _once(key, create):
    """The strategy made for ``key`` in this process, made by ``create()`` the first time."""
    if key not in _CREATED:
        _CREATED[key] = create()
    return _CREATED[key]


def _cpu_devices(count):
    """Names of ``count`` logical CPU devices, splitting the physical CPU if TensorFlow has not started yet."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        pass  # already initialised: use the logical devices it has, if there are enough
    available = tf.config.list_logical_devices("CPU")
    if len(available) < count:
        raise UsageError(f"devices {count}: TensorFlow already runs with {len(available)} logical CPU devices; "
                         "logical devices can only be created before TensorFlow starts (use a fresh process)")
    return [device.name for device in available[:count]]


def _multi_worker(task):
    try:
        strategy = _once(("multi-worker",), _KerasMultiWorkerMirroredStrategy)
    except RuntimeError as exc:
        raise UsageError(f"strategy multi-worker must be set up before TensorFlow starts (use a fresh process): "
                         f"{exc}") from None
    label = f"{task.task_type} {task.task_index}"
    return Placement(strategy, "multi-worker", strategy.num_replicas_in_sync, task.workers, label, task.chief)


class _KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` with the two reductions Keras 3's ``fit`` asks of it.

    Keras 3.15's TensorFlow trainer calls ``strategy.reduce`` under a
    multi-worker strategy with (1) a tuple of per-replica input batches, to learn
    the input shapes before training, and (2) per-replica scalar metrics with
    ``axis=0``; TensorFlow's strategy refuses both (keras-team/keras#20585: Keras
    3 ``fit`` fails under MultiWorkerMirroredStrategy). Here a structure is
    reduced leaf by leaf, and a scalar with ``axis=0`` as with ``axis=None``:
    the mean over replicas that Keras takes under `tf.distribute.MirroredStrategy`.
    tests/test_distribution.py fails, saying so, once the installed Keras stops
    asking for either; then this subclass can go.
    """

    def reduce(self, reduce_op, value, axis=None):
        if isinstance(value, (tuple, list, dict)):
            return tf.nest.map_structure(lambda v: None if v is None else self.reduce(reduce_op, v, axis), value)
        if axis is not None and self.experimental_local_results(value)[0].shape.rank == 0:
            axis = None
        return super().reduce(reduce_op, value, axis)
