"""Ray's private parts that clf leans on, on one list: each is reached from here and nowhere else in `clf/`, and
`PARTS` says what it is, where clf uses it, why, and what replaces it once Ray offers a public way. Checked against
Ray 2.60 (pinned in pyproject.toml). tests/test_ray_private.py touches every part (its import, attribute,
signature, or the environment variable Ray's module reads) in the fast lane: a Ray upgrade that moves one fails
there in seconds, naming it, rather than at a user's first fit(). The pin is what keeps them; the test is what
makes moving it safe.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: str  # what it is, in a few words
    module: str  # the Ray module that holds it
    attribute: str  # its dotted path in that module; for an environment variable, the variable's name
    kind: str  # "attribute", "callable" (with `parameters`), "class", or "env" (a variable Ray reads from os.environ)
    used_by: str  # where clf uses it
    why: str
    replacement: str  # what would replace it
    parameters: tuple[str, ...] = ()  # a callable's parameters clf passes or overrides


PARTS = (
    Part("Ray's single-machine mode", "ray._private.ray_constants", "ENABLE_RAY_CLUSTER", "attribute",
         "clf.session.loopback_mode", "every server of an embedded Ray on 127.0.0.1; read once at `import ray`",
         "a bind-address option of ray.init"),
    Part("the single-machine mode's variable", "ray._private.ray_constants", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
         "env", "clf.session.LOOPBACK_ENV", "the processes an embedded Ray starts inherit it", "the same option"),
    Part("this process's Ray node", "ray._private.worker", "_global_node", "attribute",
         "clf.session.connect", "the folder of Ray's own logs, where the driver's native stderr goes",
         "a public logs-dir accessor (ray.util.state needs the dashboard)"),
    Part("a Ray node's logs folder", "ray._private.node", "Node.get_logs_dir_path", "callable",
         "clf.session.connect", "as above", "as above", ("self",)),
    Part("the driver's printer of published errors", "ray._private.worker", "print_to_stdstream", "callable",
         "clf.session.ray_errors_to", "Ray prints the cluster's errors on every driver's stdout whatever "
         "log_to_driver says; the job says what a failure means in its own words", "an option to keep them in logs",
         ("data", "ignore_prefix")),
    Part("free resources of each node", "ray._private.state", "available_resources_per_node", "callable",
         "clf.cluster.cluster_nodes", "plans sized to what other work leaves free; ray.available_resources() is "
         "the cluster's sum", "ray.util.state.list_nodes (needs the dashboard, which an embedded Ray leaves out)"),
    Part("the autoscaler's cluster config", "ray._private.state", "state.get_cluster_config", "callable",
         "clf.cluster.autoscaler_groups", "what an autoscaler may add, as Ray Train reads it",
         "a public autoscaler API"),
    Part("the actor table", "ray._private.state", "actors", "callable", "clf.cluster.actors_waiting_for_resources",
         "a replica no node has room for waits as PENDING_CREATION: a deploy's deadline names it",
         "ray.util.state.list_actors (needs the dashboard)", ("actor_state_name",)),
    Part("the GCS key-value store", "ray.experimental.internal_kv", "_internal_kv_put", "callable",
         "clf.noticeboard", "training's progress from rank 0 to the driver with no process of its own",
         "an actor (one more process per run)", ("key", "value", "overwrite", "namespace")),
    Part("the GCS key-value store's read", "ray.experimental.internal_kv", "_internal_kv_get", "callable",
         "clf.noticeboard", "as above", "as above", ("key", "namespace")),
    Part("the GCS key-value store's delete", "ray.experimental.internal_kv", "_internal_kv_del", "callable",
         "clf.noticeboard", "as above", "as above", ("key", "namespace")),
    Part("the GCS key-value store's listing", "ray.experimental.internal_kv", "_internal_kv_list", "callable",
         "clf.ray_train.remove_placement_groups", "a search's trials' placement groups, by name", "as above",
         ("prefix", "namespace")),
    Part("a placement group from its id", "ray.util.placement_group", "PlacementGroup", "callable",
         "clf.ray_train.remove_placement_groups", "a stopped Tune trial leaves its workers' group; the search's "
         "driver removes it by the id rank 0 posted", "Ray Train removing it when Tune stops a trial", ("id",)),
    Part("Ray Train's default callbacks", "ray.train.v2.api.data_parallel_trainer",
         "DataParallelTrainer._create_default_callbacks", "callable", "clf.ray_train.Trainer",
         "leave out the PlacementGroupCleaner (an embedded Ray) and the DatasetsCallback (no datasets), and add "
         "the callback that posts a trial's placement group", "options of RunConfig", ("self",)),
    Part("Ray Train's Ctrl-C handler", "ray.train.v2.api.data_parallel_trainer",
         "DataParallelTrainer._register_sigint_handler", "callable", "clf.ray_train.Trainer",
         "Ray's handler ends the driver with exit 1 and no line; ours aborts and raises KeyboardInterrupt",
         "a handler that raises KeyboardInterrupt", ("self", "controller")),
    Part("Ray Train's datasets callback", "ray.train.v2._internal.callbacks.datasets", "DatasetsCallback", "class",
         "clf.ray_train.Trainer", "starts a DatasetManager actor for every run, datasets or none", "as above"),
    Part("Ray Train's placement group cleaner", "ray.train.v2._internal.callbacks.placement_group_callback",
         "PlacementGroupCleanerCallback", "class", "clf.ray_train.Trainer",
         "a detached actor polling the dashboard's state API, which an embedded Ray does not start", "as above"),
    Part("Ray Train's worker group callback", "ray.train.v2._internal.execution.callback", "WorkerGroupCallback",
         "class", "clf.ray_train.PostPlacementGroup", "the hook after the workers are placed",
         "a public callback API", ()),
    Part("the worker group's placement group", "ray.train.v2._internal.execution.worker_group.state",
         "WorkerGroupState", "class", "clf.ray_train.PostPlacementGroup",
         "get_worker_group_state().placement_group_handle.placement_group: the group to post", "as above"),
    Part("Ray Train's own failures", "ray.train.v2._internal.exceptions", "RayTrainError", "class",
         "clf.failures.training_failure", "a worker's failed health check or start: our one line, not a bug's "
         "traceback", "public exception classes"),
    Part("the placement-timeout failure", "ray.train.v2._internal.exceptions", "WorkerGroupStartupTimeoutError",
         "class", "clf.failures.training_failure", "told by its name: the workers could not be placed",
         "as above"),
    Part("Ray Train's preemption watcher", "ray.train.v2._internal.constants", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
         "env", "clf.session.EMBEDDED_ENV", "an actor per run that an embedded Ray's nodes never need",
         "a RunConfig option"),
    Part("Ray Train's health-check interval", "ray.train.v2._internal.constants", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
         "env", "clf.session.HEALTH_CHECK_ENV", "the end of training noticed in 0.5 s, not 2 s", "a RunConfig option"),
    Part("Tune's older output engine", "ray.tune.experimental.output", "RAY_AIR_NEW_OUTPUT", "env",
         "clf.ray_train.TUNE_ENV", "Tune's new engine prints its own progress whatever verbose says",
         "verbose=0 that is silent"),
    Part("Tune's automatic loggers", "ray.tune.utils.callback", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "env",
         "clf.ray_train.TUNE_ENV", "a CSV, JSON and TensorBoard log of every trial the job does not use",
         "a RunConfig option"),
    Part("Serve's HAProxy ingress", "ray.serve._private.constants", "RAY_SERVE_ENABLE_HA_PROXY", "env",
         "clf.deploy.HAPROXY_ENV", "--proxy haproxy", "a Serve option"),
    Part("Serve's client", "ray.serve.context", "_get_global_client", "callable", "clf.deploy.apply_application",
         "a Serve config deployed from Python (the only way 2.60 reconfigures running replicas; its public way is "
         "the dashboard's REST API, which an embedded Ray does not start)", "a public serve.deploy(config)"),
)


def touch(part: Part) -> None:
    """Look the part up in Ray as clf uses it; AssertionError (naming it) where it is not there or not as used."""
    where = f"{part.name} ({part.module}.{part.attribute})"
    try:
        module = importlib.import_module(part.module)
    except ImportError as e:
        raise AssertionError(f"{where}: its module is gone ({e})") from None
    if part.kind == "env":
        assert f'"{part.attribute}"' in inspect.getsource(module), f"{where}: Ray no longer reads this variable there"
        return
    value = module
    for name in part.attribute.split("."):
        assert hasattr(value, name), f"{where}: no {name}"
        value = getattr(value, name)
    if part.kind == "class":
        assert inspect.isclass(value), f"{where}: not a class"
    if part.kind == "callable":
        assert callable(value), f"{where}: not callable"
        parameters = set(inspect.signature(value).parameters)
        assert set(part.parameters) <= parameters, f"{where}: its parameters are {sorted(parameters)}"


# --- The accessors: clf reaches each part through these ---------------------------------------------------------


def single_machine_mode() -> None:
    import ray._private.ray_constants

    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def logs_dir() -> str:
    import ray._private.worker

    return ray._private.worker._global_node.get_logs_dir_path()


def divert_published_errors(write) -> None:
    """Ray's driver-side printer of the cluster's published errors replaced by `write(data, ignore_prefix)`."""
    import ray._private.worker

    ray._private.worker.print_to_stdstream = write


def free_resources_per_node() -> dict[str, dict[str, float]]:
    import ray._private.state

    return ray._private.state.available_resources_per_node()


def autoscaler_config():
    import ray._private.state

    return ray._private.state.state.get_cluster_config()


def actors_pending_creation() -> dict:
    import ray._private.state

    return ray._private.state.actors(actor_state_name="PENDING_CREATION")


def kv_put(key: bytes, value: bytes, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_get(key: bytes, namespace: str) -> bytes | None:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=namespace)


def kv_delete(key: bytes, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=namespace)


def kv_keys(prefix: str, namespace: str) -> list[bytes]:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_list(prefix, namespace=namespace)


def placement_group(id_hex: str):
    import ray
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(id_hex)))


def train_callbacks():
    """(DatasetsCallback, PlacementGroupCleanerCallback, WorkerGroupCallback) of Ray Train."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    return DatasetsCallback, PlacementGroupCleanerCallback, WorkerGroupCallback


def worker_group_placement_group(worker_group):
    return worker_group.get_worker_group_state().placement_group_handle.placement_group


def ray_train_error() -> type:
    from ray.train.v2._internal.exceptions import RayTrainError

    return RayTrainError


def is_startup_timeout(failure: BaseException) -> bool:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(failure, WorkerGroupStartupTimeoutError)


def serve_client():
    from ray.serve.context import _get_global_client

    return _get_global_client()
